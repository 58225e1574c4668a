// A minimal webhook receiver that verifies X-Webhook-Signature with the guide's Node.js snippet.
//
//   WEBHOOK_SECRET=whsec_... node receiver.mjs [PORT]
//
// 204 when the signature verifies, 401 otherwise. Node's standard library only.
import crypto from 'node:crypto';
import http from 'node:http';

const secret = process.env.WEBHOOK_SECRET ?? '';
const port = Number(process.argv[2] ?? 9000);
if (!secret) {
  console.error('set WEBHOOK_SECRET to the webhook\'s secret (whsec_...)');
  process.exit(2);
}

function verify(rawBody, signature) {
  const expected = crypto
    .createHmac('sha256', secret)
    .update(rawBody)
    .digest('hex');

  // timingSafeEqual throws when the lengths differ (a missing or malformed header): also a no.
  if (! crypto.timingSafeEqual(Buffer.from(expected), Buffer.from(signature))) {
    throw new Error('Invalid signature');
  }
}

http
  .createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      const rawBody = Buffer.concat(chunks); // the exact bytes that were signed
      try {
        verify(rawBody, req.headers['x-webhook-signature'] ?? '');
      } catch {
        console.log('rejected a delivery with a bad signature');
        res.writeHead(401).end('Invalid signature');
        return;
      }
      const event = JSON.parse(rawBody.toString('utf8'));
      console.log(`verified delivery ${req.headers['x-webhook-delivery']}: ${event.event} ${JSON.stringify(event.data)}`);
      res.writeHead(204).end();
    });
  })
  .listen(port, '127.0.0.1', () => console.log(`listening on http://127.0.0.1:${port}/`));
