from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

import pytest

from justscan_mcp.errors import InvalidInput
from justscan_mcp.security import (
    CursorCodec,
    api_key_prefix,
    generate_api_key,
    generate_webhook_secret,
    hash_api_key,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
codec = CursorCodec(b"k" * 32)


def test_api_keys_are_random_prefixed_and_hash_stably():
    a, b = generate_api_key(), generate_api_key()
    assert a != b and a.startswith("jsi_") and len(a) == 47
    assert hash_api_key(a) == hash_api_key(a) != hash_api_key(b)
    assert len(hash_api_key(a)) == 64 and a not in hash_api_key(a)
    assert api_key_prefix(a) == a[:12]


def test_webhook_secrets_are_standard_webhooks_form():
    secret = generate_webhook_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    assert secret != generate_webhook_secret()


def test_cursor_round_trip():
    c = codec.encode(kind="webhooks", team_id=3, after_id=41, now=NOW)
    assert codec.decode(c, kind="webhooks", team_id=3, now=NOW + timedelta(hours=23)) == 41


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c[:-2] + ("AA" if not c.endswith("AA") else "BB"),  # signature changed
        lambda c: "x" + c,  # body changed
        lambda c: c.split(".")[0],  # signature missing
        lambda c: "not-a-cursor",
        lambda c: "....",
        lambda c: c + "." * 600,
    ],
)
def test_forged_cursors_are_refused_naming_cursor(mutate):
    c = codec.encode(kind="webhooks", team_id=3, after_id=41, now=NOW)
    with pytest.raises(InvalidInput) as err:
        codec.decode(mutate(c), kind="webhooks", team_id=3, now=NOW)
    assert err.value.field == "cursor"


def test_cursor_from_another_key_team_or_listing_is_refused():
    c = codec.encode(kind="webhooks", team_id=3, after_id=41, now=NOW)
    for kwargs in ({"kind": "webhooks", "team_id": 4}, {"kind": "deliveries", "team_id": 3}):
        with pytest.raises(InvalidInput, match="not a cursor"):
            codec.decode(c, now=NOW, **kwargs)
    with pytest.raises(InvalidInput, match="not a cursor"):
        CursorCodec(b"other" * 8).decode(c, kind="webhooks", team_id=3, now=NOW)


def test_stale_cursor_is_refused():
    c = codec.encode(kind="webhooks", team_id=3, after_id=41, now=NOW)
    with pytest.raises(InvalidInput, match="expired") as err:
        codec.decode(c, kind="webhooks", team_id=3, now=NOW + timedelta(hours=25))
    assert err.value.field == "cursor"
