import type { ServerResponse } from 'node:http';
import type { IdempotencyEngine } from '../../core/engine.js';
import { failCapture } from './capture.js';
import { sendReply } from './flow.js';

/**
 * Answers a request whose handler failed (threw, or its promise rejected), as the `node:http` adapter does: the
 * engine is told (the key is released, or left to lapse when the client had gone), then a 500 in the configured
 * `errorFormat` is sent, or the connection is cut when part of the response had gone out. A response the handler
 * had ended before it failed goes out as it is.
 */
export function failResponse(res: ServerResponse, engine: IdempotencyEngine<never>): void {
  const reply = () => {
    for (const name of res.getHeaderNames()) res.removeHeader(name);
    sendReply(res, engine.internalError);
  };
  if (failCapture(res, reply)) return;
  if (!res.headersSent) reply();
  else if (!res.writableEnded) res.destroy();
}
