"""Every check of a value a caller sends, in one module.

The input models' `parse` (field rules live in `justscan_mcp.inputs`), and the few rules that
are not a field of an operation: ids given to the operator's commands, team and key names, scopes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from justscan_mcp.errors import InvalidInput
from justscan_mcp.inputs import invalid_input, parse
from justscan_mcp.models import MAX_ID, SCOPES

NAME_MAX = 200

__all__ = ["NAME_MAX", "invalid_input", "name", "parse", "positive_id", "scopes"]


def positive_id(field: str, value: Any) -> int:
    """Raises: InvalidInput (`field`) unless an integer id in 1..2^63-1 (no bool, no string)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(field, f"must be an integer id, got {value!r}")
    if not 1 <= value <= MAX_ID:
        raise InvalidInput(field, f"must be a positive integer id, got {value}")
    return value


def name(field: str, value: str | None, *, required: bool) -> str | None:
    """A team or key name: surrounding whitespace dropped, at most 200 characters.

    Raises:
        InvalidInput: (`field`) empty when required, or too long.
    """
    value = (value or "").strip() if required else value
    if required and not value:
        raise InvalidInput(field, "must not be empty")
    if value is not None and len(value) > NAME_MAX:
        raise InvalidInput(field, f"is {len(value)} characters long; the limit is {NAME_MAX}")
    return value


def scopes(values: Iterable[Any]) -> list[str]:
    """Raises: InvalidInput (field ``scopes``) for an empty list, an unknown scope or a duplicate."""
    out: list[str] = []
    for scope in values:
        if scope not in SCOPES:
            raise InvalidInput("scopes", f"{scope!r} is not a scope; choose from {', '.join(SCOPES)}")
        if scope in out:
            raise InvalidInput("scopes", f"{scope!r} is listed twice")
        out.append(scope)
    if not out:
        raise InvalidInput("scopes", f"must list at least one scope from {', '.join(SCOPES)}")
    return out
