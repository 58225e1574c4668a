"""`python -m justscan_mcp`: the same command line as `justscan-mcp`."""

from __future__ import annotations

from justscan_mcp.cli import main

raise SystemExit(main())
