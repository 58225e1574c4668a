"""Operational records: confirmations asked before destructive tool calls, and heartbeats."""

from __future__ import annotations

from collections.abc import Sequence

from sqlmodel import col, select

from justscan_mcp.models import DispatcherBeat, ToolConfirmation
from justscan_mcp.store.db import Database


class AuditRepository(Database):
    """The confirmation log and the dispatchers' heartbeats."""

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

    # --- dispatcher heartbeats ----------------------------------------------------------------

    def beat(self, row: DispatcherBeat) -> None:
        """Insert or refresh a dispatcher's heartbeat."""
        with self.session(write=True) as s:
            s.merge(row)

    def drop_beat(self, worker_id: str) -> None:
        with self.session(write=True) as s:
            found = s.get(DispatcherBeat, worker_id)
            if found is not None:
                s.delete(found)

    def dispatcher_beats(self) -> Sequence[DispatcherBeat]:
        """Every recorded heartbeat, newest first (the caller judges which are alive)."""
        with self.session() as s:
            return s.exec(select(DispatcherBeat).order_by(col(DispatcherBeat.last_beat_at).desc())).all()
