/**
 * A small HTTP client for the process-level tests: POSTs JSON with an `Idempotency-Key` and reads the whole
 * answer, and retries the way a well-behaved client does (honouring `Retry-After` on 409).
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** One answer, read to its end. */
export interface Answer {
  status: number;
  headers: Headers;
  /** The body exactly as received, decoded as UTF-8. */
  text: string;
  /** Milliseconds from sending the request to the end of its body. */
  elapsedMs: number;
}

/** POSTs `body` as JSON to `url`, with `key` as its `Idempotency-Key` (none when `undefined`). */
export async function postJson(url: string, key: string | undefined, body: unknown): Promise<Answer> {
  const headers: Record<string, string> = { 'content-type': 'application/json' };
  if (key !== undefined) headers['idempotency-key'] = key;
  const started = performance.now();
  const response = await fetch(url, { method: 'POST', headers, body: JSON.stringify(body) });
  const text = await response.text();
  return { status: response.status, headers: response.headers, text, elapsedMs: performance.now() - started };
}

/** Options of {@link postWithRetries}. */
export interface RetryOptions {
  /** Longest wait between attempts, whatever `Retry-After` says (keeps tests fast). */
  maxWaitMs: number;
  /** Attempts in all, the first included; the last answer is returned when they run out. */
  maxAttempts: number;
}

/** The final answer of a retrying client, and every 409 it met on the way. */
export interface RetriedAnswer extends Answer {
  attempts: number;
  conflicts: Answer[];
}

/**
 * POSTs until the answer is not a 409: after each 409 it waits `Retry-After` seconds (capped at `maxWaitMs`,
 * with a little jitter so that retries do not move in lockstep), for at most `maxAttempts` attempts.
 */
export async function postWithRetries(
  url: string,
  key: string,
  body: unknown,
  options: RetryOptions,
): Promise<RetriedAnswer> {
  const conflicts: Answer[] = [];
  for (let attempt = 1; ; attempt++) {
    const answer = await postJson(url, key, body);
    if (answer.status !== 409 || attempt >= options.maxAttempts)
      return { ...answer, attempts: attempt, conflicts };
    conflicts.push(answer);
    const retryAfterMs = Number(answer.headers.get('retry-after') ?? '1') * 1000;
    await sleep(Math.min(retryAfterMs, options.maxWaitMs) * (0.5 + Math.random() / 2));
  }
}
