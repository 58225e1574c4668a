"""The OAuth authorization server's use cases on both databases: consent, single-use codes,
refresh rotation with reuse detection, audience binding, expiry, and what revoking a key or a
grant does. The HTTP endpoints and real OAuth clients are tested on top of these."""

from __future__ import annotations

import base64
import hashlib
from datetime import timedelta

import pytest
from sqlalchemy import text

from justscan_mcp.app import App
from justscan_mcp.errors import InvalidInput, McpDisabled, NotFound, OAuthRefused, Unauthenticated
from tests.conftest import TeamKit, make_team

RESOURCE = "http://127.0.0.1:8123/mcp"
REDIRECT = "http://127.0.0.1:33418/callback"
VERIFIER = "a-long-enough-pkce-code-verifier-for-the-tests-0123456789"
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).decode().rstrip("=")


@pytest.fixture
def oauth(app: App, monkeypatch: pytest.MonkeyPatch) -> App:
    monkeypatch.setattr(app.service, "oauth_resource", RESOURCE)
    return app


def register(app: App) -> str:
    return app.service.register_oauth_client(
        document={"client_name": "Claude", "redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"},
        secret=None,
    )


def consent(app: App, kit: TeamKit, client_id: str, scopes=("webhooks:read",), key=None):
    handle = app.service.begin_authorization(
        client_id=client_id,
        request={
            "state": "xyz",
            "scopes": list(scopes),
            "code_challenge": CHALLENGE,
            "redirect_uri": REDIRECT,
            "redirect_uri_explicit": True,
            "resource": RESOURCE,
        },
    )
    shown = app.service.consent(handle)
    assert (shown.client_name, shown.redirect_uri, shown.state) == ("Claude", REDIRECT, "xyz")
    uri, code, state = app.service.approve_authorization(
        principal=kit.principal(key), handle=handle, scopes=scopes
    )
    assert (uri, state) == (REDIRECT, "xyz")
    return code


def tokens(app: App, client_id: str, code: str):
    grant = app.service.load_code(client_id=client_id, code=code)
    assert grant is not None and grant.code_challenge == CHALLENGE and grant.resource == RESOURCE
    return grant, app.service.redeem_code(code=code, grant=grant)


def test_the_whole_flow_and_refresh_rotation(oauth: App):
    kit = make_team(oauth, "oauth")
    client = register(oauth)
    code = consent(oauth, kit, client, scopes=("webhooks:read",))
    _, pair = tokens(oauth, client, code)
    holder = oauth.service.verify_access_token(pair.access_token)
    assert holder is not None and holder.key_id == kit.rw.id and holder.scopes == ["webhooks:read"]
    # The token acts as the key, with the approved scopes only (the key also has write).
    principal = oauth.service.principal_for_grant(holder.grant_id)
    assert principal.team_id == kit.team.id and principal.scopes == frozenset({"webhooks:read"})
    refreshed = oauth.service.load_refresh(client_id=client, token=pair.refresh_token)
    assert refreshed is not None
    second = oauth.service.rotate_refresh(token=pair.refresh_token, grant=refreshed, scopes=[])
    assert second.refresh_token != pair.refresh_token and oauth.service.verify_access_token(
        second.access_token
    )
    # Using the old refresh token again revokes the whole grant: every token of it stops working.
    assert oauth.service.load_refresh(client_id=client, token=pair.refresh_token) is None
    assert oauth.service.verify_access_token(second.access_token) is None
    assert oauth.service.load_refresh(client_id=client, token=second.refresh_token) is None


def test_a_code_used_twice_revokes_what_it_issued(oauth: App):
    kit = make_team(oauth, "oauth-code")
    client = register(oauth)
    code = consent(oauth, kit, client)
    _, pair = tokens(oauth, client, code)
    assert oauth.service.load_code(client_id=client, code=code) is None
    assert oauth.service.verify_access_token(pair.access_token) is None


def test_a_racing_second_redemption_is_refused_and_revokes(oauth: App):
    kit = make_team(oauth, "oauth-race")
    client = register(oauth)
    code = consent(oauth, kit, client)
    grant = oauth.service.load_code(client_id=client, code=code)
    again = oauth.service.load_code(client_id=client, code=code)  # both loaded before either redeemed
    assert grant is not None and again is not None
    pair = oauth.service.redeem_code(code=code, grant=grant)
    with pytest.raises(OAuthRefused) as err:
        oauth.service.redeem_code(code=code, grant=again)
    assert err.value.error == "invalid_grant"
    assert oauth.service.verify_access_token(pair.access_token) is None


def test_another_clients_code_or_refresh_token_does_not_exist(oauth: App):
    kit = make_team(oauth, "oauth-other")
    mine, theirs = register(oauth), register(oauth)
    code = consent(oauth, kit, mine)
    assert oauth.service.load_code(client_id=theirs, code=code) is None
    _, pair = tokens(oauth, mine, code)
    assert oauth.service.load_refresh(client_id=theirs, token=pair.refresh_token) is None
    assert oauth.service.verify_access_token(pair.access_token) is not None  # nothing was revoked


def test_scopes_beyond_the_key_and_a_switched_off_key_are_refused(oauth: App):
    kit = make_team(oauth, "oauth-scopes")
    client = register(oauth)
    reader = kit.key(scopes=["webhooks:read"])
    handle = oauth.service.begin_authorization(
        client_id=client,
        request={"scopes": ["webhooks:write"], "code_challenge": CHALLENGE, "redirect_uri": REDIRECT},
    )
    with pytest.raises(InvalidInput) as err:
        oauth.service.approve_authorization(
            principal=kit.principal(reader), handle=handle, scopes=["webhooks:write"]
        )
    assert err.value.field == "scopes" and "webhooks:write" in err.value.message
    with pytest.raises(InvalidInput):
        oauth.service.approve_authorization(principal=kit.principal(reader), handle=handle, scopes=[])
    off = kit.key(mcp_enabled=False)
    with pytest.raises(McpDisabled):
        oauth.service.approve_authorization(
            principal=kit.principal(off), handle=handle, scopes=["webhooks:read"]
        )
    assert oauth.service.connected_apps(team_id=kit.team.id) == []
    # The request is still there for a key that may approve it; once used, it is gone.
    oauth.service.approve_authorization(
        principal=kit.principal(reader), handle=handle, scopes=["webhooks:read"]
    )
    with pytest.raises(NotFound):
        oauth.service.consent(handle)


def test_tokens_are_bound_to_this_servers_resource(oauth: App, monkeypatch: pytest.MonkeyPatch):
    kit = make_team(oauth, "oauth-aud")
    client = register(oauth)
    with pytest.raises(OAuthRefused) as err:
        oauth.service.begin_authorization(
            client_id=client,
            request={
                "code_challenge": CHALLENGE,
                "redirect_uri": REDIRECT,
                "resource": "https://other.example/mcp",
            },
        )
    assert err.value.error == "invalid_target"
    _, pair = tokens(oauth, client, consent(oauth, kit, client))
    # The same database serving another resource URL: the token is for another audience there.
    monkeypatch.setattr(oauth.service, "oauth_resource", "https://mcp.example.com/mcp")
    assert oauth.service.verify_access_token(pair.access_token) is None


def test_access_tokens_expire_after_an_hour(oauth: App, monkeypatch: pytest.MonkeyPatch):
    kit = make_team(oauth, "oauth-exp")
    client = register(oauth)
    _, pair = tokens(oauth, client, consent(oauth, kit, client))
    start = oauth.service.clock()
    monkeypatch.setattr(oauth.service, "clock", lambda: start + timedelta(minutes=59))
    assert oauth.service.verify_access_token(pair.access_token) is not None
    monkeypatch.setattr(oauth.service, "clock", lambda: start + timedelta(minutes=61))
    assert oauth.service.verify_access_token(pair.access_token) is None


def test_revoking_the_key_or_the_grant_ends_the_tokens(oauth: App):
    kit = make_team(oauth, "oauth-revoke")
    client = register(oauth)
    key = kit.key()
    _, pair = tokens(oauth, client, consent(oauth, kit, client, key=key))
    holder = oauth.service.verify_access_token(pair.access_token)
    assert holder is not None
    oauth.service.revoke_api_key(key_id=key.id)
    with pytest.raises(Unauthenticated):
        oauth.service.principal_for_grant(holder.grant_id)
    refresh = oauth.service.load_refresh(client_id=client, token=pair.refresh_token)
    assert refresh is not None
    with pytest.raises(OAuthRefused) as err:
        oauth.service.rotate_refresh(token=pair.refresh_token, grant=refresh, scopes=[])
    assert err.value.error == "invalid_grant"
    # A grant is listed under Connected apps until it is revoked there.
    _, other = tokens(oauth, client, consent(oauth, kit, client))
    (app_row,) = [a for a in oauth.service.connected_apps(team_id=kit.team.id) if a["key_id"] == kit.rw.id]
    assert app_row["client_name"] == "Claude" and app_row["scopes"] == ["webhooks:read"]
    with pytest.raises(NotFound):
        oauth.service.revoke_connected_app(grant_id=app_row["grant_id"], team_id=kit.team.id + 10_000)
    oauth.service.revoke_connected_app(grant_id=app_row["grant_id"], team_id=kit.team.id)
    assert oauth.service.verify_access_token(other.access_token) is None


def test_codes_tokens_and_client_secrets_are_stored_only_as_hashes(oauth: App):
    kit = make_team(oauth, "oauth-hash")
    secret = "a-client-secret-that-must-not-be-stored"
    client = oauth.service.register_oauth_client(
        document={"client_name": "Claude", "redirect_uris": [REDIRECT], "client_secret": secret},
        secret=secret,
    )
    code = consent(oauth, kit, client)
    _, pair = tokens(oauth, client, code)
    with oauth.store.engine.connect() as c:
        dump = " ".join(
            str(row)
            for table in ("oauth_clients", "oauth_codes", "oauth_tokens", "oauth_grants", "oauth_requests")
            for row in c.execute(text(f"SELECT * FROM {table}")).all()
        )
    for value in (secret, code, pair.access_token, pair.refresh_token):
        assert value not in dump
