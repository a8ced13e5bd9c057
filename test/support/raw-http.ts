/**
 * A raw HTTP/1.1 client for byte-level comparisons: it writes a request on a plain socket and parses the response
 * itself, so that it sees exactly what went over the wire (status line, header lines in order, framing) and can
 * tell a complete response from one that was cut short. After a complete response it sends a second request on
 * the same connection, to prove the framing left the connection usable.
 */
import { connect, type Socket } from 'node:net';

/** A request as written on the wire. */
export interface RawRequest {
  readonly method: string;
  readonly path: string;
  readonly headers: readonly (readonly [string, string])[];
  readonly body?: Buffer;
}

/** A response as it came over the wire. */
export interface RawResponse {
  /** `HTTP/1.1 201 Created`, as sent. */
  readonly statusLine: string;
  readonly status: number;
  /** Header lines in order, names lower-cased, values as sent. */
  readonly headers: [string, string][];
  /** Trailer lines of a chunked body, likewise. */
  readonly trailers: [string, string][];
  /** The body with its framing removed (chunks joined). */
  readonly body: Buffer;
  /** `content-length`, `chunked`, `close` (read until the connection closed) or `none` (no body allowed). */
  readonly framing: 'content-length' | 'chunked' | 'close' | 'none';
  /** The response arrived whole, as its framing says. `false`: the connection was cut before. */
  readonly complete: boolean;
  /** After a complete response, a follow-up request on the same connection got a well-formed response. */
  readonly connectionReusable: boolean | undefined;
  /** No complete response within the time allowed. */
  readonly timedOut?: boolean;
}

const CRLF = Buffer.from('\r\n');
const HEAD_END = Buffer.from('\r\n\r\n');

/**
 * Sends `request` to 127.0.0.1:`port` and parses the response. After `timeoutMs` without a complete response it
 * answers with `timedOut` set (and what had arrived), rather than throwing.
 */
export async function exchange(
  port: number,
  request: RawRequest,
  follow: RawRequest | undefined,
  timeoutMs = 5000,
): Promise<RawResponse> {
  const socket = connect(port, '127.0.0.1');
  socket.setNoDelay(true);
  const reader = new SocketReader(socket, timeoutMs);
  try {
    await reader.connected;
    socket.write(serialise(request));
    const response = await readResponse(reader, request.method);
    if (!response.complete || follow === undefined || response.framing === 'close') {
      return { ...response, connectionReusable: undefined };
    }
    const connectionHeader = response.headers.find(([name]) => name === 'connection')?.[1];
    if (connectionHeader?.toLowerCase() === 'close') return { ...response, connectionReusable: undefined };
    socket.write(serialise(follow));
    const next = await readResponse(reader, follow.method);
    return { ...response, connectionReusable: next.complete && next.status >= 100 };
  } catch (error) {
    if (!(error instanceof TimeoutError)) throw error;
    return {
      statusLine: '',
      status: 0,
      headers: [],
      trailers: [],
      body: reader.rest(),
      framing: 'close',
      complete: false,
      connectionReusable: undefined,
      timedOut: true,
    };
  } finally {
    reader.dispose();
    socket.destroy();
  }
}

function serialise(request: RawRequest): Buffer {
  const lines = [`${request.method} ${request.path} HTTP/1.1`, 'Host: 127.0.0.1'];
  for (const [name, value] of request.headers) lines.push(`${name}: ${value}`);
  const body = request.body ?? Buffer.alloc(0);
  if (request.body !== undefined) lines.push(`Content-Length: ${body.length}`);
  return Buffer.concat([Buffer.from(`${lines.join('\r\n')}\r\n\r\n`, 'latin1'), body]);
}

async function readResponse(
  reader: SocketReader,
  method: string,
): Promise<Omit<RawResponse, 'connectionReusable'>> {
  const head = await reader.readUntil(HEAD_END);
  if (head === undefined) {
    return {
      statusLine: '',
      status: 0,
      headers: [],
      trailers: [],
      body: Buffer.alloc(0),
      framing: 'close',
      complete: false,
    };
  }
  const [statusLine = '', ...lines] = head.toString('latin1').split('\r\n');
  const status = Number(statusLine.split(' ')[1]);
  const headers: [string, string][] = lines.map((line) => {
    const colon = line.indexOf(':');
    return [line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim()];
  });
  const get = (name: string) => headers.find(([header]) => header === name)?.[1];
  if (status < 200 || status === 204 || status === 304 || method === 'HEAD') {
    if (status >= 100 && status < 200) return readResponse(reader, method);
    return {
      statusLine,
      status,
      headers,
      trailers: [],
      body: Buffer.alloc(0),
      framing: 'none',
      complete: true,
    };
  }
  if (get('transfer-encoding')?.toLowerCase().includes('chunked')) {
    const chunks: Buffer[] = [];
    const trailers: [string, string][] = [];
    for (;;) {
      const sizeLine = await reader.readUntil(CRLF);
      if (sizeLine === undefined) return cut(statusLine, status, headers, chunks, 'chunked');
      const size = Number.parseInt(sizeLine.toString('latin1').split(';')[0]!, 16);
      if (Number.isNaN(size)) return cut(statusLine, status, headers, chunks, 'chunked');
      if (size === 0) {
        // Trailers, then an empty line.
        for (;;) {
          const trailer = await reader.readUntil(CRLF);
          if (trailer === undefined) return cut(statusLine, status, headers, chunks, 'chunked');
          if (trailer.length === 0) break;
          const text = trailer.toString('latin1');
          trailers.push([
            text.slice(0, text.indexOf(':')).toLowerCase(),
            text.slice(text.indexOf(':') + 1).trim(),
          ]);
        }
        return {
          statusLine,
          status,
          headers,
          trailers,
          body: Buffer.concat(chunks),
          framing: 'chunked',
          complete: true,
        };
      }
      const data = await reader.read(size);
      if (data === undefined) return cut(statusLine, status, headers, chunks, 'chunked');
      chunks.push(data);
      if ((await reader.read(2))?.equals(CRLF) !== true)
        return cut(statusLine, status, headers, chunks, 'chunked');
    }
  }
  const length = get('content-length');
  if (length !== undefined) {
    const body = await reader.read(Number(length));
    if (body === undefined) return cut(statusLine, status, headers, [reader.rest()], 'content-length');
    return { statusLine, status, headers, trailers: [], body, framing: 'content-length', complete: true };
  }
  const body = await reader.readToEnd();
  return { statusLine, status, headers, trailers: [], body, framing: 'close', complete: true };
}

function cut(
  statusLine: string,
  status: number,
  headers: [string, string][],
  chunks: Buffer[],
  framing: RawResponse['framing'],
): Omit<RawResponse, 'connectionReusable'> {
  return { statusLine, status, headers, trailers: [], body: Buffer.concat(chunks), framing, complete: false };
}

class TimeoutError extends Error {}

/** Buffers a socket's bytes and hands them out by delimiter or length; `undefined` once it closed too early. */
class SocketReader {
  readonly connected: Promise<void>;
  #buffer = Buffer.alloc(0);
  #ended = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  readonly #timer: NodeJS.Timeout;

  constructor(socket: Socket, timeoutMs: number) {
    this.connected = new Promise((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', reject);
    });
    socket.on('data', (data: Buffer) => {
      this.#buffer = Buffer.concat([this.#buffer, data]);
      this.#wake?.();
    });
    socket.on('close', () => {
      this.#ended = true;
      this.#wake?.();
    });
    socket.on('error', () => {});
    this.#timer = setTimeout(() => {
      this.#error = new TimeoutError(`no complete response within ${timeoutMs} ms`);
      this.#wake?.();
    }, timeoutMs);
  }

  dispose(): void {
    clearTimeout(this.#timer);
  }

  rest(): Buffer {
    return this.#buffer;
  }

  async readUntil(delimiter: Buffer): Promise<Buffer | undefined> {
    for (;;) {
      const at = this.#buffer.indexOf(delimiter);
      if (at !== -1) {
        const out = this.#buffer.subarray(0, at);
        this.#buffer = this.#buffer.subarray(at + delimiter.length);
        return out;
      }
      if (!(await this.#more())) return undefined;
    }
  }

  async read(size: number): Promise<Buffer | undefined> {
    while (this.#buffer.length < size) if (!(await this.#more())) return undefined;
    const out = this.#buffer.subarray(0, size);
    this.#buffer = this.#buffer.subarray(size);
    return out;
  }

  async readToEnd(): Promise<Buffer> {
    while (await this.#more());
    return this.#buffer;
  }

  /** Waits for more bytes; `false` once the socket closed. Throws on timeout. */
  async #more(): Promise<boolean> {
    if (this.#error !== undefined) throw this.#error;
    if (this.#ended) return false;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
    });
    this.#wake = undefined;
    if (this.#error !== undefined) throw this.#error;
    return true;
  }
}
