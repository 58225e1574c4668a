"""Pure helpers for credentials and cursors. No IO, no clock reads: `now` is passed in.

- API keys are ``jsi_`` + 43 URL-safe characters (32 random bytes). They carry enough entropy that
  a plain SHA-256 is the right stored form (as GitHub and Stripe do for tokens): a slow password
  hash would only add latency to every authenticated call.
- Webhook secrets are ``whsec_`` + base64 of 32 random bytes, the form Standard Webhooks takes.
- Cursors are opaque, HMAC-signed tokens bound to a team and a listing kind, valid for a day.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from justscan_mcp.errors import InvalidInput

API_KEY_PREFIX = "jsi_"
KEY_VISIBLE_CHARS = 8
WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
CURSOR_TTL = timedelta(hours=24)
_CURSOR_CLOCK_SKEW = timedelta(minutes=5)


def generate_api_key() -> str:
    """A new API key from the OS CSPRNG."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """The stored form of a key: hex SHA-256."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def api_key_prefix(key: str) -> str:
    """The short visible start of a key, enough to tell keys apart in a list."""
    return key[: len(API_KEY_PREFIX) + KEY_VISIBLE_CHARS]


def looks_like_api_key(value: str) -> bool:
    return value.startswith(API_KEY_PREFIX) and 20 <= len(value) <= 100


def generate_webhook_secret() -> str:
    """A new webhook signing secret from the OS CSPRNG."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def generate_instance_key() -> str:
    return secrets.token_urlsafe(32)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class CursorCodec:
    """Signs and checks pagination cursors with a key shared by every process on one database."""

    key: bytes

    def encode(self, *, kind: str, team_id: int, after_id: int, now: datetime) -> str:
        payload = json.dumps(
            {"k": kind, "t": team_id, "a": after_id, "i": int(now.timestamp())}, separators=(",", ":")
        ).encode()
        return f"{_b64e(payload)}.{_b64e(self._mac(payload))}"

    def decode(self, cursor: str, *, kind: str, team_id: int, now: datetime) -> int:
        """Return the id the next page starts after.

        Raises:
            InvalidInput: (field ``cursor``) for a cursor that was not issued here, was issued for
                another listing or team, or is older than `CURSOR_TTL`.
        """
        forged = InvalidInput(
            "cursor", "is not a cursor this server issued; pass next_cursor from the previous page unchanged"
        )
        body, sep, mac = cursor.partition(".")
        if not sep or len(cursor) > 512:
            raise forged
        try:
            payload = _b64d(body)
            given = _b64d(mac)
        except (binascii.Error, ValueError):
            raise forged from None
        if not hmac.compare_digest(given, self._mac(payload)):
            raise forged
        try:
            data = json.loads(payload)
            k, t, a, i = data["k"], data["t"], data["a"], data["i"]
        except (ValueError, KeyError, TypeError):
            raise forged from None
        if k != kind or t != team_id or not isinstance(a, int) or not isinstance(i, int):
            raise forged
        issued = datetime.fromtimestamp(i, tz=now.tzinfo)
        if now - issued > CURSOR_TTL or issued - now > _CURSOR_CLOCK_SKEW:
            raise InvalidInput("cursor", "has expired; start again from the first page (omit cursor)")
        return a

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self.key, payload, hashlib.sha256).digest()[:16]
