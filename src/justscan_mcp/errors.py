"""The one exception tree of justscan-mcp.

Every error a caller is expected to handle derives from `JustScanError`. Front ends map these
classes to their own vocabulary (MCP tool errors, HTTP status codes, CLI exit codes) in one place
each; the service never knows which front end called it.

    JustScanError
    ├── InvalidInput          bad field value; `.field` names it            (HTTP 422)
    ├── NotFound              unknown id, or another team's id               (HTTP 404)
    ├── Conflict              unique name already taken                      (HTTP 409)
    ├── AuthError
    │   ├── Unauthenticated   no key, unknown key, revoked key               (HTTP 401)
    │   └── Forbidden         key valid but not allowed                      (HTTP 403)
    │       ├── McpDisabled   the key's MCP switch is off
    │       └── MissingScope  the key lacks `.scope`
    ├── OAuthRefused          an OAuth request refused; `.error` is RFC 6749's code
    ├── ConfigError           an environment variable or flag is malformed
    ├── Overloaded            too much work waits already; retry shortly     (HTTP 429)
    └── StoreUnavailable      the database cannot be reached

Third-party errors (SQLAlchemy, socket) are translated at the adapter boundary with
`raise ... from exc`, so nothing above `store` catches a driver exception.
"""

from __future__ import annotations


class JustScanError(Exception):
    """Root of every error justscan-mcp raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(JustScanError):
    """A value failed a rule; `field` names the offending input (dotted for nested fields)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class NotFound(JustScanError):
    """The id is unknown to the caller's team (a foreign id looks exactly like a missing one)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Conflict(JustScanError):
    """A value that must be unique is already taken."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class AuthError(JustScanError):
    """The caller is not allowed to do this."""


class Unauthenticated(AuthError):
    """No API key, an unknown one, or a revoked one."""


class Forbidden(AuthError):
    """The API key is valid but may not do this."""


class McpDisabled(Forbidden):
    """The API key's MCP switch is off."""


class MissingScope(Forbidden):
    """The API key lacks the scope an operation needs."""

    def __init__(self, scope: str, operation: str) -> None:
        super().__init__(
            f"this API key lacks the '{scope}' scope, which {operation} needs; "
            f"use a key that has '{scope}' (justscan-mcp key update ID --scopes ...)"
        )
        self.scope = scope
        self.operation = operation


class OAuthRefused(JustScanError):
    """An OAuth request the authorization server refuses; `error` is the RFC 6749 error code
    (invalid_grant, invalid_scope, invalid_target, access_denied, ...)."""

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class ConfigError(JustScanError):
    """Configuration (environment or flags) is malformed."""


class Overloaded(JustScanError):
    """More work waits than the service takes on: the caller should retry after a moment
    (HTTP 429 with Retry-After) rather than the service queueing without bound."""

    RETRY_AFTER = 1  # seconds


class StoreUnavailable(JustScanError):
    """The database cannot be reached right now.

    `message` carries the driver's words (host, port) for logs and the operator's CLI; clients
    get `PUBLIC` instead.
    """

    PUBLIC = "the webhook store is temporarily unavailable; try again in a moment"


HTTP_STATUS: tuple[tuple[type[JustScanError], int, str], ...] = (
    (InvalidInput, 422, "invalid_input"),
    (NotFound, 404, "not_found"),
    (Conflict, 409, "conflict"),
    (Unauthenticated, 401, "unauthenticated"),
    (Forbidden, 403, "forbidden"),
    (Overloaded, 429, "overloaded"),
    (StoreUnavailable, 503, "unavailable"),
)
"""The one error -> HTTP status table, for the REST API and the dashboard alike."""


def http_status(exc: JustScanError) -> tuple[int, str]:
    """The HTTP status and short code of an error (500 "internal" for one not in the table)."""
    for cls, status, code in HTTP_STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def public_message(exc: JustScanError) -> str:
    """What a caller is told: never the driver's words for a database outage."""
    return StoreUnavailable.PUBLIC if isinstance(exc, StoreUnavailable) else exc.message
