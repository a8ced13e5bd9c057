import type { OutgoingHttpHeader, OutgoingHttpHeaders, ServerResponse } from 'node:http';
import type { Socket } from 'node:net';
import { hasAppPrototype, isClassPrototype } from '../../core/app-prototype.js';
import { handlerHeaders } from '../../core/capture.js';
import { type IdempotencyEngine, isPromise, type Ticket } from '../../core/engine.js';
import { ownSymbol } from '../../core/own-symbol.js';

/**
 * Response capture for `node:http` responses (and Express's, which are the same objects).
 *
 * The response is left to Node.js entirely: status validation, header merging, framing, `headersSent`, bodies
 * dropped for 204/304/HEAD all happen exactly as without the middleware. What the capture changes is *when* the
 * bytes leave: every write to the connection (`_writeRaw`, below everything else, compression included) is held
 * back until the engine has stored the response or released its key. Beside that, the capture records the
 * response as the handler expressed it (status, headers, body bytes), for storing.
 *
 * One state machine per response:
 *
 * - `HOLDING`: keeping the body for storing, holding every byte back. The initial state.
 * - `STREAMING`: the response will not be stored (its status or type, or it grew past `maxResponseBytes`); what
 *   was held went out and later bytes go as they come.
 * - `SETTLING`: the handler ended the response; its last bytes wait while the engine stores or releases.
 * - `DONE`: out of the way; every call passes straight through.
 *
 * HOLDING → STREAMING → SETTLING → DONE, with HOLDING → SETTLING for a stored response and HOLDING or STREAMING →
 * DONE when the handler fails ({@link failCapture}).
 */

const HOLDING = 0;
const STREAMING = 1;
const SETTLING = 2;
const DONE = 3;
type State = typeof HOLDING | typeof STREAMING | typeof SETTLING | typeof DONE;

/** A response method as the capture calls it: with whatever arguments its caller passed. */
type Method = (this: ServerResponse, ...args: unknown[]) => unknown;
/** `OutgoingMessage#_writeRaw`, the one place where a response's bytes go to its connection. */
type WriteRaw = (
  this: ServerResponse,
  data: unknown,
  encoding: unknown,
  callback: unknown,
  size?: number,
) => boolean;

/** Node.js internals the capture reads; stable since Node.js 0.x, and what `compression` and `on-headers` read. */
interface ResponseInternals {
  /** The serialised head, once `writeHead` built it (it is not yet sent then). */
  _header: string | null;
  /** False for 204, 304, 1xx and HEAD: Node.js drops any body written. */
  _hasBody: boolean;
}

/** A piece of the wire held back: `_writeRaw`'s arguments. */
interface HeldWrite {
  readonly data: string | Uint8Array;
  readonly encoding: unknown;
  readonly callback: unknown;
}

/** The head the handler gave its response, as it stood before middleware mounted earlier saw it. */
interface Head {
  readonly status: number;
  readonly headers: OutgoingHttpHeaders;
}

class ResponseCapture {
  state: State = HOLDING;
  head: Head | undefined;
  chunks: Buffer[] = [];
  size = 0;
  held: HeldWrite[] = [];
  heldBytes = 0;
  /** The application destroyed the connection while the ended response waited: done right after it goes out. */
  destroyAfterFlush = false;
  /** The handler failed and the framework's error handling answers: released, not stored, once it ends. */
  failed = false;

  constructor(
    readonly engine: IdempotencyEngine<never>,
    readonly ticket: Ticket,
    /** The headers set before the handler ran (by middleware mounted earlier): not stored when unchanged. */
    readonly before: OutgoingHttpHeaders,
    readonly write: Method,
    readonly end: Method,
    readonly writeHead: Method,
    readonly writeRaw: WriteRaw,
    /**
     * The capturing methods that act for this response: the prototype that holds them, or the token of those put
     * on the response itself. Every other capturing method it meets passes its calls straight on.
     */
    readonly through: object,
  ) {}
}

/**
 * The capture of each response being captured. A WeakMap rather than a property: adding a property to a response
 * goes through V8's slow path (its prototype chain is long and in dictionary mode), a WeakMap entry does not.
 */
const captures = new WeakMap<ServerResponse, ResponseCapture>();

/**
 * Installs the capture on a response whose request holds the key's lock, in one way whatever came before: the
 * capturing methods (made once per original prototype) are found before the response's original ones, and
 * methods that middleware mounted earlier put on the response itself (`compression`, `on-headers`) are called by
 * them in place of the originals. The handler and middleware mounted later call the capture first; it calls what
 * was there before.
 *
 * Where the capturing methods go depends on the response:
 *
 * - One of its class's prototype (`node:http`'s own), or one with such methods of its own: on the response
 *   itself, where a framework that runs later and gives it an app's prototype (an Express app wrapped by
 *   `withIdempotency`) cannot drop them.
 * - One an app gave a prototype of its own (Express gives every response `app.response`): once for all such
 *   responses, in a prototype spliced into the chain below the app's prototypes ({@link splicedCapturing}). A
 *   sub-app mounted with `app.use(path, subApp)` gives the response its own `app.response` while it runs, and
 *   that shares the chain below. Changing each response's prototype instead cost a copy of its hidden class per
 *   first run (V8 gives each such response one of its own), and a sub-app dropped the capture.
 * - Where no app prototype lies above the methods the capture wraps: a prototype in front of the response's own.
 */
export function captureResponse(res: ServerResponse, engine: IdempotencyEngine<never>, ticket: Ticket): void {
  const top = Object.getPrototypeOf(res) as object;
  const own = ownMethods(res);
  // Methods of the response's own are wrappers of middleware mounted earlier, which may have saved this copy's
  // spliced methods as the ones they wrap: those must find the response captured through others.
  const onInstance = own !== undefined || !hasAppPrototype(res);
  const spliced = onInstance ? undefined : splicedCapturing(top);
  const capturing = spliced ?? capturingPrototypeFor(top);
  const { original } = capturing;
  const through = onInstance ? capturing.onInstance : capturing.prototype;
  const capture = new ResponseCapture(
    engine,
    ticket,
    original.getHeaders.call(res),
    own?.write ?? original.write,
    own?.end ?? original.end,
    own?.writeHead ?? original.writeHead,
    original.writeRaw,
    through,
  );
  if (onInstance) Object.defineProperties(res, capturing.descriptors);
  else if (spliced === undefined) Object.setPrototypeOf(res, capturing.prototype);
  captures.set(res, capture);
  // One shared listener, nothing per response: a closure over `res` kept by the capture would make the capture,
  // the WeakMap's value, hold its own key, and every response would then outlive a young-generation collection.
  res.on('close', onResponseClose);
  const socket = res.socket;
  if (socket !== null && !hookedSockets.has(socket)) watchSocket(socket);
}

/** The capturing prototype spliced into the chain of each app's response prototype; `null`: none could be. */
const splices = new WeakMap<object, CapturingPrototype | null>();

/**
 * The capturing prototype in the chain of an app's response prototype (`top`), spliced there the first time:
 * right above the first prototype in the chain that is a class's (`ServerResponse.prototype`) or has a method the
 * capture wraps of its own. For Express that is between its `response` (every app's `app.response` inherits from
 * it, a sub-app's too) and `ServerResponse.prototype`. Responses the middleware does not capture pass through it
 * to the methods below. `undefined` where the app's own prototype has such a method: nothing lies above it to
 * splice into.
 */
function splicedCapturing(top: object): CapturingPrototype | undefined {
  const known = splices.get(top);
  if (known === null) return undefined;
  // Still in the chain, unless something gave a prototype below the app's another prototype since.
  if (known !== undefined && Object.prototype.isPrototypeOf.call(known.prototype, top)) return known;
  const spliced = splice(top);
  splices.set(top, spliced ?? null);
  return spliced;
}

function splice(top: object): CapturingPrototype | undefined {
  let above: object | undefined;
  for (
    let proto: object | null = top;
    proto !== null;
    proto = Object.getPrototypeOf(proto) as object | null
  ) {
    const ours = capturingByPrototype.get(proto);
    if (ours !== undefined) return ours;
    if (isClassPrototype(proto) || CAPTURED_NAMES.some((name) => Object.hasOwn(proto, name))) {
      if (above === undefined) return undefined;
      const capturing = capturingPrototypeFor(proto);
      // A frozen prototype (a hardened realm) keeps its chain: each response's prototype is changed instead.
      if (!Reflect.setPrototypeOf(above, capturing.prototype)) return undefined;
      return capturing;
    }
    above = proto;
  }
  return undefined;
}

/** The methods and accessors the capturing prototype puts in front of the response's own. */
const CAPTURED_NAMES = [
  'writeHead',
  'write',
  'end',
  '_writeRaw',
  'writableLength',
  'writableFinished',
] as const;

/** The methods the capture wraps that middleware mounted earlier put on the response itself. */
interface OwnMethods {
  readonly write: Method | undefined;
  readonly end: Method | undefined;
  readonly writeHead: Method | undefined;
}

/**
 * The methods middleware mounted earlier put on the response itself (`compression`, `on-headers`): the capture
 * calls them in place of the prototype's, as the capturing methods take their place. `undefined` when there are
 * none: the usual case.
 */
function ownMethods(res: ServerResponse): OwnMethods | undefined {
  const write = ownMethod(res, 'write');
  const end = ownMethod(res, 'end');
  const writeHead = ownMethod(res, 'writeHead');
  if (write === undefined && end === undefined && writeHead === undefined) return undefined;
  return { write, end, writeHead };
}

function ownMethod(res: ServerResponse, name: 'write' | 'end' | 'writeHead'): Method | undefined {
  return Object.hasOwn(res, name) ? (res[name] as Method) : undefined;
}

/**
 * The capturing methods for responses of one original prototype, and that prototype's own methods: looked up
 * once here, not through a response's long prototype chain on every request. There are two sets of the methods:
 * those of {@link CapturingPrototype.prototype}, and those put on a response itself
 * ({@link CapturingPrototype.descriptors}). Each set acts only for the responses captured through it (see
 * {@link ResponseCapture.through}) and sends every other call straight on to the original methods: a response
 * the middleware does not capture reaches the prototype's where it is spliced into an app's chain, and a method
 * that middleware mounted earlier saved from the response (`compression`'s) may be one of them.
 */
interface CapturingPrototype {
  readonly prototype: object;
  /** The capturing methods and accessors to put on a response itself. */
  readonly descriptors: PropertyDescriptorMap;
  /** What {@link ResponseCapture.through} is for a response given {@link descriptors}. */
  readonly onInstance: object;
  /** The parent's methods the capturing ones call. */
  readonly original: OriginalMethods;
}

const capturingPrototypes = new WeakMap<object, CapturingPrototype>();
/** This copy's capturing prototypes, by the prototype itself: found in a chain, it was spliced there already. */
const capturingByPrototype = new WeakMap<object, CapturingPrototype>();

function capturingPrototypeFor(parent: object): CapturingPrototype {
  let capturing = capturingPrototypes.get(parent);
  if (capturing !== undefined) return capturing;
  const methods = parent as ServerResponse;
  const original: OriginalMethods = {
    getHeaders: methods.getHeaders,
    writeRaw: (parent as { _writeRaw: WriteRaw })._writeRaw,
    write: methods.write as Method,
    end: methods.end as Method,
    writeHead: methods.writeHead as Method,
    writableLength: findGetter(parent, 'writableLength'),
    writableFinished: findGetter(parent, 'writableFinished'),
  };
  const prototype = Object.create(parent) as object;
  Object.defineProperties(prototype, capturingDescriptors(prototype, original));
  const onInstance = {};
  capturing = { prototype, descriptors: capturingDescriptors(onInstance, original), onInstance, original };
  capturingPrototypes.set(parent, capturing);
  capturingByPrototype.set(prototype, capturing);
  return capturing;
}

/** The methods and accessors of a response's original prototype that the capture wraps. */
interface OriginalMethods {
  readonly getHeaders: (this: ServerResponse) => OutgoingHttpHeaders;
  /** Where held bytes finally go. */
  readonly writeRaw: WriteRaw;
  readonly write: Method;
  readonly end: Method;
  readonly writeHead: Method;
  readonly writableLength: (() => unknown) | undefined;
  readonly writableFinished: (() => unknown) | undefined;
}

/**
 * One set of capturing methods and accessors, acting for the responses captured through `through` (the
 * prototype that holds them, or the token of those put on responses themselves).
 */
function capturingDescriptors(through: object, original: OriginalMethods): PropertyDescriptorMap {
  const { writeRaw, write, end, writeHead, writableLength, writableFinished } = original;
  const method = (value: unknown): PropertyDescriptor => ({ value, writable: true, configurable: true });
  const captureOf = (res: ServerResponse): ResponseCapture | undefined => {
    const capture = captures.get(res);
    return capture?.through === through ? capture : undefined;
  };
  // `write` and `end`: the capture's own for a response captured through this set, the original for any other.
  const bodyMethod = (original: Method, captured: CapturedBodyMethod) =>
    function bodyCaptured(
      this: ServerResponse,
      chunk: unknown,
      encoding: unknown,
      callback: unknown,
    ): unknown {
      const capture = captureOf(this);
      return capture === undefined
        ? original.call(this, chunk, encoding, callback)
        : captured(this, capture, chunk, encoding, callback);
    };
  return {
    writeHead: method(function writeHeadCaptured(this: ServerResponse, ...args: unknown[]): unknown {
      const capture = captureOf(this);
      return capture === undefined ? writeHead.apply(this, args) : captureWriteHead(this, capture, args);
    }),
    write: method(bodyMethod(write, captureWrite)),
    end: method(bodyMethod(end, captureEnd)),
    _writeRaw: method(function holdWriteRaw(
      this: ServerResponse,
      data: string | Uint8Array,
      encoding: unknown,
      callback: unknown,
      size?: number,
    ): boolean {
      const capture = captureOf(this);
      if (capture === undefined || (capture.state !== HOLDING && capture.state !== SETTLING)) {
        return writeRaw.call(this, data, encoding, callback, size);
      }
      if (typeof encoding === 'function') {
        callback = encoding;
        encoding = null;
      }
      // A write's callback says the bytes were handed on: a handler may wait for it before it writes more, so
      // while the body is held it is called as if they were. The callbacks of an ended response (Node.js's
      // 'finish' among them) wait for the real write, or the connection would be handed on before it.
      if (capture.state === HOLDING && typeof callback === 'function') {
        process.nextTick(callback as () => void);
        callback = null;
      }
      capture.held.push({ data, encoding, callback });
      capture.heldBytes += data.length;
      return true;
    }),
    // Held bytes are still to be written: Node.js must not think the response finished (it would emit
    // 'finish' and hand the connection to the next response before they went out).
    writableLength: {
      get(this: ServerResponse) {
        return Number(writableLength?.call(this) ?? 0) + (captureOf(this)?.heldBytes ?? 0);
      },
      configurable: true,
    },
    writableFinished: {
      get(this: ServerResponse) {
        return Boolean(writableFinished?.call(this)) && !(captureOf(this)?.heldBytes ?? 0);
      },
      configurable: true,
    },
  };
}

function findGetter(from: object | null, name: string): (() => unknown) | undefined {
  for (let proto = from; proto !== null; proto = Object.getPrototypeOf(proto)) {
    const descriptor = Object.getOwnPropertyDescriptor(proto, name);
    if (descriptor !== undefined) return descriptor.get;
  }
  return undefined;
}

function captureWriteHead(res: ServerResponse, capture: ResponseCapture, args: unknown[]): unknown {
  if (capture.state >= SETTLING || capture.head !== undefined || internals(res)._header) {
    return capture.writeHead.apply(res, args);
  }
  recordHead(res, capture, args[0], args[1], args[2]);
  try {
    return capture.writeHead.apply(res, args);
  } catch (error) {
    capture.head = undefined;
    throw error;
  } finally {
    if (capture.head !== undefined) judgeHead(res, capture);
  }
}

// `write` and `end` pass on exactly three arguments, as every `write`/`end` in their chain takes them (`undefined`
// for those not given): no arguments array per call, on what can be a hot path.

/** `write` or `end` of a response captured through the set of methods called, with its capture. */
type CapturedBodyMethod = (
  res: ServerResponse,
  capture: ResponseCapture,
  chunk: unknown,
  encoding: unknown,
  callback: unknown,
) => unknown;

const captureWrite: CapturedBodyMethod = (res, capture, chunk, encoding, callback) => {
  if (capture.state >= SETTLING) return capture.write.call(res, chunk, encoding, callback);
  const recorded = recordImplicitHead(res, capture);
  let result: unknown;
  try {
    result = capture.write.call(res, chunk, encoding, callback);
  } catch (error) {
    if (recorded) capture.head = undefined;
    throw error;
  }
  if (recorded) judgeHead(res, capture);
  if (capture.state === HOLDING) keep(res, capture, chunk, encoding);
  return result;
};

const captureEnd: CapturedBodyMethod = (res, capture, chunk, encoding, callback) => {
  if (capture.state >= SETTLING) return capture.end.call(res, chunk, encoding, callback);
  const recorded = recordImplicitHead(res, capture);
  const previous = capture.state;
  // From here every byte the response still produces is held until the engine settled.
  capture.state = SETTLING;
  let result: unknown;
  try {
    result = capture.end.call(res, chunk, encoding, callback);
  } catch (error) {
    capture.state = previous;
    if (recorded) capture.head = undefined;
    throw error;
  }
  const keeping =
    previous === HOLDING &&
    (!recorded || capture.engine.plan(capture.head!.status, contentType(capture.head!)) === 'store');
  if (keeping && chunk !== undefined && chunk !== null && typeof chunk !== 'function') {
    keep(res, capture, chunk, typeof encoding === 'string' ? encoding : undefined);
  }
  settle(res, capture, keeping && capture.size <= capture.engine.maxResponseBytes);
  return result;
};

/** The internals the capture reads, typed. */
function internals(res: ServerResponse): ResponseInternals {
  return res as unknown as ResponseInternals;
}

/** A write or end before any `writeHead`: the head is the status and headers set so far. */
function recordImplicitHead(res: ServerResponse, capture: ResponseCapture): boolean {
  if (capture.head !== undefined || internals(res)._header) return false;
  recordHead(res, capture, res.statusCode, undefined, undefined);
  return capture.head !== undefined;
}

/**
 * Records the head the handler gives its response, before the call goes on to middleware mounted earlier (whose
 * `on-headers` hooks add their own headers, set again on a replay). `writeHead`'s headers are merged over those
 * set so far exactly as Node.js merges them: once any header was set through `setHeader`, every name given
 * replaces (`setHeader`); otherwise the given headers are the head as they are, repeated names included. An
 * invalid status is not recorded: Node.js throws for it when the call goes on.
 */
function recordHead(
  res: ServerResponse,
  capture: ResponseCapture,
  statusCode: unknown,
  reason: unknown,
  headers: unknown,
): void {
  const status = Number(statusCode) | 0;
  if (status < 100 || status > 999) return;
  const given = typeof reason === 'string' ? headers : (headers ?? reason);
  if (given === undefined || given === null || typeof given !== 'object') {
    capture.head = { status, headers: res.getHeaders() };
  } else if (hasProgressiveHeaders(res)) {
    const merged = res.getHeaders();
    const list = Array.isArray(given) ? (given as unknown[]) : undefined;
    if (list === undefined) {
      for (const name of Object.keys(given))
        merged[name.toLowerCase()] = (given as OutgoingHttpHeaders)[name];
    } else {
      for (let i = 0; i + 1 < list.length; i += 2)
        merged[String(list[i]).toLowerCase()] = list[i + 1] as string;
    }
    capture.head = { status, headers: merged };
  } else {
    capture.head = { status, headers: rawHeaders(given) };
  }
}

let outHeadersSymbol: symbol | null | undefined;

/**
 * Node.js's record of the headers set on a response through `setHeader` (kept under its `kOutHeaders` symbol):
 * `null` until the first is set, `undefined` when this version of Node.js keeps it elsewhere.
 */
export function outHeadersOf(res: ServerResponse): object | null | undefined {
  if (outHeadersSymbol === undefined) outHeadersSymbol = ownSymbol(res, 'kOutHeaders');
  if (outHeadersSymbol === null) return undefined;
  return (res as unknown as Record<symbol, object | null>)[outHeadersSymbol];
}

/**
 * Whether headers were set on the response through `setHeader`: then `writeHead` merges its headers into them,
 * else it sends its own as given.
 */
function hasProgressiveHeaders(res: ServerResponse): boolean {
  const out = outHeadersOf(res);
  if (out === undefined) return res.getHeaderNames().length > 0;
  return Boolean(out);
}

/** `writeHead`'s own headers as Node.js sends them when nothing was set before: an object, or a flat or paired list. */
function rawHeaders(given: object): OutgoingHttpHeaders {
  const headers: OutgoingHttpHeaders = Object.create(null);
  const add = (name: unknown, value: unknown) => {
    const lower = String(name).toLowerCase();
    const current = headers[lower];
    headers[lower] =
      current === undefined
        ? (value as OutgoingHttpHeader)
        : [...(Array.isArray(current) ? current : [String(current)]), String(value)];
  };
  if (!Array.isArray(given)) {
    for (const name of Object.keys(given)) add(name, (given as OutgoingHttpHeaders)[name]);
  } else if (Array.isArray(given[0])) {
    for (const pair of given as [unknown, unknown][]) add(pair[0], pair[1]);
  } else {
    for (let i = 0; i + 1 < given.length; i += 2) add(given[i], given[i + 1]);
  }
  return headers;
}

/** Decides, once the head is known, whether the response is kept for storing or streams. */
function judgeHead(res: ServerResponse, capture: ResponseCapture): void {
  if (capture.state !== HOLDING || capture.head === undefined) return;
  if (capture.engine.plan(capture.head.status, contentType(capture.head)) === 'stream') stream(res, capture);
}

/** Keeps a body chunk for storing; past `maxResponseBytes` the body will not be stored and the response streams. */
function keep(res: ServerResponse, capture: ResponseCapture, chunk: unknown, encoding: unknown): void {
  // Node.js drops the body of a 204, a 304 or a response to HEAD; so does the record.
  if (!internals(res)._hasBody) return;
  const buffer = toBuffer(chunk, typeof encoding === 'string' ? (encoding as BufferEncoding) : undefined);
  if (buffer === undefined || buffer.length === 0) return;
  capture.chunks.push(buffer);
  capture.size += buffer.length;
  if (capture.size > capture.engine.maxResponseBytes && capture.state === HOLDING) stream(res, capture);
}

function stream(res: ServerResponse, capture: ResponseCapture): void {
  capture.state = STREAMING;
  capture.chunks = [];
  flushHeld(res, capture);
}

/**
 * Hands the finished response to the engine, then lets its held bytes go. `kept` says whether the body in hand
 * is the whole body. While an asynchronous store runs, a destroy of the connection (Express's final handler
 * does that when a handler fails after ending its response) waits for the bytes, as they would have been
 * written already without the middleware.
 */
function settle(res: ServerResponse, capture: ResponseCapture, kept: boolean): void {
  const head = capture.head ?? { status: res.statusCode, headers: res.getHeaders() };
  const body = kept
    ? capture.chunks.length === 1
      ? capture.chunks[0]!
      : Buffer.concat(capture.chunks, capture.size)
    : undefined;
  capture.chunks = [];
  if (res.destroyed) capture.engine.clientLeft(capture.ticket);
  const settled = capture.failed
    ? capture.engine.fail(capture.ticket)
    : capture.engine.finish(capture.ticket, {
        status: head.status,
        headers: handlerHeaders(head.headers, capture.before),
        body,
      });
  if (isPromise(settled)) settled.then(() => done(res, capture));
  else done(res, capture);
}

function done(res: ServerResponse, capture: ResponseCapture): void {
  capture.state = DONE;
  flushHeld(res, capture);
  if (capture.destroyAfterFlush) res.socket?.destroy();
}

/**
 * Writes what was held back, corked: Node.js wrote those pieces within one cork (head and body, or a chunk and its
 * framing), and they go out together again, in one system call rather than one each.
 */
function flushHeld(res: ServerResponse, capture: ResponseCapture): void {
  if (capture.held.length === 0) return;
  const held = capture.held;
  capture.held = [];
  capture.heldBytes = 0;
  const socket = res.socket;
  socket?.cork();
  try {
    for (const write of held) capture.writeRaw.call(res, write.data, write.encoding, write.callback);
  } catch {
    res.destroy();
  } finally {
    socket?.uncork();
  }
}

function contentType(head: Head): string | undefined {
  const value = head.headers['content-type'];
  return value === undefined ? undefined : String(Array.isArray(value) ? value[0] : value);
}

function toBuffer(chunk: unknown, encoding?: BufferEncoding): Buffer | undefined {
  if (Buffer.isBuffer(chunk)) return chunk;
  if (typeof chunk === 'string') return Buffer.from(chunk, encoding);
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  return undefined;
}

/**
 * The client went away (or the connection was cut) before the handler ended its response. Nothing changes for
 * the request: the handler keeps its lock and its response is stored when it ends.
 */
function onResponseClose(this: ServerResponse): void {
  const capture = captures.get(this);
  if (capture !== undefined && capture.state < SETTLING) capture.engine.clientLeft(capture.ticket);
}

/** Connections whose `destroy` is watched. */
const hookedSockets = new WeakSet<Socket>();

/**
 * Watches the application destroying the connection (an error-less `destroy()`), once per connection, for the
 * captured response it serves at that moment:
 *
 * - while an ended response waits for the engine: the destroy waits until the response went out, as the bytes
 *   would have been written already without the middleware (Express's final handler destroys the connection
 *   when a handler fails after ending its response);
 * - before the response ended, on a connection whose client is still there (not ended, not failed): the
 *   application cut its own response, which is how Express answers a handler that fails after it started
 *   writing. That is the handler failing, not the client leaving: the engine is told so and the key released.
 *
 * A destroy with an error, or of a connection the client already closed, is the client going away; it happens
 * at once and changes nothing for the request.
 */
function watchSocket(socket: Socket): void {
  hookedSockets.add(socket);
  const destroy = socket.destroy;
  socket.destroy = function destroyWatched(this: Socket, error?: Error) {
    // The response the connection serves now: Node.js hands a connection to one response at a time.
    const current = (this as Socket & { _httpMessage?: ServerResponse | null })._httpMessage;
    const watched = current ? captures.get(current) : undefined;
    if (watched !== undefined && error === undefined && !this.destroyed) {
      if (watched.state === SETTLING) {
        watched.destroyAfterFlush = true;
        return this;
      }
      if (watched.state !== DONE && !this.readableEnded && !this.errored) cutByApplication(watched);
    }
    return destroy.call(this, error);
  };
}

function cutByApplication(capture: ResponseCapture): void {
  capture.state = DONE;
  capture.held = [];
  capture.heldBytes = 0;
  capture.chunks = [];
  capture.engine.fail(capture.ticket);
}

/**
 * The ticket of a response being captured: what `idempotencyOf(req)` shows the handler (key, lease signal).
 * `undefined` for a response the middleware did not capture.
 */
export function ticketOf(res: ServerResponse | undefined): Ticket | undefined {
  return res === undefined ? undefined : captures.get(res)?.ticket;
}

/**
 * The handler failed, and the framework's error handling answers for it (Express, which reports the failure on
 * its router's diagnostics channel): the response it sends goes out as usual, but is not stored, whatever its
 * status, and the key is released before its last byte, as for a handler that throws anywhere else. Nothing
 * changes for a response that had ended before the failure (it is stored) or that was not captured.
 */
export function markHandlerFailed(res: ServerResponse): void {
  const capture = captures.get(res);
  if (capture !== undefined && capture.state < SETTLING) capture.failed = true;
}

/**
 * The handler failed before it ended its response, and the adapter answers for it (the `node:http` adapter; where
 * the framework's error handling answers, see {@link markHandlerFailed}). Tells the engine, which releases
 * the key or, if the client had gone, leaves it to lapse; then, once that settled, `reply` runs if the head is
 * not sent yet, and the connection is cut otherwise, as it would be without the middleware. A response the
 * handler had ended goes out as usual. Returns `false` when the response was not being captured.
 */
export function failCapture(res: ServerResponse, reply: () => void): boolean {
  const capture = captures.get(res);
  if (capture === undefined || capture.state === DONE) return false;
  if (capture.state === SETTLING) return true;
  if (res.destroyed) capture.engine.clientLeft(capture.ticket);
  const settled = capture.engine.fail(capture.ticket);
  const answer = () => {
    capture.state = DONE;
    capture.chunks = [];
    flushHeld(res, capture);
    if (!res.headersSent) reply();
    else if (!res.writableEnded) res.destroy();
  };
  if (isPromise(settled)) settled.then(answer);
  else answer();
  return true;
}
