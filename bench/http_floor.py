"""The HTTP stack alone: uvicorn, run as `serve --transport http` runs it, with one ASGI app that
reads each request's body, parses its JSON and answers 202 with a small JSON body. No key, no
validation, no database. bench/run.py posts the same events to it with the same client just
before ours, so a slow minute of this machine shows in both.

    .venv/bin/python bench/http_floor.py PORT
"""

from __future__ import annotations

import json
import sys
from typing import Any

import uvicorn

ANSWER = json.dumps({"id": "evt_floor", "deliveries": []}).encode()
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] == "POST":
        json.loads(body)
    await send(
        {
            "type": "http.response.start",
            "status": 202 if scope["method"] == "POST" else 200,
            "headers": HEADERS,
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", lifespan="on")
