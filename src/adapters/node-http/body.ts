import type { IncomingMessage } from 'node:http';

/** Rejection of {@link readRequestBody} for a body over its limit (a chunked body that announced no length). */
export const BODY_TOO_LARGE = new Error('The request body is over the limit');

const EMPTY = Buffer.alloc(0);

/** Whether the request announces a body: RFC 9112 says only these two headers do. */
export function hasBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0');
}

/**
 * Reads the whole request body, then puts it back at the front of the stream before the stream reports its end,
 * so that a body parser or handler that runs later reads the same bytes as if nobody had touched them. Rejects
 * with {@link BODY_TOO_LARGE} past `limit` bytes, leaving the rest unread.
 */
export function readRequestBody(req: IncomingMessage, limit: number): Promise<Buffer> {
  // Started once the HTTP parser is done with the bytes in hand (a request handler runs while it parses them): an
  // empty body has ended by then, and is left alone, since listening for 'readable' on it would emit its 'end'
  // before the parser that reads it after this one listens.
  return Promise.resolve().then(() => {
    if ((req.complete || endPushed(req)) && req.readableLength === 0) return EMPTY;
    return readBuffered(req, limit);
  });
}

function readBuffered(req: IncomingMessage, limit: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.removeListener('readable', onReadable);
      req.removeListener('end', onEnd);
      req.removeListener('error', onError);
      req.removeListener('aborted', onAborted);
    };
    const onReadable = () => {
      // Only what is buffered is read: a `read()` that finds the stream empty and ended emits 'end' a tick later,
      // which a parser reading an empty body after this one would miss.
      while (req.readableLength > 0) {
        const chunk: Buffer | null = req.read();
        if (chunk === null) break;
        chunks.push(chunk);
        size += chunk.length;
        if (size > limit) return onError(BODY_TOO_LARGE);
      }
      // `complete` is set just before the parser pushes the end of the stream: with nothing buffered after it,
      // every byte is in hand, and unshifting it keeps the stream from ending.
      if (!req.complete && !endPushed(req)) return;
      cleanup();
      const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks, size);
      if (body.length > 0) req.unshift(body);
      resolve(body);
    };
    const onError = (error: Error) => {
      cleanup();
      reject(error);
    };
    const onAborted = () => onError(new Error('The client aborted the request'));
    // A stream whose end was pushed before anyone listened (an empty body) may end without a 'readable' event.
    const onEnd = () => {
      cleanup();
      resolve(Buffer.concat(chunks, size));
    };
    req.on('readable', onReadable);
    req.on('end', onEnd);
    req.on('error', onError);
    req.on('aborted', onAborted);
  });
}

/**
 * Whether a readable that is not Node.js's own request (Fastify's `inject()` passes one of its own, which has no
 * `complete`) has had the end of its data pushed: its 'end' is then due, and data unshifted now still comes first.
 */
function endPushed(req: IncomingMessage): boolean {
  return (req as unknown as { _readableState?: { ended?: unknown } })._readableState?.ended === true;
}
