/**
 * `idempotency-header inspect KEY` and `idempotency-header forget KEY`: the operator API ({@link inspectKey},
 * {@link forgetKey}) on the command line, against the backend the proxies (or the applications) share. The
 * backend is named as the proxy names it (`--backend`, `--prefix`, `--table`, and their `IDEMPOTENCY_*`
 * variables), so that the command runs with the proxy's own environment.
 *
 * Output is one JSON line on stdout, for people and for `jq` alike. Exit codes, so that scripts can branch:
 * 0 found (inspect) or forgotten (forget), 1 nothing held for the key, 2 bad command line, 3 the backend failed,
 * 4 forget refused because a request with the key is still running (`--force` deletes it anyway).
 */
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import { storageKeyOf } from '../core/engine.js';
import { IdempotencyError } from '../core/errors.js';
import { forgetKey, inspectKey } from '../core/operator.js';
import type { KeyState } from '../core/types.js';
import { BackendSetupError, type ModuleLoader, openBackend } from './backend.js';
import { envName, FLAGS, scopeFromHeaders, UsageError } from './config.js';
import type { Output } from './main.js';

/** The subcommands this module runs. */
export type OperatorCommandName = 'inspect' | 'forget';

/** Exit codes of `inspect` and `forget`. */
export const OPERATOR_EXIT = {
  /** inspect: the key holds a lock or a record; forget: it was deleted. */
  ok: 0,
  /** Nothing is held for the key (never used, expired, or already forgotten). */
  notFound: 1,
  /** A bad command line. */
  usage: 2,
  /** The backend could not be reached or failed. */
  backend: 3,
  /** forget: a request with the key is still running; `--force` deletes its lock anyway. */
  inFlight: 4,
} as const;

/** A parsed `inspect` or `forget` command line. */
export interface OperatorConfig {
  command: OperatorCommandName;
  key: string;
  backend: string;
  prefix: string | undefined;
  table: string | undefined;
  /** The scope as the middleware's `scope` function returns it; `undefined`: no scope. */
  scope: string | undefined;
  force: boolean;
}

/** Whether `argv` (without the program name) runs an operator command. */
export function isOperatorCommand(argv: readonly string[]): boolean {
  return argv[0] === 'inspect' || argv[0] === 'forget';
}

/** The proxy's flags this command shares, parsed exactly as the proxy parses them. */
const SHARED_FLAGS = ['backend', 'prefix', 'table', 'scope-header'] as const;
/** Every flag that takes a value. */
const OPERATOR_FLAGS: ReadonlySet<string> = new Set([...SHARED_FLAGS, 'scope', 'header']);

interface Draft {
  backend: string | undefined;
  prefix: string | undefined;
  table: string | undefined;
  scopeHeaders: string[];
}

/**
 * Reads `inspect KEY [flags]` or `forget KEY [flags]` and the environment. Resolves to `'help'` for `--help`.
 * Throws {@link UsageError} naming the flag at fault.
 */
export function parseOperatorCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): OperatorConfig | 'help' {
  const [command, ...args] = argv as [OperatorCommandName, ...string[]];
  if (args.includes('--help') || args.includes('-h')) return 'help';
  const draft: Draft = { backend: undefined, prefix: undefined, table: undefined, scopeHeaders: [] };
  const shared = (name: (typeof SHARED_FLAGS)[number], value: string) =>
    FLAGS.find((flag) => flag.name === name)!.apply(draft as never, value, name);
  for (const name of SHARED_FLAGS) {
    const value = env[envName(name)];
    if (value !== undefined) shared(name, value);
  }
  let key: string | undefined;
  let scope = env[envName('scope')];
  const headers: Record<string, string[]> = {};
  let force = false;
  let flagsEnded = false;
  while (args.length > 0) {
    const arg = args.shift()!;
    if (arg === '--' && !flagsEnded) {
      // What follows is the key, even when it starts with a dash.
      flagsEnded = true;
      continue;
    }
    if (flagsEnded || !arg.startsWith('--')) {
      if (key !== undefined)
        throw new UsageError(`Unexpected argument ${JSON.stringify(arg)}: one key at a time`);
      key = arg;
      continue;
    }
    const equals = arg.indexOf('=');
    const name = equals === -1 ? arg.slice(2) : arg.slice(2, equals);
    if (name === 'force' || name === 'no-force') {
      if (command !== 'forget') throw new UsageError(`--${name} is a flag of forget, not of ${command}`);
      if (equals !== -1) throw new UsageError(`--${name} takes no value`);
      force = name === 'force';
      continue;
    }
    if (!OPERATOR_FLAGS.has(name)) {
      throw new UsageError(`Unknown flag --${name} (see idempotency-header ${command} --help)`);
    }
    const value = equals === -1 ? args.shift() : arg.slice(equals + 1);
    if (value === undefined) throw new UsageError(`--${name} needs a value`);
    if ((SHARED_FLAGS as readonly string[]).includes(name)) {
      shared(name as (typeof SHARED_FLAGS)[number], value);
    } else if (name === 'scope') {
      scope = value;
    } else {
      const colon = value.indexOf(':');
      if (colon <= 0) throw new UsageError(`--header must be NAME: VALUE, not ${JSON.stringify(value)}`);
      const headerName = value.slice(0, colon).trim().toLowerCase();
      headers[headerName] = [...(headers[headerName] ?? []), value.slice(colon + 1).trim()];
    }
  }
  if (key === undefined || key === '') {
    throw new UsageError(`${command} needs a key: idempotency-header ${command} KEY --backend SPEC`);
  }
  if (draft.backend === undefined || draft.backend === 'memory') {
    throw new UsageError(
      `${command} needs --backend (or ${envName('backend')}): the backend the proxies share, e.g. ` +
        'redis://127.0.0.1:6379. A memory backend lives inside its proxy and cannot be reached from outside.',
    );
  }
  const hasHeaders = Object.keys(headers).length > 0;
  if (hasHeaders && scope !== undefined) throw new UsageError('Give --scope or --header, not both');
  if (hasHeaders && draft.scopeHeaders.length === 0) {
    throw new UsageError('--header needs --scope-header NAMES: the headers the proxy scopes keys by');
  }
  if (draft.scopeHeaders.length > 0 && scope === undefined) {
    // The scope the proxy's --scope-header gives a request that sends these headers (none: no scope).
    const request = {
      headers: Object.fromEntries(Object.entries(headers).map(([n, v]) => [n, v.join('\n')])),
    };
    scope = scopeFromHeaders(draft.scopeHeaders)?.(request as unknown as IncomingMessage);
  }
  return { command, key, backend: draft.backend, prefix: draft.prefix, table: draft.table, scope, force };
}

/**
 * Runs `inspect` or `forget` (`argv` without the program name, starting with the subcommand) and resolves with
 * the exit code ({@link OPERATOR_EXIT}).
 *
 * @example
 * ```ts
 * const code = await runOperatorCommand(['inspect', 'order-1', '--backend', 'redis://127.0.0.1:6379'], {});
 * ```
 */
export async function runOperatorCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
  output: Output,
  load?: ModuleLoader,
): Promise<number> {
  const command = argv[0] as OperatorCommandName;
  let config: OperatorConfig | 'help';
  try {
    config = parseOperatorCommand(argv, env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    output.stderr(`idempotency-header: ${error.message}\nRun \`idempotency-header ${command} --help\`.\n`);
    return OPERATOR_EXIT.usage;
  }
  if (config === 'help') {
    output.stdout(`${operatorHelpText(command)}\n`);
    return OPERATOR_EXIT.ok;
  }
  const { key, scope } = config;
  const driverErrors: string[] = [];
  let opened: Awaited<ReturnType<typeof openBackend>>;
  try {
    opened = await openBackend(
      config.backend,
      {
        prefix: config.prefix,
        table: config.table,
        // A forced forget of a lock is announced (NOTIFY, PUBLISH), so that proxies waiting on the key with
        // --on-conflict wait look again at once. Nothing listens in this process: it costs nothing more.
        notifications: true,
        onDriverError: (driver, error) => driverErrors.push(`${driver}: ${error.message}`),
        // Reading or deleting a key never creates a table (or a SQLite file): a mistyped one is an error.
        createTable: false,
      },
      load,
    );
  } catch (error) {
    if (!(error instanceof BackendSetupError || error instanceof IdempotencyError)) throw error;
    output.stderr(`idempotency-header: ${error.message}\n`);
    return error instanceof BackendSetupError ? OPERATOR_EXIT.usage : OPERATOR_EXIT.backend;
  }
  const head = {
    key,
    scope: scope ?? null,
    // The hash the proxy's log lines and onEvent report (and the SQL backends' key_hash), to match them up.
    keyHash: createHash('sha256').update(storageKeyOf(key, scope)).digest('hex'),
  };
  const line = (fields: object) => output.stdout(`${JSON.stringify({ ...head, ...fields })}\n`);
  try {
    if (config.command === 'inspect') {
      const state = await inspectKey(opened.backend, key, { scope });
      if (state === undefined) {
        line({ state: 'not-found' });
        return OPERATOR_EXIT.notFound;
      }
      line(shown(state));
      return OPERATOR_EXIT.ok;
    }
    const result = await forgetKey(opened.backend, key, { scope, force: config.force });
    if (result.forgotten) {
      line({ forgotten: true, was: shown(result.was) });
      return OPERATOR_EXIT.ok;
    }
    line({ forgotten: false, reason: result.reason });
    if (result.reason === 'not-found') return OPERATOR_EXIT.notFound;
    output.stderr(
      'idempotency-header: a request with this key is still running (or its process died and its lease has not ' +
        'lapsed); its response would still be stored. Run again with --force to delete its lock anyway.\n',
    );
    return OPERATOR_EXIT.inFlight;
  } catch (error) {
    const message = error instanceof Error ? error.message : String(error);
    const drivers = driverErrors.length > 0 ? ` (${[...new Set(driverErrors)].join('; ')})` : '';
    output.stderr(`idempotency-header: the backend failed: ${message}${drivers}\n`);
    return OPERATOR_EXIT.backend;
  } finally {
    await opened.close();
  }
}

/** A key state as printed: times as ISO 8601 (UTC), for people; milliseconds left as a number, for scripts. */
function shown(state: KeyState): object {
  if (state.state === 'in-flight') {
    return {
      state: state.state,
      fingerprint: state.fingerprint,
      leaseLeftMs: state.leaseLeftMs,
      leaseEndsAt: new Date(Date.now() + state.leaseLeftMs).toISOString(),
    };
  }
  return {
    state: state.state,
    status: state.status,
    fingerprint: state.fingerprint,
    size: state.size,
    storedAt: new Date(state.storedAt).toISOString(),
    expiresAt: state.expiresAt === null ? null : new Date(state.expiresAt).toISOString(),
  };
}

/** The `--help` text of `inspect` or `forget`. */
export function operatorHelpText(command: OperatorCommandName): string {
  const what =
    command === 'inspect'
      ? [
          'Prints the state of an idempotency key as one JSON line: in flight (fingerprint, leaseLeftMs,',
          'leaseEndsAt), completed (status, fingerprint, size in bytes, storedAt, expiresAt or null for never),',
          'or {"state":"not-found"}. Every line also has key, scope and keyHash (the hash the proxy logs).',
        ]
      : [
          'Deletes the record of an idempotency key, so that the next request with it runs again. A key whose',
          'request is still running is refused (exit 4) unless --force: then its lock is deleted, its response',
          'will not be stored, and a repeat runs again. Prints {"forgotten":true,"was":{…}} or',
          '{"forgotten":false,"reason":"not-found"|"in-flight"}.',
        ];
  return [
    `Usage: idempotency-header ${command} KEY --backend SPEC [--prefix TEXT] [--table NAME]`,
    `         [--scope TEXT | --scope-header NAMES --header 'NAME: VALUE' ...]${command === 'forget' ? ' [--force]' : ''}`,
    '',
    ...what,
    '',
    'Flags:',
    '  --backend SPEC        redis://HOST:PORT, postgres://USER@HOST:PORT/DB, mysql://USER@HOST:PORT/DB or',
    '                        sqlite:PATH: the backend the proxies or applications share. Required.',
    `                        environment: ${envName('backend')}`,
    `  --prefix TEXT         Redis: the key prefix (default idempotency:). environment: ${envName('prefix')}`,
    `  --table NAME          SQL: the table (default idempotency_keys). environment: ${envName('table')}`,
    "  --scope TEXT          The key's scope, as the middleware's scope function returns it (a tenant id).",
    `                        environment: ${envName('scope')}`,
    "  --scope-header NAMES  The proxy's --scope-header: with --header, the scope is computed as the proxy",
    `                        computes it. environment: ${envName('scope-header')}`,
    "  --header 'NAME: VALUE'  A header the key's requests send (repeatable), for --scope-header.",
    ...(command === 'forget'
      ? ['  --force               Delete the lock of a request that is still running.']
      : []),
    '',
    'Exit codes: 0 found (inspect) or forgotten (forget), 1 nothing held for the key, 2 bad command line,',
    '3 the backend failed, 4 forget refused: the key is in flight (use --force).',
    '',
    'Example:',
    `  npx idempotency-header ${command} 5f0c…-order --backend redis://127.0.0.1:6379 --scope tenant-42`,
  ].join('\n');
}
