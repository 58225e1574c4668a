"""A webhook receiver that verifies the Standard Webhooks headers (webhook-id, webhook-timestamp,
webhook-signature) with the `standardwebhooks` package.

    pip install standardwebhooks
    WEBHOOK_SECRET=whsec_... python receiver.py [PORT]

The library checks the signature over id, timestamp and raw body with the secret's decoded bytes,
and refuses a timestamp more than five minutes from now (a replayed delivery). 204 when it
verifies, 401 otherwise. During a secret rotation webhook-signature carries one signature per
live secret, so a receiver that already has the new secret keeps verifying.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

secret = os.environ.get("WEBHOOK_SECRET", "")


class Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        raw_body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        try:
            event = Webhook(secret).verify(raw_body, dict(self.headers.items()))
        except (WebhookVerificationError, ValueError) as exc:
            self.send_response(401)
            self.send_header("Content-Length", "17")
            self.end_headers()
            self.wfile.write(b"Invalid signature")
            print(f"rejected a delivery: {exc}", flush=True)
            return
        print(
            f"verified delivery {self.headers.get('webhook-id')}: {event['event']} {json.dumps(event['data'])}",
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
