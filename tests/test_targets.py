from __future__ import annotations

import pytest

from justscan_mcp.errors import InvalidInput
from justscan_mcp.targets import system_resolver, validate_webhook_url
from tests.conftest import PUBLIC_URL, stub_resolver


def check(url: str, *, allow_private: bool = False, resolver=stub_resolver) -> str:
    return validate_webhook_url(url, allow_private=allow_private, resolve=resolver)


@pytest.mark.parametrize(
    "url",
    [
        PUBLIC_URL,
        "https://hooks.example.test/in?x=1",
        "https://[2606:4700::1111]:8443/h",
        "HTTPS://hooks.example.test",
    ],
)
def test_public_https_targets_are_accepted_unchanged(url: str):
    assert check(url) == url


@pytest.mark.parametrize(
    "url,words",
    [
        ("ftp://hooks.example.test/x", "https://"),
        ("/relative/path", "absolute"),
        ("hooks.example.test/x", "absolute"),
        ("http://hooks.example.test/x", "https://"),
        ("https://", "absolute"),
        ("https://hooks.example.test:99999/", "valid URL"),
        ("https://hooks.example.test/a b", "spaces"),
        ("", "required"),
    ],
)
def test_malformed_urls_are_refused_naming_url(url: str, words: str):
    with pytest.raises(InvalidInput) as err:
        check(url)
    assert err.value.field == "url"
    assert words in err.value.reason


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.1/x",
        "https://127.1.2.3/x",
        "https://10.1.2.3/x",
        "https://172.16.0.1/x",
        "https://192.168.1.1/x",
        "https://169.254.169.254/latest/meta-data",
        "https://100.64.0.1/x",
        "https://0.0.0.0/x",
        "https://[::1]/x",
        "https://[fc00::1]/x",
        "https://[fe80::1]/x",
        "https://[::ffff:127.0.0.1]/x",
        "https://[64:ff9b::a00:1]/x",
        "https://[2002:7f00:1::]/x",
        "https://224.0.0.1/x",
        "https://internal.example.test/x",
        "https://metadata.example.test/x",
        "https://rebind.example.test/x",
    ],
)
def test_internal_targets_are_refused_unless_allowed(url: str):
    with pytest.raises(InvalidInput) as err:
        check(url)
    assert err.value.field == "url"
    assert "public address" in err.value.reason
    assert check(url, allow_private=True) == url


def test_http_is_allowed_only_with_private_targets():
    assert check("http://127.0.0.1:8080/hook", allow_private=True)


def test_a_name_that_does_not_resolve_is_refused_even_when_private_targets_are_allowed():
    with pytest.raises(InvalidInput) as err:
        check("https://nowhere.example.test/x", allow_private=True)
    assert err.value.field == "url" and "does not resolve" in err.value.reason


def test_the_system_resolver_is_used_for_real():
    # Real name resolution: localhost resolves (to loopback, refused); .invalid never resolves (RFC 6761).
    with pytest.raises(InvalidInput, match="loopback"):
        check("https://localhost/x", resolver=system_resolver)
    with pytest.raises(InvalidInput, match="does not resolve"):
        check("https://no-such-host.invalid/x", resolver=system_resolver)
