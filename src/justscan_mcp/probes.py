"""What monitoring reads: `/healthz`, `/readyz` and `/metrics`, on serve and worker alike.

`serve --transport http` mounts them beside everything else; `worker --metrics-port` serves
only these.

- `/healthz`: the process is up and the database answers (200), or 503.
- `/readyz`: also the schema at head and, where this process runs a dispatcher, a claim loop
  that turned within three poll intervals; 503 `{"status": "unready", "reason"}` otherwise.
- `/metrics`: Prometheus text, no key (it carries no team name, URL or secret).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from justscan_mcp.app import App
from justscan_mcp.errors import StoreUnavailable
from justscan_mcp.threads import in_thread


def probe_routes(app: App) -> list[Route]:
    """The three monitoring routes over `app`."""
    metrics = app.metrics  # made now, not by the first scrape's thread

    async def healthz(request: Request) -> JSONResponse:
        if not app.ready:
            return JSONResponse({"status": "starting", "database": "unreachable"}, status_code=503)
        try:
            await in_thread(app.store.ping)
        except StoreUnavailable:
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ok", "database": app.store.backend})

    async def readyz(request: Request) -> JSONResponse:
        reason = await app.unready_reason()
        if reason is not None:
            return JSONResponse({"status": "unready", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready", "database": app.store.backend})

    async def scrape(request: Request) -> Response:
        from justscan_mcp.metrics import CONTENT_TYPE

        # In a thread: the database gauges may read the database.
        return Response(await in_thread(metrics.render), media_type=CONTENT_TYPE)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", scrape, methods=["GET"]),
    ]
