/**
 * `idempotency-header proxy`: reads the command line and environment, opens the backend, runs the proxy until
 * SIGTERM or SIGINT, then drains it and closes the backend.
 */
import packageJson from '../../package.json' with { type: 'json' };
import { IdempotencyError } from '../core/errors.js';
import { BackendSetupError, type OpenedBackend, openBackend } from './backend.js';
import {
  type Command,
  helpText,
  OPTION_FLAGS,
  parseCommand,
  scopeFromHeaders,
  UsageError,
} from './config.js';
import { isOperatorCommand, runOperatorCommand } from './operator-command.js';
import { createIdempotencyProxy, type IdempotencyProxy } from './server.js';

/** Where the command writes: the process's streams, or a test's. */
export interface Output {
  stdout(text: string): void;
  stderr(text: string): void;
}

const PROCESS_OUTPUT: Output = {
  stdout: (text) => process.stdout.write(text),
  stderr: (text) => process.stderr.write(text),
};

/** Exit codes: 0 done, 1 could not run (backend, port), 2 bad command line. */
const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

/**
 * Runs the command line (`argv` without the program name) and resolves with the exit code once the proxy has
 * stopped (or at once for `--help`, `--version` and errors).
 *
 * @example
 * ```ts
 * process.exitCode = await main(['proxy', '--upstream', 'http://127.0.0.1:8080'], process.env);
 * ```
 */
export async function main(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  output: Output = PROCESS_OUTPUT,
): Promise<number> {
  if (isOperatorCommand(argv)) return runOperatorCommand(argv, env, output);
  let command: Command;
  try {
    command = parseCommand(argv, env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    output.stderr(
      `idempotency-header: ${error.message}\nRun \`idempotency-header proxy --help\` for every flag.\n`,
    );
    return EXIT_USAGE;
  }
  if (command.kind === 'help') {
    output.stdout(`${helpText(packageJson.version)}\n`);
    return EXIT_OK;
  }
  if (command.kind === 'version') {
    output.stdout(`${packageJson.version}\n`);
    return EXIT_OK;
  }
  const { config } = command;
  const line = (fields: object) => output.stdout(`${JSON.stringify(fields)}\n`);
  const notice = (msg: string, fields: object = {}) =>
    line({ msg, time: new Date().toISOString(), ...fields });
  // A driver retrying a lost connection reports the same error again and again: one line per change is enough.
  let lastDriverError = '';
  let opened: OpenedBackend;
  try {
    opened = await openBackend(config.backend, {
      prefix: config.prefix,
      table: config.table,
      // Waiting repeats are woken by PostgreSQL's or Redis's notifications rather than by polling.
      notifications: config.middleware.onConflict === 'wait',
      onDriverError(driver, error) {
        const text = `${driver}: ${error.message}`;
        if (text === lastDriverError) return;
        lastDriverError = text;
        notice('backend-error', { driver, error: error.message });
      },
    });
  } catch (error) {
    if (!(error instanceof BackendSetupError || error instanceof IdempotencyError)) throw error;
    output.stderr(`idempotency-header: ${error.message}\n`);
    return error instanceof BackendSetupError ? EXIT_USAGE : EXIT_FAILED;
  }

  let proxy: IdempotencyProxy;
  try {
    proxy = createIdempotencyProxy({
      upstream: config.upstream,
      backend: opened.backend,
      middleware: { ...config.middleware, scope: scopeFromHeaders(config.scopeHeaders) },
      healthPath: config.healthPath,
      log: config.log === 'json' ? line : undefined,
      onStrayEvent: (event) => notice('event', { ...event, error: undefined }),
    });
  } catch (error) {
    await opened.close();
    if (!(error instanceof IdempotencyError && error.code === 'ERR_IDEMPOTENCY_OPTION')) throw error;
    output.stderr(`idempotency-header: ${flagMessage(error.message)}\n`);
    return EXIT_USAGE;
  }

  let url: string;
  try {
    url = await proxy.listen(config.port, config.host);
  } catch (error) {
    await opened.close();
    output.stderr(
      `idempotency-header: cannot listen on ${config.host}:${config.port}: ${(error as Error).message}\n`,
    );
    return EXIT_FAILED;
  }
  notice('listening', {
    url,
    upstream: config.upstream.href,
    backend: opened.name,
    location: opened.location,
    pid: process.pid,
  });

  const signal = await new Promise<NodeJS.Signals>((resolve) => {
    process.once('SIGTERM', () => resolve('SIGTERM'));
    process.once('SIGINT', () => resolve('SIGINT'));
  });
  notice('stopping', { signal, inFlight: proxy.inFlight, timeoutSeconds: config.shutdownTimeout });
  // A second signal means now: the requests still running are cut, and their keys lapse with their leases.
  const again = () => {
    notice('stopped', { signal: 'again', inFlight: proxy.inFlight });
    process.exit(EXIT_FAILED);
  };
  process.once('SIGTERM', again);
  process.once('SIGINT', again);
  await proxy.shutdown(config.shutdownTimeout * 1000);
  await opened.close();
  notice('stopped', { signal });
  process.off('SIGTERM', again);
  process.off('SIGINT', again);
  return EXIT_OK;
}

/** An engine option error, told in flags: "Invalid option `lockTimeout`" becomes "Invalid --lock-timeout". */
function flagMessage(message: string): string {
  return message.replace(/Invalid option `(\w+)`/, (whole, name: string) => {
    const flag = OPTION_FLAGS[name as keyof typeof OPTION_FLAGS];
    return flag === undefined ? whole : `Invalid --${flag}`;
  });
}
