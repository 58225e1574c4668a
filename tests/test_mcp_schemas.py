"""The output schemas tools publish: `compact_schema` rewrites them to be cheaper for a client to
validate (the SDK client re-validates every result with `jsonschema`), and must not change which
documents they accept. Checked differentially: real results of the tools, and every one-field
break of them, are judged the same by the schema pydantic produced and by the rewritten one."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import validators
from mcp import Client

from justscan_mcp import mcp_server
from justscan_mcp.mcp_server import build_mcp_server, compact_schema
from tests.conftest import TeamKit

pytestmark = pytest.mark.anyio

ODD_VALUES: list[Any] = [None, 0, -1, 1.5, "", "x", True, [], ["x"], {}, {"a": 1}]


def accepts(schema: dict[str, Any], doc: Any) -> bool:
    validator = validators.validator_for(schema)(schema)
    return not list(validator.iter_errors(doc))


def breaks(doc: Any) -> Iterator[Any]:
    """`doc` with one value replaced by each odd value, or one key removed, at every depth."""
    if isinstance(doc, dict):
        for key, value in doc.items():
            without = dict(doc)
            del without[key]
            yield without
            for odd in ODD_VALUES:
                yield {**doc, key: odd}
            for broken in breaks(value):
                yield {**doc, key: broken}
    elif isinstance(doc, list) and doc:
        for odd in ODD_VALUES:
            yield [odd, *doc[1:]]
        for broken in breaks(doc[0]):
            yield [broken, *doc[1:]]


async def published_schemas(kit: TeamKit) -> dict[str, dict[str, Any]]:
    async with Client(build_mcp_server(kit.app, fixed_key_id=kit.rw.id)) as c:
        return {t.name: t.output_schema for t in (await c.list_tools()).tools if t.output_schema}


async def test_compacted_schemas_accept_and_refuse_what_the_originals_do(
    kit: TeamKit, monkeypatch: pytest.MonkeyPatch
):
    compacted = await published_schemas(kit)
    with monkeypatch.context() as m:
        m.setattr(mcp_server, "compact_schema", lambda schema: schema)
        original = await published_schemas(kit)
    assert compacted.keys() == original.keys() and len(compacted) >= 10

    # Every reference inlined and every nullable simple type collapsed, in every tool.
    for name, schema in compacted.items():
        text = json.dumps(schema)
        assert "$ref" not in text and "$defs" not in text, name
        assert '{"type": "null"}' not in text, name

    results: dict[str, Any] = {}
    async with Client(build_mcp_server(kit.app, fixed_key_id=kit.rw.id)) as c:
        made = await c.call_tool(
            "create_webhook",
            {"url": "https://93.184.216.34/a", "events": ["scan"], "description": "d", "rate_limit": 5},
        )
        results["create_webhook"] = made.structured_content
        hook = made.structured_content["id"]
        for tool, args in (
            ("list_webhooks", {}),
            ("get_webhook", {"webhook_id": hook}),
            ("update_webhook", {"webhook_id": hook, "active": False}),
            ("list_deliveries", {"webhook_id": hook}),
            ("get_webhook_stats", {"webhook_id": hook}),
            ("rotate_secret", {"webhook_id": hook}),
        ):
            got = await c.call_tool(tool, args)
            assert not got.is_error, (tool, got.content)
            results[tool] = got.structured_content

    checked = 0
    for tool, doc in results.items():
        assert accepts(original[tool], doc) and accepts(compacted[tool], doc), tool
        for broken in breaks(doc):
            assert accepts(original[tool], broken) == accepts(compacted[tool], broken), (tool, broken)
            checked += 1
    assert checked > 500  # the breaks really ran over the results


def test_a_nullable_enum_keeps_null_and_refuses_other_values():
    schema = {
        "type": "object",
        "properties": {"state": {"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}]}},
    }
    compacted = compact_schema(copy.deepcopy(schema))
    assert compacted["properties"]["state"] == {"enum": ["a", "b", None], "type": ["string", "null"]}
    for value, ok in (("a", True), (None, True), ("c", False), (1, False)):
        assert accepts(compacted, {"state": value}) is ok
        assert accepts(schema, {"state": value}) is ok


def test_a_schema_it_cannot_rewrite_faithfully_comes_back_unchanged():
    recursive = {
        "$defs": {"Node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/Node"}}}},
        "$ref": "#/$defs/Node",
    }
    assert compact_schema(recursive) is recursive
    # A $ref beside a validating keyword would change meaning if merged into the inlined schema.
    beside = {
        "$defs": {"A": {"type": "string"}},
        "properties": {"x": {"$ref": "#/$defs/A", "maxLength": 3}},
    }
    assert compact_schema(beside) is beside
