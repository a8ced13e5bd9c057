import type { IncomingMessage } from 'node:http';

/** Rejection of {@link readRequestBody} for a body over its limit (a chunked body that announced no length). */
export const BODY_TOO_LARGE = new Error('The request body is over the limit');

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
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    const cleanup = () => {
      req.removeListener('readable', onReadable);
      req.removeListener('error', onError);
      req.removeListener('aborted', onAborted);
    };
    const onReadable = () => {
      let chunk: Buffer | null;
      // biome-ignore lint/suspicious/noAssignInExpressions: the stream idiom for draining a paused stream
      while ((chunk = req.read()) !== null) {
        chunks.push(chunk);
        size += chunk.length;
        if (size > limit) return onError(BODY_TOO_LARGE);
      }
      // `complete` is set just before the parser pushes the end of the stream, and `read()` returning null after
      // it means every byte is in hand. 'end' is emitted a tick later unless data is unshifted now.
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
    req.on('readable', onReadable);
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
