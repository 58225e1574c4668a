"""The README's "emit an event and watch it arrive" walkthrough, step by step, with the example
receiver as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import child_env, free_port, spawn_server, wait_for
from tests.test_cli import ok_json

EXAMPLE = Path(__file__).parents[1] / "examples" / "receivers" / "python" / "receiver.py"


def test_emit_a_scan_and_watch_it_arrive(db_url: str, tmp_path: Path):
    env = child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="1", JUSTSCAN_POLL_INTERVAL="0.1")
    rport = free_port()
    receiver = None
    with spawn_server(env, tmp_path / "serve.log") as server:
        try:
            team = ok_json(db_url, "team", "create", f"walk-{len(db_url)}-{server.base.rsplit(':', 1)[1]}")
            hook = ok_json(
                db_url,
                "webhook",
                "create",
                "--team",
                str(team["id"]),
                "--url",
                f"http://127.0.0.1:{rport}/hook",
                "--events",
                "scan,first_scan",
                "--allow-private-targets",
            )
            assert hook["secret"].startswith("whsec_")
            printed = tmp_path / "receiver.out"
            receiver = subprocess.Popen(
                [sys.executable, str(EXAMPLE), str(rport)],
                env=child_env(db_url, WEBHOOK_SECRET=hook["secret"]),
                stdout=printed.open("wb"),
                stderr=subprocess.STDOUT,
            )
            wait_for(lambda: "listening" in printed.read_text(), what="receiver")
            data = '{"qr_code_id": 42, "scan_id": 1, "country": "DE"}'
            emitted = ok_json(db_url, "emit", "scan", "--team", str(team["id"]), "--data", data)

            def log() -> dict:
                return ok_json(db_url, "deliveries", "--webhook", str(hook["id"]))

            wait_for(
                lambda: all(d["state"] == "succeeded" for d in log()["deliveries"]), what="both succeeded"
            )
            deliveries = log()["deliveries"]
            assert sorted(d["id"] for d in deliveries) == sorted(emitted["deliveries"])
            assert {d["attempts"][0]["status_code"] for d in deliveries} == {204}
            out = printed.read_text()
            assert out.count("verified delivery") == 2 and '"qr_code_id": 42' in out
            # The example refuses a tampered body.
            body = json.dumps(
                {"event": "scan", "timestamp": "2026-04-20T10:00:00+00:00", "data": {"qr_code_id": 43}}
            )
            forged = httpx.post(
                f"http://127.0.0.1:{rport}/hook", content=body, headers={"X-Webhook-Signature": "0" * 64}
            )
            assert forged.status_code == 401
            listed = ok_json(db_url, "webhook", "list", "--team", str(team["id"]))
            assert [w["id"] for w in listed] == [hook["id"]] and "secret" not in listed[0]
            assert (
                ok_json(db_url, "webhook", "delete", str(hook["id"]), "--team", str(team["id"]))["deleted"]
                is True
            )
        finally:
            if receiver is not None:
                receiver.terminate()
                receiver.wait(timeout=15)
