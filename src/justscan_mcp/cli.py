"""`justscan-mcp`: the command line. Every command that prints a result takes `--json`.

Exit codes: 0 success; 1 a refused operation (bad input, unknown id, name taken, database down),
with the reason on stderr (a JSON document there under `--json`); 2 a usage error (argparse).
Heavy imports (the mcp SDK, uvicorn) happen inside `serve` only, so the other commands start fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel

from justscan_mcp import __version__
from justscan_mcp.config import Settings
from justscan_mcp.errors import JustScanError
from justscan_mcp.models import DEFAULT_KEY_SCOPES
from justscan_mcp.retry import DELIVERY_STATES

log = logging.getLogger("justscan_mcp")


class CliError(Exception):
    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], str]) -> None:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json")
    elif isinstance(data, list):
        data = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in data]
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(data) + "\n")
    else:
        sys.stdout.write(human(data) + "\n")


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env()
    url = getattr(args, "database_url", None)
    if url:
        settings = settings.with_overrides(database_url=url, database_url_is_default=False)
    if getattr(args, "allow_private_targets", False):
        settings = settings.with_overrides(allow_private_targets=True)
    public = getattr(args, "public_url", None)
    if public:
        from justscan_mcp.config import parse_public_url

        settings = settings.with_overrides(public_url=parse_public_url("--public-url", public))
    return settings


def _app(args: argparse.Namespace) -> Any:
    from justscan_mcp.app import App

    app = App.build(_settings(args))
    app.prepare()
    return app


def _scopes(raw: str | None) -> list[str] | None:
    if raw is None:
        return None
    return [s.strip() for s in raw.split(",") if s.strip()]


def _key_line(k: dict[str, Any]) -> str:
    state = "revoked" if k.get("revoked_at") else "active"
    mcp = "mcp on" if k["mcp_enabled"] else "mcp off"
    return f"{k['id']}\t{k['prefix']}…\tteam {k['team_id']}\t{','.join(k['scopes'])}\t{mcp}\t{state}\t{k.get('name') or ''}"


# --- teams and keys ---------------------------------------------------------------------------


def cmd_team_create(args: argparse.Namespace) -> None:
    team = _app(args).service.create_team(name=args.name)
    _emit(args, team, lambda t: f"created team {t['id']} ({t['name']})")


def cmd_team_list(args: argparse.Namespace) -> None:
    teams = _app(args).service.list_teams()
    _emit(args, teams, lambda ts: "\n".join(f"{t['id']}\t{t['name']}" for t in ts) or "no teams")


def cmd_key_create(args: argparse.Namespace) -> None:
    created = _app(args).service.create_api_key(
        team_id=args.team,
        scopes=list(DEFAULT_KEY_SCOPES) if args.scopes is None else _scopes(args.scopes) or [],
        mcp_enabled=args.mcp,
        name=args.name,
    )
    _emit(
        args,
        created,
        lambda k: (
            f"{k['key']}\n(key {k['id']} for team {k['team_id']}, scopes {','.join(k['scopes'])}, "
            f"MCP {'on' if k['mcp_enabled'] else 'off'}; shown once, only its hash is stored)"
        ),
    )


def cmd_key_list(args: argparse.Namespace) -> None:
    keys = _app(args).service.list_api_keys(team_id=args.team)
    _emit(args, keys, lambda ks: "\n".join(_key_line(k) for k in ks) or "no keys")


def cmd_key_update(args: argparse.Namespace) -> None:
    key = _app(args).service.update_api_key(key_id=args.id, mcp_enabled=args.mcp, scopes=_scopes(args.scopes))
    _emit(args, key, _key_line)


def cmd_key_revoke(args: argparse.Namespace) -> None:
    key = _app(args).service.revoke_api_key(key_id=args.id)
    _emit(args, key, _key_line)


# --- serve ------------------------------------------------------------------------------------


def _launcher() -> tuple[str, list[str]]:
    """How a client should launch this server: the console script if found, else the module."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "justscan-mcp" and os.access(argv0, os.X_OK):
        return argv0, ["serve"]
    found = shutil.which("justscan-mcp")
    if found:
        return os.path.abspath(found), ["serve"]
    return sys.executable, ["-m", "justscan_mcp", "serve"]


def claude_desktop_snippet(key: str, settings: Settings) -> str:
    command, cmd_args = _launcher()
    env = {"JUSTSCAN_API_KEY": key}
    if not settings.database_url_is_default:
        env["JUSTSCAN_DATABASE_URL"] = "<the same JUSTSCAN_DATABASE_URL as this server>"
    return json.dumps(
        {"mcpServers": {"justscan": {"command": command, "args": cmd_args, "env": env}}}, indent=2
    )


def _bootstrap(app: Any, settings: Settings) -> str | None:
    """On the embedded SQLite default with no team yet, create one with an MCP key (shown once)."""
    if not settings.database_url_is_default or app.store.count_teams() > 0:
        return None
    team = app.service.create_team(name="default")
    created = app.service.create_api_key(
        team_id=team.id, scopes=["webhooks:read", "webhooks:write", "events:write"], name="first key"
    )
    return str(created.key)


def _http_banner(host: str, port: int, first_key: str | None, settings: Settings) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}"
    key = first_key or "jsi_..."
    lines = [
        "",
        f"justscan-mcp {__version__} serving on {base}",
        f"  MCP (streamable HTTP): {base}/mcp",
        f"  MCP (SSE):             {base}/sse",
        f"  REST API:              {base}/api/v1",
        f"  dashboard:             {base}/  (sign in with an API key; admin area: "
        + ("open" if settings.admin_password else "closed, set JUSTSCAN_ADMIN_PASSWORD")
        + ")",
        f"  health:                {base}/healthz  {base}/readyz",
        f"  metrics (Prometheus):  {base}/metrics  (an operator's view: `justscan-mcp status`)",
        f"  database:              {_redacted(settings.database_url)}",
        "",
    ]
    if first_key:
        lines += [
            "First run: created team 'default' and an MCP-enabled API key. It is shown ONCE; only",
            "its hash is stored. Make more with `justscan-mcp key create --team 1`.",
            "",
            f"  API key: {first_key}",
            "",
        ]
    else:
        lines += [
            "Connect with an MCP-enabled API key (create one: `justscan-mcp team create NAME`, then",
            "`justscan-mcp key create --team ID`).",
            "",
        ]
    public = settings.public_url or base
    lines += [
        "Hosted agent over HTTP: point an MCP client at the /mcp URL with the header",
        f"  Authorization: Bearer {key}",
        f"or add {public}/mcp as a remote connector: it signs in with OAuth (a person approves",
        "on the dashboard with one of the team's API keys; no key is pasted anywhere).",
        "",
        "Claude Desktop (stdio): add to claude_desktop_config.json:",
        claude_desktop_snippet(key, settings),
        "",
    ]
    return "\n".join(lines)


def _redacted(url: str) -> str:
    from justscan_mcp.store import redact_url

    return redact_url(url)


def _configure_logging(settings: Settings, *, level: str | None = None) -> None:
    from justscan_mcp import logs

    logs.configure(settings, level=level)


def cmd_serve(args: argparse.Namespace) -> None:
    settings = _settings(args)
    if args.transport == "stdio":
        _serve_stdio(settings, dispatcher=not args.no_dispatcher)
    else:
        _serve_http(args, settings)


def _serve_stdio(settings: Settings, *, dispatcher: bool) -> None:
    import anyio

    from justscan_mcp.app import App
    from justscan_mcp.errors import AuthError, StoreUnavailable

    # stdout carries the protocol: everything human goes to stderr, warnings only unless
    # JUSTSCAN_LOG_LEVEL asks for more (a desktop client keeps this log).
    _configure_logging(settings, level=None if os.environ.get("JUSTSCAN_LOG_LEVEL") else "warning")
    if not settings.api_key:
        raise CliError(
            "JUSTSCAN_API_KEY is not set; the stdio server acts as that key (create one with `justscan-mcp key create`)"
        )
    app = App.build(settings)
    try:
        app.prepare()
        principal = app.service.authenticate(settings.api_key)
        app.service.require_mcp(principal)
    except AuthError as exc:
        raise CliError(f"JUSTSCAN_API_KEY refused: {exc.message}") from None
    except StoreUnavailable as exc:
        raise CliError(
            f"cannot open the database {_redacted(settings.database_url)}: {exc.message}"
        ) from None

    from justscan_mcp.mcp_server import build_mcp_server, serve_stdio

    server = build_mcp_server(app, fixed_key_id=principal.key_id)

    async def main() -> None:
        # SIGTERM is how an MCP client stops a server that has not exited after stdin closed: it
        # ends the session as EOF does, and the lifespan then finishes in-flight deliveries, as a
        # worker's does, instead of leaving them to their leases.
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with app.lifespan(dispatcher=dispatcher), anyio.create_task_group() as tg:

                async def until_signalled() -> None:
                    await _stop_signal(signals)
                    tg.cancel_scope.cancel()

                tg.start_soon(until_signalled)
                await serve_stdio(server)
                tg.cancel_scope.cancel()

    anyio.run(main)


async def _stop_signal(signals: Any) -> None:
    """Wait for the first stop signal from `signals`, and say what happens next."""
    async for signum in signals:
        log.info("received %s; finishing in-flight deliveries", signal.Signals(signum).name)
        return


def _serve_http(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from justscan_mcp.app import App
    from justscan_mcp.http_server import build_http_app

    _configure_logging(settings)
    app = App.build(settings)
    first_key = None
    if settings.log_format == "json":
        # A log pipeline reads this stream: one JSON line, and never a key (no first-run key is
        # made; `justscan-mcp key create` makes one).
        shown = f"[{args.host}]" if ":" in args.host else args.host
        log.info("serving", extra={"fields": {"url": f"http://{shown}:{args.port}", "version": __version__}})
    else:
        if settings.database_url_is_default:
            # The embedded default is always reachable; a configured database is awaited in the lifespan.
            app.prepare()
            first_key = _bootstrap(app, settings)
        sys.stderr.write(_http_banner(args.host, args.port, first_key, settings) + "\n")
        sys.stderr.flush()
    asgi = build_http_app(
        app,
        host=args.host,
        port=args.port,
        allowed_hosts=args.allowed_host or (),
        dispatcher=not args.no_dispatcher,
    )
    from justscan_mcp.logs import uvicorn_log_config

    uvicorn.run(
        asgi,
        host=args.host,
        port=args.port,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(),
        lifespan="on",
    )


# --- webhooks (operator) ---------------------------------------------------------------------


def _events_arg(raw: str) -> list[str]:
    return [e.strip() for e in raw.split(",") if e.strip()]


def _webhook_line(w: dict[str, Any]) -> str:
    state = "active" if w["active"] else "inactive"
    return f"{w['id']}\t{','.join(w['events'])}\t{state}\t{w['url']}\t{w.get('description') or ''}"


def cmd_webhook_create(args: argparse.Namespace) -> None:
    service = _app(args).service
    created = service.create_webhook(
        principal=service.operator(team_id=args.team),
        url=args.url,
        events=_events_arg(args.events),
        description=args.description,
        rate_limit=args.rate_limit,
    )
    _emit(args, created, lambda w: f"{_webhook_line(w)}\nsecret (shown once): {w['secret']}")


def cmd_webhook_list(args: argparse.Namespace) -> None:
    service = _app(args).service
    principal = service.operator(team_id=args.team)
    hooks, cursor = [], None
    while True:
        page = service.list_webhooks(principal=principal, cursor=cursor, limit=100)
        hooks += page.webhooks
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    _emit(args, hooks, lambda ws: "\n".join(_webhook_line(w) for w in ws) or "no webhooks")


def cmd_webhook_delete(args: argparse.Namespace) -> None:
    service = _app(args).service
    service.delete_webhook(principal=service.operator(team_id=args.team), webhook_id=args.id)
    _emit(args, {"deleted": True, "webhook_id": args.id}, lambda d: f"deleted webhook {d['webhook_id']}")


def cmd_webhook_get(args: argparse.Namespace) -> None:
    service = _app(args).service
    _emit(
        args,
        service.get_webhook(principal=service.operator(team_id=args.team), webhook_id=args.id),
        _webhook_line,
    )


def cmd_webhook_update(args: argparse.Namespace) -> None:
    changes: dict[str, Any] = {}
    if args.url is not None:
        changes["url"] = args.url
    if args.events is not None:
        changes["events"] = _events_arg(args.events)
    if args.description is not None:
        changes["description"] = args.description  # "" clears it (inputs.normalise_description)
    if args.active is not None:
        changes["active"] = args.active
    if args.rate_limit is not None:
        changes["rate_limit"] = None if args.rate_limit == "none" else args.rate_limit
    service = _app(args).service
    updated = service.update_webhook(
        principal=service.operator(team_id=args.team), webhook_id=args.id, changes=changes
    )
    _emit(args, updated, _webhook_line)


def cmd_webhook_rotate(args: argparse.Namespace) -> None:
    service = _app(args).service
    rotated = service.rotate_secret(
        principal=service.operator(team_id=args.team), webhook_id=args.id, grace_seconds=args.grace_seconds
    )
    _emit(
        args,
        rotated,
        lambda r: (
            f"new secret (shown once): {r['secret']}\nold secret still signs webhook-signature until "
            f"{r['previous_secret_expires_at'] or 'now'}"
        ),
    )


def cmd_redeliver(args: argparse.Namespace) -> None:
    service = _app(args).service
    copy = service.redeliver(principal=service.operator(team_id=args.team), delivery_id=args.delivery)
    _emit(args, copy, lambda d: f"queued delivery {d['id']} (redelivery of {d['redelivery_of']})")


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from justscan_mcp.progress import Progress
    from justscan_mcp.store import Store

    store = Store.from_url(_settings(args).database_url)
    try:
        before, head = store.schema_revision()
        steps = store.revisions_after(before) if before != head else []
        if steps:
            # On stderr: stdout keeps the one result (a JSON document under --json).
            with Progress("applying migrations", len(steps), unit="revisions") as shown:
                store.migrate(on_step=lambda _revision: shown.update())
        else:
            store.migrate()
    finally:
        store.close()
    _emit(
        args,
        {"from": before, "to": head},
        lambda r: (
            f"schema at {r['to']}"
            + (f" (was {r['from'] or 'empty'})" if r["from"] != r["to"] else " (already current)")
        ),
    )


# --- events, deliveries, worker ----------------------------------------------------------------


def cmd_emit(args: argparse.Namespace) -> None:
    try:
        data = json.loads(args.data)
    except json.JSONDecodeError as exc:
        raise CliError(f"data: not valid JSON ({exc.msg} at position {exc.pos})", field="data") from None
    result = _app(args).service.emit_event(team_id=args.team, event=args.event, data=data)
    _emit(
        args,
        result,
        lambda r: (
            f"recorded event {r['event_id']}; deliveries: {', '.join(map(str, r['deliveries'])) or 'none'}"
        ),
    )


def _delivery_lines(page: dict[str, Any]) -> str:
    lines = []
    for d in page["deliveries"]:
        retry = f" next retry {d['next_attempt_at']}" if d["next_attempt_at"] else ""
        lines.append(
            f"delivery {d['id']}\t{d['event']}\t{d['state']}\t{len(d['attempts'])} attempt(s){retry}"
        )
        for a in d["attempts"]:
            outcome = a["status_code"] if a["status_code"] is not None else "-"
            error = f"\t{a['error']}" if a["error"] else ""
            lines.append(f"  #{a['number']} {a['started_at']} {a['duration_ms']} ms HTTP {outcome}{error}")
    return "\n".join(lines) or "no deliveries"


def cmd_deliveries(args: argparse.Namespace) -> None:
    page = _app(args).service.delivery_log(webhook_id=args.webhook, limit=args.limit, state=args.state)
    _emit(args, page, _delivery_lines)


def cmd_worker(args: argparse.Namespace) -> None:
    import anyio

    from justscan_mcp.app import App

    settings = _settings(args)
    if args.metrics_port is not None:
        settings = settings.with_overrides(metrics_port=args.metrics_port)
    _configure_logging(settings)
    app = App.build(settings)
    probes = _probe_server(app, args.metrics_host, settings.metrics_port) if settings.metrics_port else None

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as tg:
                if probes is not None:
                    # Up before the database is: /healthz and /readyz then say why not ready.
                    tg.start_soon(probes.serve)
                async with app.lifespan(dispatcher=True):
                    log.info("worker running; stop with SIGTERM")
                    await _stop_signal(signals)
                if probes is not None:
                    probes.should_exit = True

    # uvloop, as `serve --transport http` has through uvicorn: the worker's event loop carries
    # every send. One SQLite worker, 20,000 deliveries: 211 µs of CPU a delivery (mean of six
    # runs, 193 to 235) against 229 (five runs, 208 to 277) on asyncio's own loop; no change seen
    # on PostgreSQL, where the database waits dominate.
    anyio.run(main, backend_options={"use_uvloop": importlib.util.find_spec("uvloop") is not None})


def _probe_server(app: Any, host: str, port: int) -> Any:
    """A uvicorn server for the worker's /metrics, /healthz and /readyz on `port`."""
    import uvicorn
    from starlette.applications import Starlette

    from justscan_mcp.logs import uvicorn_log_config
    from justscan_mcp.probes import probe_routes

    config = uvicorn.Config(
        Starlette(routes=probe_routes(app)),
        host=host,
        port=port,
        log_level=app.settings.log_level,
        log_config=uvicorn_log_config(),
        lifespan="off",
    )
    server = uvicorn.Server(config)
    # The worker handles SIGTERM itself (finish in-flight sends first); uvicorn must not take
    # the signal handlers over.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    return server


# --- status -----------------------------------------------------------------------------------

WATCH_INTERVAL = 2.0


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def status_text(st: dict[str, Any], backend: str) -> str:
    """The plain table `status` prints (st: an OperationsStatus as JSON)."""
    when = st["generated_at"].replace("T", " ")[:19]
    lines = [f"justscan-mcp status at {when} UTC ({backend})", ""]
    hooks = st["dispatchers"]
    lines.append(f"Live dispatchers: {len(hooks)}")
    if hooks:
        lines += _table(
            ["WORKER", "HOST", "PID", "STARTED", "LAST BEAT", "IN FLIGHT"],
            [
                [
                    d["worker_id"],
                    d["host"],
                    d["pid"],
                    d["started_at"][:19],
                    d["last_beat_at"][11:19],
                    d["in_flight"],
                ]
                for d in hooks
            ],
        )
    else:
        lines.append("  none: nothing is being delivered (start `justscan-mcp worker` or `serve`)")
    opened = st["open_deliveries"]
    lines += ["", "Open deliveries: " + ", ".join(f"{k} {v}" for k, v in opened.items())]
    age = st["oldest_due_age_seconds"]
    lines.append(
        "Oldest due delivery: none waiting"
        if age is None
        else f"Oldest due delivery: waiting for {_ago(age)}"
    )
    window = st["window_seconds"] // 60
    rate = st["success_rate"]
    tried = ", ".join(f"{k} {v}" for k, v in st["attempts"].items())
    shown = "no attempts" if rate is None else f"success {rate * 100:.1f} %"
    lines += ["", f"Attempts in the last {window} min: {tried} ({shown})"]
    failing = st["top_failing"]
    lines.append(f"Top failing webhooks (last {window} min): {'none' if not failing else ''}".rstrip())
    if failing:
        lines += _table(
            ["WEBHOOK", "TEAM", "FAILED", "FAILING SINCE"],
            [
                [f["webhook_id"], f["team_id"], f["failed_attempts"], (f["failing_since"] or "-")[:19]]
                for f in failing
            ],
        )
    lines.append(f"Switched off for failing: {st['switched_off']}")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> None:
    app = _app(args)

    def once() -> dict[str, Any]:
        return app.service.operations_status().model_dump(mode="json")  # type: ignore[no-any-return]

    if not args.watch:
        _emit(args, once(), lambda st: status_text(st, app.store.backend))
        return
    import time

    from justscan_mcp.errors import StoreUnavailable

    clear = sys.stdout.isatty() and not args.json
    try:
        while True:
            try:
                st = once()
                out = json.dumps(st) if args.json else status_text(st, app.store.backend)
            except StoreUnavailable as exc:
                # Watching through an outage is the point: say so and keep watching.
                out = (
                    json.dumps({"error": exc.message})
                    if args.json
                    else f"database unavailable: {exc.message}"
                )
            if clear:
                sys.stdout.write("\x1b[H\x1b[2J")  # home and clear: refresh in place
            elif not args.json:
                out += "\n"  # blocks apart when piped
            sys.stdout.write(out + "\n")
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return


# --- parser -----------------------------------------------------------------------------------


def _positive_int(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not an integer id") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive id")
    return value


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a positive number")
    return value


def _port(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{raw!r} is not a port number (0-65535)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="justscan-mcp", description="Just Scan It webhooks: MCP server, API and CLI."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--database-url",
        help="SQLAlchemy URL (default: $JUSTSCAN_DATABASE_URL or SQLite in the user data dir)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, func: Callable[[argparse.Namespace], None], help_: str, json_flag: bool = True
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if json_flag:
            p.add_argument("--json", action="store_true", help="print one JSON document on stdout")
        return p

    serve = add(sub, "serve", cmd_serve, "run the MCP server (stdio by default, or HTTP)", json_flag=False)
    serve.add_argument("--transport", choices=["stdio", "http"], default="stdio")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="HTTP port (default 8000)")
    serve.add_argument(
        "--no-dispatcher", action="store_true", help="do not run the delivery dispatcher in this process"
    )
    serve.add_argument(
        "--public-url",
        metavar="URL",
        help="the base URL clients reach this server at, behind a proxy (OAuth discovery and token "
        "audience are built from it); default http://HOST:PORT; also $JUSTSCAN_PUBLIC_URL",
    )
    serve.add_argument(
        "--allowed-host",
        action="append",
        metavar="HOST",
        help="public host name clients use (behind a proxy); repeatable; also $JUSTSCAN_ALLOWED_HOSTS",
    )
    serve.add_argument(
        "--allow-private-targets",
        action="store_true",
        help="allow http:// and private webhook targets (development)",
    )

    db = sub.add_parser("db", help="database schema").add_subparsers(
        dest="db_command", required=True, metavar="ACTION"
    )
    add(db, "upgrade", cmd_db_upgrade, "apply schema migrations (run once per release on PostgreSQL)")
    worker = add(sub, "worker", cmd_worker, "run the delivery dispatcher alone (scale-out)", json_flag=False)
    worker.add_argument(
        "--allow-private-targets",
        action="store_true",
        help="deliver to private/loopback addresses (development)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_port,
        metavar="N",
        help="serve /metrics, /healthz and /readyz on this port (or JUSTSCAN_METRICS_PORT)",
    )
    worker.add_argument(
        "--metrics-host", default="127.0.0.1", help="bind address of --metrics-port (default 127.0.0.1)"
    )
    p = add(sub, "status", cmd_status, "what is being delivered now, across every team (for operators)")
    p.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    p.add_argument("--interval", type=_positive_float, default=WATCH_INTERVAL, help=argparse.SUPPRESS)
    p = add(sub, "emit", cmd_emit, "record an event and fan it out to subscribed webhooks")
    p.add_argument("event", metavar="EVENT", help="scan, form_submit or file_download")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p.add_argument(
        "--data",
        required=True,
        metavar="JSON",
        help='the event data, e.g. \'{"qr_code_id": 1, "scan_id": 2}\'',
    )
    p = add(sub, "deliveries", cmd_deliveries, "show a webhook's delivery log, newest first")
    p.add_argument("--webhook", type=_positive_int, required=True, metavar="ID")
    p.add_argument("--state", choices=DELIVERY_STATES)
    p.add_argument("--limit", type=_positive_int, default=20, help="1 to 100 (default 20)")

    webhook = sub.add_parser("webhook", help="manage a team's webhooks as the operator").add_subparsers(
        dest="webhook_command", required=True, metavar="ACTION"
    )
    p = add(webhook, "create", cmd_webhook_create, "create a webhook (its secret is printed once)")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p.add_argument("--url", required=True)
    p.add_argument(
        "--events", required=True, help="comma-separated: scan,first_scan,form_submit,file_download"
    )
    p.add_argument("--description")
    p.add_argument("--rate-limit", type=int, metavar="N", help="at most N deliveries per second (1-1000)")
    p.add_argument(
        "--allow-private-targets", action="store_true", help="allow http:// and private targets (development)"
    )
    p = add(webhook, "list", cmd_webhook_list, "list a team's webhooks")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p = add(webhook, "get", cmd_webhook_get, "show one webhook")
    p.add_argument("id", type=_positive_int)
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p = add(webhook, "update", cmd_webhook_update, "change a webhook (only the fields given)")
    p.add_argument("id", type=_positive_int)
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p.add_argument("--url")
    p.add_argument("--events", help="comma-separated, replaces the list")
    p.add_argument("--description", help='new note; "" clears it')
    p.add_argument("--active", dest="active", action="store_true", default=None)
    p.add_argument("--inactive", dest="active", action="store_false")
    p.add_argument(
        "--rate-limit",
        type=lambda v: v if v == "none" else int(v),
        metavar="N",
        help='at most N deliveries per second (1-1000); "none" removes the limit',
    )
    p.add_argument(
        "--allow-private-targets", action="store_true", help="allow http:// and private targets (development)"
    )
    p = add(webhook, "rotate-secret", cmd_webhook_rotate, "issue a new signing secret (printed once)")
    p.add_argument("id", type=_positive_int)
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p.add_argument(
        "--grace-seconds", type=int, default=86400, help="how long the old secret still signs (default 86400)"
    )
    p = add(sub, "redeliver", cmd_redeliver, "send a past delivery's event again, as a new delivery")
    p.add_argument("delivery", type=_positive_int, metavar="DELIVERY_ID")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p = add(webhook, "delete", cmd_webhook_delete, "delete a webhook")
    p.add_argument("id", type=_positive_int)
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")

    team = sub.add_parser("team", help="manage teams").add_subparsers(
        dest="team_command", required=True, metavar="ACTION"
    )
    p = add(team, "create", cmd_team_create, "create a team")
    p.add_argument("name")
    add(team, "list", cmd_team_list, "list teams")

    key = sub.add_parser("key", help="manage API keys").add_subparsers(
        dest="key_command", required=True, metavar="ACTION"
    )
    p = add(key, "create", cmd_key_create, "create an API key (printed once)")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p.add_argument(
        "--scopes",
        help="comma-separated: webhooks:read,webhooks:write,events:write (default webhooks:read,webhooks:write)",
    )
    p.add_argument("--mcp", dest="mcp", action="store_true", default=True, help="MCP tools enabled (default)")
    p.add_argument("--no-mcp", dest="mcp", action="store_false", help="MCP tools disabled")
    p.add_argument("--name", help="a label to tell keys apart")
    p = add(key, "list", cmd_key_list, "list a team's API keys")
    p.add_argument("--team", type=_positive_int, required=True, metavar="ID")
    p = add(key, "update", cmd_key_update, "change a key's MCP switch or scopes")
    p.add_argument("id", type=_positive_int)
    p.add_argument("--mcp", dest="mcp", action="store_true", default=None)
    p.add_argument("--no-mcp", dest="mcp", action="store_false")
    p.add_argument("--scopes")
    p = add(key, "revoke", cmd_key_revoke, "revoke a key (takes effect on its next call)")
    p.add_argument("id", type=_positive_int)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (JustScanError, CliError) as exc:
        field = getattr(exc, "field", None)
        message = exc.message
        if getattr(args, "json", False):
            sys.stderr.write(json.dumps({"error": message, "field": field}) + "\n")
        else:
            sys.stderr.write(f"justscan-mcp: error: {message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
