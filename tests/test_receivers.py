"""The example receivers in examples/receivers/, each run as a real process (Python, Node.js,
PHP, and Python with the `standardwebhooks` package) against a real dispatcher process.

Every receiver gets two scans through a man-in-the-middle proxy. The proxy passes the first
untouched and changes one byte of the second's signed body in transit, so the receiver sees the
dispatcher's real headers over a tampered body. The first must be accepted (2xx, `succeeded`),
the second refused (401, logged on the attempt, `retrying`).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from justscan_mcp.signing import guide_signature, standard_signatures
from tests.conftest import child_env, free_port, program, spawn_worker, stop_process, wait_for
from tests.tcpproxy import TcpProxy
from tests.test_cli import ok_json

EXAMPLES = Path(__file__).parents[1] / "examples" / "receivers"

# The same length before and after, so Content-Length still holds and only the signature fails.
GENUINE, TAMPERED = b'"qr_code_id":666', b'"qr_code_id":999'


def receiver_command(kind: str, port: int) -> list[str]:
    if kind == "python":
        return [sys.executable, str(EXAMPLES / "python" / "receiver.py"), str(port)]
    if kind == "python-standardwebhooks":
        return [sys.executable, str(EXAMPLES / "python-standardwebhooks" / "receiver.py"), str(port)]
    if kind == "node":
        return [
            program("node", "install Node.js 18 or newer"),
            str(EXAMPLES / "node" / "receiver.mjs"),
            str(port),
        ]
    if kind == "php":
        return [
            program("php", "install Debian's php-cli (.ci/run does)"),
            "-S",
            f"127.0.0.1:{port}",
            str(EXAMPLES / "php" / "receiver.php"),
        ]
    raise AssertionError(kind)


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("kind", ["python", "node", "php", "python-standardwebhooks"])
def test_receiver_accepts_real_deliveries_and_refuses_a_tampered_body(kind: str, tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'receivers.db'}"
    rport, pport = free_port(), free_port()
    team = ok_json(db_url, "team", "create", f"receivers-{kind}")
    hook = ok_json(
        db_url,
        "webhook",
        "create",
        "--team",
        str(team["id"]),
        "--url",
        f"http://127.0.0.1:{pport}/hook",
        "--events",
        "scan",
        "--allow-private-targets",
    )
    printed = tmp_path / "receiver.out"
    receiver = subprocess.Popen(
        receiver_command(kind, rport),
        env=child_env(db_url, WEBHOOK_SECRET=hook["secret"]),
        stdout=printed.open("wb"),
        stderr=subprocess.STDOUT,
    )
    proxy = TcpProxy(pport, ("127.0.0.1", rport), rewrite=lambda chunk: chunk.replace(GENUINE, TAMPERED))
    worker = None
    try:
        wait_for(lambda: port_open(rport), what=f"{kind} receiver (output in {printed})")
        proxy.start()
        genuine = ok_json(
            db_url, "emit", "scan", "--team", str(team["id"]), "--data", '{"qr_code_id": 7, "scan_id": 1}'
        )["deliveries"]
        forged = ok_json(
            db_url, "emit", "scan", "--team", str(team["id"]), "--data", '{"qr_code_id": 666, "scan_id": 2}'
        )["deliveries"]
        worker = spawn_worker(
            child_env(db_url, JUSTSCAN_ALLOW_PRIVATE_TARGETS="1", JUSTSCAN_POLL_INTERVAL="0.1"),
            tmp_path / "worker.log",
        )

        def attempted() -> dict[int, dict]:
            log = ok_json(db_url, "deliveries", "--webhook", str(hook["id"]))["deliveries"]
            return {d["id"]: d for d in log if d["attempts"]} if len(log) == 2 else {}

        log = wait_for(lambda: (a := attempted()) and len(a) == 2 and a, what="both first attempts")
        ok, bad = log[genuine[0]], log[forged[0]]
        assert ok["state"] == "succeeded" and 200 <= ok["attempts"][0]["status_code"] < 300, ok
        assert bad["state"] == "retrying" and bad["attempts"][0]["status_code"] == 401, bad
        assert "Invalid signature" in bad["attempts"][0]["response_body"]

        # Straight to the receiver: no signature, and (Standard Webhooks) a stale but correctly
        # signed replay, are refused as well.
        body = json.dumps({"event": "scan", "timestamp": "2026-04-20T10:00:00+00:00", "data": {}}).encode()
        assert httpx.post(f"http://127.0.0.1:{rport}/hook", content=body).status_code == 401
        if kind == "python-standardwebhooks":
            stale = int(time.time()) - 600
            replay = {
                "webhook-id": "1",
                "webhook-timestamp": str(stale),
                "webhook-signature": standard_signatures([hook["secret"]], "1", stale, body),
            }
            got = httpx.post(f"http://127.0.0.1:{rport}/hook", content=body, headers=replay)
            assert got.status_code == 401
            fresh = replay | {
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": standard_signatures([hook["secret"]], "1", int(time.time()), body),
            }
            assert (
                httpx.post(f"http://127.0.0.1:{rport}/hook", content=body, headers=fresh).status_code == 204
            )
        else:
            signed = {"X-Webhook-Signature": guide_signature(hook["secret"], body)}
            assert (
                httpx.post(f"http://127.0.0.1:{rport}/hook", content=body, headers=signed).status_code == 204
            )
        out = printed.read_text()
        assert "verified delivery" in out and "rejected" in out, out
    finally:
        if worker is not None:
            stop_process(worker)
        proxy.stop()
        stop_process(receiver)
