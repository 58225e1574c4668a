"""The SDK alone: an MCP stdio server whose one tool returns a fixed page. bench/run.py measures it
beside the real server, in the same minutes and with the same client, so a slow minute of this
machine shows in both and the difference is what our server adds.

    .venv/bin/python bench/mcp_floor.py PAGE.json            # over stdio
    .venv/bin/python bench/mcp_floor.py PAGE.json PORT       # over streamable HTTP on 127.0.0.1

PAGE.json is a `list_webhooks` result the real server gave; this server returns it for every
call, as the same model, with the same published output schema (so the client's re-validation
costs the same), through the SDK's own stdio or streamable HTTP transport (uvicorn's defaults,
as `serve` runs it). No database, no key, no gate.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mcp.server import MCPServer
from mcp.server.mcpserver.tools import Tool

from justscan_mcp.mcp_server import compact_schema
from justscan_mcp.models import WebhookPage


def main(page_file: str, port: str | None = None) -> None:
    page = WebhookPage.model_validate(json.loads(Path(page_file).read_text()))

    def list_webhooks(limit: int = 50, cursor: str | None = None) -> WebhookPage:
        """The same page every time."""
        return page

    tool = Tool.from_function(list_webhooks, structured_output=True)
    assert tool.fn_metadata.output_schema is not None
    tool.fn_metadata.output_schema = compact_schema(tool.fn_metadata.output_schema)
    server = MCPServer("floor", tools=[tool])
    if port is None:
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(port))


if __name__ == "__main__":
    main(*sys.argv[1:3])
