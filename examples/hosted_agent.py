"""A hosted agent's view: connect over streamable HTTP with a bearer key and manage webhooks.

    JUSTSCAN_URL=http://127.0.0.1:8000/mcp JUSTSCAN_API_KEY=jsi_... python examples/hosted_agent.py

It lists the tools this key may use, creates a webhook (printing its secret once), lists the
team's webhooks and deletes the one it made.
"""

from __future__ import annotations

import asyncio
import os
import sys

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client


async def main() -> int:
    url = os.environ.get("JUSTSCAN_URL", "http://127.0.0.1:8000/mcp")
    key = os.environ.get("JUSTSCAN_API_KEY")
    if not key:
        print("set JUSTSCAN_API_KEY to an MCP-enabled key (jsi_...)", file=sys.stderr)
        return 2
    target = os.environ.get("WEBHOOK_URL", "https://93.184.216.34/hooks/justscan")
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=30)
    async with Client(streamable_http_client(url, http_client=http)) as client:
        tools = [t.name for t in (await client.list_tools()).tools]
        print("tools:", ", ".join(tools))
        made = await client.call_tool("create_webhook", {"url": target, "events": ["scan", "first_scan"]})
        if made.is_error:
            print("create_webhook refused:", made.content[0].text, file=sys.stderr)
            return 1
        hook = made.structured_content or {}
        print(f"created webhook {hook['id']} -> {hook['url']} (secret {hook['secret']}; store it now)")
        page = await client.call_tool("list_webhooks", {"limit": 50})
        for w in (page.structured_content or {}).get("webhooks", []):
            print(f"  {w['id']}\t{','.join(w['events'])}\t{w['url']}")
        await client.call_tool("delete_webhook", {"webhook_id": hook["id"]})
        print(f"deleted webhook {hook['id']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
