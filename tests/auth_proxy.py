"""A pass-through HTTP proxy that adds `Authorization: Bearer <key>` to every request.

The MCP conformance suite has no option for an auth header, and every MCP request to this
server needs a key. Everything else passes through as sent, the Host and Origin headers included
(the DNS-rebinding scenarios depend on the server seeing them), and responses stream back chunk
by chunk (SSE).

    python tests/auth_proxy.py LISTEN_PORT UPSTREAM_BASE_URL   (the key in $PROXY_BEARER_KEY)
"""

from __future__ import annotations

import os
import sys

import aiohttp
from aiohttp import web

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def make_app(upstream: str, key: str) -> web.Application:
    async def forward(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Authorization"] = f"Bearer {key}"
        body = await request.read()
        async with session.request(
            request.method,
            upstream + request.rel_url.raw_path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream_resp:
            resp = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason)
            for k, v in upstream_resp.headers.items():
                if k.lower() not in HOP_BY_HOP:
                    resp.headers.add(k, v)
            try:
                await resp.prepare(request)
                async for chunk in upstream_resp.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionResetError:
                pass  # the client went away (a closed SSE stream): nothing left to pass on
            return resp

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None), auto_decompress=False
        )
        yield
        await app["session"].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    web.run_app(
        make_app(upstream, os.environ["PROXY_BEARER_KEY"]),
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=lambda *_: print(f"proxy on http://127.0.0.1:{port}/ -> {upstream}", flush=True),
    )
