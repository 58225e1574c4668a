"""Confirmations before destructive tool calls, and their audit log."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from justscan_mcp.models import Caller, Principal, RecoveryResult, ToolConfirmation
from justscan_mcp.service.base import UseCases

CONFIRMED_TOOLS = ("delete_webhook", "rotate_secret", "recover_deliveries")
ANSWERS = ("accept", "decline", "cancel")


class ConfirmationUseCases(UseCases):
    """What a person is asked before an assistant deletes a webhook, rotates its secret or
    re-sends its failed deliveries, and the record of their answer."""

    if TYPE_CHECKING:  # provided by DeliveryUseCases, beside this class in `Service`

        def recover_deliveries(
            self, *, principal: Caller, webhook_id: int, since: Any, until: Any = None, dry_run: bool = False
        ) -> RecoveryResult: ...

    def confirmation_question(
        self, *, principal: Caller, tool: str, args: Mapping[str, Any]
    ) -> tuple[str, int] | None:
        """The question for `tool` called with `args`, naming the webhook by its URL, and the
        webhook's id; None when the call needs no confirmation (another tool, a dry run, or
        nothing to recover).

        Raises:
            InvalidInput, NotFound: as the call itself would.
        """
        if tool not in CONFIRMED_TOOLS:
            return None
        hook = self._own_webhook(principal.team_id, args.get("webhook_id"))
        assert hook.id is not None
        name = f"webhook #{hook.id} ({hook.url})"
        if tool == "delete_webhook":
            return f"Delete {name}? Its delivery log goes with it. This cannot be undone.", hook.id
        if tool == "rotate_secret":
            grace = args.get("grace_seconds")
            until = "at once" if grace == 0 else "after the grace period (24 hours unless set)"
            return (
                f"Issue a new signing secret for {name}? The receiver must switch to it; the old one "
                f"stops signing {until}.",
                hook.id,
            )
        if args.get("dry_run"):
            return None
        counted = self.recover_deliveries(
            principal=principal,
            webhook_id=hook.id,
            since=args.get("since"),
            until=args.get("until"),
            dry_run=True,
        )
        if counted.count == 0:
            return None
        more = " (and more after these: the limit per call is 10,000)" if counted.more else ""
        return (
            f"Re-send {counted.count} failed deliveries{more} of {name} created since {args.get('since')}? "
            "The receiver gets each event again.",
            hook.id,
        )

    def record_confirmation(
        self, *, principal: Principal, tool: str, webhook_id: int | None, question: str, answer: str
    ) -> None:
        """Append to the audit log."""
        self.store.add_confirmation(
            ToolConfirmation(
                team_id=principal.team_id,
                key_id=principal.key_id,
                tool=tool,
                webhook_id=webhook_id,
                question=question[:1000],
                answer=answer if answer in ANSWERS else "cancel",
                created_at=self.clock(),
            )
        )

    def recent_confirmations(self, *, limit: int = 100) -> Sequence[ToolConfirmation]:
        """The operator's view of the audit log, newest first."""
        return self.store.recent_confirmations(limit=limit)
