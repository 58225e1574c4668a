"""How every process logs: text or JSON lines on stderr, quiet third-party libraries.

`configure(settings)` is called once per command. Our own loggers log from `JUSTSCAN_LOG_LEVEL`
(default info). Third-party loggers (APScheduler's per-tick lines, alembic's plugin lines, the
MCP SDK, httpx) stay at warning unless the level is debug: an idle server used to write two
APScheduler lines a second. Fields given as `extra={"fields": {...}}` become keys of the JSON
line, or `key=value` pairs after the text message. Nothing here ever receives a secret: callers
log ids, never keys, tokens, cookies or bodies.

The HTTP access log goes through the same handler, with the query string removed (consent
handles and cursors travel there).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from justscan_mcp.config import Settings

THIRD_PARTY = (
    "apscheduler",
    "alembic",
    "mcp",
    "httpx",
    "httpcore",
    "sse_starlette",
    "uvicorn.error",
    "asyncio",
)
ACCESS_LOGGER = "uvicorn.access"


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the record's fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class TextLines(logging.Formatter):
    """`time LEVEL logger: message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


# Polled every few seconds by load balancers, orchestrators and Prometheus: their access lines
# would outnumber every other line, so they are logged at debug only.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class NoQueryString(logging.Filter):
    """uvicorn's access line without the query string: `GET /oauth/consent HTTP/1.1` 200. Probe
    requests (PROBE_PATHS) pass only when debug logging is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            path = args[2].split("?", 1)[0]
            if path in PROBE_PATHS and not logging.getLogger(ACCESS_LOGGER).isEnabledFor(logging.DEBUG):
                return False
            record.args = (*args[:2], path, *args[3:])
        return True


def configure(settings: Settings, *, stream: TextIO | None = None, level: str | None = None) -> None:
    """Set up the root handler for this process (replacing any earlier one)."""
    chosen = (level or settings.log_level).upper()
    # No line shows a source file, thread or process, so records skip finding them (the logging
    # HOWTO's "Optimization"): a worker writes a line per attempt, thousands a second.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLines() if settings.log_format == "json" else TextLines())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    quiet = logging.DEBUG if chosen == "DEBUG" else logging.WARNING
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(quiet)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers = []
    access.propagate = True
    access.setLevel(chosen)
    if not any(isinstance(f, NoQueryString) for f in access.filters):
        access.addFilter(NoQueryString())


def uvicorn_log_config() -> dict[str, Any]:
    """Leave uvicorn's loggers to the root handler (its own config would install its own)."""
    return {"version": 1, "disable_existing_loggers": False}
