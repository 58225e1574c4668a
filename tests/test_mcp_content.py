"""Resources, the diagnosis prompt and completions, through the SDK's in-memory client (the same
server object every transport serves) and over streamable HTTP."""

from __future__ import annotations

import json

import pytest
from mcp import Client
from mcp.types import PromptReference, ResourceTemplateReference

from justscan_mcp.events import DATA_MODELS, validate_emit
from justscan_mcp.mcp_server import build_mcp_server
from tests.conftest import PUBLIC_URL, TeamKit

pytestmark = pytest.mark.anyio


def client(kit: TeamKit, key=None) -> Client:
    return Client(build_mcp_server(kit.app, fixed_key_id=(key or kit.rw).id))


async def test_the_guide_and_every_events_schema_are_resources(kit: TeamKit):
    async with client(kit) as c:
        listed = {str(r.uri) for r in (await c.list_resources()).resources}
        assert "justscan://guide" in listed
        templates = {t.uri_template for t in (await c.list_resource_templates()).resource_templates}
        assert "justscan://events/{event}/schema" in templates
        guide = (await c.read_resource("justscan://guide")).contents[0].text
        assert "hash_equals" in guide and "timingSafeEqual" in guide and "compare_digest" in guide
        assert "1 minute" in guide and "Retry-After" in guide
        for event in DATA_MODELS:
            doc = json.loads((await c.read_resource(f"justscan://events/{event}/schema")).contents[0].text)
            example = doc["examples"][0]
            assert example["event"] == event and set(doc["required"]) == {"event", "timestamp", "data"}
            if event not in ("first_scan", "test"):
                validate_emit(event, example["data"])  # the example passes the same rules as real data
        with pytest.raises(Exception, match="unknown event"):
            await c.read_resource("justscan://events/scan2/schema")


async def test_the_diagnosis_prompt_names_the_steps(kit: TeamKit):
    async with client(kit) as c:
        (prompt,) = [p for p in (await c.list_prompts()).prompts if p.name == "diagnose_webhook"]
        assert [a.name for a in prompt.arguments or []] == ["webhook_id"]
        text = (await c.get_prompt("diagnose_webhook", {"webhook_id": "17"})).messages[0].content.text
        for step in (
            "get_webhook_stats(webhook_id=17",
            "list_deliveries(webhook_id=17",
            "test_webhook(webhook_id=17",
            "recover_deliveries(webhook_id=17",
        ):
            assert step in text
        with pytest.raises(Exception, match="webhook_id"):
            await c.get_prompt("diagnose_webhook", {"webhook_id": "abc"})


async def test_completions_list_the_teams_webhooks_and_the_events(kit: TeamKit, other: TeamKit):
    mine = [
        kit.app.service.create_webhook(principal=kit.principal(), url=PUBLIC_URL, events=["scan"]).id
        for _ in range(2)
    ]
    theirs = other.app.service.create_webhook(principal=other.principal(), url=PUBLIC_URL, events=["scan"]).id
    async with client(kit) as c:
        got = await c.complete(
            PromptReference(type="ref/prompt", name="diagnose_webhook"), {"name": "webhook_id", "value": ""}
        )
        assert (
            sorted(int(v) for v in got.completion.values) == sorted(mine)
            and str(theirs) not in got.completion.values
        )
        events = await c.complete(
            ResourceTemplateReference(type="ref/resource", uri="justscan://events/{event}/schema"),
            {"name": "event", "value": "f"},
        )
        assert events.completion.values == ["first_scan", "form_submit", "file_download"]
    writer_only = kit.key(scopes=["webhooks:write"])
    async with client(kit, writer_only) as c:
        got = await c.complete(
            PromptReference(type="ref/prompt", name="diagnose_webhook"), {"name": "webhook_id", "value": ""}
        )
        assert got.completion.values == []  # listing webhooks needs webhooks:read
