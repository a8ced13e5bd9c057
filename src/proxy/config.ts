/**
 * The `idempotency-header proxy` command line: every flag, the environment variable that sets it, its parsing
 * and its help text, from one table. A flag given on the command line wins over its variable.
 */
import { createHash } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { IdempotencyOptions } from '../core/options.js';

/** A command line the proxy cannot run with; its message names the flag. */
export class UsageError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
  }
}

/** The middleware options a flag can set: all but the backend, and the functions (scope, events). */
export type MiddlewareFlags = Omit<IdempotencyOptions<IncomingMessage>, 'backend' | 'onEvent' | 'scope'>;

/** The proxy's settings, parsed from flags and environment. */
export interface ProxyConfig {
  upstream: URL;
  port: number;
  host: string;
  /** `memory`, a Redis, PostgreSQL or MySQL URL, or `sqlite:PATH`. */
  backend: string;
  prefix: string | undefined;
  table: string | undefined;
  scopeHeaders: string[];
  /** `null`: no health path. */
  healthPath: string | null;
  log: 'json' | 'none';
  /** Seconds. */
  shutdownTimeout: number;
  middleware: MiddlewareFlags;
}

/** What a command line asks for: run with a config, or print help or the version. */
export type Command = { kind: 'run'; config: ProxyConfig } | { kind: 'help' } | { kind: 'version' };

type Draft = Omit<ProxyConfig, 'upstream'> & { upstream: URL | undefined };

/** One flag: its name (`--lock-timeout`), its value's placeholder (none for a switch), its help, how it applies. */
interface Flag {
  readonly name: string;
  /** `undefined` for a switch: `--flag`, `--no-flag`, `--flag=false`. */
  readonly value?: string;
  readonly help: string;
  /** The default, as the help shows it. */
  readonly fallback: string;
  readonly section: 'proxy' | 'middleware';
  apply(config: Draft, value: string | boolean, name: string): void;
}

/** The environment variable of a flag: `--lock-timeout` is `IDEMPOTENCY_LOCK_TIMEOUT`. */
export function envName(flag: string): string {
  return `IDEMPOTENCY_${flag.toUpperCase().replaceAll('-', '_')}`;
}

function text(value: string | boolean, name: string): string {
  if (typeof value !== 'string') throw new UsageError(`--${name} needs a value`);
  return value;
}

function integer(value: string | boolean, name: string, min = 1): number {
  const raw = text(value, name);
  const parsed = Number(raw);
  if (!/^\d+$/.test(raw.trim()) || !Number.isSafeInteger(parsed) || parsed < min) {
    throw new UsageError(
      `--${name} must be a whole number${min > 0 ? `, at least ${min}` : ''}, not ${JSON.stringify(raw)}`,
    );
  }
  return parsed;
}

function seconds(value: string | boolean, name: string): number {
  const raw = text(value, name);
  const parsed = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(parsed) || parsed <= 0) {
    throw new UsageError(`--${name} must be a positive number of seconds, not ${JSON.stringify(raw)}`);
  }
  return parsed;
}

function list(value: string | boolean, name: string): string[] {
  const items = text(value, name)
    .split(',')
    .map((item) => item.trim())
    .filter((item) => item !== '');
  if (items.length === 0) throw new UsageError(`--${name} needs a comma-separated list`);
  return items;
}

function oneOf<const T extends string>(value: string | boolean, name: string, allowed: readonly T[]): T {
  const raw = text(value, name);
  if ((allowed as readonly string[]).includes(raw)) return raw as T;
  throw new UsageError(`--${name} must be ${allowed.join(' or ')}, not ${JSON.stringify(raw)}`);
}

function middleware<K extends keyof MiddlewareFlags>(
  key: K,
  parse: (value: string | boolean, name: string) => MiddlewareFlags[K],
): Flag['apply'] {
  return (config, value, name) => {
    config.middleware[key] = parse(value, name);
  };
}

const bool = (value: string | boolean) => value as boolean;

/** Every flag, in the order `--help` lists them. */
export const FLAGS: readonly Flag[] = [
  {
    name: 'upstream',
    value: 'URL',
    help: 'The service to make idempotent: http:// or https://, with an optional path prefix. Required.',
    fallback: 'none',
    section: 'proxy',
    apply(config, value, name) {
      const raw = text(value, name);
      let url: URL;
      try {
        url = new URL(raw);
      } catch {
        throw new UsageError(
          `--${name} must be a URL such as http://127.0.0.1:8080, not ${JSON.stringify(raw)}`,
        );
      }
      if (url.protocol !== 'http:' && url.protocol !== 'https:') {
        throw new UsageError(`--${name} must be an http:// or https:// URL, not ${JSON.stringify(raw)}`);
      }
      config.upstream = url;
    },
  },
  {
    name: 'port',
    value: 'PORT',
    help: 'Port to listen on; 0 picks a free one (the start-up line says which).',
    fallback: '8081',
    section: 'proxy',
    apply(config, value, name) {
      config.port = integer(value, name, 0);
      if (config.port > 65_535) throw new UsageError(`--${name} must be at most 65535`);
    },
  },
  {
    name: 'host',
    value: 'ADDRESS',
    help: 'Address to listen on; 0.0.0.0 (or ::) to accept connections from other machines.',
    fallback: '127.0.0.1',
    section: 'proxy',
    apply(config, value, name) {
      config.host = text(value, name);
    },
  },
  {
    name: 'backend',
    value: 'SPEC',
    help:
      'Where keys, locks and responses live: memory (this process only), redis://HOST:PORT (rediss:// for ' +
      'TLS), postgres://USER@HOST:PORT/DB, mysql://USER@HOST:PORT/DB (mariadb:// too) or sqlite:PATH. Share ' +
      'one between every proxy in front of the same service. The driver (ioredis or redis, pg, mysql2, ' +
      'better-sqlite3) is loaded when needed: install it beside idempotency-header.',
    fallback: 'memory',
    section: 'proxy',
    apply(config, value, name) {
      config.backend = text(value, name);
    },
  },
  {
    name: 'prefix',
    value: 'TEXT',
    help: 'Redis backend: prefix of every key it writes.',
    fallback: 'idempotency:',
    section: 'proxy',
    apply(config, value, name) {
      config.prefix = text(value, name);
    },
  },
  {
    name: 'table',
    value: 'NAME',
    help: 'SQL backends: the table (created if missing).',
    fallback: 'idempotency_keys',
    section: 'proxy',
    apply(config, value, name) {
      config.table = text(value, name);
    },
  },
  {
    name: 'scope-header',
    value: 'NAMES',
    help:
      "Namespaces keys by these request headers' values (comma-separated, e.g. authorization or x-api-key), " +
      'so that two clients never see each other’s responses. Values are hashed, never stored as sent.',
    fallback: 'none (one namespace)',
    section: 'proxy',
    apply(config, value, name) {
      config.scopeHeaders = list(value, name).map((header) => header.toLowerCase());
    },
  },
  {
    name: 'health-path',
    value: 'PATH',
    help:
      'Answered by the proxy itself to GET and HEAD: 200 {"status":"ok"}, or 503 once shutting down. ' +
      'An empty value sends that path upstream like any other.',
    fallback: '/healthz',
    section: 'proxy',
    apply(config, value, name) {
      const path = text(value, name);
      if (path !== '' && !path.startsWith('/')) throw new UsageError(`--${name} must start with /`);
      config.healthPath = path === '' ? null : path;
    },
  },
  {
    name: 'log',
    value: 'json|none',
    help:
      'json: one JSON line per request on stdout (method, path, status, outcome, keyHash, durationMs, ' +
      'upstreamMs). none: no request lines. The lines of start, stop and backend errors are written either way.',
    fallback: 'json',
    section: 'proxy',
    apply(config, value, name) {
      config.log = oneOf(value, name, ['json', 'none']);
    },
  },
  {
    name: 'shutdown-timeout',
    value: 'SECONDS',
    help:
      'On SIGTERM or SIGINT the proxy stops taking connections and lets requests in flight finish (their ' +
      'responses stored, their keys released) for up to this long, then cuts the rest.',
    fallback: '30',
    section: 'proxy',
    apply(config, value, name) {
      config.shutdownTimeout = seconds(value, name);
    },
  },
  {
    name: 'idempotency-header-key',
    value: 'NAME',
    help: 'The request header that carries the key.',
    fallback: 'Idempotency-Key',
    section: 'middleware',
    apply: middleware('idempotencyHeaderKey', text),
  },
  {
    name: 'replay-header-key',
    value: 'NAME',
    help: 'The header set to true on replayed responses.',
    fallback: 'Idempotent-Replayed',
    section: 'middleware',
    apply: middleware('replayHeaderKey', text),
  },
  {
    name: 'enforce-uuid4-formatting',
    help: 'Answer 422 to keys that are not v4 UUIDs.',
    fallback: 'off',
    section: 'middleware',
    apply: middleware('enforceUuid4Formatting', bool),
  },
  {
    name: 'expiry',
    value: 'SECONDS|forever',
    help: 'How long a response is replayed.',
    fallback: '86400',
    section: 'middleware',
    apply: middleware('expiry', (value, name) => (value === 'forever' ? null : seconds(value, name))),
  },
  {
    name: 'applicable-methods',
    value: 'METHODS',
    help: 'Methods the middleware handles (comma-separated); others pass through untouched.',
    fallback: 'POST,PATCH',
    section: 'middleware',
    apply: middleware('applicableMethods', list),
  },
  {
    name: 'required',
    help: 'Answer 400 to an applicable request without a key, instead of passing it through.',
    fallback: 'off',
    section: 'middleware',
    apply: middleware('required', bool),
  },
  {
    name: 'fingerprint',
    help:
      'Tell a repeat from a different request under the same key (422) by a SHA-256 of method, path and ' +
      'body. --no-fingerprint turns it off.',
    fallback: 'on',
    section: 'middleware',
    apply: middleware('fingerprint', bool),
  },
  {
    name: 'lock-timeout',
    value: 'SECONDS',
    help:
      'The in-flight lock’s lease, renewed while the upstream works: only a proxy that died lets it lapse, ' +
      'and then a retry runs.',
    fallback: '60',
    section: 'middleware',
    apply: middleware('lockTimeout', seconds),
  },
  {
    name: 'max-key-length',
    value: 'N',
    help: 'Longest key accepted; longer keys get 422.',
    fallback: '255',
    section: 'middleware',
    apply: middleware('maxKeyLength', integer),
  },
  {
    name: 'cacheable-content-types',
    value: 'TYPES|*',
    help:
      'Responses stored, by media type (comma-separated; type/*, */*+json allowed). * stores every type but ' +
      'text/event-stream. Others are sent but not stored, and the key is released.',
    fallback: 'application/json,*/*+json',
    section: 'middleware',
    apply: middleware('cacheableContentTypes', (value, name) => (value === '*' ? '*' : list(value, name))),
  },
  {
    name: 'cache-server-errors',
    help: 'Store 5xx responses too (off: the key is released and a retry runs again).',
    fallback: 'off',
    section: 'middleware',
    apply: middleware('cacheServerErrors', bool),
  },
  {
    name: 'release-statuses',
    value: 'STATUSES',
    help: 'Statuses that mean "not executed": not stored, key released (comma-separated).',
    fallback: '401,403,407,408,425,429',
    section: 'middleware',
    apply: middleware('releaseStatuses', (value, name) =>
      list(value, name).map((status) => integer(status, name, 100)),
    ),
  },
  {
    name: 'max-response-bytes',
    value: 'BYTES',
    help: 'Largest response body stored; a larger one is sent and handled as --unstored-responses says.',
    fallback: '1048576',
    section: 'middleware',
    apply: middleware('maxResponseBytes', integer),
  },
  {
    name: 'unstored-responses',
    value: 'remember|release',
    help:
      'A response too large to store, or an event stream: remember keeps the key as completed (a retry gets ' +
      '410, the upstream never runs it twice); release frees it (a retry runs again).',
    fallback: 'remember',
    section: 'middleware',
    apply: middleware('unstoredResponses', (value, name) => oneOf(value, name, ['remember', 'release'])),
  },
  {
    name: 'max-request-bytes',
    value: 'BYTES',
    help:
      'Largest request body read for the fingerprint: a keyed request with a larger one gets 413. Requests ' +
      'without a key stream through whatever their size.',
    fallback: '1048576',
    section: 'middleware',
    apply: middleware('maxRequestBytes', integer),
  },
  {
    name: 'on-backend-error',
    value: 'fail-closed|fail-open',
    help: 'Backend unreachable: fail-closed answers 503; fail-open forwards the request without idempotency.',
    fallback: 'fail-closed',
    section: 'middleware',
    apply: middleware('onBackendError', (value, name) => oneOf(value, name, ['fail-closed', 'fail-open'])),
  },
  {
    name: 'on-conflict',
    value: 'reject|wait',
    help:
      'A repeat that arrives while the first request with its key runs: reject answers 409 at once (with ' +
      'Retry-After); wait holds it up to --wait-timeout for the first to finish and answers with its response ' +
      '(on PostgreSQL this turns LISTEN/NOTIFY on, on Redis pub/sub, to wake it at once: give every proxy the ' +
      'same setting).',
    fallback: 'reject',
    section: 'middleware',
    apply: middleware('onConflict', (value, name) => oneOf(value, name, ['reject', 'wait'])),
  },
  {
    name: 'wait-timeout',
    value: 'SECONDS',
    help: 'With --on-conflict wait: how long a repeat waits before it gets 409.',
    fallback: '10',
    section: 'middleware',
    apply: middleware('waitTimeout', seconds),
  },
  {
    name: 'backend-timeout',
    value: 'SECONDS',
    help: 'How long a backend call may take before it counts as failed (then --on-backend-error applies).',
    fallback: '2',
    section: 'middleware',
    apply: middleware('backendTimeout', seconds),
  },
  {
    name: 'error-format',
    value: 'detail|problem',
    help: 'Error bodies: {"detail": "..."} JSON, or RFC 9457 application/problem+json.',
    fallback: 'detail',
    section: 'middleware',
    apply: middleware('errorFormat', (value, name) => oneOf(value, name, ['detail', 'problem'])),
  },
];

/**
 * The flag that sets each middleware option: adding an option to the engine without a flag here (or saying why
 * none is needed) fails the type check.
 */
export const OPTION_FLAGS: Record<keyof IdempotencyOptions, string> = {
  backend: 'backend',
  idempotencyHeaderKey: 'idempotency-header-key',
  replayHeaderKey: 'replay-header-key',
  enforceUuid4Formatting: 'enforce-uuid4-formatting',
  expiry: 'expiry',
  applicableMethods: 'applicable-methods',
  required: 'required',
  fingerprint: 'fingerprint',
  scope: 'scope-header',
  lockTimeout: 'lock-timeout',
  maxKeyLength: 'max-key-length',
  cacheableContentTypes: 'cacheable-content-types',
  cacheServerErrors: 'cache-server-errors',
  releaseStatuses: 'release-statuses',
  maxResponseBytes: 'max-response-bytes',
  unstoredResponses: 'unstored-responses',
  maxRequestBytes: 'max-request-bytes',
  onBackendError: 'on-backend-error',
  backendTimeout: 'backend-timeout',
  onConflict: 'on-conflict',
  waitTimeout: 'wait-timeout',
  errorFormat: 'error-format',
  onEvent: 'log',
};

const BY_NAME = new Map(FLAGS.map((flag) => [flag.name, flag]));

function parseSwitch(raw: string, name: string): boolean {
  const value = raw.trim().toLowerCase();
  if (['true', '1', 'yes', 'on'].includes(value)) return true;
  if (['false', '0', 'no', 'off'].includes(value)) return false;
  throw new UsageError(`--${name} is on or off: true or false, not ${JSON.stringify(raw)}`);
}

/**
 * Reads `idempotency-header proxy [flags]` (the arguments after the program name) and the environment into a
 * command. Throws {@link UsageError} naming the flag at fault.
 */
export function parseCommand(
  argv: readonly string[],
  env: Readonly<Record<string, string | undefined>>,
): Command {
  const args = [...argv];
  if (args.includes('--help') || args.includes('-h') || args[0] === 'help') return { kind: 'help' };
  if (args[0] === '--version' || args[0] === '-v') return { kind: 'version' };
  const command = args.shift();
  if (command === undefined) return { kind: 'help' };
  if (command !== 'proxy')
    throw new UsageError(
      `Unknown command ${JSON.stringify(command)}: the commands are proxy, inspect and forget`,
    );

  const draft: Draft = {
    upstream: undefined,
    port: 8081,
    host: '127.0.0.1',
    backend: 'memory',
    prefix: undefined,
    table: undefined,
    scopeHeaders: [],
    healthPath: '/healthz',
    log: 'json',
    shutdownTimeout: 30,
    middleware: {},
  };
  // Environment first, then the command line over it.
  for (const flag of FLAGS) {
    const value = env[envName(flag.name)];
    if (value === undefined) continue;
    try {
      flag.apply(draft, flag.value === undefined ? parseSwitch(value, flag.name) : value, flag.name);
    } catch (error) {
      if (error instanceof UsageError) {
        throw new UsageError(`${envName(flag.name)} (${error.message.replace(/^--\S+ /, '')})`);
      }
      throw error;
    }
  }
  while (args.length > 0) {
    const arg = args.shift()!;
    if (!arg.startsWith('--')) throw new UsageError(`Unexpected argument ${JSON.stringify(arg)}`);
    const equals = arg.indexOf('=');
    let name = equals === -1 ? arg.slice(2) : arg.slice(2, equals);
    let inline: string | undefined = equals === -1 ? undefined : arg.slice(equals + 1);
    let negated = false;
    if (!BY_NAME.has(name) && name.startsWith('no-') && BY_NAME.get(name.slice(3))?.value === undefined) {
      name = name.slice(3);
      negated = true;
    }
    const flag = BY_NAME.get(name);
    if (flag === undefined) throw new UsageError(`Unknown flag --${name} (see --help)`);
    if (flag.value === undefined) {
      if (negated && inline !== undefined) throw new UsageError(`--no-${name} takes no value`);
      flag.apply(draft, negated ? false : inline === undefined ? true : parseSwitch(inline, name), name);
      continue;
    }
    if (inline === undefined) {
      inline = args.shift();
      if (inline === undefined) throw new UsageError(`--${name} needs a value (${flag.value})`);
    }
    flag.apply(draft, inline, name);
  }
  if (draft.upstream === undefined) {
    throw new UsageError(
      `--upstream is required (or ${envName('upstream')}), e.g. --upstream http://127.0.0.1:8080`,
    );
  }
  return { kind: 'run', config: { ...draft, upstream: draft.upstream } };
}

/**
 * The `scope` function of `--scope-header`: a SHA-256 of the named headers' values, so that keys are namespaced
 * per credential without the credential ever being written to the backend. `undefined` when none is sent.
 */
export function scopeFromHeaders(
  names: readonly string[],
): ((req: IncomingMessage) => string | undefined) | undefined {
  if (names.length === 0) return undefined;
  return function scopeFromHeaders(req) {
    let seen = false;
    const hash = createHash('sha256');
    for (const name of names) {
      const header = req.headers[name];
      const value = Array.isArray(header) ? header.join('\n') : header;
      if (value !== undefined) seen = true;
      // Length-prefixed, so that no two sets of values hash alike by moving text from one header to the next.
      hash.update(value === undefined ? '-;' : `${value.length}:${value};`);
    }
    return seen ? hash.digest('hex') : undefined;
  };
}

/** The `--help` text: every flag with its variable, its default and what it does. */
export function helpText(version: string): string {
  const wrap = (line: string, indent: string) => {
    const words = line.split(' ');
    const lines: string[] = [];
    let current = '';
    for (const word of words) {
      if (current !== '' && current.length + word.length + 1 > 76) {
        lines.push(current);
        current = word;
      } else current = current === '' ? word : `${current} ${word}`;
    }
    if (current !== '') lines.push(current);
    return lines.map((piece) => indent + piece).join('\n');
  };
  const describe = (flag: Flag) => {
    const head =
      flag.value === undefined ? `  --${flag.name}, --no-${flag.name}` : `  --${flag.name} ${flag.value}`;
    return [
      head,
      wrap(flag.help, '      '),
      `      default: ${flag.fallback}; environment: ${envName(flag.name)}`,
    ].join('\n');
  };
  return [
    `idempotency-header ${version}: a reverse proxy that makes a service's POST and PATCH endpoints safe to retry`,
    'with an Idempotency-Key header: the first request runs, repeats get its stored response, a repeat while it',
    'runs gets 409, a key reused for another request gets 422. Every other request passes through untouched.',
    '',
    'Usage:',
    '  idempotency-header proxy --upstream URL [--port PORT] [--backend SPEC] [flags]',
    '  idempotency-header inspect KEY --backend SPEC [--scope TEXT]    (the state of a key; inspect --help)',
    '  idempotency-header forget KEY --backend SPEC [--force]          (delete a key; forget --help)',
    '  idempotency-header --help | --version',
    '',
    'Example:',
    '  npx idempotency-header proxy --upstream http://127.0.0.1:8080 --port 8081 --backend redis://127.0.0.1:6379',
    '',
    'Every flag can be set from the environment instead: --lock-timeout 30 is IDEMPOTENCY_LOCK_TIMEOUT=30, and',
    'a switch takes true or false (IDEMPOTENCY_REQUIRED=true). A flag on the command line wins. A switch is',
    'turned on by --flag and off by --no-flag or --flag=false.',
    '',
    'Proxy:',
    ...FLAGS.filter((flag) => flag.section === 'proxy').map(describe),
    '',
    'Middleware (the options of idempotency-header, one flag each):',
    ...FLAGS.filter((flag) => flag.section === 'middleware').map(describe),
    '',
    'Requests: hop-by-hop headers (Connection and those it names, Keep-Alive, TE, Trailer, Transfer-Encoding,',
    'Upgrade, Proxy-*) end at the proxy; X-Forwarded-For, -Proto and -Host are added; Host is passed on. If',
    'the upstream cannot be reached the answer is 502 and the key is released; if it fails once it has the',
    'request, 502 and the key waits out its lease (the request may have run). Signals: SIGTERM or SIGINT stop',
    'the proxy gracefully; a second one stops it at once.',
  ].join('\n');
}
