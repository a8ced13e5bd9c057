/**
 * The processes of the proxy tests: the Python upstream (`upstream.py`) and the proxy itself, run as its command
 * line runs it (`idempotency-header proxy …`, from the sources through tsx), each its own process.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const UPSTREAM = fileURLToPath(new URL('./upstream.py', import.meta.url));
const STARTUP_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 5_000;

const live = new Set<ChildProcess>();

// A test process that dies without its afterAll never leaves a server behind.
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/** A child process and what it printed. */
interface Child {
  readonly child: ChildProcess;
  readonly pid: number;
  /** Everything printed so far, stdout and stderr. */
  output(): string;
  /** Resolves with the exit code and signal once the process has exited. */
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Sends `signal` (SIGTERM by default) and waits for the exit; SIGKILL if it has not exited within 5 s. */
  stop(signal?: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

/** Starts `command` with exactly `env` as its environment. */
function run(command: string, args: string[], env: NodeJS.ProcessEnv): Child {
  const child = spawn(command, args, {
    cwd: ROOT,
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  let output = '';
  child.stdout?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) =>
    child.once('exit', (code, signal) => {
      live.delete(child);
      resolve({ code, signal });
    }),
  );
  return {
    child,
    pid: child.pid!,
    output: () => output,
    exited,
    async stop(signal = 'SIGTERM') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
      const result = await exited;
      clearTimeout(timer);
      return result;
    },
  };
}

/** Waits until `ready` finds what it looks for in the child's output, or fails with that output. */
function waitFor<T>(started: Child, what: string, ready: (output: string) => T | undefined) {
  return new Promise<T>((resolve, reject) => {
    const check = () => {
      const found = ready(started.output());
      if (found === undefined) return;
      cleanup();
      resolve(found);
    };
    const fail = (reason: string) => {
      cleanup();
      started.child.kill('SIGKILL');
      reject(new Error(`${what} (pid ${started.pid}) ${reason}. Its output:\n${started.output()}`));
    };
    const timer = setTimeout(() => fail(`was not ready within ${STARTUP_TIMEOUT_MS} ms`), STARTUP_TIMEOUT_MS);
    const onExit = (code: number | null) => fail(`exited (code ${code}) before it was ready`);
    const cleanup = () => {
      clearTimeout(timer);
      started.child.stdout?.off('data', check);
      started.child.off('exit', onExit);
    };
    started.child.stdout?.on('data', check);
    started.child.once('exit', onExit);
    check();
  });
}

/** The Python upstream. */
export interface Upstream extends Child {
  readonly url: string;
  readonly port: number;
  /** Runs per idempotency key so far (`null`: requests without a key). */
  counts(): Promise<Record<string, number>>;
}

/** Starts `upstream.py` on `port` (0: a free one). */
export async function startUpstream(port = 0): Promise<Upstream> {
  const started = run('python3', [UPSTREAM, String(port)], { ...process.env, PYTHONUNBUFFERED: '1' });
  const actual = await waitFor(started, 'The Python upstream', (output) => {
    const match = /LISTENING (\d+)/.exec(output);
    return match === null ? undefined : Number(match[1]);
  });
  const url = `http://127.0.0.1:${actual}`;
  return {
    ...started,
    url,
    port: actual,
    counts: async () => (await (await fetch(`${url}/counts`)).json()) as Record<string, number>,
  };
}

/** One JSON line the proxy printed. */
export type LogLine = Record<string, unknown> & { msg: string };

/** A running proxy. */
export interface ProxyProcess extends Child {
  /** `http://127.0.0.1:<port>`. */
  readonly url: string;
  /** Its `listening` line: backend name, upstream, pid. */
  readonly started: LogLine;
  /** Every JSON line printed so far. */
  lines(): LogLine[];
  /** Waits (up to 10 s) for a line that `match` accepts. */
  waitForLine(match: (line: LogLine) => boolean): Promise<LogLine>;
}

/** Parses the JSON lines of an output; other lines are left out. */
export function jsonLines(output: string): LogLine[] {
  return output
    .split('\n')
    .filter((line) => line.startsWith('{'))
    .map((line) => JSON.parse(line) as LogLine);
}

/**
 * Starts `idempotency-header proxy --port 0 <args>` and resolves once it printed its `listening` line. `env` is
 * added to this process's environment (the proxy's own `IDEMPOTENCY_*` variables are cleared first).
 */
export async function startProxy(args: string[], env: Record<string, string> = {}): Promise<ProxyProcess> {
  const started = run(
    process.execPath,
    ['--import', 'tsx', 'src/proxy/cli.ts', 'proxy', '--port', '0', ...args],
    {
      ...proxyFreeEnv(),
      ...env,
    },
  );
  const line = await waitFor(started, 'The proxy', (output) =>
    jsonLines(output).find((candidate) => candidate.msg === 'listening'),
  );
  return {
    ...started,
    url: String(line.url),
    started: line,
    lines: () => jsonLines(started.output()),
    async waitForLine(match) {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const found = jsonLines(started.output()).find(match);
        if (found !== undefined) return found;
        if (Date.now() > deadline) throw new Error(`No such line. The proxy's output:\n${started.output()}`);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    },
  };
}

/** This process's environment without the proxy's own variables, so that only a test's settings apply. */
function proxyFreeEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('IDEMPOTENCY_')));
}

/** Runs the command line to its end (`--help`, bad flags): its exit code and output. */
export async function runCommand(
  args: string[],
  env: Record<string, string> = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/proxy/cli.ts', ...args], {
    cwd: ROOT,
    env: { ...proxyFreeEnv(), ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (chunk: Buffer) => {
    stdout += chunk.toString();
  });
  child.stderr.on('data', (chunk: Buffer) => {
    stderr += chunk.toString();
  });
  const code = await new Promise<number | null>((resolve) => child.once('exit', (exit) => resolve(exit)));
  live.delete(child);
  return { code, stdout, stderr };
}

/** A response as the waiting tests compare them, with when it ended (`performance.now()`). */
export interface TimedAnswer {
  readonly status: number;
  readonly replayed: string | null;
  readonly text: string;
  readonly at: number;
}

/**
 * A first run that takes 800 ms upstream, sent to `holder`, and the same request sent to `waiter` 300 ms later,
 * while the first still runs: the two answers, the repeat's to be compared with the first's (a waiting proxy
 * replays it as soon as it is stored).
 */
export async function firstRunAndRepeat(
  holder: ProxyProcess,
  waiter: ProxyProcess,
  key: string,
): Promise<{ done: TimedAnswer; repeat: TimedAnswer }> {
  const send = (proxy: ProxyProcess): Promise<TimedAnswer> =>
    fetch(`${proxy.url}/orders?delay=800`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'idempotency-key': key },
      body: '{}',
    }).then(async (response) => ({
      status: response.status,
      replayed: response.headers.get('idempotent-replayed'),
      text: await response.text(),
      at: performance.now(),
    }));
  const first = send(holder);
  await new Promise((resolve) => setTimeout(resolve, 300));
  const repeat = await send(waiter);
  return { done: await first, repeat };
}
