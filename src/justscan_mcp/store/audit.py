"""The audit log: confirmations asked before destructive tool calls, and their answers."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import col, select

from justscan_mcp.models import ToolConfirmation
from justscan_mcp.store.db import Database


class AuditRepository(Database):
    """Append and read the confirmation log."""

    def add_confirmation(self, row: ToolConfirmation) -> None:
        """Raises: StoreUnavailable."""
        with self.session(write=True) as s:
            s.add(row)

    def recent_confirmations(self, *, limit: int) -> Sequence[ToolConfirmation]:
        """Newest first, across teams (the operator's view)."""
        with self.session() as s:
            return s.exec(
                select(ToolConfirmation).order_by(col(ToolConfirmation.id).desc()).limit(limit)
            ).all()
