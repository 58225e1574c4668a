"""Configuration from the environment, read once into an immutable `Settings`.

Every variable of SPEC's configuration table lives here and nowhere else; the CLI overlays flags on
top of it. Malformed values raise `ConfigError` naming the variable, instead of being guessed at.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from justscan_mcp.errors import ConfigError

T = TypeVar("T")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60.0, 300.0, 1800.0)
DEFAULT_DELIVERY_TIMEOUT = 10.0
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_DISABLE_AFTER = 5 * 24 * 3600.0  # like Svix: a failure streak five days old switches a webhook off
DB_FILENAME = "justscan.db"
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_LEASE_MARGIN = 60.0
DEFAULT_MAX_IN_FLIGHT = 64


def parse_bool(name: str, raw: str) -> bool:
    """Read a boolean the way SPEC says (1/true/yes/on, 0/false/no/off), case-insensitively.

    Raises:
        ConfigError: for any other spelling, naming the variable.
    """
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected one of 1/true/yes/on or 0/false/no/off, got {raw!r}")


def parse_retry_schedule(name: str, raw: str) -> tuple[float, ...]:
    """Parse comma-separated seconds, e.g. ``60,300,1800``.

    Raises:
        ConfigError: when a part is not a non-negative number or the list is empty.
    """
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"{name}: expected comma-separated seconds such as 60,300,1800")
    out: list[float] = []
    for part in parts:
        try:
            seconds = float(part)
        except ValueError:
            raise ConfigError(f"{name}: {part!r} is not a number of seconds") from None
        if not seconds >= 0 or seconds == float("inf"):
            raise ConfigError(f"{name}: {part!r} must be a finite, non-negative number of seconds")
        out.append(seconds)
    return tuple(out)


def parse_positive_float(name: str, raw: str) -> float:
    """Parse a strictly positive, finite number of seconds.

    Raises:
        ConfigError: when the value is not such a number.
    """
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name}: must be a positive number of seconds, got {raw!r}")
    return value


def _non_negative(name: str, raw: str, unit: str) -> float:
    """A finite number of `unit`, 0 or more.

    Raises:
        ConfigError: when the value is not such a number.
    """
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a number of {unit}") from None
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{name}: must be a number of {unit}, 0 or more, got {raw!r}")
    return value


def parse_seconds_or_zero(name: str, raw: str) -> float:
    """A finite number of seconds, 0 or more (0 turns the feature off). Raises: ConfigError."""
    return _non_negative(name, raw, "seconds")


def parse_retention_days(name: str, raw: str) -> float:
    """Days to keep finished deliveries, decimals allowed; 0 keeps all. Raises: ConfigError."""
    return _non_negative(name, raw, "days")


def parse_in_flight(name: str, raw: str) -> int:
    """Raises: ConfigError unless an integer from 1 to 10000."""
    if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
        raise ConfigError(f"{name}: expected an integer from 1 to 10000, got {raw!r}")
    return int(raw)


def default_data_dir() -> Path:
    """The per-user data directory (never the current directory)."""
    # Imported here: platformdirs is only needed when no URL is configured.
    from platformdirs import user_data_path

    return user_data_path("justscan-mcp", appauthor=False)


ADMIN_PASSWORD_MIN = 12


def parse_admin_password(name: str, raw: str) -> str:
    """Raises: ConfigError for a password too short to stand in front of every team's data."""
    if len(raw) < ADMIN_PASSWORD_MIN:
        raise ConfigError(f"{name} must be at least {ADMIN_PASSWORD_MIN} characters long")
    return raw


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]", "::1")


def parse_public_url(name: str, raw: str) -> str:
    """The base URL clients reach the HTTP server at (behind a proxy: the proxy's). OAuth
    discovery, token audiences and redirects are built from it, so it is checked at start.

    Raises:
        ConfigError: not an absolute http(s) URL without query or fragment, or plain http on a
            host that is not loopback.
    """
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"{name} is not a URL: {exc}") from None
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigError(f"{name} must be an absolute http(s) URL, e.g. https://mcp.example.com")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"{name} must not carry a query, a fragment or credentials")
    if parts.scheme == "http" and host not in LOOPBACK_NAMES:
        raise ConfigError(f"{name} must use https unless its host is loopback (OAuth 2.1 requires it)")
    del port
    return raw.rstrip("/")


LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_format(name: str, raw: str) -> str:
    """Raises: ConfigError for anything but text or json."""
    if raw.lower() not in LOG_FORMATS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_FORMATS)}, got {raw!r}")
    return raw.lower()


def parse_log_level(name: str, raw: str) -> str:
    """Raises: ConfigError for anything but debug, info, warning or error."""
    if raw.lower() not in LOG_LEVELS:
        raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}, got {raw!r}")
    return raw.lower()


def parse_port(name: str, raw: str) -> int:
    """Raises: ConfigError unless a TCP port from 1 to 65535."""
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ConfigError(f"{name}: expected a port from 1 to 65535, got {raw!r}")
    return int(raw)


def default_database_url() -> str:
    """SQLite file in the user's data directory."""
    return f"sqlite:///{default_data_dir() / DB_FILENAME}"


@dataclass(frozen=True)
class Settings:
    """Everything the process is configured with. Build it with `Settings.from_env()`."""

    database_url: str
    database_url_is_default: bool = False
    api_key: str | None = None
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT
    allow_private_targets: bool = False
    allowed_hosts: tuple[str, ...] = field(default_factory=tuple)
    poll_interval: float = DEFAULT_POLL_INTERVAL
    lease_margin: float = DEFAULT_LEASE_MARGIN
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    # Isolation (see `per_webhook_in_flight` and `slow_lane_in_flight`); None: derived.
    max_in_flight_per_webhook: int | None = None
    slow_lane: int | None = None
    # The dashboard's operator credential (the admin area); unset, the admin area is closed.
    admin_password: str | None = field(default=None, repr=False)
    # Days finished deliveries (and their attempts, and events left without deliveries) are kept.
    retention_days: float = DEFAULT_RETENTION_DAYS
    # Seconds a failure streak may last before the webhook is switched off; 0: never.
    disable_after: float = DEFAULT_DISABLE_AFTER
    # The base URL clients reach `serve --transport http` at; None: http://<host>:<port>.
    public_url: str | None = None
    # How the process logs: text or json lines, and from which level (third-party libraries
    # stay at warning unless this is debug).
    log_format: str = "text"
    log_level: str = "info"
    # `worker`: the port of its /metrics, /healthz and /readyz; None: no HTTP listener.
    metrics_port: int | None = None

    @property
    def lease_seconds(self) -> float:
        """How long a claimed delivery stays with its process: the send's own time limit plus a
        margin, so a lease never expires under a send that is still allowed to run (Svix #2181)."""
        return self.delivery_timeout + self.lease_margin

    @property
    def per_webhook_in_flight(self) -> int:
        """Sends one webhook may have in flight in one process: three quarters of the slots by
        default, so a receiver that never answers cannot take every slot before it is known to be
        slow, while one busy healthy webhook still has most of the pool."""
        if self.max_in_flight_per_webhook is not None:
            return min(self.max_in_flight_per_webhook, self.max_in_flight)
        return max(1, self.max_in_flight * 3 // 4)

    @property
    def slow_lane_in_flight(self) -> int:
        """Slots that webhooks known to be slow (their last attempt timed out or took at least half
        the timeout) share, together, in one process: an eighth of the slots by default."""
        if self.slow_lane is not None:
            return min(self.slow_lane, self.max_in_flight)
        return max(1, self.max_in_flight // 8)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `JUSTSCAN_*` variables.

        Raises:
            ConfigError: when a variable is set to a malformed value.
        """
        env = os.environ if environ is None else environ

        def read(name: str, parse: Callable[[str, str], T], default: T) -> T:
            raw = env.get(name, "").strip()
            return parse(name, raw) if raw else default

        url = env.get("JUSTSCAN_DATABASE_URL", "").strip()
        return cls(
            database_url=url or default_database_url(),
            database_url_is_default=not url,
            api_key=env.get("JUSTSCAN_API_KEY", "").strip() or None,
            retry_schedule=read("JUSTSCAN_RETRY_SCHEDULE", parse_retry_schedule, DEFAULT_RETRY_SCHEDULE),
            delivery_timeout=read(
                "JUSTSCAN_DELIVERY_TIMEOUT", parse_positive_float, DEFAULT_DELIVERY_TIMEOUT
            ),
            allow_private_targets=read("JUSTSCAN_ALLOW_PRIVATE_TARGETS", parse_bool, False),
            allowed_hosts=tuple(
                h.strip() for h in env.get("JUSTSCAN_ALLOWED_HOSTS", "").split(",") if h.strip()
            ),
            poll_interval=read("JUSTSCAN_POLL_INTERVAL", parse_positive_float, DEFAULT_POLL_INTERVAL),
            lease_margin=read("JUSTSCAN_LEASE_MARGIN", parse_positive_float, DEFAULT_LEASE_MARGIN),
            retention_days=read("JUSTSCAN_RETENTION_DAYS", parse_retention_days, DEFAULT_RETENTION_DAYS),
            disable_after=read("JUSTSCAN_DISABLE_AFTER", parse_seconds_or_zero, DEFAULT_DISABLE_AFTER),
            max_in_flight=read("JUSTSCAN_MAX_IN_FLIGHT", parse_in_flight, DEFAULT_MAX_IN_FLIGHT),
            max_in_flight_per_webhook=read("JUSTSCAN_MAX_IN_FLIGHT_PER_WEBHOOK", parse_in_flight, None),
            slow_lane=read("JUSTSCAN_SLOW_LANE", parse_in_flight, None),
            admin_password=read("JUSTSCAN_ADMIN_PASSWORD", parse_admin_password, None),
            public_url=read("JUSTSCAN_PUBLIC_URL", parse_public_url, None),
            log_format=read("JUSTSCAN_LOG_FORMAT", parse_log_format, "text"),
            log_level=read("JUSTSCAN_LOG_LEVEL", parse_log_level, "info"),
            metrics_port=read("JUSTSCAN_METRICS_PORT", parse_port, None),
        )

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with CLI flags applied (only the ones given)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
