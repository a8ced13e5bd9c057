/**
 * The runtimes the web-standard code is proved on, each started on a bundle and waited for until it serves.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Miniflare } from 'miniflare';

const HERE = fileURLToPath(new URL('.', import.meta.url));
const BIN = join(HERE, '..', '..', 'node_modules', '.bin');

/** A runtime serving the bundle: its base URL, and how to stop it. */
export interface Served {
  readonly url: string;
  stop(): Promise<void>;
}

/** Starts `command` and waits for it to print `LISTENING <port>`. */
function serveProcess(command: string, args: string[]): Promise<Served> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = spawn(command, args, {
      env: { ...process.env, DENO_NO_UPDATE_CHECK: '1', DENO_NO_PROMPT: '1', NO_COLOR: '1' },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    const timer = setTimeout(() => {
      child.kill();
      reject(new Error(`${command} did not start within 30 s:\n${output}`));
    }, 30_000);
    const onData = (chunk: Buffer) => {
      output += chunk.toString();
      const port = /LISTENING (\d+)/.exec(output)?.[1];
      if (port === undefined) return;
      clearTimeout(timer);
      child.stdout?.off('data', onData);
      resolve({
        url: `http://127.0.0.1:${port}`,
        stop: () =>
          new Promise<void>((done) => {
            if (child.exitCode !== null) return done();
            child.once('exit', () => done());
            child.kill();
          }),
      });
    };
    child.stdout?.on('data', onData);
    child.stderr?.on('data', (chunk: Buffer) => {
      output += chunk.toString();
    });
    child.once('error', (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${command} exited with ${code}:\n${output}`));
    });
  });
}

/** Where a test's bundle is, known once its `beforeAll` built it. */
export interface Bundle {
  /** The ES module, a `fetch` handler as its default export. */
  readonly file: string;
  /** Its folder, which Deno is allowed to read. */
  readonly dir: string;
}

/** Bun, Deno and workerd, each a function that starts the runtime on the bundle and waits until it serves. */
export function runtimes(bundle: () => Bundle): readonly (readonly [string, () => Promise<Served>])[] {
  return [
    ['Bun', () => serveProcess(join(BIN, 'bun'), [join(HERE, 'serve-bun.mjs'), bundle().file])],
    [
      'Deno',
      () =>
        serveProcess(join(BIN, 'deno'), [
          'run',
          '--allow-net=127.0.0.1',
          `--allow-read=${bundle().dir}`,
          join(HERE, 'serve-deno.mjs'),
          bundle().file,
        ]),
    ],
    [
      'workerd (Miniflare)',
      async () => {
        const mf = new Miniflare({
          modules: true,
          script: await readFile(bundle().file, 'utf8'),
          compatibilityDate: '2025-01-01',
        });
        const url = await mf.ready;
        return { url: url.origin, stop: () => mf.dispose() };
      },
    ],
  ];
}
