/**
 * Header handling of the reverse proxy (RFC 9110 §7.6.1): hop-by-hop headers describe one connection and stop
 * at the proxy, in both directions; end-to-end headers pass as they came, in their order, case and number.
 */
import type { IncomingMessage } from 'node:http';

/**
 * Hop-by-hop headers, dropped in both directions: the standard ones (`Connection`, `Keep-Alive`, `TE`,
 * `Trailer`, `Transfer-Encoding`, `Upgrade`), the `Proxy-*` family (meant for this proxy, or sent by it), and
 * `Expect`, which this proxy has answered already (Node.js sends `100 Continue` itself). The framing of each
 * hop is its own: a body that came chunked leaves chunked, one with a `Content-Length` leaves with it.
 */
const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authenticate',
  'proxy-authorization',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'expect',
]);

const NONE: ReadonlySet<string> = new Set();

/**
 * The header names a `Connection` header lists (its value as Node.js parsed it, several lines joined): hop-by-hop
 * too, whatever they are.
 */
function connectionOptions(connection: string | string[] | undefined): ReadonlySet<string> {
  if (connection === undefined) return NONE;
  const named = new Set<string>();
  for (const token of String(connection).split(',')) {
    const name = token.trim().toLowerCase();
    if (name !== '') named.add(name);
  }
  return named;
}

/** Whether a lower-case header name ends at this hop. */
function isHopByHop(name: string, named: ReadonlySet<string>): boolean {
  return HOP_BY_HOP.has(name) || name.startsWith('proxy-') || named.has(name);
}

/**
 * A message's end-to-end headers, as sent: a flat `[name, value, name, value, …]` list of its raw headers without
 * the hop-by-hop ones.
 */
export function endToEndHeaders(message: IncomingMessage): string[] {
  const raw = message.rawHeaders;
  const named = connectionOptions(message.headers.connection);
  const kept: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    if (!isHopByHop(raw[i]!.toLowerCase(), named)) kept.push(raw[i]!, raw[i + 1]!);
  }
  return kept;
}

/**
 * The headers a request goes upstream with: its end-to-end headers as the client sent them, `Host` included
 * (the upstream sees the name it is known by, as without the proxy; `X-Forwarded-Host` says it too), then:
 *
 * - `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`: this hop appended to what earlier proxies said
 *   (one line each, comma-separated), as a chain of proxies builds them;
 * - `Host` set to the upstream's when the client sent none (HTTP/1.0);
 * - the `Transfer-Encoding` the body came with: Node.js removed its chunked framing on the way in and frames it
 *   again on the way out (any other coding it names stays in the bytes, so it is named again).
 */
export function upstreamRequestHeaders(req: IncomingMessage, upstreamHost: string): string[] {
  const raw = req.rawHeaders;
  const named = connectionOptions(req.headers.connection);
  const headers: string[] = [];
  const forwarded: Record<'x-forwarded-for' | 'x-forwarded-proto' | 'x-forwarded-host', string[]> = {
    'x-forwarded-for': [],
    'x-forwarded-proto': [],
    'x-forwarded-host': [],
  };
  let host: string | undefined;
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i]!;
    const lower = name.toLowerCase();
    if (isHopByHop(lower, named)) continue;
    if (lower === 'x-forwarded-for' || lower === 'x-forwarded-proto' || lower === 'x-forwarded-host') {
      forwarded[lower].push(raw[i + 1]!);
      continue;
    }
    if (lower === 'host') host ??= raw[i + 1]!;
    headers.push(name, raw[i + 1]!);
  }
  if (host === undefined) headers.push('Host', upstreamHost);
  const socket = req.socket as IncomingMessage['socket'] & { encrypted?: boolean };
  forwarded['x-forwarded-for'].push(socket.remoteAddress ?? 'unknown');
  forwarded['x-forwarded-proto'].push(socket.encrypted ? 'https' : 'http');
  forwarded['x-forwarded-host'].push(host ?? upstreamHost);
  headers.push(
    'X-Forwarded-For',
    forwarded['x-forwarded-for'].join(', '),
    'X-Forwarded-Proto',
    forwarded['x-forwarded-proto'].join(', '),
    'X-Forwarded-Host',
    forwarded['x-forwarded-host'].join(', '),
  );
  const coding = req.headers['transfer-encoding'];
  if (coding !== undefined) headers.push('Transfer-Encoding', coding);
  return headers;
}
