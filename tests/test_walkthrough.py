"""The README's "emit an event and watch it arrive" walkthrough, step by step, with the example
receiver as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import child_env, free_port, wait_for
from tests.test_cli import ok_json

EXAMPLE = Path(__file__).parents[1] / "examples" / "receivers" / "python" / "receiver.py"


def test_emit_a_scan_and_watch_it_arrive(db_url: str, tmp_path: Path):
    env = child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="1", JUSTSCAN_POLL_INTERVAL="0.1")
    port, rport = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "justscan_mcp", "serve", "--transport", "http", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "serve.log").open("wb"),
    )
    receiver = None
    try:
        wait_for(
            lambda: httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200, what="server"
        )
        team = ok_json(db_url, "team", "create", f"walk-{len(db_url)}-{port}")
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
        out = (tmp_path / "receiver.out").open("wb")
        receiver = subprocess.Popen(
            [sys.executable, str(EXAMPLE), str(rport)],
            env=child_env(db_url, WEBHOOK_SECRET=hook["secret"]),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        wait_for(lambda: "listening" in (tmp_path / "receiver.out").read_text(), what="receiver")
        emitted = ok_json(
            db_url,
            "emit",
            "scan",
            "--team",
            str(team["id"]),
            "--data",
            '{"qr_code_id": 42, "scan_id": 1, "country": "DE"}',
        )
        wait_for(
            lambda: all(
                d["state"] == "succeeded"
                for d in ok_json(db_url, "deliveries", "--webhook", str(hook["id"]))["deliveries"]
            ),
            what="both deliveries succeeded",
        )
        log = ok_json(db_url, "deliveries", "--webhook", str(hook["id"]))
        assert sorted(d["id"] for d in log["deliveries"]) == sorted(emitted["deliveries"])
        assert {d["attempts"][0]["status_code"] for d in log["deliveries"]} == {204}
        printed = (tmp_path / "receiver.out").read_text()
        assert printed.count("verified delivery") == 2 and '"qr_code_id": 42' in printed
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
        for proc in (receiver, server):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=15)
