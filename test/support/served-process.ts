/**
 * Helpers for tests that run a server as a child process (an example, a README snippet) and talk to it as a
 * client would: wait until it listens, send the same keyed POST twice, stop it.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { expect } from 'vitest';

export interface ServedProcess {
  child: ChildProcess;
  /** Everything the process wrote to stdout and stderr so far, for failure messages. */
  output(): string;
  /** Resolves with the exit code (or signal name) once the process has exited. */
  exited: Promise<number | string | null>;
}

/**
 * Spawns `command` in its own process group (`detached`), so that {@link stopGroup} reaches everything it starts
 * (`npm run` → shell → tsx → node), and collects its output.
 */
export function serve(command: string, args: string[], options: { cwd: string; env: NodeJS.ProcessEnv }) {
  const child = spawn(command, args, { ...options, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  const exited = new Promise<number | string | null>((resolve) =>
    child.once('exit', (code, signal) => resolve(code ?? signal)),
  );
  return { child, output: () => output, exited } satisfies ServedProcess;
}

/** Sends `signal` to the process group; ignores a group that is already gone. */
export function stopGroup(served: ServedProcess, signal: NodeJS.Signals): void {
  try {
    process.kill(-served.child.pid!, signal);
  } catch {}
}

/** Waits until `test()` returns a value, failing early (with the output) if the process exits first. */
export async function waitFor<T>(
  served: ServedProcess,
  what: string,
  test: () => T | undefined | Promise<T | undefined>,
  timeoutMs = 20_000,
): Promise<T> {
  let exit: number | string | null | undefined;
  void served.exited.then((code) => {
    exit = code;
  });
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await test();
    if (value !== undefined) return value;
    if (exit !== undefined) throw new Error(`exited (${exit}) before ${what}:\n${served.output()}`);
    if (Date.now() > deadline) throw new Error(`no ${what} within ${timeoutMs} ms:\n${served.output()}`);
    await sleep(50);
  }
}

/** Whether something accepts TCP connections on 127.0.0.1:`port`. */
export function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = connect({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

export interface KeyedPost {
  status: number;
  replayed: string | null;
  body: string;
}

async function post(url: string, key: string): Promise<KeyedPost> {
  const response = await fetch(url, {
    method: 'POST',
    headers: { 'idempotency-key': key, 'content-type': 'application/json' },
    body: JSON.stringify({ item: 'book' }),
  });
  return {
    status: response.status,
    replayed: response.headers.get('idempotent-replayed'),
    body: await response.text(),
  };
}

/**
 * The behaviour every example and snippet promises: a keyed POST runs (2xx, the handler's body), the same POST
 * again gets that very response back with `Idempotent-Replayed: true`, and a POST with another key runs again.
 * Every handler used here puts something new in each response (an order number, a random id), so the third
 * response differing from the first (apart from an echoed `key`) while the replay equals it shows the handler ran
 * once for the repeated key; a handler whose responses do not differ fails here, as its replay would prove nothing.
 * `{"item":"book"}` is sent as JSON; a body that echoes `item` or `key` must echo what was sent, which shows the
 * request body and the key reached the handler through the middleware. Returns the keys used.
 */
export async function expectReplay(url: string): Promise<string[]> {
  const key = randomUUID();
  const first = await post(url, key);
  expect(first.status, first.body).toBeGreaterThanOrEqual(200);
  expect(first.status, first.body).toBeLessThan(300);
  expect(first.replayed).toBeNull();
  const parsed = JSON.parse(first.body) as Record<string, unknown>;
  if ('item' in parsed) expect(parsed.item).toBe('book');
  if ('key' in parsed) expect(parsed.key).toBe(key);

  const replay = await post(url, key);
  expect(replay).toEqual({ status: first.status, replayed: 'true', body: first.body });

  const otherKey = randomUUID();
  const other = await post(url, otherKey);
  expect(other.status).toBe(first.status);
  expect(other.replayed).toBeNull();
  // Without the echoed key, so that only what the handler made anew for the run can tell the runs apart.
  const { key: _key, ...firstRun } = parsed;
  const { key: _otherKey, ...otherRun } = JSON.parse(other.body) as Record<string, unknown>;
  expect(
    otherRun,
    'a second run made the same response: a replay cannot show the handler ran once',
  ).not.toEqual(firstRun);
  return [key, otherKey];
}
