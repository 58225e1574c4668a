"""Retention: deleting what is old enough, in small batches, one process per database at a time."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from justscan_mcp.store.db import MIGRATION_LOCK, Database

# One advisory-lock key for the retention sweep (PostgreSQL), beside the migrations' key.
RETENTION_LOCK = MIGRATION_LOCK + 1


@dataclass(frozen=True)
class Purged:
    deliveries: int = 0
    events: int = 0
    idempotency_keys: int = 0
    skipped: bool = False  # another process held the sweep


class RetentionRepository(Database):
    """The sweep behind JUSTSCAN_RETENTION_DAYS."""

    def purge(self, *, before: datetime | None, now: datetime, batch: int = 1000) -> Purged:
        """One batch of each: finished deliveries last changed before `before` (their attempts go
        with them), events older than `before` with no delivery left, and idempotency keys that
        expired by `now`. `before=None` keeps deliveries and events (retention off). Events
        that decided a first_scan are kept, and `first_scans` rows are never deleted: they decide
        first_scan forever. On PostgreSQL a transaction-scoped advisory lock keeps it to one
        process at a time (another one skips); SQLite's write lock serialises it.

        Raises:
            StoreUnavailable.
        """
        m = self._mark
        dt = self._dt_bind
        with self._driver(write=True) as cur:
            if self.backend == "postgresql":
                cur.execute("SELECT pg_try_advisory_xact_lock(%s)", (RETENTION_LOCK,))
                if not cur.fetchone()[0]:
                    return Purged(skipped=True)
            deliveries = events = 0
            if before is not None:
                # Oldest first along the primary key: old rows have low ids, so a batch is found
                # without reading the whole table. Attempts go by ON DELETE CASCADE.
                cur.execute(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"  # noqa: S608
                    f" WHERE state IN ('succeeded', 'failed') AND updated_at < {m} ORDER BY id LIMIT {m})",
                    (dt(before), batch),
                )
                deliveries = cur.rowcount
                cur.execute(
                    "DELETE FROM events WHERE id IN (SELECT e.id FROM events e"  # noqa: S608
                    f" WHERE e.created_at < {m}"
                    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)"
                    " AND NOT EXISTS (SELECT 1 FROM first_scans f WHERE f.event_id = e.id)"
                    f" ORDER BY e.id LIMIT {m})",
                    (dt(before), batch),
                )
                events = cur.rowcount
            cur.execute(
                "DELETE FROM idempotency_keys WHERE (team_id, key) IN (SELECT team_id, key"  # noqa: S608
                f" FROM idempotency_keys WHERE expires_at < {m} LIMIT {m})",
                (dt(now), batch),
            )
            return Purged(deliveries=deliveries, events=events, idempotency_keys=cur.rowcount)
