/**
 * Helpers for tests that run a server as a child process (an example, a README snippet) and talk to it as a
 * client would: wait until it listens, send the same keyed POST twice, stop it.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
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

/**
 * A child's output or source for an error message, each line behind a bar: vitest reads `at …` lines in a message
 * as stack frames of the test and fails parsing the child's files for source maps.
 */
export function quote(text: string): string {
  // The last lines, each cut short: a crash prints the minified source line it happened on, 100 kB long.
  return text
    .split('\n')
    .slice(-60)
    .map((line) => `│ ${line.length > 300 ? `${line.slice(0, 300)}…` : line}`)
    .join('\n');
}

/** Sends `signal` to the process group; ignores a group that is already gone. */
export function stopGroup(served: ServedProcess, signal: NodeJS.Signals): void {
  try {
    process.kill(-served.child.pid!, signal);
  } catch {}
}

/**
 * The processes of the group that have not exited, read from /proc (Linux). Zombies do not count: a process
 * orphaned when `npm` exits first is reaped by init, which in a container may never happen.
 */
export function liveInGroup(pgid: number): number[] {
  const live: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
    } catch {
      continue;
    }
    // pid (comm) state ppid pgrp …; comm may hold spaces and parentheses, so read after its last ')'.
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(pgrp) === pgid && state !== 'Z') live.push(Number(entry));
  }
  return live;
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
    if (exit !== undefined) throw new Error(`exited (${exit}) before ${what}:\n${quote(served.output())}`);
    if (Date.now() > deadline)
      throw new Error(`no ${what} within ${timeoutMs} ms:\n${quote(served.output())}`);
    await sleep(50);
  }
}

/**
 * Sends SIGTERM to the whole process group, as a terminal's Ctrl-C or a supervisor stopping a service does, and
 * waits until none of its processes is left; SIGKILLs what remains after `timeoutMs` and throws. (SIGTERM to
 * `npm` alone is not enough: npm exits at once and leaves the server running, orphaned.)
 */
export async function stopsOnSigterm(served: ServedProcess, timeoutMs = 10_000): Promise<void> {
  const pgid = served.child.pid!;
  stopGroup(served, 'SIGTERM');
  const deadline = Date.now() + timeoutMs;
  while (liveInGroup(pgid).length > 0) {
    if (Date.now() > deadline) {
      const left = liveInGroup(pgid).map((pid) =>
        readFileSync(`/proc/${pid}/cmdline`, 'utf8').replace(/\0/g, ' '),
      );
      stopGroup(served, 'SIGKILL');
      throw new Error(
        `still running ${timeoutMs} ms after SIGTERM: ${left.join('; ')}\n${quote(served.output())}`,
      );
    }
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
