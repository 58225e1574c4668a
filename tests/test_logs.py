"""Logs: quiet when idle, JSON lines that parse, one line per attempt with its ids and outcome,
an access log without query strings, and no secret anywhere in a full run's output."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from justscan_mcp.config import Settings
from justscan_mcp.errors import ConfigError
from tests.conftest import TeamKit, child_env, spawn_server, wait_for
from tests.receiver import Receiver

pytestmark = pytest.mark.slow


def ours(log: Path, webhook_id: int) -> list[dict]:
    """This webhook's attempt lines (every line of the log must be JSON to get here)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in records if r["msg"] == "attempt" and r["webhook_id"] == webhook_id]


def test_the_settings_are_named_and_checked():
    assert (Settings.from_env({}).log_format, Settings.from_env({}).log_level) == ("text", "info")
    got = Settings.from_env({"JUSTSCAN_LOG_FORMAT": "JSON", "JUSTSCAN_LOG_LEVEL": "Debug"})
    assert (got.log_format, got.log_level) == ("json", "debug")
    for name, raw in (("JUSTSCAN_LOG_FORMAT", "xml"), ("JUSTSCAN_LOG_LEVEL", "loud")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: raw})


def test_an_idle_server_is_quiet(tmp_path: Path):
    """APScheduler used to write two lines a second ("Running job Dispatcher._tick ... executed
    successfully"), about 170,000 a day, and alembic ten plugin lines at every start. Idle means
    no work at all: a database of its own (the shared test database holds other tests' retries)."""
    log = tmp_path / "idle.log"
    with spawn_server(child_env(f"sqlite:///{tmp_path / 'idle.db'}", JUSTSCAN_POLL_INTERVAL="0.5"), log):
        wait_for(
            lambda: "dispatcher" in log.read_text() and "started" in log.read_text(), what="the dispatcher"
        )
        before = len(log.read_text().splitlines())
        time.sleep(10)  # the measurement itself: what an idle server writes in 10 s
        idle = log.read_text().splitlines()[before:]
    assert idle == [], idle[:5]
    everything = log.read_text()
    assert "apscheduler" not in everything and "alembic.runtime.plugins" not in everything


def test_json_lines_one_per_attempt_and_no_secrets(db_url: str, kit: TeamKit, tmp_path: Path):
    log = tmp_path / "json.log"
    env = child_env(
        db_url, JUSTSCAN_LOG_FORMAT="json", JUSTSCAN_ALLOW_PRIVATE_TARGETS="1", JUSTSCAN_POLL_INTERVAL="0.2"
    )
    with Receiver() as receiver, spawn_server(env, log) as server:
        auth = {"Authorization": f"Bearer {kit.rw.key}"}
        made = httpx.post(
            f"{server.base}/api/v1/webhooks",
            json={"url": receiver.url("/logs"), "events": ["scan"]},
            headers=auth,
            timeout=10,
        ).json()
        receiver.secrets["/logs"] = made["secret"]
        events = kit.key(scopes=["events:write"])
        for n in range(3):
            r = httpx.post(
                f"{server.base}/api/v1/events",
                json={"event": "scan", "data": {"qr_code_id": 5, "scan_id": n + 1}},
                headers={"Authorization": f"Bearer {events.key}"},
                timeout=10,
            )
            assert r.status_code == 202, r.text
        wait_for(lambda: len(receiver.at("/logs")) == 3, what="three deliveries")
        httpx.get(
            f"{server.base}/api/v1/webhooks?limit=5&cursor=secret-cursor-value", headers=auth, timeout=10
        )
        # This webhook's lines only: the shared test database may hold other tests' due retries.
        wait_for(lambda: len(ours(log, made["id"])) >= 3, what="three attempt lines")
    records = [
        json.loads(line) for line in log.read_text().splitlines() if line.strip()
    ]  # every line is JSON
    attempts = ours(log, made["id"])
    assert len(attempts) == 3
    for a in attempts:
        assert a["webhook_id"] == made["id"] and a["team_id"] == kit.team.id and a["event"] == "scan"
        assert (a["attempt"], a["outcome"], a["status"], a["state"]) == (1, "2xx", 200, "succeeded")
        assert isinstance(a["duration_ms"], int) and "next_attempt_at" in a and "delivery_id" in a
    access = [r for r in records if r["logger"] == "uvicorn.access"]
    assert access and not any("secret-cursor-value" in r["msg"] or "?" in r["msg"] for r in access)
    text = log.read_text()
    for secret in (kit.rw.key, events.key, made["secret"], "secret-cursor-value"):
        assert secret not in text
