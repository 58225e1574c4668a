"""Signatures a receiver checks. Pure functions of their inputs.

- `X-Webhook-Signature`: hex HMAC-SHA256 of the raw body, keyed with the whole secret string as
  UTF-8. That is what the guide's PHP (`hash_hmac`), Node and Python snippets compute.
- Standard Webhooks (`webhook-signature`): ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``,
  keyed with the base64-decoded part of ``whsec_...``. Several space-separated signatures
  may be sent while a secret is being rotated.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable

from justscan_mcp.security import WEBHOOK_SECRET_PREFIX


def guide_signature(secret: str, body: bytes) -> str:
    """The `X-Webhook-Signature` value."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def standard_signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature, ``v1,<base64>``."""
    key = base64.b64decode(secret.removeprefix(WEBHOOK_SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")


def standard_signatures(signing_secrets: Iterable[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header for one or more secrets (rotation)."""
    return " ".join(standard_signature(s, msg_id, timestamp, body) for s in signing_secrets)
