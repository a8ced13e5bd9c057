/**
 * Runs the Express example (`examples/express/server.ts`) as a child process, the way a user deploys it: its
 * own Node.js process, port and connection to the shared backend (Redis, PostgreSQL, MariaDB/MySQL or SQLite).
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const STARTUP_TIMEOUT_MS = 20_000;
const STOP_TIMEOUT_MS = 3_000;
const LISTENING = /Listening on (http:\/\/\S+) \((\w+)\)/;

/** A running example server. */
export interface ExampleProcess {
  /** The orders endpoint, e.g. `http://127.0.0.1:40123/orders`. */
  readonly url: string;
  /** The backend it reported: `RedisBackend`, `PostgresBackend`, `MysqlBackend`, `SqliteBackend` or `MemoryBackend`. */
  readonly backend: string;
  readonly pid: number;
  /** Everything it printed so far, stdout and stderr: for failure messages. */
  output(): string;
  /** SIGTERM (the example closes its server and Redis connection), SIGKILL if it has not exited in 3 s. */
  stop(): Promise<void>;
}

const live = new Set<ChildProcess>();

// A safety net: a test process that dies without its afterAll never leaves an example server behind.
process.once('exit', () => {
  for (const child of live) child.kill('SIGKILL');
});

/**
 * Starts the example with `node --import tsx` (so the process's pid is the server's) and resolves once it prints
 * the URL it listens on. `env` is added to this process's environment; `PORT` defaults to 0 (a free port).
 * `script` (relative to the repository) runs another server that prints the same `Listening on` line.
 */
export function startExample(
  env: Record<string, string>,
  script = 'examples/express/server.ts',
): Promise<ExampleProcess> {
  const child = spawn(process.execPath, ['--import', 'tsx', script], {
    cwd: ROOT,
    env: { ...process.env, PORT: '0', HOST: '127.0.0.1', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  live.add(child);
  let output = '';
  let exited = child.exitCode !== null || child.signalCode !== null;
  const exit = new Promise<void>((resolve) =>
    child.once('exit', () => {
      exited = true;
      live.delete(child);
      resolve();
    }),
  );
  child.stdout?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });
  child.stderr?.on('data', (chunk: Buffer) => {
    output += chunk.toString();
  });

  const stop = async () => {
    if (exited) return;
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), STOP_TIMEOUT_MS);
    await exit;
    clearTimeout(timer);
  };

  return new Promise<ExampleProcess>((resolve, reject) => {
    const fail = (reason: string) => {
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.kill('SIGKILL');
      reject(new Error(`The example (pid ${child.pid}) ${reason}. Its output:\n${output}`));
    };
    const timer = setTimeout(
      () => fail(`did not print its URL within ${STARTUP_TIMEOUT_MS} ms`),
      STARTUP_TIMEOUT_MS,
    );
    const onData = () => {
      const match = LISTENING.exec(output);
      if (match === null) return;
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      child.off('exit', onEarlyExit);
      resolve({
        url: match[1]!,
        backend: match[2]!,
        pid: child.pid!,
        output: () => output,
        stop,
      });
    };
    const onEarlyExit = (code: number | null, signal: NodeJS.Signals | null) =>
      fail(`exited before listening (code ${code}, signal ${signal})`);
    child.stdout?.on('data', onData);
    child.once('exit', onEarlyExit);
    child.once('error', (error) => fail(`could not be started: ${error.message}`));
  });
}
