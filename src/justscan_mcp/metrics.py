"""Prometheus metrics: one registry per process (per `App`), rendered at `GET /metrics`.

Two kinds of series:
- counted by this process as it works (the dispatcher counts what it claims, sends and saves;
  counters are updated in the database thread after a batch is saved, beside the attempt log
  lines, so a counter never counts an attempt the delivery log does not hold, and the event loop
  pays nothing per attempt);
- read from the database at scrape time (`DatabaseCollector`): the backlog, the oldest due
  delivery, the live dispatchers, the last five minutes across every process. One snapshot
  (`Service.operations_status`, two statements) is cached for `SNAPSHOT_TTL` seconds, so any
  number of scrapers cost one read per few seconds.

Nothing here is labelled with a team name, a URL or anything secret: per-webhook series carry the
webhook id only, and only for the few webhooks with most failed attempts (bounded cardinality).
docs/observability.md lists every series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from justscan_mcp import __version__
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.models import METRIC_OUTCOMES, OperationsStatus

log = logging.getLogger("justscan_mcp.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
SNAPSHOT_TTL = 5.0  # seconds one database snapshot serves every scraper
# Seconds: a loopback receiver answers in a millisecond, a slow one up to the 30 s timeout.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Seconds from an event's delivery being recorded to its first attempt starting: milliseconds
# when all is well, the poll interval for work recorded by another process without a wake-up,
# minutes behind a backlog.
FIRST_ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
BATCH_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# A tool call is a database read or two and some JSON: a millisecond or two when well.
TOOL_CALL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """This process's instruments and the registry /metrics renders."""

    def __init__(self) -> None:
        # No `_created` series beside every counter and histogram: they double the output and
        # Prometheus does not use them in the text format.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        Gauge("justscan_build_info", "The running version (always 1)", ["version"], registry=registry).labels(
            __version__
        ).set(1)
        attempts = Counter(
            "justscan_attempts",
            "Delivery attempts saved by this process, by outcome class",
            ["outcome"],
            registry=registry,
        )
        # Every class from the start at 0, so rate() and ratios work before the first failure.
        self.attempts = {o: attempts.labels(o) for o in METRIC_OUTCOMES}
        self.attempt_duration = Histogram(
            "justscan_attempt_duration_seconds",
            "How long an attempt took, from sending to the receiver's answer or the error",
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.first_attempt_latency = Histogram(
            "justscan_event_to_first_attempt_seconds",
            "From a delivery being recorded to its first attempt starting",
            buckets=FIRST_ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.claim_size = Histogram(
            "justscan_claim_size",
            "Deliveries leased per claim statement (the count is the number of claims)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.taken_over = Counter(
            "justscan_deliveries_taken_over",
            "Deliveries claimed after another claim's lease on them expired (a worker died or stalled)",
            registry=registry,
        )
        self.save_size = Histogram(
            "justscan_save_batch_size",
            "Attempts saved per transaction (the count is the number of saves)",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.database_errors = Counter(
            "justscan_database_errors",
            "Database operations of the dispatcher and the scrape that failed, by operation and "
            "kind (unavailable: no connection or timeout; error: anything else)",
            ["operation", "kind"],
            registry=registry,
        )
        self.retry_after = Counter(
            "justscan_retry_after_honoured",
            "Retries scheduled later than the schedule's step because of a receiver's Retry-After",
            registry=registry,
        )
        self.auto_disabled = Counter(
            "justscan_webhooks_auto_disabled",
            "Webhooks this process switched off for failing longer than JUSTSCAN_DISABLE_AFTER",
            registry=registry,
        )
        self.in_flight = Gauge(
            "justscan_sends_in_flight",
            "Deliveries this process is sending now (started and not finished; claimed ones waiting for a slot are not counted)",
            registry=registry,
        )
        self.loop_age = Gauge(
            "justscan_dispatcher_loop_age_seconds",
            "Seconds since this process's claim loop last turned (0 without a dispatcher)",
            registry=registry,
        )
        self.tool_calls = Histogram(
            "justscan_mcp_tool_call_seconds",
            "Server time of an MCP tools/call, from the request reaching the key gate to its result "
            "(the transport's JSON framing excluded), by tool",
            ["tool"],
            buckets=TOOL_CALL_BUCKETS,
            registry=registry,
        )
        self._database: DatabaseCollector | None = None

    def watch_database(self, read: Callable[[], OperationsStatus], *, ttl: float = SNAPSHOT_TTL) -> None:
        """Add the scrape-time gauges, read through `read` (at most once per `ttl` seconds)."""
        if self._database is None:
            self._database = DatabaseCollector(read, ttl=ttl, errors=self.database_errors)
            self.registry.register(self._database)

    def bind_dispatcher(self, in_flight: Callable[[], float], loop_age: Callable[[], float]) -> None:
        """Read the dispatcher's in-flight count and loop age at scrape time (free per send)."""
        self.in_flight.set_function(in_flight)
        self.loop_age.set_function(loop_age)

    def unbind_dispatcher(self) -> None:
        self.in_flight.set_function(lambda: 0.0)
        self.loop_age.set_function(lambda: 0.0)

    def render(self) -> bytes:
        """The text exposition. Blocking (it may read the database): call it from a thread."""
        return generate_latest(self.registry)


class DatabaseCollector:
    """Gauges read from the database when scraped, through one cached snapshot."""

    def __init__(self, read: Callable[[], OperationsStatus], *, ttl: float, errors: Counter) -> None:
        self._read = read
        self._ttl = ttl
        self._errors = errors
        self._lock = threading.Lock()
        self._at = float("-inf")
        self._snapshot: OperationsStatus | None = None

    def describe(self) -> list[Metric]:
        return []  # no database read when the collector is registered

    def _current(self) -> OperationsStatus | None:
        # One reader at a time: concurrent scrapes wait for the read in progress and share it.
        with self._lock:
            if time.monotonic() - self._at < self._ttl:
                return self._snapshot
            try:
                self._snapshot = self._read()
            except StoreUnavailable:
                self._errors.labels("scrape", "unavailable").inc()
                self._snapshot = None
            except Exception:
                log.exception("metrics: the database snapshot failed")
                self._errors.labels("scrape", "error").inc()
                self._snapshot = None
            self._at = time.monotonic()
            return self._snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._current()
        yield GaugeMetricFamily(
            "justscan_database_up",
            "1 when the last scrape-time read of the database worked",
            value=int(bool(snap)),
        )
        if snap is None:
            return
        open_ = GaugeMetricFamily(
            "justscan_deliveries_open", "Open deliveries across every team, by state", labels=["state"]
        )
        for state, n in snap.open_deliveries.items():
            open_.add_metric([state], n)
        yield open_
        yield GaugeMetricFamily(
            "justscan_oldest_due_delivery_age_seconds",
            "Age of the oldest due delivery no dispatcher holds (0 when none is waiting; "
            "rate-limited webhooks are left out)",
            value=snap.oldest_due_age_seconds or 0.0,
        )
        yield GaugeMetricFamily(
            "justscan_webhooks_switched_off",
            "Webhooks switched off for failing (disabled_reason=failing)",
            value=snap.switched_off,
        )
        yield GaugeMetricFamily(
            "justscan_live_dispatchers",
            "Dispatchers whose heartbeat is younger than three poll intervals, in every process",
            value=len(snap.dispatchers),
        )
        recent = GaugeMetricFamily(
            "justscan_recent_attempts",
            f"Attempts started in the last {snap.window_seconds} s by every process, by stored outcome class",
            labels=["outcome"],
        )
        for outcome, n in snap.attempts.items():
            recent.add_metric([outcome], n)
        yield recent
        failing = GaugeMetricFamily(
            "justscan_webhook_recent_failed_attempts",
            f"Failed attempts in the last {snap.window_seconds} s of the few webhooks with most of "
            "them (status's top failing list), by webhook id",
            labels=["webhook_id"],
        )
        for f in snap.top_failing:
            failing.add_metric([str(f.webhook_id)], f.failed_attempts)
        yield failing
