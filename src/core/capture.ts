import type { IdempotencyEngine, Ticket } from './engine.js';
import { headerValue, isStoredHeader, REMOVED_HEADER } from './responses.js';
import type { Awaitable, HeaderPair } from './types.js';
import { utf8 } from './utf8.js';

/**
 * What the adapters that see a handler's response as a value (Fastify's payload, Koa's `ctx.body`, a fetch
 * `Response`) do with it, runtime-neutral: decide whether the body is kept for storing, read it, hand it to the
 * engine, and relay it when it streams, holding its end back until the engine settled.
 */

/** A header value as Node.js and the frameworks on it keep it: a string, a number, or one per repeated line. */
export type HeaderRecordValue = string | number | readonly string[] | undefined;

/**
 * The headers to store from a record of a response's headers (`res.getHeaders()`, Fastify's `reply.getHeaders()`):
 * what the handler (and middleware after this one) changed on top of what middleware mounted before this one had
 * set before the handler ran (`before`). Headers still as that middleware set them are left out (it sets them
 * again on a replay, for the replay's own request: CORS, request ids, rate-limit headers); headers the handler
 * removed are stored as removals (`[REMOVED_HEADER, name]`); headers never stored (hop-by-hop, `set-cookie`,
 * `date`, `content-length`) are left out at once.
 */
export function handlerHeaders(
  headers: Readonly<Record<string, HeaderRecordValue>>,
  before: Readonly<Record<string, HeaderRecordValue>>,
): HeaderPair[] {
  const pairs: HeaderPair[] = [];
  for (const name in headers) {
    const value = headers[name];
    if (value === undefined || sameValue(value, before[name])) continue;
    const lower = name.toLowerCase();
    if (!isStoredHeader(lower)) continue;
    if (Array.isArray(value)) for (const item of value) pairs.push([lower, String(item)]);
    else pairs.push([lower, String(value)]);
  }
  for (const name in before) {
    if (before[name] !== undefined && headers[name] === undefined && isStoredHeader(name.toLowerCase())) {
      pairs.push([REMOVED_HEADER, name.toLowerCase()]);
    }
  }
  return pairs;
}

function sameValue(a: HeaderRecordValue, b: HeaderRecordValue): boolean {
  if (b === undefined) return false;
  if (!Array.isArray(a) || !Array.isArray(b)) return String(a) === String(b);
  return a.length === b.length && a.every((item, i) => item === b[i]);
}

/** A `node:http` response, seen by its shape only: adapters that must not import `node:http` (Hono) use it too. */
export interface ClosingResponse {
  readonly writableFinished: boolean;
  on(event: 'close', listener: (this: ClosingResponse) => void): unknown;
}

/** What {@link watchConnection} tells the engine. */
type ConnectionEngine = Pick<IdempotencyEngine<never>, 'fail' | 'clientLeft'>;

/** The engine and request each watched response serves; see {@link watchConnection}. */
interface Watched {
  readonly engine: ConnectionEngine;
  readonly ticket: Ticket;
}

/**
 * Where a watched response keeps what it serves: a property of the response rather than an entry of a `WeakMap`,
 * since every entry of a weak collection made for a young request is an ephemeron the garbage collector processes
 * on each scavenge, a measurable share of a fast framework's time per request.
 */
const WATCHED: unique symbol = Symbol('idempotency-header.watched');
type WatchedResponse = ClosingResponse & { [WATCHED]?: Watched | undefined };

/**
 * Watches the connection of a request that runs its handler under its key, until the engine settled or
 * {@link stopWatchingConnection}. Closed before the response was handed to the engine, either the client went
 * away (nothing changes for the request: the engine only notes when), or the response went out without passing
 * the adapter (a hijacked reply): nothing can be stored then, and the key is released. One listener shared by
 * every response, rather than a closure and a `once` wrapper made for each.
 */
export function watchConnection(res: ClosingResponse, engine: ConnectionEngine, ticket: Ticket): void {
  (res as WatchedResponse)[WATCHED] = { engine, ticket };
  res.on('close', onWatchedClose);
}

/** Stops {@link watchConnection}: the response is in the adapter's hands again. */
export function stopWatchingConnection(res: ClosingResponse): void {
  // Set to `undefined` rather than deleted: a deleted property turns the response into a slow dictionary object.
  (res as WatchedResponse)[WATCHED] = undefined;
}

function onWatchedClose(this: ClosingResponse): void {
  const watched = (this as WatchedResponse)[WATCHED];
  if (watched === undefined || watched.ticket.settled) return;
  if (this.writableFinished) watched.engine.fail(watched.ticket);
  else watched.engine.clientLeft(watched.ticket);
}

/** Status and headers of a finished response, as {@link IdempotencyEngine.finish} takes them. */
export interface ResponseHead {
  readonly status: number;
  /** What the handler (and middleware after this one) set: see {@link handlerHeaders}. */
  readonly headers: readonly HeaderPair[];
}

/**
 * Hands a response whose whole body is in hand (a string, a buffer, a serialised object) to the engine, which
 * stores the body when the response is storable and the body fits `maxResponseBytes` (it decides both itself).
 * Send the response once the returned promise, if any, settled.
 */
export function finishWithBody(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  head: ResponseHead,
  body: Uint8Array | string,
): ReturnType<IdempotencyEngine['finish']> {
  return engine.finish(ticket, { status: head.status, headers: head.headers, body });
}

/**
 * A body after {@link captureBody}: either kept whole (`'kept'`: the engine has settled, send these bytes), or to
 * be sent as it comes (`'stream'`: relay `chunks` to the client; they end only after the engine settled, and
 * they throw where the handler's own body failed).
 */
export type CapturedBody =
  | { readonly kind: 'kept'; readonly body: Uint8Array }
  | { readonly kind: 'stream'; readonly chunks: AsyncIterable<Uint8Array> };

/**
 * Captures a streamed response body. When the engine's plan is `'store'`, the body is read whole before anything
 * is sent, and the engine stores it; once it outgrows `maxResponseBytes` it is relayed instead, what was read
 * first included. When the plan is `'stream'`, it is relayed at once. A relayed body ends only after the engine
 * settled, so that a client that saw the end and retries finds the outcome.
 *
 * A body that fails is reported as the handler failing (the key is released, or left to lapse if the client had
 * gone), then relayed up to where it failed and failed the same way, so that the client sees what it would
 * have seen without the middleware. A relay its consumer stops early (the client went away) stops the source as
 * it would have been stopped without the middleware, and hands the response to the engine as it stands.
 *
 * Never rejects.
 */
export async function captureBody(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  head: ResponseHead,
  source: AsyncIterable<unknown>,
): Promise<CapturedBody> {
  const iterator = source[Symbol.asyncIterator]();
  if (engine.plan(head.status, headerValue(head.headers, 'content-type')) === 'stream') {
    return { kind: 'stream', chunks: relay(engine, ticket, head, iterator, []) };
  }
  const kept: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    let next: IteratorResult<unknown>;
    try {
      next = await iterator.next();
    } catch (error) {
      await failed(engine, ticket, head);
      return { kind: 'stream', chunks: failing(kept, error) };
    }
    if (next.done) {
      const body = concat(kept, size);
      await engine.finish(ticket, { status: head.status, headers: head.headers, body });
      return { kind: 'kept', body };
    }
    const chunk = toBytes(next.value);
    kept.push(chunk);
    size += chunk.byteLength;
    if (size > engine.maxResponseBytes) {
      return { kind: 'stream', chunks: relay(engine, ticket, head, iterator, kept) };
    }
  }
}

async function* relay(
  engine: IdempotencyEngine<never>,
  ticket: Ticket,
  head: ResponseHead,
  iterator: AsyncIterator<unknown>,
  first: Uint8Array[],
): AsyncGenerator<Uint8Array> {
  const unkept = { status: head.status, headers: head.headers, body: undefined };
  let ended = false;
  try {
    yield* first;
    first.length = 0;
    for (;;) {
      let next: IteratorResult<unknown>;
      try {
        next = await iterator.next();
      } catch (error) {
        ended = true;
        await failed(engine, ticket, head);
        throw error;
      }
      if (next.done) break;
      yield toBytes(next.value);
    }
    ended = true;
    await engine.finish(ticket, unkept);
  } finally {
    if (!ended) {
      // The consumer stopped reading: the client went away. The source is stopped as the framework would have
      // stopped it, and the response stands as it was when the client left.
      engine.clientLeft(ticket);
      try {
        await iterator.return?.();
      } catch {}
      await engine.finish(ticket, unkept);
    }
  }
}

/**
 * The body failed. While the client is there, the handler failed: the key is released. Once the client has gone,
 * the framework stops a response body the way it does when its client leaves (Koa destroys it), so the failure is
 * the client leaving: the response stands as it was, as for a relay stopped early.
 */
function failed(engine: IdempotencyEngine<never>, ticket: Ticket, head: ResponseHead): Awaitable<void> {
  if (ticket.clientGoneAt === undefined) return engine.fail(ticket);
  return engine.finish(ticket, { status: head.status, headers: head.headers, body: undefined });
}

async function* failing(first: Uint8Array[], error: unknown): AsyncGenerator<Uint8Array> {
  yield* first;
  throw error;
}

/** A body chunk as bytes: streams yield bytes, or strings when an encoding was set on them. */
export function toBytes(chunk: unknown): Uint8Array {
  if (chunk instanceof Uint8Array) return chunk;
  if (typeof chunk === 'string') return utf8(chunk);
  if (ArrayBuffer.isView(chunk)) return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  if (chunk instanceof ArrayBuffer) return new Uint8Array(chunk);
  return utf8(String(chunk));
}

function concat(chunks: readonly Uint8Array[], size: number): Uint8Array {
  if (chunks.length === 1) return chunks[0]!;
  const out = new Uint8Array(size);
  let offset = 0;
  for (const chunk of chunks) {
    out.set(chunk, offset);
    offset += chunk.byteLength;
  }
  return out;
}
