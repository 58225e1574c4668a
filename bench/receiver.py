"""Benchmark receiver: a separate process answering 200 to every POST and recording, per
X-Webhook-Delivery, the wall-clock arrival time. GET /stats returns the count; GET /arrivals
returns {delivery_id: unix_time}; POST /reset clears both."""

from __future__ import annotations

import sys
import time

from aiohttp import web

arrivals: dict[str, float] = {}
count = 0


async def hook(request: web.Request) -> web.Response:
    global count
    await request.read()
    count += 1
    arrivals[request.headers.get("X-Webhook-Delivery", f"anon-{count}")] = time.time()
    return web.Response(text="ok")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "count": count,
            "first": min(arrivals.values(), default=0),
            "last": max(arrivals.values(), default=0),
        }
    )


async def get_arrivals(request: web.Request) -> web.Response:
    return web.json_response(arrivals)


async def reset(request: web.Request) -> web.Response:
    global count
    arrivals.clear()
    count = 0
    return web.json_response({})


app = web.Application()
app.add_routes(
    [
        web.post("/hook", hook),
        web.get("/stats", stats),
        web.get("/arrivals", get_arrivals),
        web.post("/reset", reset),
    ]
)

if __name__ == "__main__":
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, backlog=2048)
