/**
 * The client's app for the runtime tests: a fetch handler that Bun, Deno and workerd serve, and that calls
 * `idempotentFetch` itself, from that runtime. `GET /call?target=URL` POSTs a streamed JSON body to `target`
 * and answers what the call ended with: status, replay header, body, and the retries on the way. Web-standard
 * only: it is bundled for a neutral platform, so a `node:` import on its path fails the bundle.
 */
import { idempotentFetch } from '../../src/client.js';

export default {
  async fetch(request: Request): Promise<Response> {
    const target = new URL(request.url).searchParams.get('target');
    if (target === null) return new Response('target missing', { status: 400 });
    const retries: { attempt: number; status: number | undefined; network: boolean }[] = [];
    const bytes = new TextEncoder().encode('{"item":"from a runtime"}');
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(bytes.subarray(0, 8));
        controller.enqueue(bytes.subarray(8));
        controller.close();
      },
    });
    const response = await idempotentFetch(
      target,
      {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body,
        duplex: 'half',
      } as RequestInit,
      {
        baseDelayMs: 10,
        onRetry: (retry) =>
          retries.push({ attempt: retry.attempt, status: retry.status, network: retry.error !== undefined }),
      },
    );
    return Response.json({
      status: response.status,
      replayed: response.headers.get('idempotent-replayed'),
      text: await response.text(),
      retries,
    });
  },
};
