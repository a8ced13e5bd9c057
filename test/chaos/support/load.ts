/**
 * The soak's load: virtual clients that each send one logical request after another to random processes, and
 * retry it with the same key the way real clients do — after a 409 or a 503, after giving up on a slow answer
 * (a client timeout), after a random pause — until they get a 2xx, sometimes sending it once more after that (a
 * replay). Faults are injected at set times while the load runs. Every HTTP request is recorded.
 */
import { setTimeout as sleep } from 'node:timers/promises';

/** What one HTTP request got. */
export interface SentRequest {
  key: string;
  /** `answer`: a response read to its end; `timeout`: the client gave up first (on purpose); `network`: failed. */
  kind: 'answer' | 'timeout' | 'network';
  status: number;
  replayed: boolean;
  /** The execution the answer carries (`run` of the fixture's body), for a 2xx. */
  run: string | undefined;
  /** From sending to the end of the body, or to the give-up. */
  elapsedMs: number;
  /** The client's own limit on this request, when it was an impatient one. */
  clientTimeoutMs: number | undefined;
  /** When the request was sent, ms after the load began. */
  sentAtMs: number;
  error?: string;
}

/** One logical request: a key, resent until it got a 2xx. */
export interface Operation {
  key: string;
  attempts: number;
  /** Got a 2xx. */
  done: boolean;
  /** From the first attempt to the 2xx. */
  elapsedMs: number;
}

/** A fault the load runner injects at `atMs` after the load began. */
export interface Fault {
  atMs: number;
  name: string;
  /** Injects the fault and resolves once it is over (the server back); resolves to a note for the report. */
  inject(): Promise<string>;
}

export interface LoadOptions {
  /** Prefix of every key. */
  label: string;
  /** The processes' order endpoints. */
  urls: readonly string[];
  /** How long new logical requests are started. */
  durationMs: number;
  /** Concurrent virtual clients. */
  clients: number;
  /** After `durationMs`, how long unfinished requests may go on retrying. */
  drainMs: number;
  /** A patient request (no client timeout) that has no answer after this is a hang. */
  hangMs: number;
  faults: readonly Fault[];
}

export interface LoadResult {
  requests: SentRequest[];
  operations: Operation[];
  faults: { name: string; atMs: number; tookMs: number; note: string }[];
  elapsedMs: number;
}

function between(low: number, high: number): number {
  return low + Math.random() * (high - low);
}

/** How long the handler takes: mostly quick, some slow, a few long enough for impatient clients to give up. */
function handlerDelayMs(): number {
  const draw = Math.random();
  if (draw < 0.6) return Math.floor(between(0, 50));
  if (draw < 0.92) return Math.floor(between(50, 400));
  return Math.floor(between(1200, 2000));
}

export async function runLoad(options: LoadOptions): Promise<LoadResult> {
  const started = performance.now();
  const now = () => performance.now() - started;
  const requests: SentRequest[] = [];
  const operations: Operation[] = [];
  const faults: LoadResult['faults'] = [];
  const stopAt = options.durationMs + options.drainMs;

  async function send(key: string, body: unknown): Promise<SentRequest> {
    const url = options.urls[Math.floor(Math.random() * options.urls.length)]!;
    const impatient = Math.random() < 0.25;
    const clientTimeoutMs = impatient ? Math.floor(between(100, 1500)) : undefined;
    const sentAtMs = now();
    const record: SentRequest = {
      key,
      kind: 'answer',
      status: 0,
      replayed: false,
      run: undefined,
      elapsedMs: 0,
      clientTimeoutMs,
      sentAtMs,
    };
    try {
      const response = await fetch(url, {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'idempotency-key': key },
        body: JSON.stringify(body),
        signal: AbortSignal.timeout(clientTimeoutMs ?? options.hangMs),
      });
      const text = await response.text();
      record.status = response.status;
      record.replayed = response.headers.get('idempotent-replayed') === 'true';
      if (response.status >= 200 && response.status < 300)
        record.run = (JSON.parse(text) as { run: string }).run;
    } catch (error) {
      const name = (error as Error).name;
      record.kind = name === 'TimeoutError' && impatient ? 'timeout' : 'network';
      record.error = `${name}: ${(error as Error).message}`;
    }
    record.elapsedMs = now() - sentAtMs;
    requests.push(record);
    return record;
  }

  async function operation(key: string): Promise<void> {
    const body = { item: key, delayMs: handlerDelayMs() };
    const op: Operation = { key, attempts: 0, done: false, elapsedMs: 0 };
    operations.push(op);
    const opStarted = now();
    while (now() < stopAt) {
      op.attempts++;
      const sent = await send(key, body);
      if (sent.kind === 'answer' && sent.status >= 200 && sent.status < 300) {
        op.done = true;
        op.elapsedMs = now() - opStarted;
        // Some clients send it again anyway (a retry whose first answer they did not trust): a replay.
        if (Math.random() < 0.3) {
          await sleep(between(0, 300));
          await send(key, body);
        }
        return;
      }
      if (sent.kind === 'answer' && sent.status !== 409 && sent.status !== 503) return; // unexpected: judged later
      await sleep(sent.status === 409 ? between(50, 600) : between(0, 400));
    }
  }

  async function client(index: number): Promise<void> {
    for (let n = 0; now() < options.durationMs; n++) await operation(`${options.label}-${index}-${n}`);
  }

  const injected = options.faults.map(async (fault) => {
    await sleep(Math.max(0, fault.atMs - now()));
    const at = now();
    const note = await fault.inject();
    faults.push({ name: fault.name, atMs: at, tookMs: now() - at, note });
  });
  await Promise.all([...Array.from({ length: options.clients }, (_, i) => client(i)), ...injected]);
  return { requests, operations, faults, elapsedMs: now() };
}
