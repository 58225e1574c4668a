// The official MCP TypeScript SDK client connects to justscan-mcp through OAuth, headless: its
// OAuthClientProvider's redirect goes to a "person" that signs in on the consent page with an API
// key and approves, over plain HTTP as a browser would. Prints one JSON object of what it saw;
// tests/test_oauth_js.py asserts on it.
//
//   node mcp_oauth_client.mjs   (JS_BASE_URL, JS_API_KEY)
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { UnauthorizedError } from '@modelcontextprotocol/sdk/client/auth.js';

const env = process.env;
const base = env.JS_BASE_URL;
const REDIRECT = 'http://127.0.0.1:47002/callback';

// A browser's cookie jar, for one host, enough for the dashboard's session and CSRF cookies.
const jar = new Map();
function remember(response) {
  for (const line of response.headers.getSetCookie()) {
    const [pair] = line.split(';');
    const at = pair.indexOf('=');
    jar.set(pair.slice(0, at).trim(), pair.slice(at + 1).trim());
  }
}
const cookies = () => [...jar].map(([k, v]) => `${k}=${v}`).join('; ');
async function go(url, init = {}) {
  const response = await fetch(new URL(url, base), {
    ...init,
    redirect: 'manual',
    headers: { ...(init.headers ?? {}), Cookie: cookies() },
  });
  remember(response);
  return response;
}
const field = (html, name) => {
  const found = html.match(new RegExp(`name="${name}" value="([^"]*)"`));
  if (!found) throw new Error(`no ${name} field`);
  return found[1].replaceAll('&amp;', '&');
};
const form = (values) => {
  const body = new URLSearchParams();
  for (const [k, v] of Object.entries(values)) for (const item of [v].flat()) body.append(k, item);
  return { method: 'POST', body, headers: { 'Content-Type': 'application/x-www-form-urlencoded' } };
};

// The person: from the authorization URL to the code the app is sent back with.
async function signInAndApprove(authorizationUrl) {
  let r = await go(authorizationUrl);
  const consent = r.headers.get('location');
  r = await go(`${consent}&again=1`);
  let html = await r.text();
  r = await go('/login', form({ csrf: field(html, 'csrf'), api_key: env.JS_API_KEY, next: field(html, 'next') }));
  r = await go(r.headers.get('location'));
  html = await r.text();
  r = await go(
    '/oauth/consent',
    form({
      csrf: field(html, 'csrf'),
      request: field(html, 'request'),
      decision: 'approve',
      scopes: ['webhooks:read', 'webhooks:write'],
    }),
  );
  const back = new URL(r.headers.get('location'));
  return { code: back.searchParams.get('code'), iss: back.searchParams.get('iss') };
}

class HeadlessProvider {
  constructor() {
    this.saved = {};
    this.code = undefined;
  }
  get redirectUrl() {
    return REDIRECT;
  }
  get clientMetadata() {
    return {
      client_name: 'TS SDK assistant',
      redirect_uris: [REDIRECT],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: 'none',
    };
  }
  clientInformation() {
    return this.saved.client;
  }
  saveClientInformation(info) {
    this.saved.client = info;
  }
  tokens() {
    return this.saved.tokens;
  }
  saveTokens(tokens) {
    this.saved.tokens = tokens;
  }
  async redirectToAuthorization(url) {
    this.back = await signInAndApprove(url);
  }
  saveCodeVerifier(verifier) {
    this.saved.verifier = verifier;
  }
  codeVerifier() {
    return this.saved.verifier;
  }
}

const provider = new HeadlessProvider();
const url = new URL(`${base}/mcp`);
const out = {};

async function connect() {
  const client = new Client({ name: 'justscan-ts-oauth', version: '1.0.0' });
  await client.connect(new StreamableHTTPClientTransport(url, { authProvider: provider }));
  return client;
}

let client;
try {
  client = await connect();
} catch (error) {
  if (!(error instanceof UnauthorizedError)) throw error;
  // The SDK sent the person off; with the code back, finish and connect again.
  const transport = new StreamableHTTPClientTransport(url, { authProvider: provider });
  await transport.finishAuth(provider.back.code);
  client = await connect();
}
out.iss = provider.back?.iss;
out.tools = (await client.listTools()).tools.map((t) => t.name).sort();
const made = await client.callTool({
  name: 'create_webhook',
  arguments: { url: env.JS_TARGET_URL, events: ['scan'], description: 'via OAuth from TS' },
});
out.created = made.structuredContent;
await client.close();
out.firstAccess = provider.saved.tokens.access_token;
out.firstRefresh = provider.saved.tokens.refresh_token;

// Refresh: the token endpoint rotates the refresh token.
const refreshed = await fetch(`${base}/token`, {
  method: 'POST',
  headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
  body: new URLSearchParams({
    grant_type: 'refresh_token',
    refresh_token: provider.saved.tokens.refresh_token,
    client_id: provider.saved.client.client_id,
  }),
});
const pair = await refreshed.json();
out.refreshStatus = refreshed.status;
out.rotated = pair.refresh_token !== out.firstRefresh;
provider.saved.tokens = { ...provider.saved.tokens, ...pair };
client = await connect();
out.afterRefresh = (await client.callTool({ name: 'list_webhooks', arguments: {} })).structuredContent.webhooks.length;
await client.close();
out.access = provider.saved.tokens.access_token;
console.log(JSON.stringify(out));
