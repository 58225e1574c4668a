from __future__ import annotations

from justscan_mcp.cli import main

raise SystemExit(main())
