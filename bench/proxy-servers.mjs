// The two servers of the proxy benchmark besides the proxy itself, each run as its own process:
//   node bench/proxy-servers.mjs upstream PORT          a small JSON service: POST /orders answers 201 with an
//                                                       order, GET /orders 200 with a list; GET /ready 200
//   node bench/proxy-servers.mjs plain PORT UPSTREAM    a plain Node.js reverse proxy, no idempotency: what any
//                                                       proxy costs, to set the idempotency proxy's cost against
// Both print `LISTENING <port>` once they serve.
import { Agent, createServer, request } from 'node:http';

const [mode, portText, upstreamText] = process.argv.slice(2);
const port = Number(portText ?? 0);

let server;
if (mode === 'upstream') {
  let next = 0;
  server = createServer((req, res) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => {
      if (req.url === '/ready') return res.writeHead(200).end('ok');
      if (req.method === 'POST') {
        const body = Buffer.concat(chunks).toString();
        const order = JSON.stringify({ id: ++next, item: body.length > 0 ? JSON.parse(body).item : null });
        res.writeHead(201, { 'content-type': 'application/json', location: `/orders/${next}` });
        return res.end(order);
      }
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end('[{"id":1,"item":"book"}]');
    });
  });
} else if (mode === 'plain') {
  // What a minimal reverse proxy does, as most hand-written ones do it: keep-alive to the upstream, hop-by-hop
  // headers dropped, X-Forwarded-For added, bodies piped both ways.
  const upstream = new URL(upstreamText);
  const agent = new Agent({ keepAlive: true, scheduling: 'lifo', timeout: 4000 });
  const HOP = new Set([
    'connection',
    'keep-alive',
    'proxy-connection',
    'te',
    'trailer',
    'transfer-encoding',
    'upgrade',
  ]);
  const endToEnd = (headers) => {
    const kept = {};
    for (const [name, value] of Object.entries(headers)) if (!HOP.has(name)) kept[name] = value;
    return kept;
  };
  server = createServer((req, res) => {
    if (req.url === '/ready') return res.writeHead(200).end('ok');
    const headers = endToEnd(req.headers);
    headers['x-forwarded-for'] = req.socket.remoteAddress;
    const out = request(
      { hostname: upstream.hostname, port: upstream.port, method: req.method, path: req.url, headers, agent },
      (upstreamRes) => {
        res.writeHead(upstreamRes.statusCode, endToEnd(upstreamRes.headers));
        upstreamRes.pipe(res);
      },
    );
    out.on('error', () => {
      if (!res.headersSent) res.writeHead(502).end();
      else res.destroy();
    });
    req.pipe(out);
  });
} else {
  console.error('usage: proxy-servers.mjs upstream PORT | plain PORT UPSTREAM_URL');
  process.exit(2);
}

server.keepAliveTimeout = 30_000;
server.listen(port, '127.0.0.1', () => console.log(`LISTENING ${server.address().port}`));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
