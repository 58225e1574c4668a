"""Configuration from the environment, read once into an immutable `Settings`.

Every variable of SPEC's configuration table lives here and nowhere else; the CLI overlays flags on
top of it. Malformed values raise `ConfigError` naming the variable, instead of being guessed at.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from justscan_mcp.errors import ConfigError

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

DEFAULT_RETRY_SCHEDULE: tuple[float, ...] = (60.0, 300.0, 1800.0)
DEFAULT_DELIVERY_TIMEOUT = 10.0
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


def default_data_dir() -> Path:
    """The per-user data directory (never the current directory)."""
    # Imported here: platformdirs is only needed when no URL is configured.
    from platformdirs import user_data_path

    return user_data_path("justscan-mcp", appauthor=False)


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

    @property
    def lease_seconds(self) -> float:
        """How long a claimed delivery stays with its process: the send's own time limit plus a
        margin, so a lease never expires under a send that is still allowed to run (Svix #2181)."""
        return self.delivery_timeout + self.lease_margin

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read `JUSTSCAN_*` variables.

        Raises:
            ConfigError: when a variable is set to a malformed value.
        """
        env = os.environ if environ is None else environ
        url = env.get("JUSTSCAN_DATABASE_URL", "").strip()
        api_key = env.get("JUSTSCAN_API_KEY", "").strip() or None
        schedule = DEFAULT_RETRY_SCHEDULE
        if raw := env.get("JUSTSCAN_RETRY_SCHEDULE", "").strip():
            schedule = parse_retry_schedule("JUSTSCAN_RETRY_SCHEDULE", raw)
        timeout = DEFAULT_DELIVERY_TIMEOUT
        if raw := env.get("JUSTSCAN_DELIVERY_TIMEOUT", "").strip():
            timeout = parse_positive_float("JUSTSCAN_DELIVERY_TIMEOUT", raw)
        allow_private = False
        if raw := env.get("JUSTSCAN_ALLOW_PRIVATE_TARGETS", "").strip():
            allow_private = parse_bool("JUSTSCAN_ALLOW_PRIVATE_TARGETS", raw)
        poll = DEFAULT_POLL_INTERVAL
        if raw := env.get("JUSTSCAN_POLL_INTERVAL", "").strip():
            poll = parse_positive_float("JUSTSCAN_POLL_INTERVAL", raw)
        margin = DEFAULT_LEASE_MARGIN
        if raw := env.get("JUSTSCAN_LEASE_MARGIN", "").strip():
            margin = parse_positive_float("JUSTSCAN_LEASE_MARGIN", raw)
        in_flight = DEFAULT_MAX_IN_FLIGHT
        if raw := env.get("JUSTSCAN_MAX_IN_FLIGHT", "").strip():
            if not raw.isdigit() or not 1 <= int(raw) <= 10_000:
                raise ConfigError(f"JUSTSCAN_MAX_IN_FLIGHT: expected an integer from 1 to 10000, got {raw!r}")
            in_flight = int(raw)
        hosts = tuple(h.strip() for h in env.get("JUSTSCAN_ALLOWED_HOSTS", "").split(",") if h.strip())
        return cls(
            database_url=url or default_database_url(),
            database_url_is_default=not url,
            api_key=api_key,
            retry_schedule=schedule,
            delivery_timeout=timeout,
            allow_private_targets=allow_private,
            allowed_hosts=hosts,
            poll_interval=poll,
            lease_margin=margin,
            max_in_flight=in_flight,
        )

    def with_overrides(self, **changes: object) -> Settings:
        """A copy with CLI flags applied (only the ones given)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})  # type: ignore[arg-type]
