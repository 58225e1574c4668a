"""The structure a newcomer relies on: declared dependencies are used, imports point one way."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "justscan_mcp"

# Distributions whose import name differs from their own name, and ones that are used without an
# import of ours (with the reason).
IMPORT_NAMES = {"python-multipart": "multipart", "psycopg[binary]": "psycopg"}
USED_WITHOUT_IMPORT = {
    "python-multipart": "Starlette parses the dashboard's forms with it",
}


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_every_runtime_dependency_has_a_job_in_src():
    """httpx was declared while src never imported it: a dependency must be used, or go."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = {name.split(".")[0] for path in SRC.rglob("*.py") for name in _imports(path)}
    for spec in deps:
        dist = re.split(r"[<>=!~ ]", spec, maxsplit=1)[0]
        if dist in USED_WITHOUT_IMPORT:
            continue
        module = IMPORT_NAMES.get(dist, dist).replace("-", "_")
        assert module in imported, f"{dist} is a runtime dependency but src never imports {module}"
