"""Property-based run of schemathesis against the served OpenAPI document: no 5xx, and every
response matches its documented status, content type and schema.

Safety: the server has its own SQLite file and runs with --no-dispatcher. Generated webhooks may
point at public addresses, and nothing here may ever send to one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from justscan_mcp.app import App
from justscan_mcp.config import Settings
from tests.conftest import child_env, spawn_server

pytestmark = pytest.mark.slow

CHECKS = "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance"


def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path):
    db_url = f"sqlite:///{tmp_path / 'fuzz.db'}"
    app = App.build(Settings(database_url=db_url))
    app.prepare()
    team = app.service.create_team(name="fuzz")
    key = app.service.create_api_key(
        team_id=team.id, scopes=["webhooks:read", "webhooks:write", "events:write"]
    )
    app.close()
    env = child_env(db_url, JUSTSCAN_DELIVERY_TIMEOUT="0.2")
    with spawn_server(env, tmp_path / "serve.log", "--no-dispatcher") as server:
        st = Path(sys.executable).with_name("schemathesis")
        proc = subprocess.run(
            [
                str(st),
                "run",
                f"{server.base}/api/v1/openapi.json",
                "-H",
                f"Authorization: Bearer {key.key}",
                "--max-examples",
                "10",
                "--max-time",
                "60",
                "--seed",
                "20261127",
                "--checks",
                CHECKS,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    summary = proc.stdout[-2500:]
    print(summary)
    assert proc.returncode == 0, summary
    assert "Test cases:" in proc.stdout and " passed" in proc.stdout
    assert key.key not in proc.stdout  # schemathesis filters the header; keep it that way
