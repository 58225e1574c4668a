"""justscan-mcp: the webhook service of Just Scan It, with an MCP server as its front door."""

from __future__ import annotations

__version__ = "0.1.0"
