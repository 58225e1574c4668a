"""The service over real stores (SQLite file and PostgreSQL): every rule, and nothing stored on refusal."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from justscan_mcp.errors import Conflict, InvalidInput, McpDisabled, MissingScope, NotFound, Unauthenticated
from justscan_mcp.security import hash_api_key
from justscan_mcp.service import Service
from justscan_mcp.service.operations import invoke
from tests.conftest import PUBLIC_URL, TeamKit, make_team


def create(kit: TeamKit, **kwargs):
    args = {"url": PUBLIC_URL, "events": ["scan"], "description": None} | kwargs
    return kit.app.service.create_webhook(principal=kit.principal(), **args)


def test_create_get_list_delete_round_trip(kit: TeamKit):
    svc = kit.app.service
    created = create(
        kit, url="https://hooks.example.test/in", events=["scan", "first_scan"], description="CRM"
    )
    assert created.secret.startswith("whsec_")
    assert created.team_id == kit.team.id and created.active is True
    assert created.created_at.tzinfo is not None and created.created_at == created.updated_at
    got = svc.get_webhook(principal=kit.principal(), webhook_id=created.id)
    assert got.model_dump() == created.model_dump(exclude={"secret"})
    assert "secret" not in got.model_dump()
    page = svc.list_webhooks(principal=kit.principal())
    assert [w.id for w in page.webhooks] == [created.id] and page.next_cursor is None
    assert "secret" not in page.model_dump()["webhooks"][0]
    svc.delete_webhook(principal=kit.principal(), webhook_id=created.id)
    with pytest.raises(NotFound):
        svc.get_webhook(principal=kit.principal(), webhook_id=created.id)
    assert kit.webhook_count() == 0


def test_secrets_differ_and_are_stored_for_signing(kit: TeamKit):
    a, b = create(kit), create(kit)
    assert a.secret != b.secret
    stored = kit.app.store.get_webhook(team_id=kit.team.id, webhook_id=a.id)
    assert stored is not None and stored.secret == a.secret


BAD_CREATES = [
    ({"url": "ftp://hooks.example.test/x"}, "url"),
    ({"url": "/relative"}, "url"),
    ({"url": "https://hooks.example.test/" + "a" * 2100}, "url"),
    ({"url": "https://127.0.0.1/x"}, "url"),
    ({"url": "https://10.0.0.1/x"}, "url"),
    ({"url": "https://169.254.169.254/x"}, "url"),
    ({"url": "https://[::1]/x"}, "url"),
    ({"url": "https://nowhere.example.test/x"}, "url"),
    ({"events": ["scan2"]}, "events"),
    ({"events": []}, "events"),
    ({"events": ["scan", "scan"]}, "events"),
    ({"events": ["test"]}, "events"),
    ({"events": "scan"}, "events"),
    ({"description": "d" * 501}, "description"),
    ({"description": 5}, "description"),
    ({"rate_limit": 0}, "rate_limit"),
    ({"rate_limit": 1001}, "rate_limit"),
    ({"rate_limit": "7"}, "rate_limit"),
]


@pytest.mark.parametrize("change,field", BAD_CREATES)
def test_bad_input_names_the_field_and_stores_nothing(kit: TeamKit, change: dict, field: str):
    with pytest.raises(InvalidInput) as err:
        create(kit, **change)
    assert err.value.field == field
    assert err.value.message.startswith(f"{field}: ")
    assert kit.webhook_count() == 0


def test_url_length_is_a_rule_of_the_input_model():
    """Moved from test_targets with the rule: the URL's length lives in `inputs.WebhookUrl`."""
    from justscan_mcp.inputs import WebhookCreate, parse

    with pytest.raises(InvalidInput) as err:
        parse(WebhookCreate, {"url": "https://hooks.example.test/" + "a" * 2030, "events": ["scan"]})
    assert err.value.field == "url" and "2048" in err.value.reason


def test_description_of_exactly_500_and_url_of_exactly_2048_are_fine(kit: TeamKit):
    base = "https://hooks.example.test/"
    created = create(kit, url=base + "a" * (2048 - len(base)), description="d" * 500)
    assert len(created.url) == 2048


@pytest.mark.parametrize("webhook_id", [-1, 0, True, "7"])
def test_malformed_ids_are_invalid_input(kit: TeamKit, webhook_id):
    for call in (kit.app.service.get_webhook, kit.app.service.delete_webhook):
        with pytest.raises(InvalidInput) as err:
            call(principal=kit.principal(), webhook_id=webhook_id)
        assert err.value.field == "webhook_id"


def test_foreign_id_behaves_exactly_like_a_missing_one(kit: TeamKit, other: TeamKit):
    theirs = create(other)
    svc = kit.app.service
    errors = []
    for webhook_id in (theirs.id, 10**12):
        for call in (svc.get_webhook, svc.delete_webhook):
            with pytest.raises(NotFound) as err:
                call(principal=kit.principal(), webhook_id=webhook_id)
            errors.append(err.value.message.replace(str(webhook_id), "N"))
    assert len(errors) == 4 and len(set(errors)) == 1  # one wording, whatever the id or the call
    assert [w.id for w in svc.list_webhooks(principal=kit.principal()).webhooks] == []
    assert other.webhook_count() == 1  # still there


def test_pagination_is_stable_complete_and_opaque(kit: TeamKit):
    ids = [create(kit).id for _ in range(7)]
    svc = kit.app.service
    seen, cursor, pages = [], None, 0
    while True:
        page = svc.list_webhooks(principal=kit.principal(), cursor=cursor, limit=3)
        seen += [w.id for w in page.webhooks]
        pages += 1
        if page.next_cursor is None:
            break
        assert not page.next_cursor.isdigit()  # opaque, not a bare id (forgery is refused elsewhere)
        cursor = page.next_cursor
    assert seen == ids and pages == 3
    # Deleting a row already seen does not disturb the walk.
    first = svc.list_webhooks(principal=kit.principal(), limit=2)
    svc.delete_webhook(principal=kit.principal(), webhook_id=ids[0])
    rest = svc.list_webhooks(principal=kit.principal(), cursor=first.next_cursor, limit=100)
    assert [w.id for w in rest.webhooks] == ids[2:]


@pytest.mark.parametrize("limit", [0, 101, 1000, -5, True, "20"])
def test_limit_out_of_range_is_an_error_not_clamped(kit: TeamKit, limit):
    with pytest.raises(InvalidInput) as err:
        kit.app.service.list_webhooks(principal=kit.principal(), limit=limit)
    assert err.value.field == "limit"


def test_limit_bounds_are_inclusive(kit: TeamKit):
    for limit in (1, 100):
        kit.app.service.list_webhooks(principal=kit.principal(), limit=limit)


def test_cursor_from_another_team_forged_or_stale_is_refused(kit: TeamKit, other: TeamKit):
    for _ in range(3):
        create(kit)
        create(other)
    svc = kit.app.service
    theirs = svc.list_webhooks(principal=other.principal(), limit=1).next_cursor
    mine = svc.list_webhooks(principal=kit.principal(), limit=1).next_cursor
    for cursor in (theirs, mine + "x", "garbage", ""):
        with pytest.raises(InvalidInput) as err:
            svc.list_webhooks(principal=kit.principal(), cursor=cursor)
        assert err.value.field == "cursor"
    later = Service(
        svc.store, svc.settings, resolver=svc.resolver, clock=lambda: svc.clock() + timedelta(hours=25)
    )
    with pytest.raises(InvalidInput, match="expired"):
        later.list_webhooks(principal=kit.principal(), cursor=mine)


@pytest.mark.anyio
async def test_scopes_are_enforced_by_the_operation_gate(kit: TeamKit):
    """Moved with the rule: the operation table's `invoke` is the one scope gate of every front end."""
    ro = kit.principal(kit.key(scopes=["webhooks:read"]))
    wo = kit.principal(kit.key(scopes=["webhooks:write"]))
    svc = kit.app.service
    with pytest.raises(MissingScope) as err:
        await invoke(svc, "create_webhook", principal=ro, args={"url": PUBLIC_URL, "events": ["scan"]})
    assert err.value.scope == "webhooks:write" and "webhooks:write" in err.value.message
    with pytest.raises(MissingScope, match="webhooks:read"):
        await invoke(svc, "list_webhooks", principal=wo, args={})
    hook = await invoke(svc, "create_webhook", principal=wo, args={"url": PUBLIC_URL, "events": ["scan"]})
    with pytest.raises(MissingScope, match="webhooks:write"):
        await invoke(svc, "delete_webhook", principal=ro, args={"webhook_id": hook.id})
    assert kit.webhook_count() == 1


def test_only_the_hash_of_a_key_is_stored(kit: TeamKit):
    created = kit.key(name="ci")
    with kit.app.store.engine.connect() as conn:
        rows = [tuple(str(v) for v in r) for r in conn.execute(text("SELECT * FROM api_keys"))]
    assert not any(created.key in v for row in rows for v in row)
    assert any(hash_api_key(created.key) in row for row in rows)
    listed = kit.app.service.list_api_keys(team_id=kit.team.id)
    assert created.prefix in [k.prefix for k in listed]
    assert all("key" not in k.model_dump() for k in listed)


def test_authentication_states(kit: TeamKit):
    svc = kit.app.service
    for raw in (None, "", "Bearer", "jsi_" + "x" * 43, "sk_live_abc"):
        with pytest.raises(Unauthenticated):
            svc.authenticate(raw)
    off = kit.key(mcp_enabled=False)
    principal = svc.authenticate(off.key)
    with pytest.raises(McpDisabled, match="MCP is not enabled"):
        svc.require_mcp(principal)
    svc.update_api_key(key_id=off.id, mcp_enabled=True)
    svc.require_mcp(svc.principal_for_key_id(off.id))
    svc.revoke_api_key(key_id=off.id)
    with pytest.raises(Unauthenticated, match="revoked"):
        svc.authenticate(off.key)
    with pytest.raises(Unauthenticated, match="revoked"):
        svc.principal_for_key_id(off.id)


def test_last_used_is_recorded(kit: TeamKit):
    kit.principal()
    key = kit.app.store.get_api_key(kit.rw.id)
    assert key is not None and key.last_used_at is not None


def test_key_and_team_management_errors(app, kit: TeamKit):
    svc = app.service
    with pytest.raises(Conflict) as err:
        svc.create_team(name=kit.team.name)
    assert err.value.field == "name"
    for name in ("", "   ", "n" * 201):
        with pytest.raises(InvalidInput, match="name"):
            svc.create_team(name=name)
    with pytest.raises(NotFound) as nf:
        svc.create_api_key(team_id=10**9)
    assert nf.value.field == "team"
    for scopes in ([], ["webhooks:admin"], ["webhooks:read", "webhooks:read"]):
        with pytest.raises(InvalidInput) as bad:
            svc.create_api_key(team_id=kit.team.id, scopes=scopes)
        assert bad.value.field == "scopes"
    with pytest.raises(NotFound):
        svc.update_api_key(key_id=10**9, mcp_enabled=False)
    with pytest.raises(NotFound):
        svc.revoke_api_key(key_id=10**9)
    with pytest.raises(InvalidInput):
        svc.update_api_key(key_id=kit.rw.id)
    assert len(svc.list_api_keys(team_id=kit.team.id)) == 1


def test_two_teams_two_stores_share_cursor_key(app, kit: TeamKit):
    """A second process on the same database accepts cursors the first issued."""
    from justscan_mcp.app import App

    for _ in range(2):
        create(kit)
    cursor = app.service.list_webhooks(principal=kit.principal(), limit=1).next_cursor
    second = App.build(app.settings)
    try:
        page = second.service.list_webhooks(principal=kit.principal(), cursor=cursor)
        assert len(page.webhooks) == 1
    finally:
        second.close()


def test_new_team_after_many_is_isolated(app):
    teams = [make_team(app, "iso") for _ in range(3)]
    for t in teams:
        create(t)
    for t in teams:
        assert [w.team_id for w in app.service.list_webhooks(principal=t.principal()).webhooks] == [t.team.id]


def test_driver_sql_reads_of_keys_and_webhook_pages_match_the_orm(kit: TeamKit):
    """list_webhooks and the key reads use driver SQL (issue 17, for MCP latency): what they
    return must be what the ORM returned, on both databases: aware UTC times, parsed JSON lists,
    real booleans, every field."""
    from sqlmodel import Session, select

    from justscan_mcp.models import ApiKey, Webhook, WebhookPublic

    app = kit.app
    p = kit.principal()
    made = app.service.create_webhook(
        principal=p, url=PUBLIC_URL, events=["scan", "form_submit"], description="d"
    )
    app.service.update_webhook(principal=p, webhook_id=made.id, changes={"active": False, "rate_limit": 3})
    app.service.create_webhook(principal=p, url=PUBLIC_URL, events=["scan"])
    app.service.revoke_api_key(key_id=kit.key(scopes=["webhooks:read"]).id)
    with Session(app.store.engine) as s:
        orm_hooks = s.exec(select(Webhook).where(Webhook.team_id == p.team_id).order_by(Webhook.id)).all()
        expected = [WebhookPublic.model_validate(w) for w in orm_hooks]
        orm_keys = {
            k.id: k.model_dump() for k in s.exec(select(ApiKey).where(ApiKey.team_id == p.team_id)).all()
        }
    page = app.store.list_webhooks(team_id=p.team_id, after_id=0, limit=100)
    assert page == expected and len(page) >= 2
    assert all(w.created_at.utcoffset() == timedelta(0) for w in page)
    assert page[0].events == ["scan", "form_submit"] and page[0].active is False and page[0].rate_limit == 3
    for key_id, fields in orm_keys.items():
        read = app.store.get_api_key(key_id)
        assert read is not None and read.model_dump() == fields
        assert app.store.get_api_key_by_hash(fields["key_hash"]).model_dump() == fields
        assert isinstance(read.mcp_enabled, bool) and isinstance(read.scopes, list)
    assert any(f["revoked_at"] is not None for f in orm_keys.values())
    assert app.store.get_api_key(10**9) is None and app.store.get_api_key_by_hash("0" * 64) is None
