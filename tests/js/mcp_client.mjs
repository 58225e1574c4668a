// Drives justscan-mcp with the official MCP TypeScript SDK client, over stdio or streamable HTTP,
// and prints one JSON object with what it saw; tests/test_js_client.py asserts on it.
//
//   node mcp_client.mjs stdio  (JS_PYTHON, JS_DB_URL, JS_WRITE_KEY, JS_READ_KEY, JS_TARGET_URL)
//   node mcp_client.mjs http   (JS_MCP_URL, JS_WRITE_KEY, JS_READ_KEY, JS_TARGET_URL)
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

const mode = process.argv[2];
const env = process.env;

function transport(key) {
  if (mode === 'stdio') {
    return new StdioClientTransport({
      command: env.JS_PYTHON,
      args: ['-m', 'justscan_mcp', 'serve', '--transport', 'stdio'],
      env: { ...env, JUSTSCAN_DATABASE_URL: env.JS_DB_URL, JUSTSCAN_API_KEY: key },
      stderr: 'inherit',
    });
  }
  return new StreamableHTTPClientTransport(new URL(env.JS_MCP_URL), {
    requestInit: { headers: { Authorization: `Bearer ${key}` } },
  });
}

async function session(key, body) {
  const client = new Client({ name: 'justscan-js-test', version: '1.0.0' });
  await client.connect(transport(key));
  try {
    return await body(client);
  } finally {
    await client.close();
  }
}

const text = (result) => result.content.filter((c) => c.type === 'text').map((c) => c.text).join('\n');

const out = {};
await session(env.JS_WRITE_KEY, async (c) => {
  out.server = c.getServerVersion();
  out.tools = (await c.listTools()).tools.map((t) => t.name).sort();
  const made = await c.callTool({
    name: 'create_webhook',
    arguments: { url: env.JS_TARGET_URL, events: ['scan', 'first_scan'], description: 'from the TS SDK' },
  });
  out.created = { isError: made.isError ?? false, webhook: made.structuredContent };
  const listed = await c.callTool({ name: 'list_webhooks', arguments: { limit: 50 } });
  out.listed = listed.structuredContent.webhooks.map((w) => w.id);
  const recovered = await c.callTool({
    name: 'recover_deliveries',
    arguments: { webhook_id: made.structuredContent.id, since: '2026-01-01T00:00:00Z', dry_run: true },
  });
  out.recovered = { isError: recovered.isError ?? false, result: recovered.structuredContent };
  const stats = await c.callTool({
    name: 'get_webhook_stats',
    arguments: { webhook_id: made.structuredContent.id, hours: 48 },
  });
  out.stats = { isError: stats.isError ?? false, result: stats.structuredContent };
  const deleted = await c.callTool({
    name: 'delete_webhook',
    arguments: { webhook_id: made.structuredContent.id },
  });
  out.deleted = deleted.structuredContent;
  const after = await c.callTool({ name: 'list_webhooks', arguments: {} });
  out.listedAfterDelete = after.structuredContent.webhooks.map((w) => w.id);
  const invalid = await c.callTool({ name: 'create_webhook', arguments: { url: 'ftp://x', events: ['scan'] } });
  out.invalid = { isError: invalid.isError ?? false, text: text(invalid) };
});
await session(env.JS_READ_KEY, async (c) => {
  out.readOnlyTools = (await c.listTools()).tools.map((t) => t.name).sort();
  const refused = await c.callTool({
    name: 'create_webhook',
    arguments: { url: env.JS_TARGET_URL, events: ['scan'] },
  });
  out.missingScope = { isError: refused.isError ?? false, text: text(refused) };
});
console.log(JSON.stringify(out));
