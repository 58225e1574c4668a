"""The outbox: the delivery hot path (record, claim, complete) and nothing else.

Record an event with its deliveries in one transaction, claim due work under a lease, save
attempts, and tell other processes that work is due (PostgreSQL NOTIFY, or the SQLite file probe).

Its statements are here together. The claim and the save run as driver SQL: SQLAlchemy's
per-row compile, bind and coercion work was most of a worker's database time.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import func, text, update
from sqlmodel import Session, col, select

from justscan_mcp.errors import Conflict
from justscan_mcp.models import (
    OPEN_STATES,
    OPEN_STATES_SQL,
    Delivery,
    Event,
    IdempotencyKey,
    Webhook,
    outcome_class,
    storable_text,
)
from justscan_mcp.ratelimit import take
from justscan_mcp.store.db import Database

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "justscan_deliveries"
# Appended to a claim's token on the rows it took over from an expired lease (see claim_due).
TAKEN_OVER = "+"


class Outbox(Database):
    """Recording, claiming and completing deliveries."""

    # --- events and deliveries ----------------------------------------------------------------

    def record_event(
        self,
        *,
        team_id: int,
        event: str,
        payload: bytes,
        now: datetime,
        first_scan: tuple[int, bytes] | None = None,
    ) -> tuple[int, list[int]]:
        """Record an event and fan it out, in one transaction (the outbox): one pending delivery
        per active webhook of the team subscribed to it. With `first_scan=(qr_code_id, payload)`
        the first scan of that QR code also records a first_scan event; the primary key of
        `first_scans` decides which scan is first, also under concurrent scans.

        Returns the event id and the ids of every delivery created (first_scan ones included).
        """
        item = NewEvent(team_id=team_id, event=event, payload=payload, first_scan=first_scan)
        return self.record_events(items=[item], now=now)[0]

    def record_events_once(
        self,
        *,
        team_id: int,
        key: str,
        request_hash: str,
        answer: Callable[[list[tuple[int, list[int]]]], str],
        expires_at: datetime,
        items: Sequence[NewEvent],
        now: datetime,
    ) -> tuple[str, bool]:
        """`record_events` under an idempotency key, in one transaction. The first use of the key
        records the events and stores `answer(results)`; a repeat with the same `request_hash`
        returns that stored answer and records nothing. The key's primary key decides which of
        two concurrent requests is first: the other waits for it to commit (PostgreSQL's unique
        check; SQLite's write lock) and then replays. An expired key is used afresh. Returns
        (the answer, whether it was replayed).

        Raises:
            Conflict: (Idempotency-Key) the key was used with a different request.
            StoreUnavailable.
        """
        with self.session(write=True) as s:
            values = {
                "team_id": team_id,
                "key": key,
                "request_hash": request_hash,
                "response": "",
                "created_at": now,
                "expires_at": expires_at,
            }
            if self.backend == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as pg_insert

                stmt: Any = pg_insert(IdempotencyKey).values(**values).on_conflict_do_nothing()
            else:
                from sqlalchemy.dialects.sqlite import insert as sqlite_insert

                stmt = sqlite_insert(IdempotencyKey).values(**values).on_conflict_do_nothing()
            claimed = s.execute(stmt.returning(col(IdempotencyKey.key))).first()
            if claimed is None:
                row = s.exec(
                    select(IdempotencyKey)
                    .where(IdempotencyKey.team_id == team_id)
                    .where(IdempotencyKey.key == key)
                    .with_for_update()
                ).one()
                if row.expires_at > now:
                    if row.request_hash != request_hash:
                        raise Conflict(
                            "Idempotency-Key",
                            "this Idempotency-Key was already used with a different request; use a new key",
                        )
                    return row.response, True
                row.request_hash, row.created_at, row.expires_at = request_hash, now, expires_at
                s.add(row)
                s.flush()
            # The events on the driver cursor of this same transaction.
            cur = s.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                results = self._record_many(cur, items, now) if items else []
            finally:
                cur.close()
            response = answer(results)
            s.execute(
                update(IdempotencyKey)
                .where(col(IdempotencyKey.team_id) == team_id)
                .where(col(IdempotencyKey.key) == key)
                .values(response=response)
            )
            return response, False

    def record_events(self, *, items: Sequence[NewEvent], now: datetime) -> list[tuple[int, list[int]]]:
        """Record many events, each fanned out like `record_event`, in one transaction: what a
        batch request and the group commit of concurrent requests write. One statement per
        table, whatever the count: the teams' active webhooks (FOR SHARE on PostgreSQL), the
        events, the first_scans claim (the primary key decides the first scan of a QR code, also
        between two scans of one batch: the earlier one wins), and the deliveries. One NOTIFY.

        Returns, per item in order, the event id and its delivery ids (first_scan ones after).

        Raises:
            StoreUnavailable. Conflict, InvalidInput: a row the database refuses; nothing of the
                batch is recorded then (the caller records the items one by one to find it).
        """
        if not items:
            return []
        with self._driver(write=True) as cur:
            return self._record_many(cur, items, now, commit=True)

    def record_events_by_keys(
        self,
        *,
        key_hashes: Sequence[str],
        build: Callable[[Mapping[str, KeyRow]], Sequence[NewEvent]],
        most: int,
        now: datetime,
    ) -> list[tuple[int, list[int]]]:
        """The group commit's transaction: read the API keys with these hashes, let `build` turn
        them into the events to record (at most `most`; it refuses what the keys may not do),
        and record those, all in one transaction: one key lookup per batch of requests, not one
        per request. Returns, per event built, its id and delivery ids.

        Raises:
            StoreUnavailable. Conflict, InvalidInput: as record_events (nothing is recorded).
        """
        with self._driver(write=True) as cur:
            keys_sql = (
                "SELECT key_hash, id, team_id, scopes, revoked_at, last_used_at, prefix"  # noqa: S608
                f" FROM api_keys WHERE key_hash IN ({self._marks(len(key_hashes))})"
            )
            hooks = None
            event_pool = None
            if not key_hashes:
                rows: list[Any] = []
            elif self.backend == "postgresql":
                # The keys, their teams' webhooks and the event ids in one round trip, after
                # psycopg's BEGIN (a round trip of its own): ids for `most` events and as many
                # first_scans, the unused ones gaps. Four in all (tests/test_round_trips.py).
                conn = cur.connection
                with self._pipeline(cur):
                    kc, hc, ic = conn.cursor(), conn.cursor(), conn.cursor()
                    kc.execute(keys_sql, list(key_hashes))
                    hc.execute(
                        self._hooks_sql(
                            f"SELECT team_id FROM api_keys WHERE key_hash IN ({self._marks(len(key_hashes))})"  # noqa: S608
                        ),
                        list(key_hashes),
                    )
                    ic.execute(self._IDS_SQL.format(table="events"), (2 * most,))
                rows = kc.fetchall()
                hooks = self._hooks_of(hc.fetchall())
                event_pool = list(ic.fetchone()[0])
            else:
                cur.execute(keys_sql, list(key_hashes))
                rows = cur.fetchall()
            read_dt = self._dt_result
            keys = {
                key_hash: KeyRow(
                    id=kid,
                    team_id=team,
                    scopes=frozenset(self._json_result(scopes)),
                    revoked=revoked is not None,
                    last_used_at=read_dt(used),
                    prefix=prefix,
                )
                for key_hash, kid, team, scopes, revoked, used, prefix in rows
            }
            items = list(build(keys))
            if len(items) > most:
                raise ValueError(f"build returned {len(items)} events, more than most={most}")
            if not items:
                return []
            return self._record_many(cur, items, now, hooks=hooks, event_pool=event_pool, commit=True)

    def _hooks_sql(self, teams: str) -> str:
        """The active webhooks of the teams `teams` (a list of placeholders, or a subquery)."""
        # FOR SHARE (PostgreSQL): a concurrent delete or deactivation of one of these webhooks
        # waits for this transaction, or this one sees its result; SQLite's write lock already
        # serialises them.
        lock = " FOR SHARE" if self.backend == "postgresql" else ""
        return f"SELECT id, team_id, events FROM webhooks WHERE team_id IN ({teams}) AND active ORDER BY id{lock}"  # noqa: S608

    def _hooks_of(self, rows: Sequence[Any]) -> dict[int, list[tuple[int, list[str]]]]:
        hooks: dict[int, list[tuple[int, list[str]]]] = {}
        for hook_id, team_id, events in rows:
            hooks.setdefault(team_id, []).append((hook_id, self._json_result(events)))
        return hooks

    def _record_many(
        self,
        cur: Any,
        items: Sequence[NewEvent],
        now: datetime,
        *,
        hooks: dict[int, list[tuple[int, list[str]]]] | None = None,
        event_pool: Sequence[int] | None = None,
        commit: bool = False,
    ) -> list[tuple[int, list[int]]]:
        """The body of `record_events`, on a driver cursor inside the caller's write transaction
        (`hooks`: the teams' active webhooks when the caller has read them already;
        `event_pool`: PostgreSQL ids for the events and their first_scans, likewise; `commit`:
        the last statements end the transaction, so its COMMIT rides with them).

        On PostgreSQL the statements go in three round trips (psycopg's pipeline mode; plus its
        BEGIN when they start the transaction), two when the caller's first one read the
        webhooks and the event ids: the webhooks and the event ids from their sequence (for
        every possible first_scan too; unused ones are gaps); the delivery ids, the events and
        the first_scans claim; the first_scan events, the deliveries, the NOTIFY and the COMMIT.
        SQLite runs them one by one in C, on a local file."""
        pg = self.backend == "postgresql"
        m = self._mark
        # The first scan of each (team, QR code) not yet seen, earliest in the batch first.
        firsts: dict[tuple[int, int], int] = {}
        for n, it in enumerate(items):
            if it.first_scan is not None:
                firsts.setdefault((it.team_id, it.first_scan[0]), n)
        teams = sorted({it.team_id for it in items})
        if pg and (hooks is None or event_pool is None):
            with self._pipeline(cur):
                hc, ic = cur.connection.cursor(), cur.connection.cursor()
                if hooks is None:
                    hc.execute(self._hooks_sql(self._marks(len(teams))), teams)
                if event_pool is None:
                    ic.execute(self._IDS_SQL.format(table="events"), (len(items) + len(firsts),))
            if hooks is None:
                hooks = self._hooks_of(hc.fetchall())
            if event_pool is None:
                event_pool = list(ic.fetchone()[0])
        elif hooks is None:
            cur.execute(self._hooks_sql(self._marks(len(teams))), teams)
            hooks = self._hooks_of(cur.fetchall())
        assert hooks is not None
        found = hooks
        stamp = self._dt_bind(now)

        def subscribed(team: int, name: str) -> list[int]:
            return [hook for hook, events in found.get(team, []) if name in events]

        event_pool = event_pool or []
        assert not pg or len(event_pool) >= len(items) + len(firsts)
        pool_cursor = claim = None
        with self._pipeline(cur):
            if pg:
                most = sum(len(subscribed(it.team_id, it.event)) for it in items) + sum(
                    len(subscribed(team, "first_scan")) for team, _ in firsts
                )
                pool_cursor = cur.connection.cursor()
                pool_cursor.execute(self._IDS_SQL.format(table="deliveries"), (most,))
            event_ids = self._insert_events(
                cur, [(it.team_id, it.event, it.payload) for it in items], stamp, event_pool
            )
            won: list[int] = []
            if firsts:
                # In key order: two transactions claiming overlapping codes lock them in one order.
                rows = [(team, qr, event_ids[n]) for (team, qr), n in sorted(firsts.items())]
                claim = cur.connection.cursor() if pg else cur
                if pg:  # arrays: a statement with thousands of placeholders costs its parse
                    claim.execute(
                        "INSERT INTO first_scans (team_id, qr_code_id, event_id)"
                        " SELECT * FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[])"
                        " ON CONFLICT DO NOTHING RETURNING team_id, qr_code_id",
                        [[r[k] for r in rows] for k in range(3)],
                    )
                else:
                    claim.execute(
                        "INSERT INTO first_scans (team_id, qr_code_id, event_id) VALUES "  # noqa: S608
                        + ", ".join([f"({m}, {m}, {m})"] * len(rows))
                        + " ON CONFLICT DO NOTHING RETURNING team_id, qr_code_id",
                        [v for r in rows for v in r],
                    )
        if claim is not None:
            won = sorted(firsts[(team, qr)] for team, qr in claim.fetchall())
        delivery_pool: list[int] = list(pool_cursor.fetchone()[0]) if pool_cursor is not None else []
        first_rows = []
        for n in won:
            first = items[n].first_scan
            assert first is not None
            payload = first[1]  # built only for the scans that are first
            first_rows.append((items[n].team_id, "first_scan", payload() if callable(payload) else payload))
        with self._pipeline(cur, commit=commit):
            first_ids = self._insert_events(cur, first_rows, stamp, event_pool[len(items) :])
            # Deliveries: the events in order, each followed by its first_scan's.
            wanted: list[tuple[int, int, int, str]] = []  # (item, webhook, event id, name) per delivery
            order = [(n, event_ids[n], items[n].event) for n in range(len(items))]
            order += [(n, fid, "first_scan") for n, fid in zip(won, first_ids, strict=True)]
            for n, event_id, name in order:
                wanted += [(n, hook, event_id, name) for hook in subscribed(items[n].team_id, name)]
            delivery_ids = self._insert_deliveries(
                cur,
                [(items[n].team_id, hook, event_id, name) for n, hook, event_id, name in wanted],
                stamp,
                delivery_pool,
            )
            if delivery_ids and pg:
                cur.execute("SELECT pg_notify(%s, '')", (NOTIFY_CHANNEL,))
        out: list[tuple[int, list[int]]] = [(event_ids[n], []) for n in range(len(items))]
        for (n, _, _, _), did in zip(wanted, delivery_ids, strict=True):
            out[n][1].append(did)
        return out

    @contextlib.contextmanager
    def _pipeline(self, cur: Any, *, commit: bool = False) -> Iterator[None]:
        """PostgreSQL: the statements of the block in one round trip; elsewhere nothing. Read
        their results after the block: a fetch inside it costs a round trip of its own (a flush
        request and its wait) before the block's closing sync and its wait.

        `commit=True` sends the transaction's COMMIT in the same round trip, for a block that
        ends the transaction (`_driver`'s own commit then finds nothing left to do). It goes as
        a statement: psycopg's `commit()` syncs and waits, and the block's exit syncs and waits
        again. Results read after the block were committed."""
        if self.backend != "postgresql":
            yield
            return
        with cur.connection.pipeline():
            yield
            if commit:
                # On a cursor of its own: `cur` keeps the last result of the block for reading.
                cur.connection.execute("COMMIT")

    # PostgreSQL: n ids from a table's sequence in one statement, so rows inserted in one
    # statement are known by id without relying on the order of RETURNING. The sequence is
    # looked up once, in a sub-select (an InitPlan) cast to regclass: written as the argument
    # of nextval, pg_get_serial_sequence ran for every id, parsing the name and searching the
    # catalog each time (6 µs an id against 0.6, measured on 100,000 ids).
    _IDS_SQL = (
        "SELECT ARRAY(SELECT nextval((SELECT pg_get_serial_sequence('{table}', 'id')::regclass))"
        " FROM generate_series(1, %s))"
    )

    def _insert_events(
        self, cur: Any, rows: Sequence[tuple[int, str, bytes]], stamp: Any, ids: Sequence[int]
    ) -> list[int]:
        """Insert events; PostgreSQL takes their ids from `ids` (at least as many as rows)."""
        if not rows:
            return []
        if self.backend == "postgresql":
            # One statement over arrays: executemany sent a statement per row (22 µs each).
            mine = list(ids[: len(rows)])
            cur.execute(
                "INSERT INTO events (id, team_id, name, payload, created_at)"
                " SELECT i, t, n, p, %s FROM unnest(%b::bigint[], %b::bigint[], %b::text[], %b::text[]) AS r(i, t, n, p)",
                (
                    stamp,
                    mine,
                    [r[0] for r in rows],
                    [r[1] for r in rows],
                    [r[2].decode("utf-8") for r in rows],
                ),
            )
            return mine
        cur.executemany(
            "INSERT INTO events (team_id, name, payload, created_at) VALUES (?, ?, ?, ?)",
            [(team, name, payload.decode("utf-8"), stamp) for team, name, payload in rows],
        )
        return self._sqlite_ids(cur, len(rows))

    @staticmethod
    def _sqlite_ids(cur: Any, n: int) -> list[int]:
        """The ids of the n rows just inserted by one executemany: consecutive, because the
        tables are AUTOINCREMENT and this transaction holds SQLite's write lock."""
        cur.execute("SELECT last_insert_rowid()")
        last = cur.fetchone()[0]
        return list(range(last - n + 1, last + 1))

    def _insert_deliveries(
        self, cur: Any, rows: Sequence[tuple[int, int, int, str]], stamp: Any, ids: Sequence[int]
    ) -> list[int]:
        """Insert pending deliveries; PostgreSQL takes their ids from `ids`."""
        if not rows:
            return []
        columns = (
            "team_id, webhook_id, event_id, event, state, is_test, attempt_count, next_attempt_at,"
            " created_at, updated_at"
        )
        if self.backend == "postgresql":
            mine = list(ids[: len(rows)])
            cur.execute(
                f"INSERT INTO deliveries (id, {columns})"  # noqa: S608
                " SELECT i, t, w, e, n, 'pending', false, 0, %s, %s, %s"
                " FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::text[]) AS r(i, t, w, e, n)",
                (stamp, stamp, stamp, mine, *([r[k] for r in rows] for k in range(4))),
            )
            return mine
        cur.executemany(
            f"INSERT INTO deliveries ({columns}) VALUES (?, ?, ?, ?, 'pending', 0, 0, ?, ?, ?)",  # noqa: S608
            [(*r, stamp, stamp, stamp) for r in rows],
        )
        return self._sqlite_ids(cur, len(rows))

    def _notify(self, s: Session) -> None:
        """Tell dispatchers in other processes that work is due. NOTIFY is transactional: it is
        delivered when this transaction commits, never for work that was rolled back."""
        if self.backend == "postgresql":
            s.execute(text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})

    def sqlite_path(self) -> str | None:
        """The SQLite database file (for the dispatcher's cross-process wake-up), else None."""
        if self.backend != "sqlite":
            return None
        name = self.engine.url.database
        return None if not name or name == ":memory:" else str(Path(name).expanduser())

    def newest_delivery_probe(self) -> NewestDeliveryProbe | None:
        """SQLite only: a reader of the newest delivery id on a connection of its own, for the
        dispatcher's cross-process wake-up. None on other backends (they have LISTEN/NOTIFY)."""
        path = self.sqlite_path()
        return None if path is None else NewestDeliveryProbe(path)

    def listen_dsn(self) -> str | None:
        """A libpq URL for a LISTEN connection (PostgreSQL only)."""
        if self.backend != "postgresql":
            return None
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    @staticmethod
    def _add_event(s: Session, team_id: int, name: str, payload: bytes, now: datetime) -> Event:
        row = Event(team_id=team_id, name=name, payload=payload.decode("utf-8"), created_at=now)
        s.add(row)
        s.flush()
        return row

    @staticmethod
    def _fan_out(
        s: Session, hooks: Sequence[Webhook], ev: Event, now: datetime, *, is_test: bool = False
    ) -> list[Delivery]:
        assert ev.id is not None
        rows = [
            Delivery(
                team_id=ev.team_id,
                webhook_id=h.id,
                event_id=ev.id,
                event=ev.name,
                state="pending",
                is_test=is_test,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            for h in hooks
            if h.id is not None and (is_test or ev.name in h.events)
        ]
        s.add_all(rows)
        s.flush()
        return rows

    def record_test_delivery(self, *, webhook: Webhook, payload: bytes, now: datetime) -> int:
        """A `test` event for one webhook and its single-attempt delivery, in one transaction."""
        with self.session(write=True) as s:
            ev = self._add_event(s, webhook.team_id, "test", payload, now)
            (delivery,) = self._fan_out(s, [webhook], ev, now, is_test=True)
            self._notify(s)
            assert delivery.id is not None
            return delivery.id

    # The dispatcher's two hot statements run as driver SQL: SQLAlchemy's per-row compile, bind
    # and coercion work was most of a worker's database time (claim plus save, thread CPU on
    # SQLite at 32 per batch: ~80 µs per delivery, ~32 µs here), and it held the GIL the send
    # loop needs.
    def claim_due(
        self,
        *,
        claim: str,
        now: datetime,
        lease_seconds: float,
        limit: int,
        exclude: Sequence[int] = (),
        only: Sequence[int] | None = None,
    ) -> Claims:
        """Lease up to `limit` due deliveries to the claim token `claim`, atomically.

        Due: pending or retrying, next attempt time reached, and no live lease (an expired lease
        is how a crashed or stalled process's work comes back). The webhook must be active, except
        for a test delivery, which checks a receiver whatever the switch says. Each claim has its
        own token: a process that stalled past its lease and claimed the same rows again cannot
        save the first claim's results over the second's. The lease runs `lease_seconds` from
        the database's clock when the statement runs.

        A webhook with a rate limit is claimed from only while its gate is open; what the claim
        took past the tokens in its bucket is given back at once, and the gate closes until
        tokens are back (`Claims.gate_opens_at` says when). Test deliveries pass the gate.

        PostgreSQL locks the rows it picks with FOR UPDATE SKIP LOCKED so concurrent claimers take
        disjoint sets without waiting; SQLite runs the whole UPDATE under its single write lock.
        The walk follows the partial index `ix_deliveries_open` in (next_attempt_at, id) order and
        stops after `limit` rows. `exclude` skips webhooks (the dispatcher's saturated and slow
        ones); `only` keeps just the listed webhooks (its slow lane).

        Raises:
            StoreUnavailable: when the database cannot be reached.
        """
        m = self._mark
        dt = self._dt_bind
        lock = " FOR UPDATE OF d SKIP LOCKED" if self.backend == "postgresql" else ""
        which = ""
        if exclude:
            which += f" AND d.webhook_id NOT IN ({self._marks(len(exclude))})"
        if only is not None:
            which += f" AND d.webhook_id IN ({self._marks(len(only))})"
        # The columns a send needs, read in the claim's own transaction.
        returned = "id, webhook_id, event, is_test, attempt_count, event_id, team_id, created_at, lease_owner"
        wanted = (
            "{d}.id, {d}.webhook_id, {d}.event, {d}.is_test, {d}.attempt_count, w.url, w.secret,"
            " w.previous_secret, w.previous_secret_expires_at, e.payload, w.rate_limit, {d}.team_id,"
            " {d}.created_at, {d}.lease_owner"
        )
        pick = (
            "SELECT d.id FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"  # noqa: S608
            f" WHERE (w.active OR d.is_test) AND d.{OPEN_STATES_SQL} AND d.next_attempt_at <= {m}"
            f" AND (w.rate_open_at IS NULL OR w.rate_open_at <= {m} OR d.is_test)"
            f" AND (d.lease_expires_at IS NULL OR d.lease_expires_at < {self._db_now()}){which}"
            f" ORDER BY d.next_attempt_at, d.id LIMIT {m}{lock}"
        )
        # A row whose lease expired under another claim gets the token with TAKEN_OVER appended:
        # the claim reads back which rows it took over from a dead or stalled worker (for the
        # log and /metrics) without a second statement, and that row's result is saved under
        # the marked token like any other.
        lease = (
            f"UPDATE deliveries SET lease_owner = CASE WHEN lease_owner IS NULL THEN {m} ELSE {m} END,"  # noqa: S608
            f" lease_expires_at = {self._db_now(m)} WHERE id IN ({pick})"
        )
        taken = claim + TAKEN_OVER
        params = (
            claim,
            taken,
            float(lease_seconds),
            dt(now),
            dt(now),
            *exclude,
            *(only or ()),
            limit,
        )
        with self._driver(write=True) as cur:
            if self.backend == "postgresql":
                # Two round trips (tests/test_round_trips.py counts them): psycopg's BEGIN, which
                # it sends and waits for alone, then one pipeline of the settings, the lease with
                # the rows' send columns in one statement (a CTE), and the COMMIT. Under load each
                # round trip waits for a CPU beside the sends and the receiver, and the claim's six
                # (with the pool's ping) kept a dozen sends in flight of the 48 a webhook may have.
                with self._pipeline(cur, commit=True):
                    # Only an ordered walk of the partial index is right at every backlog size,
                    # but the planner judges by statistics, and a burst outruns autovacuum's
                    # ANALYZE: on a table analyzed when it was nearly empty it chose a bitmap scan
                    # and a sort of the whole backlog (9.4 ms a claim with 10,000 queued, against
                    # 0.1). Without sorting as an option the walk is the only plan.
                    cur.execute("SET LOCAL enable_sort = off")
                    # A lease needs no flush to disk before the sends start: a claim lost with a
                    # database crash leaves its rows unleased, to be claimed and sent again (at
                    # least once, same delivery id), and the result's save, which does wait for
                    # the disk, flushes the claim with it.
                    cur.execute("SET LOCAL synchronous_commit = off")
                    cur.execute(
                        f"WITH c AS ({lease} RETURNING {returned})"  # noqa: S608
                        f" SELECT {wanted.format(d='c')} FROM c JOIN webhooks w ON w.id = c.webhook_id"
                        " JOIN events e ON e.id = c.event_id",
                        params,
                    )
                rows = cur.fetchall()
            else:
                cur.execute(f"{lease} RETURNING id", params)
                ids = [row[0] for row in cur.fetchall()]
                if not ids:
                    return Claims([])
                cur.execute(
                    f"SELECT {wanted.format(d='d')} FROM deliveries d"  # noqa: S608
                    " JOIN webhooks w ON w.id = d.webhook_id JOIN events e ON e.id = d.event_id"
                    f" WHERE d.id IN ({self._marks(len(ids))})",
                    ids,
                )
                rows = cur.fetchall()
        if not rows:
            return Claims([])
        # Oldest first, sorted here: PostgreSQL's claim runs with sorting switched off.
        rows.sort(key=itemgetter(0))
        read_dt = self._dt_result
        claimed = []
        limited: dict[int, list[int]] = {}
        for (
            did,
            hook_id,
            ev,
            is_test,
            count,
            url,
            secret,
            prev,
            prev_until,
            payload,
            rate,
            team,
            created,
            owner,
        ) in rows:
            prev_until = read_dt(prev_until)
            live_prev = bool(prev) and prev_until is not None and prev_until > now
            if rate is not None and not is_test:
                limited.setdefault(hook_id, []).append(did)
            claimed.append(
                Claimed(
                    delivery_id=did,
                    webhook_id=hook_id,
                    event=ev,
                    is_test=bool(is_test),
                    attempt_number=count + 1,
                    url=url,
                    signing_secrets=(secret, prev) if live_prev else (secret,),
                    payload=payload.encode("utf-8"),
                    claim=owner,
                    team_id=team,
                    created_at=read_dt(created),
                )
            )
        taken_over = [row[0] for row in rows if row[-1] == taken]
        if not limited:
            return Claims(claimed, taken_over=taken_over)
        held, opens_at = self._take_tokens(claim=claim, wanted=limited, now=now)
        return Claims(
            [c for c in claimed if c.delivery_id not in held], gate_opens_at=opens_at, taken_over=taken_over
        )

    def _take_tokens(
        self, *, claim: str, wanted: dict[int, list[int]], now: datetime
    ) -> tuple[set[int], datetime | None]:
        """Take tokens from the buckets of rate-limited webhooks for the deliveries a claim took
        (`wanted`: webhook id -> delivery ids, oldest first), give back the deliveries over the
        limit, and close the gates. Returns the given-back ids and the earliest gate opening.

        One transaction, apart from the claim's: it locks webhook rows (in id order) and then
        delivery rows, the order a deactivation takes them in; inside the claim, which holds
        delivery rows, it could deadlock against one."""
        m = self._mark
        dt = self._dt_bind
        read_dt = self._dt_result
        lock = " FOR UPDATE" if self.backend == "postgresql" else ""
        hooks = sorted(wanted)
        held: list[int] = []
        opens: list[datetime] = []
        with self._driver(write=True) as cur:
            cur.execute(
                f"SELECT id, rate_limit, rate_tat FROM webhooks WHERE id IN ({self._marks(len(hooks))})"  # noqa: S608
                f" ORDER BY id{lock}",
                hooks,
            )
            updates = []
            for hook_id, rate, tat in cur.fetchall():
                ids = wanted[hook_id]
                if rate is None:  # the limit was removed since the claim
                    continue
                grant = take(rate=rate, tat=read_dt(tat), now=now, wanted=len(ids))
                held.extend(ids[grant.granted :])
                if grant.open_at is not None:
                    opens.append(grant.open_at)
                updates.append((dt(grant.tat), dt(grant.open_at), hook_id))
            if updates:
                cur.executemany(
                    f"UPDATE webhooks SET rate_tat = {m}, rate_open_at = {m} WHERE id = {m}",  # noqa: S608
                    updates,
                )
            if held:
                cur.execute(
                    "UPDATE deliveries SET lease_owner = NULL, lease_expires_at = NULL"  # noqa: S608
                    f" WHERE id IN ({self._marks(len(held))}) AND lease_owner IN ({m}, {m})",
                    [*held, claim, claim + TAKEN_OVER],
                )
        return set(held), min(opens, default=None)

    def release(self, *, claim: str, delivery_ids: Sequence[int]) -> None:
        """Give back claimed deliveries that were not sent (over a webhook's in-flight cap): they
        are due again at once for any process.

        Raises:
            StoreUnavailable.
        """
        if not delivery_ids:
            return
        m = self._mark
        with self._driver(write=True) as cur:
            cur.execute(
                "UPDATE deliveries SET lease_owner = NULL, lease_expires_at = NULL"  # noqa: S608
                f" WHERE id IN ({self._marks(len(delivery_ids))}) AND lease_owner IN ({m}, {m})",
                [*delivery_ids, claim, claim + TAKEN_OVER],
            )

    def next_due_after(self, when: datetime) -> datetime | None:
        """The earliest time after `when` at which work may become claimable (the dispatcher's
        one timer): a retry time among open deliveries, from the partial index in
        (next_attempt_at, id) order, or a rate-limited webhook's gate opening.

        Raises:
            StoreUnavailable.
        """
        with self.session() as s:
            retry = s.exec(
                select(Delivery.next_attempt_at)
                .where(text(OPEN_STATES_SQL))
                .where(col(Delivery.next_attempt_at) > when)
                .order_by(col(Delivery.next_attempt_at), col(Delivery.id))
                .limit(1)
            ).first()
            gate = s.exec(
                select(func.min(Webhook.rate_open_at))
                .where(col(Webhook.rate_limit).is_not(None))
                .where(col(Webhook.rate_open_at) > when)
            ).first()
        return min((t for t in (retry, gate) if t is not None), default=None)

    def complete(self, *, worker: str, results: Sequence[AttemptResult], now: datetime) -> list[int]:
        """Log attempts and move their deliveries on, in one transaction.

        A result is applied only while its claim still holds the delivery's lease: a claim whose
        lease was taken over (by another process, or by this one after a stall) never overwrites
        the new owner. A delivery cancelled while its send was in flight (its webhook was
        deactivated) keeps its lease until then: the attempt is logged and the delivery stays
        where the cancellation put it. Response bodies and errors are stored as `storable_text`.
        Returns the ids whose results were applied.

        Raises:
            StoreUnavailable: when the database cannot be reached. Conflict, InvalidInput: a row
                the database refuses (the caller saves row by row to find it).
        """
        if not results:
            return []
        m = self._mark
        dt = self._dt_bind
        ids = [r.delivery_id for r in results]
        lock = " FOR UPDATE OF d" if self.backend == "postgresql" else ""
        with self._driver(write=True) as cur:
            # PostgreSQL: three round trips (counted in tests/test_round_trips.py), psycopg's
            # BEGIN, the lock, and the writes with the COMMIT. Under load each round trip waits
            # for a CPU beside the sends and the receiver.
            # The webhook's streak is read with the lock (the webhook row itself is not locked).
            with self._pipeline(cur):
                cur.execute(
                    "SELECT d.id, d.lease_owner, d.state, d.webhook_id, w.failing_since IS NOT NULL"  # noqa: S608
                    f" FROM deliveries d JOIN webhooks w ON w.id = d.webhook_id"
                    f" WHERE d.id IN ({self._marks(len(ids))}){lock}",
                    ids,
                )
            found = cur.fetchall()
            running = {row[3] for row in found if row[4]}
            rows = {row[0]: (row[1], row[2]) for row in found}
            hook_of = {row[0]: row[3] for row in found}
            mine: list[AttemptResult] = []
            cancelled: set[int] = set()
            for r in results:
                owner, state = rows.get(r.delivery_id, (None, None))
                if owner is not None and owner == r.claim:
                    if state not in OPEN_STATES:
                        # Cancelled under the send: log what happened, keep the final state.
                        r = replace(r, state=state, next_attempt_at=None)
                        cancelled.add(r.delivery_id)
                    mine.append(r)
                elif state is None:
                    log.info("delivery %s was deleted with its webhook while it was sent", r.delivery_id)
                else:
                    log.warning("delivery %s: lease lost before its result was saved", r.delivery_id)
            if not mine:
                return []
            stamp = dt(now)
            attempts = [
                (
                    r.delivery_id,
                    hook_of[r.delivery_id],
                    outcome_class(r.status_code, r.error),
                    r.number,
                    dt(r.started_at),
                    r.duration_ms,
                    r.status_code,
                    storable_text(r.response_body),
                    storable_text(r.error),
                    dt(r.next_attempt_at),
                    None if r.retry_after is None else math.ceil(r.retry_after),
                )
                for r in mine
            ]
            with self._pipeline(cur, commit=True):
                if self.backend == "postgresql":
                    # One statement over arrays for each table, as recording does: executemany sent
                    # a statement per row, and psycopg's per-row work was a sixth of a worker's GIL.
                    cur.execute(
                        "UPDATE deliveries AS d SET state = r.s, attempt_count = r.n, next_attempt_at = r.a,"
                        " lease_owner = NULL, lease_expires_at = NULL, updated_at = %s, note = COALESCE(r.o, d.note)"
                        " FROM unnest(%b::bigint[], %b::text[], %b::int[], %b::timestamptz[], %b::text[])"
                        " AS r(i, s, n, a, o) WHERE d.id = r.i",
                        (
                            stamp,
                            [r.delivery_id for r in mine],
                            [r.state for r in mine],
                            [r.number for r in mine],
                            [dt(r.next_attempt_at) for r in mine],
                            [r.note for r in mine],
                        ),
                    )
                    cur.execute(
                        "INSERT INTO delivery_attempts (delivery_id, webhook_id, outcome, number, worker, started_at,"
                        " duration_ms, status_code, response_body, error, next_retry_at, retry_after_seconds)"
                        " SELECT i, w, o, n, %s, t, ms, sc, rb, e, nr, ra FROM unnest(%b::bigint[], %b::bigint[],"
                        " %b::text[], %b::int[], %b::timestamptz[], %b::int[], %b::int[], %b::text[], %b::text[],"
                        " %b::timestamptz[], %b::bigint[]) AS r(i, w, o, n, t, ms, sc, rb, e, nr, ra)",
                        (worker, *(list(column) for column in zip(*attempts, strict=True))),
                    )
                else:
                    cur.executemany(
                        f"UPDATE deliveries SET state = {m}, attempt_count = {m}, next_attempt_at = {m},"  # noqa: S608
                        f" lease_owner = NULL, lease_expires_at = NULL, updated_at = {m}, note = COALESCE({m}, note)"
                        f" WHERE id = {m}",
                        [
                            (r.state, r.number, dt(r.next_attempt_at), stamp, r.note, r.delivery_id)
                            for r in mine
                        ],
                    )
                    cur.executemany(
                        "INSERT INTO delivery_attempts (delivery_id, webhook_id, outcome, number, worker, started_at,"  # noqa: S608
                        " duration_ms, status_code, response_body, error, next_retry_at, retry_after_seconds)"
                        f" VALUES ({self._marks(12)})",
                        [(*a[:4], worker, *a[4:]) for a in attempts],
                    )
            changes = self._streak_changes(
                [r for r in mine if r.delivery_id not in cancelled], running, stamp
            )
            applied = [r.delivery_id for r in mine]
        # The streaks in a transaction of their own, after the deliveries' locks are released:
        # taking webhook rows while holding delivery rows would deadlock against a deactivation,
        # which takes them the other way round. `failing_since` is derived; the next result
        # corrects it should this process stop in between.
        if changes:
            with self._driver(write=True) as cur:
                for sql, params in changes:
                    cur.executemany(sql, params)
        return applied

    def _streak_changes(
        self, results: Sequence[AttemptResult], running: set[int], stamp: Any
    ) -> list[tuple[str, list[Any]]]:
        """What `failing_since` must become for the webhooks of these results, given the webhooks
        whose streak runs now (`running`): a delivery that succeeds ends the streak, one that
        ends `failed` starts it when none runs. Test deliveries do not count. The common case, a
        success where none runs, writes nothing. Returns (statement, rows) pairs."""
        m = self._mark
        last: dict[int, tuple[bool, bool]] = {}  # webhook -> (failing now, a success in this batch)
        for r in results:
            if r.webhook_id is None or r.single_attempt or r.state not in ("succeeded", "failed"):
                continue
            ok = r.state == "succeeded"
            _, reset = last.get(r.webhook_id, (False, False))
            last[r.webhook_id] = (not ok, reset or ok)
        ended = [(hook,) for hook, (failing, _) in last.items() if not failing and hook in running]
        fresh = [(stamp, hook) for hook, (failing, reset) in last.items() if failing and reset]
        begun = [
            (stamp, hook)
            for hook, (failing, reset) in last.items()
            if failing and not reset and hook not in running
        ]
        changes: list[tuple[str, list[Any]]] = []
        if ended:
            changes.append((f"UPDATE webhooks SET failing_since = NULL WHERE id = {m}", ended))  # noqa: S608
        if fresh:
            changes.append((f"UPDATE webhooks SET failing_since = {m} WHERE id = {m}", fresh))  # noqa: S608
        if begun:
            sql = f"UPDATE webhooks SET failing_since = {m} WHERE id = {m} AND failing_since IS NULL"  # noqa: S608
            changes.append((sql, begun))
        return changes

    def redeliver(self, *, team_id: int, delivery_id: int, now: datetime) -> Delivery | None:
        """A new pending delivery of the same event to the same webhook, linked to the original.
        The webhook is read (and on PostgreSQL locked against a concurrent deactivation) in the
        same transaction as the insert.

        Raises:
            Conflict: (webhook_id) the webhook is inactive. StoreUnavailable.
        """
        with self.session(write=True) as s:
            original = s.exec(
                select(Delivery).where(Delivery.id == delivery_id).where(Delivery.team_id == team_id)
            ).first()
            if original is None:
                return None
            webhook = s.exec(
                select(Webhook).where(Webhook.id == original.webhook_id).with_for_update(read=True)
            ).first()
            if webhook is None:
                return None
            if not webhook.active:
                raise Conflict(
                    "webhook_id", f"webhook {webhook.id} is inactive; set it active before redelivering"
                )
            copy = Delivery(
                team_id=team_id,
                webhook_id=original.webhook_id,
                event_id=original.event_id,
                event=original.event,
                state="pending",
                is_test=original.is_test,
                redelivery_of=original.id,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            s.add(copy)
            s.flush()
            self._notify(s)
            return copy

    def recover(
        self,
        *,
        team_id: int,
        webhook_id: int,
        since: datetime,
        until: datetime | None,
        limit: int,
        dry_run: bool,
        now: datetime,
    ) -> tuple[list[int], bool] | None:
        """Re-send the webhook's failed deliveries created in [since, until): one new pending
        delivery (linked by `redelivery_of`) per event that has no delivery to this webhook that
        succeeded or is still open, so a second recovery sends nothing twice. At most `limit`;
        the flag says whether more remain. With `dry_run`, nothing is written and the ids are
        those of the failed deliveries that would be re-sent. None when the webhook is not the
        team's.

        Raises:
            Conflict: (active) the webhook is inactive. StoreUnavailable.
        """
        with self.session(write=True) as s:
            webhook = s.exec(
                select(Webhook)
                .where(Webhook.id == webhook_id)
                .where(Webhook.team_id == team_id)
                .with_for_update(read=True)
            ).first()
            if webhook is None:
                return None
            if not webhook.active:
                raise Conflict("active", f"webhook {webhook_id} is inactive; set it active before recovering")
            later = Delivery.__table__.alias("later")  # type: ignore[attr-defined]
            settled = (
                select(later.c.id)
                .where(later.c.webhook_id == col(Delivery.webhook_id))
                .where(later.c.event_id == col(Delivery.event_id))
                .where(later.c.state.in_(("succeeded", "pending", "retrying")))
                .exists()
            )
            # One failed delivery per event (the first), oldest first.
            q = (
                select(func.min(col(Delivery.id)))
                .where(col(Delivery.webhook_id) == webhook_id)
                .where(col(Delivery.state) == "failed")
                .where(col(Delivery.is_test).is_(False))
                .where(col(Delivery.created_at) >= since)
                .where(~settled)
            )
            if until is not None:
                q = q.where(col(Delivery.created_at) < until)
            rows = s.exec(
                q.group_by(col(Delivery.event_id)).order_by(func.min(col(Delivery.id))).limit(limit + 1)
            ).all()
            ids = [i for i in rows if i is not None]
            more = len(ids) > limit
            ids = ids[:limit]
            if dry_run or not ids:
                return ids, more
            originals = s.exec(
                select(Delivery).where(col(Delivery.id).in_(ids)).order_by(col(Delivery.id))
            ).all()
            copies = [
                Delivery(
                    team_id=team_id,
                    webhook_id=webhook_id,
                    event_id=d.event_id,
                    event=d.event,
                    state="pending",
                    is_test=False,
                    redelivery_of=d.id,
                    next_attempt_at=now,
                    created_at=now,
                    updated_at=now,
                )
                for d in originals
            ]
            s.add_all(copies)
            s.flush()
            self._notify(s)
            return [c.id for c in copies if c.id is not None], more


class NewestDeliveryProbe:
    """The newest delivery id of one SQLite file, read on a connection of its own: one index
    descent and no transaction held, cheap enough to ask every few milliseconds from one thread.
    A changed answer means another process recorded work."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None

    def read(self) -> int | None:
        """Raises: sqlite3.Error when the file cannot be read (the connection is then dropped and
        opened again on the next read)."""
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self._path, timeout=1.0, check_same_thread=False)
            newest: int | None = self._conn.execute("SELECT max(id) FROM deliveries").fetchone()[0]
            return newest
        except sqlite3.Error:
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Claims(list["Claimed"]):
    """What one claim leased, plus when a rate-limited webhook it held back may be claimed from
    again (None: none was held back), so a dispatcher can wake up then."""

    def __init__(
        self,
        jobs: Sequence[Claimed],
        *,
        gate_opens_at: datetime | None = None,
        taken_over: Sequence[int] = (),
    ) -> None:
        super().__init__(jobs)
        self.gate_opens_at = gate_opens_at
        # Ids this claim leased after another claim's lease on them expired.
        self.taken_over = list(taken_over)


@dataclass(frozen=True)
class KeyRow:
    """An API key as the group commit's transaction reads it."""

    id: int
    team_id: int
    scopes: frozenset[str]
    revoked: bool
    last_used_at: datetime | None
    prefix: str  # the visible start of the key, for messages


@dataclass(frozen=True)
class NewEvent:
    """An event to record (`record_events`): its signed envelope, and for a scan the QR code and
    the envelope of the first_scan it makes if it is that code's first."""

    team_id: int
    event: str
    payload: bytes
    # (QR code id, the first_scan's envelope, or a function that makes it: most scans are not
    # first, and an envelope costs a JSON encoding).
    first_scan: tuple[int, bytes | Callable[[], bytes]] | None = None


@dataclass(frozen=True)
class Claimed:
    """A leased delivery with everything needed to send it."""

    delivery_id: int
    webhook_id: int
    event: str
    is_test: bool
    attempt_number: int
    url: str
    signing_secrets: tuple[str, ...]  # the current secret first; a rotated-out one while its grace lasts
    payload: bytes
    claim: str  # the claim's token, held in lease_owner until the result is saved
    team_id: int = 0  # for the attempt's log line
    created_at: datetime | None = None  # when the delivery was recorded (first-attempt latency)


@dataclass(frozen=True)
class AttemptResult:
    delivery_id: int
    claim: str
    number: int
    started_at: datetime
    duration_ms: int
    status_code: int | None
    response_body: str | None
    error: str | None
    state: str
    next_attempt_at: datetime | None
    single_attempt: bool = False  # a test delivery: a failure ends it
    retry_after: float | None = None  # the receiver's Retry-After (seconds) that set the next time
    note: str | None = None  # why the delivery ended early (410 Gone), for the log
    webhook_id: int | None = None  # for the webhook's failure streak (`failing_since`)
    team_id: int | None = None  # these two for the attempt's log line
    event: str | None = None
    created_at: datetime | None = None  # the delivery's, for the first-attempt latency
