"""The process entry: `python -m justscan_mcp` and the `justscan-mcp` script, one command line.

The collector is relaxed before the command line's imports (see `collector`): they are most of a
start, and the script's own `from justscan_mcp.cli import main` would run them first.
"""

from __future__ import annotations


def main() -> int:
    from justscan_mcp import collector

    collector.relax_for_start()
    from justscan_mcp.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
