from __future__ import annotations

from pathlib import Path

import pytest

from justscan_mcp.config import DEFAULT_RETRY_SCHEDULE, Settings
from justscan_mcp.errors import ConfigError


def test_defaults_put_sqlite_in_the_user_data_dir_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'justscan-mcp' / 'justscan.db'}"
    assert settings.database_url_is_default
    assert settings.retry_schedule == DEFAULT_RETRY_SCHEDULE == (60.0, 300.0, 1800.0)
    assert settings.delivery_timeout == 10.0
    assert settings.allow_private_targets is False
    assert settings.api_key is None


def test_every_variable_is_read():
    settings = Settings.from_env(
        {
            "JUSTSCAN_DATABASE_URL": "postgresql://u@h/db",
            "JUSTSCAN_API_KEY": "jsi_x",
            "JUSTSCAN_RETRY_SCHEDULE": "0.2, 0.4,0.6",
            "JUSTSCAN_DELIVERY_TIMEOUT": "2.5",
            "JUSTSCAN_ALLOW_PRIVATE_TARGETS": "Yes",
            "JUSTSCAN_ALLOWED_HOSTS": "hooks.example.com, api.example.com",
        }
    )
    assert settings.database_url == "postgresql://u@h/db" and not settings.database_url_is_default
    assert settings.api_key == "jsi_x"
    assert settings.retry_schedule == (0.2, 0.4, 0.6)
    assert settings.delivery_timeout == 2.5
    assert settings.allow_private_targets is True
    assert settings.allowed_hosts == ("hooks.example.com", "api.example.com")


@pytest.mark.parametrize(
    "raw,expected", [("1", True), ("on", True), ("TRUE", True), ("0", False), ("off", False), ("No", False)]
)
def test_booleans_read_the_spec_spellings(raw: str, expected: bool):
    assert Settings.from_env({"JUSTSCAN_ALLOW_PRIVATE_TARGETS": raw}).allow_private_targets is expected


@pytest.mark.parametrize(
    "name,raw",
    [
        ("JUSTSCAN_ALLOW_PRIVATE_TARGETS", "maybe"),
        ("JUSTSCAN_RETRY_SCHEDULE", "60,soon"),
        ("JUSTSCAN_RETRY_SCHEDULE", "60,-1"),
        ("JUSTSCAN_RETRY_SCHEDULE", ","),
        ("JUSTSCAN_RETRY_SCHEDULE", "nan"),
        ("JUSTSCAN_DELIVERY_TIMEOUT", "0"),
        ("JUSTSCAN_DELIVERY_TIMEOUT", "ten"),
        ("JUSTSCAN_PUBLIC_URL", "mcp.example.com"),
        ("JUSTSCAN_PUBLIC_URL", "ftp://mcp.example.com"),
        ("JUSTSCAN_PUBLIC_URL", "http://mcp.example.com"),
        ("JUSTSCAN_PUBLIC_URL", "https://mcp.example.com/?x=1"),
        ("JUSTSCAN_PUBLIC_URL", "https://user:pw@mcp.example.com"),
        ("JUSTSCAN_PUBLIC_URL", "https://mcp.example.com:99999"),
    ],
)
def test_malformed_values_name_the_variable(name: str, raw: str):
    with pytest.raises(ConfigError) as err:
        Settings.from_env({name: raw})
    assert name in err.value.message


def test_the_public_url_is_https_or_loopback_and_loses_its_trailing_slash():
    assert (
        Settings.from_env({"JUSTSCAN_PUBLIC_URL": "https://mcp.example.com/"}).public_url
        == "https://mcp.example.com"
    )
    assert (
        Settings.from_env({"JUSTSCAN_PUBLIC_URL": "http://127.0.0.1:8000"}).public_url
        == "http://127.0.0.1:8000"
    )
    assert Settings.from_env({}).public_url is None
