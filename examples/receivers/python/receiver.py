"""A minimal webhook receiver that verifies X-Webhook-Signature with the guide's Python snippet.

    WEBHOOK_SECRET=whsec_... python examples/receivers/python/receiver.py [PORT]

It answers 204 to a delivery whose signature verifies and 401 to anything else, and prints one
line per delivery. Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

secret = os.environ.get("WEBHOOK_SECRET", "")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        raw_body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        signature = self.headers.get("X-Webhook-Signature", "")

        expected = hmac.new(
            secret.encode("utf-8"),
            raw_body,
            hashlib.sha256,
        ).hexdigest()

        if not secret or not hmac.compare_digest(expected, signature):
            self.send_response(401)
            self.send_header("Content-Length", "17")
            self.end_headers()
            self.wfile.write(b"Invalid signature")
            print("rejected a delivery with a bad signature", flush=True)
            return

        event = json.loads(raw_body)
        print(
            f"verified delivery {self.headers.get('X-Webhook-Delivery')}: {event['event']} {json.dumps(event['data'])}",
            flush=True,
        )
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    if not secret:
        print("set WEBHOOK_SECRET to the webhook's secret (whsec_...)", file=sys.stderr)
        raise SystemExit(2)
    print(f"listening on http://127.0.0.1:{port}/", flush=True)
    HTTPServer(("127.0.0.1", port), Handler).serve_forever()
