"""The CLI as a user runs it: subprocesses, --json on stdout, errors on stderr, exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import PUBLIC_URL, child_env, spawn_server, wait_for


def run(db_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "justscan_mcp", *args],
        env=env or child_env(db_url),
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok_json(db_url: str, *args: str):
    proc = run(db_url, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_team_and_key_lifecycle_in_json(db_url: str):
    team = ok_json(db_url, "team", "create", f"cli-{os.getpid()}-{id(db_url)}")
    assert set(team) == {"id", "name"}
    key = ok_json(
        db_url,
        "key",
        "create",
        "--team",
        str(team["id"]),
        "--scopes",
        "webhooks:read",
        "--no-mcp",
        "--name",
        "ci",
    )
    assert (
        key["key"].startswith("jsi_") and key["scopes"] == ["webhooks:read"] and key["mcp_enabled"] is False
    )
    assert key["team_id"] == team["id"] and isinstance(key["id"], int)
    listed = ok_json(db_url, "key", "list", "--team", str(team["id"]))
    assert [k["id"] for k in listed] == [key["id"]]
    assert key["key"] not in json.dumps(listed) and listed[0]["prefix"] == key["key"][:12]
    updated = ok_json(
        db_url, "key", "update", str(key["id"]), "--mcp", "--scopes", "webhooks:read,webhooks:write"
    )
    assert updated["mcp_enabled"] is True and updated["scopes"] == ["webhooks:read", "webhooks:write"]
    revoked = ok_json(db_url, "key", "revoke", str(key["id"]))
    assert revoked["revoked_at"] is not None
    default = ok_json(db_url, "key", "create", "--team", str(team["id"]))
    assert default["scopes"] == ["webhooks:read", "webhooks:write"] and default["mcp_enabled"] is True
    assert any(t["id"] == team["id"] for t in ok_json(db_url, "team", "list"))


def test_human_output_shows_the_key_once_and_lists_without_it(db_url: str):
    team = ok_json(db_url, "team", "create", f"human-{os.getpid()}")
    created = run(db_url, "key", "create", "--team", str(team["id"]))
    assert created.returncode == 0 and created.stdout.startswith("jsi_")
    key = created.stdout.split()[0]
    listed = run(db_url, "key", "list", "--team", str(team["id"]))
    assert listed.returncode == 0 and key[:12] in listed.stdout and key not in listed.stdout


@pytest.mark.parametrize(
    "args,field,words",
    [
        (("team", "create", ""), "name", "must not be empty"),
        (("key", "create", "--team", "999999999"), "team", "does not exist"),
        (("key", "create", "--team", "1", "--scopes", "webhooks:admin"), "scopes", "not a scope"),
        (("key", "create", "--team", "1", "--scopes", ""), "scopes", "at least one"),
        (("key", "update", "999999999", "--mcp"), "key", "does not exist"),
        (("key", "revoke", "999999999"), "key", "does not exist"),
    ],
)
def test_refusals_go_to_stderr_with_nonzero_exit(db_url: str, args, field: str, words: str):
    ok_json(db_url, "team", "list")  # make sure team 1 may exist or not; the errors do not depend on it
    human = run(db_url, *args)
    assert human.returncode == 1 and human.stdout == ""
    assert human.stderr.startswith("justscan-mcp: error:") and words in human.stderr
    machine = run(db_url, *args, "--json")
    assert machine.returncode == 1 and machine.stdout == ""
    err = json.loads(machine.stderr)
    assert err["field"] == field and words in err["error"]


@pytest.mark.parametrize(
    "url,events,description,field",
    [
        ("ftp://93.184.216.34/x", "scan", None, "url"),
        ("https://10.0.0.1/x", "scan", None, "url"),
        ("https://no-such-host.invalid/x", "scan", None, "url"),
        ("https://93.184.216.34/x", "scan2", None, "events"),
        ("https://93.184.216.34/x", "", None, "events"),
        ("https://93.184.216.34/x", "scan,scan", None, "events"),
        ("https://93.184.216.34/x", "scan", "d" * 501, "description"),
    ],
)
def test_webhook_create_refusals_name_the_field_and_store_nothing(
    db_url: str, url, events, description, field
):
    team = ok_json(
        db_url, "team", "create", f"wh-{os.getpid()}-{abs(hash((url, events, description))) % 10**8}"
    )
    args = ["webhook", "create", "--team", str(team["id"]), "--url", url, "--events", events]
    if description:
        args += ["--description", description]
    proc = run(db_url, *args, "--json")
    assert proc.returncode == 1 and json.loads(proc.stderr)["field"] == field
    assert ok_json(db_url, "webhook", "list", "--team", str(team["id"])) == []


def test_webhook_rate_limit_from_the_command_line(db_url: str):
    team = ok_json(db_url, "team", "create", f"rate-{os.getpid()}-{len(db_url)}")
    base = ["--team", str(team["id"])]
    hook = ok_json(
        db_url,
        "webhook",
        "create",
        *base,
        "--url",
        "https://93.184.216.34/r",
        "--events",
        "scan",
        "--rate-limit",
        "20",
    )
    assert hook["rate_limit"] == 20
    proc = run(db_url, "webhook", "update", str(hook["id"]), *base, "--rate-limit", "0", "--json")
    assert proc.returncode == 1 and json.loads(proc.stderr)["field"] == "rate_limit"
    changed = ok_json(db_url, "webhook", "update", str(hook["id"]), *base, "--rate-limit", "none")
    assert changed["rate_limit"] is None


def test_webhook_delete_of_another_teams_id_is_not_found(db_url: str):
    mine = ok_json(db_url, "team", "create", f"mine-{os.getpid()}-{len(db_url)}")
    theirs = ok_json(db_url, "team", "create", f"theirs-{os.getpid()}-{len(db_url)}")
    hook = ok_json(
        db_url,
        "webhook",
        "create",
        "--team",
        str(theirs["id"]),
        "--url",
        "https://93.184.216.34/x",
        "--events",
        "scan",
    )
    proc = run(db_url, "webhook", "delete", str(hook["id"]), "--team", str(mine["id"]), "--json")
    assert proc.returncode == 1 and "does not exist" in json.loads(proc.stderr)["error"]
    assert [w["id"] for w in ok_json(db_url, "webhook", "list", "--team", str(theirs["id"]))] == [hook["id"]]


def test_duplicate_team_name_is_refused(db_url: str):
    name = f"dup-{os.getpid()}"
    ok_json(db_url, "team", "create", name)
    proc = run(db_url, "team", "create", name, "--json")
    assert proc.returncode == 1 and json.loads(proc.stderr)["field"] == "name"


@pytest.mark.parametrize(
    "args",
    [
        ("key", "create"),
        ("key", "create", "--team", "x"),
        ("key", "revoke", "-3"),
        ("serve", "--transport", "ws"),
        ("serve", "--port", "70000"),
        (),
    ],
)
def test_usage_errors_exit_2(db_url: str, args):
    proc = run(db_url, *args)
    assert proc.returncode == 2 and proc.stdout == "" and "usage:" in proc.stderr


def test_a_bad_public_url_stops_serve_at_start(db_url: str):
    proc = run(
        db_url, "serve", "--transport", "http", "--port", "1", "--public-url", "http://mcp.example.com"
    )
    assert proc.returncode == 1 and "--public-url" in proc.stderr and "https" in proc.stderr


def test_malformed_environment_is_reported(db_url: str):
    proc = run(db_url, "team", "list", env=child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="perhaps"))
    assert proc.returncode == 1 and "JUSTSCAN_ALLOW_PRIVATE_TARGETS" in proc.stderr


@pytest.mark.anyio
async def test_newcomer_first_run_prints_a_working_key_and_snippets(tmp_path: Path, anyio_backend):
    """The README's run command on an empty default database ends with a working MCP key."""
    data_home = tmp_path / "xdg"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUSTSCAN_")} | {
        "XDG_DATA_HOME": str(data_home)
    }
    log = tmp_path / "serve.log"
    with spawn_server(env, log) as first:
        banner = log.read_text()
        assert (data_home / "justscan-mcp" / "justscan.db").exists()
        assert f"{first.base}/mcp" in banner and f"{first.base}/sse" in banner
        key = re.search(r"API key: (jsi_\S+)", banner).group(1)
        assert f"Authorization: Bearer {key}" in banner
        snippet = json.loads(
            banner[banner.index("{", banner.index("claude_desktop_config.json")) : banner.rindex("}") + 1]
        )
        server = snippet["mcpServers"]["justscan"]
        assert server["env"] == {"JUSTSCAN_API_KEY": key}

        hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
        async with Client(streamable_http_client(f"{first.base}/mcp", http_client=hc)) as c:
            made = await c.call_tool("create_webhook", {"url": PUBLIC_URL, "events": ["scan"]})
            assert made.is_error is False

        # Launch exactly what the snippet says, as Claude Desktop would (same user data dir).
        params = StdioServerParameters(
            command=server["command"],
            args=server["args"],
            env=server["env"] | {"XDG_DATA_HOME": str(data_home)},
        )
        async with Client(params) as c:
            listed = await c.call_tool("list_webhooks", {})
            assert [w["id"] for w in listed.structured_content["webhooks"]] == [made.structured_content["id"]]
    # A second start does not make another key.
    with spawn_server(env, tmp_path / "second.log"):
        text = (tmp_path / "second.log").read_text()
        assert "API key:" not in text and "key create --team" in text


@pytest.mark.parametrize(
    "args,field,words",
    [
        (("emit", "scan", "--team", "1", "--data", "{not json"), "data", "not valid JSON"),
        (("emit", "scan2", "--team", "1", "--data", "{}"), "event", "not an event"),
        (
            ("emit", "first_scan", "--team", "1", "--data", '{"qr_code_id": 1, "scan_id": 1}'),
            "event",
            "cannot be emitted",
        ),
        (("emit", "scan", "--team", "1", "--data", "[1]"), "data", "JSON object"),
        (
            ("emit", "scan", "--team", "1", "--data", '{"qr_code_id": "x", "scan_id": 1}'),
            "data.qr_code_id",
            "integer",
        ),
        (
            ("emit", "scan", "--team", "999999999", "--data", '{"qr_code_id": 1, "scan_id": 1}'),
            "team",
            "does not exist",
        ),
        (("deliveries", "--webhook", "999999999"), "webhook_id", "does not exist"),
        (
            (
                "webhook",
                "create",
                "--team",
                "999999999",
                "--url",
                "https://93.184.216.34/",
                "--events",
                "scan",
            ),
            "team",
            "does not exist",
        ),
        (("webhook", "list", "--team", "999999999"), "team", "does not exist"),
        (("webhook", "delete", "999999999", "--team", "999999999"), "team", "does not exist"),
        (("deliveries", "--webhook", "1", "--limit", "101"), "limit", "1 to 100"),
    ],
)
def test_emit_and_deliveries_refusals(db_url: str, args, field: str, words: str):
    proc = run(db_url, *args, "--json")
    assert proc.returncode == 1 and proc.stdout == ""
    err = json.loads(proc.stderr)
    assert err["field"] == field and words in err["error"], err


@pytest.mark.anyio
async def test_emit_from_the_cli_reaches_the_receiver_through_the_server_dispatcher(
    db_url: str, tmp_path: Path, anyio_backend
):
    from tests.receiver import Receiver

    team = ok_json(db_url, "team", "create", f"e2e-{os.getpid()}-{len(db_url)}")
    key = ok_json(db_url, "key", "create", "--team", str(team["id"]))
    env = child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="1", JUSTSCAN_POLL_INTERVAL="0.1")
    with Receiver() as receiver, spawn_server(env, tmp_path / "serve.log") as server:
        hc = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key['key']}"}, timeout=30)
        async with Client(streamable_http_client(f"{server.base}/mcp", http_client=hc)) as c:
            made = (
                await c.call_tool(
                    "create_webhook", {"url": receiver.url("/e2e"), "events": ["scan", "first_scan"]}
                )
            ).structured_content
            receiver.secrets["/e2e"] = made["secret"]
            data = '{"qr_code_id": 5, "scan_id": 1, "country": "Ísland"}'
            emitted = ok_json(db_url, "emit", "scan", "--team", str(team["id"]), "--data", data)
            assert (
                set(emitted) == {"event_id", "deliveries"} and len(emitted["deliveries"]) == 2
            )  # scan + first_scan
            wait_for(lambda: len(receiver.at("/e2e")) == 2, what="both deliveries at the receiver")
            assert all(r.verified for r in receiver.at("/e2e"))
            assert sorted(r.headers["x-webhook-event"] for r in receiver.at("/e2e")) == ["first_scan", "scan"]

            def log() -> dict:
                return ok_json(db_url, "deliveries", "--webhook", str(made["id"]))

            wait_for(
                lambda: all(d["state"] == "succeeded" for d in log()["deliveries"]),
                what="succeeded in the log",
            )
            log_doc = log()
            assert [d["id"] for d in log_doc["deliveries"]] == sorted(emitted["deliveries"], reverse=True)
            assert all(d["attempts"][0]["status_code"] == 200 for d in log_doc["deliveries"])
            human = run(db_url, "deliveries", "--webhook", str(made["id"]))
            assert human.returncode == 0 and "succeeded" in human.stdout and "HTTP 200" in human.stdout
            tested = (await c.call_tool("test_webhook", {"webhook_id": made["id"]})).structured_content
            assert tested["state"] == "succeeded" and tested["status_code"] == 200


@pytest.mark.anyio
async def test_stdio_server_embeds_the_dispatcher(db_url: str, anyio_backend):
    from tests.receiver import Receiver

    team = ok_json(db_url, "team", "create", f"stdio-disp-{os.getpid()}-{len(db_url)}")
    key = ok_json(db_url, "key", "create", "--team", str(team["id"]))
    env = child_env(db_url, JUSTSCAN_API_KEY=key["key"], JUSTSCAN_ALLOW_PRIVATE_TARGETS="1")
    with Receiver() as receiver:
        params = StdioServerParameters(command=sys.executable, args=["-m", "justscan_mcp", "serve"], env=env)
        async with Client(params) as c:
            made = (
                await c.call_tool("create_webhook", {"url": receiver.url("/stdio"), "events": ["scan"]})
            ).structured_content
            receiver.secrets["/stdio"] = made["secret"]
            out = (await c.call_tool("test_webhook", {"webhook_id": made["id"]})).structured_content
            assert out["state"] == "succeeded" and receiver.at("/stdio")[0].verified
        params = StdioServerParameters(
            command=sys.executable, args=["-m", "justscan_mcp", "serve", "--no-dispatcher"], env=env
        )
        async with Client(params) as c:
            emitted = ok_json(
                db_url, "emit", "scan", "--team", str(team["id"]), "--data", '{"qr_code_id": 6, "scan_id": 2}'
            )
            assert len(emitted["deliveries"]) == 1
            # --no-dispatcher: nothing in this process sends; the delivery waits for a dispatcher.
            listed = (
                await c.call_tool("list_deliveries", {"webhook_id": made["id"], "state": "pending"})
            ).structured_content
            assert [d["id"] for d in listed["deliveries"]] == emitted["deliveries"]
        assert len(receiver.at("/stdio")) == 1
