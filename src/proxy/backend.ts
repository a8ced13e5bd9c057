/**
 * The proxy's backend, from its `--backend` value: `memory`, a `redis://` or `rediss://` URL, a `postgres://` or
 * `postgresql://` URL, a `mysql://` or `mariadb://` URL, or `sqlite:PATH`. The driver the value needs is an
 * optional peer dependency, loaded here on demand with a dynamic `import()`: running on Redis needs no `pg`.
 */
import { existsSync } from 'node:fs';
import { MemoryBackend } from '../backends/memory.js';
import { MysqlBackend } from '../backends/mysql.js';
import { PostgresBackend } from '../backends/postgres.js';
import { RedisBackend } from '../backends/redis.js';
import { SqliteBackend } from '../backends/sqlite.js';
import { IdempotencyError } from '../core/errors.js';
import type { Backend } from '../core/types.js';

/** A backend ready for the proxy, and how to let go of its connections once the proxy has stopped. */
export interface OpenedBackend {
  readonly backend: Backend;
  /** The backend's class name, for the start-up log line. */
  readonly name: string;
  /** Where it lives, with any password removed, for the start-up log line. */
  readonly location: string;
  /** Closes the driver's connections (or the memory backend's sweep timer). */
  close(): Promise<void>;
}

/** Settings of the backend that are not in its URL. */
export interface BackendSettings {
  /** Redis key prefix. @default 'idempotency:' */
  prefix?: string;
  /** SQL table. @default 'idempotency_keys' */
  table?: string;
  /**
   * PostgreSQL and Redis: announce stores and releases (`NOTIFY`, `PUBLISH`), so that repeats waiting with
   * `onConflict: 'wait'` are woken at once instead of polling. @default false
   */
  notifications?: boolean;
  /** Reports driver errors (connection lost, reconnecting) so that they are seen, never thrown. */
  onDriverError?: (driver: string, error: Error) => void;
  /**
   * SQL: create the table on first use when it is missing. `false` for commands that only read or delete keys
   * (`inspect`, `forget`): a mistyped table is then an error, not a new empty table that holds nothing, and a
   * SQLite file must exist. @default true
   */
  createTable?: boolean;
}

/** Loads a module by name: `import()` in production, a stand-in in tests. */
export type ModuleLoader = (name: string) => Promise<unknown>;

/**
 * The error for a `--backend` value, a driver that is missing, or a setting the backend refuses (`--prefix`,
 * `--table`); its message says what to do.
 */
export class BackendSetupError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BackendSetupError';
  }
}

/** How long start-up waits for the backend to answer before it goes on (requests get 503 until it does). */
const CONNECT_WAIT_MS = 5_000;
/** The drivers' time to give up on an unreachable server, so that requests get 503 rather than wait. */
const CONNECT_TIMEOUT_MS = 2_000;

const importModule: ModuleLoader = (name) => import(name);

/**
 * Opens the backend a `--backend` value names. Throws {@link BackendSetupError} for a value it does not
 * understand, a setting the backend refuses, or a driver that is not installed, naming the package to install.
 *
 * @example
 * ```ts
 * const { backend, close } = await openBackend('redis://127.0.0.1:6379', { prefix: 'orders:' });
 * ```
 */
export async function openBackend(
  spec: string,
  settings: BackendSettings = {},
  load: ModuleLoader = importModule,
): Promise<OpenedBackend> {
  const report = settings.onDriverError ?? (() => {});
  if (spec === 'memory') {
    const backend = new MemoryBackend();
    return { backend, name: 'MemoryBackend', location: 'memory', close: async () => backend.close() };
  }
  if (spec.startsWith('sqlite:')) return openSqlite(spec.slice('sqlite:'.length), settings, load);
  let url: URL;
  try {
    url = new URL(spec);
  } catch {
    throw unknownBackend(spec);
  }
  switch (url.protocol) {
    case 'redis:':
    case 'rediss:':
      return openRedis(url, settings, report, load);
    case 'postgres:':
    case 'postgresql:':
      return openPostgres(url, settings, report, load);
    case 'mysql:':
    case 'mariadb:':
      return openMysql(url, settings, load);
    default:
      throw unknownBackend(spec);
  }
}

function unknownBackend(spec: string): BackendSetupError {
  return new BackendSetupError(
    `--backend ${JSON.stringify(spec)} is not a backend: use memory, redis://HOST:PORT, ` +
      'postgres://USER@HOST:PORT/DATABASE, mysql://USER@HOST:PORT/DATABASE or sqlite:PATH',
  );
}

/** The URL without its password, for logs. */
function redact(url: URL): string {
  const copy = new URL(url.href);
  if (copy.password !== '') copy.password = '***';
  return copy.href;
}

/**
 * Imports the first of `names` that is installed. A module that is installed but fails to load is an error of
 * its own, reported as it is rather than as missing.
 */
async function loadDriver(names: readonly string[], backendName: string, load: ModuleLoader) {
  for (const name of names) {
    try {
      return { name, module: (await load(name)) as Record<string, unknown> };
    } catch (error) {
      if (!isNotFound(error, packageOf(name))) {
        throw new BackendSetupError(`The ${name} package could not be loaded: ${(error as Error).message}`, {
          cause: error,
        });
      }
    }
  }
  const packages = names.map(packageOf);
  const choices = packages.map((name) => `\`${name}\``).join(' or ');
  throw new BackendSetupError(
    `The ${backendName} backend needs the ${choices} package, which is not installed. ` +
      `Install it beside idempotency-header: npm install ${packages[0]}`,
  );
}

/** The package a module specifier is in: `mysql2` for `mysql2/promise`, `@scope/name` for `@scope/name/sub`. */
function packageOf(specifier: string): string {
  const parts = specifier.split('/');
  return specifier.startsWith('@') ? parts.slice(0, 2).join('/') : parts[0]!;
}

function isNotFound(error: unknown, name: string): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  if (code !== 'ERR_MODULE_NOT_FOUND' && code !== 'MODULE_NOT_FOUND') return false;
  // A missing dependency *of* the driver is a broken install, not a missing driver.
  return (
    String((error as Error).message).includes(`'${name}'`) || !String((error as Error).message).includes("'")
  );
}

/** A module's default export, or the module itself (CommonJS packages imported from ESM). */
function exportOf<T>(module: Record<string, unknown>, name: string): T {
  return (module[name] ?? (module.default as Record<string, unknown> | undefined)?.[name]) as T;
}

interface IoredisLike {
  on(event: 'error', listener: (error: Error) => void): unknown;
  once(event: 'ready', listener: () => void): unknown;
  status: string;
  quit(): Promise<unknown>;
  disconnect(): void;
}

interface NodeRedisLike {
  on(event: 'error', listener: (error: Error) => void): unknown;
  connect(): Promise<unknown>;
  quit?(): Promise<unknown>;
  close?(): Promise<unknown>;
  destroy?(): void;
  disconnect?(): Promise<unknown>;
}

async function openRedis(
  url: URL,
  settings: BackendSettings,
  report: (driver: string, error: Error) => void,
  load: ModuleLoader,
): Promise<OpenedBackend> {
  const driver = await loadDriver(['ioredis', 'redis'], 'Redis', load);
  const { client, quit } =
    driver.name === 'ioredis'
      ? await connectIoredis(driver.module, url, report)
      : await connectNodeRedis(driver.module, url, report);
  const backend = await made(
    () =>
      new RedisBackend({
        redis: client as never,
        prefix: settings.prefix,
        notifications: settings.notifications ?? false,
      }),
    quit,
  );
  return {
    backend,
    name: 'RedisBackend',
    location: redact(url),
    close: async () => {
      await backend.close().catch(() => {});
      await quit();
    },
  };
}

/** A connected Redis client, and how to close it within a second. */
interface RedisConnection {
  readonly client: unknown;
  quit(): Promise<void>;
}

async function connectIoredis(
  module: Record<string, unknown>,
  url: URL,
  report: (driver: string, error: Error) => void,
): Promise<RedisConnection> {
  const Redis = exportOf<new (url: string, options: object) => IoredisLike>(module, 'Redis');
  // Fail fast while Redis is away (RedisBackend's documented settings): a request gets a 503 at once instead of
  // waiting for a reconnect, and a command that failed is never resent after one (it could take a lock).
  // Auto-pipelining, as the README advises: concurrent requests share socket writes and reads.
  const redis = new Redis(url.href, {
    enableOfflineQueue: false,
    maxRetriesPerRequest: 0,
    autoResendUnfulfilledCommands: false,
    commandTimeout: CONNECT_TIMEOUT_MS,
    connectTimeout: CONNECT_TIMEOUT_MS,
    enableAutoPipelining: true,
  });
  redis.on('error', (error) => report('ioredis', error));
  await waitFor(new Promise<void>((resolve) => redis.once('ready', resolve)));
  return {
    client: redis,
    quit: async () => {
      await waitFor(
        redis.quit().catch(() => {}),
        1_000,
      );
      redis.disconnect();
    },
  };
}

async function connectNodeRedis(
  module: Record<string, unknown>,
  url: URL,
  report: (driver: string, error: Error) => void,
): Promise<RedisConnection> {
  const createClient = exportOf<(options: object) => NodeRedisLike>(module, 'createClient');
  const client = createClient({
    url: url.href,
    disableOfflineQueue: true,
    pingInterval: 1_000,
    socket: {
      connectTimeout: CONNECT_TIMEOUT_MS,
      socketTimeout: 3_000,
      reconnectStrategy: (retries: number) => Math.min(retries * 100, 2_000),
    },
  });
  client.on('error', (error) => report('redis', error));
  await waitFor(client.connect().catch(() => {}));
  return {
    client,
    quit: async () => {
      const closing = client.close?.() ?? client.quit?.();
      await waitFor(
        Promise.resolve(closing).catch(() => {}),
        1_000,
      );
      client.destroy?.();
    },
  };
}

interface PoolLike {
  on(event: 'error', listener: (error: Error) => void): unknown;
  query(text: string): Promise<unknown>;
  connect(): Promise<unknown>;
  end(): Promise<unknown>;
}

async function openPostgres(
  url: URL,
  settings: BackendSettings,
  report: (driver: string, error: Error) => void,
  load: ModuleLoader,
): Promise<OpenedBackend> {
  const driver = await loadDriver(['pg'], 'PostgreSQL', load);
  const Pool = exportOf<new (options: object) => PoolLike>(driver.module, 'Pool');
  const pool = new Pool({ connectionString: url.href, connectionTimeoutMillis: CONNECT_TIMEOUT_MS, max: 10 });
  // An idle client's error (the server restarted) is reported on the pool; unheard, it would end the process.
  pool.on('error', (error) => report('pg', error));
  const backend = await made(
    () =>
      new PostgresBackend({
        pool: pool as never,
        table: settings.table,
        notifications: settings.notifications ?? false,
        createTable: settings.createTable ?? true,
      }),
    () => pool.end(),
  );
  await waitFor(pool.query('SELECT 1').catch((error: Error) => report('pg', error)));
  return {
    backend,
    name: 'PostgresBackend',
    location: redact(url),
    close: async () => {
      await backend.close().catch(() => {});
      await pool.end().catch(() => {});
    },
  };
}

interface MysqlPoolLike {
  query(text: string): Promise<unknown>;
  end(): Promise<unknown>;
}

async function openMysql(url: URL, settings: BackendSettings, load: ModuleLoader): Promise<OpenedBackend> {
  const driver = await loadDriver(['mysql2/promise'], 'MySQL', load);
  const createPool = exportOf<(options: object) => MysqlPoolLike>(driver.module, 'createPool');
  // mysql2 reads only mysql:// URLs; a MariaDB server speaks the same protocol.
  const uri = url.protocol === 'mariadb:' ? `mysql:${url.href.slice('mariadb:'.length)}` : url.href;
  const pool = createPool({ uri, connectTimeout: CONNECT_TIMEOUT_MS, connectionLimit: 10 });
  const backend = await made(
    () =>
      new MysqlBackend({
        pool: pool as never,
        table: settings.table,
        createTable: settings.createTable ?? true,
      }),
    () => pool.end(),
  );
  await waitFor(pool.query('SELECT 1').catch(() => {}));
  return {
    backend,
    name: 'MysqlBackend',
    location: redact(url),
    close: async () => {
      await pool.end().catch(() => {});
    },
  };
}

async function openSqlite(
  path: string,
  settings: BackendSettings,
  load: ModuleLoader,
): Promise<OpenedBackend> {
  if (path === '')
    throw new BackendSetupError('--backend sqlite:PATH needs a file path, e.g. sqlite:./idempotency.db');
  // SqliteBackend loads better-sqlite3 itself on first use; loading it now turns a missing driver into a start-up
  // error rather than a 503 on the first request.
  await loadDriver(['better-sqlite3'], 'SQLite', load);
  const createTable = settings.createTable ?? true;
  // Opening a file that is not there would create it: a mistyped path would seem to hold no keys.
  if (!createTable && !existsSync(path)) {
    throw new BackendSetupError(`--backend sqlite:${path}: no such file`);
  }
  const backend = await made(
    () => new SqliteBackend({ database: path, table: settings.table, createTable }),
    async () => {},
  );
  return {
    backend,
    name: 'SqliteBackend',
    location: `sqlite:${path}`,
    close: async () => backend.close(),
  };
}

/**
 * The backend `make` builds, before start-up waits for its server: an option it refuses (`--prefix`, `--table`)
 * is a bad command line, reported as such once the driver's connections are closed.
 */
async function made<T>(make: () => T, close: () => Promise<unknown>): Promise<T> {
  try {
    return make();
  } catch (error) {
    await close().catch(() => {});
    if (error instanceof IdempotencyError && error.code === 'ERR_IDEMPOTENCY_OPTION') {
      throw new BackendSetupError(error.message, { cause: error });
    }
    throw error;
  }
}

/** Waits for `promise`, at most `ms`: start-up goes on without a backend that does not answer yet. */
function waitFor(promise: Promise<unknown>, ms = CONNECT_WAIT_MS): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    (timer as { unref?: () => void }).unref?.();
    promise.then(
      () => {
        clearTimeout(timer);
        resolve();
      },
      () => {
        clearTimeout(timer);
        resolve();
      },
    );
  });
}
