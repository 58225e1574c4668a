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
    "httptools": "uvicorn parses HTTP with it when it is installed",
    "uvloop": "uvicorn runs its event loop on it when it is installed",
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


# Leaf to front end. A module imports only modules of a lower rank; inside `store` and `service`
# a module may also use its package's shared modules (named in SHARED).
RANK = {
    "errors": 0,
    "collector": 0,
    "config": 1,
    "models": 2,
    "security": 3,
    "targets": 3,
    "retry": 3,
    "ratelimit": 3,
    "events": 3,
    "threads": 3,
    "logs": 2,
    "progress": 2,
    "metrics": 3,
    "signing": 4,
    "http1": 4,
    "stdio_pipes": 4,
    "inputs": 4,
    "store": 5,
    "migrations": 4,
    "sender": 5,
    "client_documents": 5,
    "service": 6,
    "dispatcher": 6,
    "groupcommit": 6,
    "app": 7,
    "mcp_server": 8,
    "oauth_server": 8,
    "rest_api": 8,
    "dashboard": 8,
    "probes": 8,
    "http_server": 9,
    "cli": 10,
    "__main__": 11,
}
SHARED = {
    "store": {"store.db"},
    "service": {"service.base", "service.validators", "service.operations"},
}


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def _runtime_imports(path: Path) -> set[str]:
    """Project modules imported when the module runs (not under `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for child in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from package import submodule` imports the submodule.
            base = node.module.replace(".", "/")
            subs = [
                f"{node.module}.{a.name}" for a in node.names if (SRC.parent / base / f"{a.name}.py").exists()
            ]
            names = subs or [node.module]
        found.update(n.removeprefix("justscan_mcp.") for n in names if n.startswith("justscan_mcp."))
        found.update("__init__" for n in names if n == "justscan_mcp")
    return found


def test_imports_point_from_the_front_ends_to_the_leaves():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module(path)
        top = module.split(".")[0]
        if top == "__init__":
            continue
        for target in _runtime_imports(path):
            other = target.split(".")[0]
            if other == "__init__":
                continue  # the package's version string
            if other == top and top in SHARED:
                if module.count(".") and target not in SHARED[top] and module != top:
                    problems.append(f"{module} uses {target}; inside {top} only {sorted(SHARED[top])}")
                continue
            if other == top:
                continue
            if RANK[other] >= RANK[top]:
                problems.append(f"{module} (rank {RANK[top]}) imports {target} (rank {RANK[other]})")
    assert not problems, "\n".join(problems)


def test_every_module_opens_with_a_one_line_summary_of_what_it_owns():
    for path in sorted(SRC.rglob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, f"{path.relative_to(SRC)} has no docstring"
        lines = doc.splitlines()
        assert len(lines) == 1 or not lines[1].strip(), f"{path.relative_to(SRC)}: the first line runs on"
