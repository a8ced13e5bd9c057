/**
 * The proxy's command line: flags and their environment variables, `--help`, the errors it names, and the
 * backend drivers it loads on demand (with the driver missing, a message that says what to install).
 */
import type { IncomingMessage } from 'node:http';
import { describe, expect, it } from 'vitest';
import { KNOWN_OPTIONS } from '../../src/core/options.js';
import { BackendSetupError, type ModuleLoader, openBackend } from '../../src/proxy/backend.js';
import {
  envName,
  FLAGS,
  helpText,
  OPTION_FLAGS,
  type ProxyConfig,
  parseCommand,
  scopeFromHeaders,
  UsageError,
} from '../../src/proxy/config.js';
import { main } from '../../src/proxy/main.js';
import { runCommand } from './processes.js';

const UPSTREAM = ['--upstream', 'http://127.0.0.1:8080'];

function config(argv: string[], env: Record<string, string> = {}): ProxyConfig {
  const command = parseCommand(['proxy', ...argv], env);
  if (command.kind !== 'run') throw new Error(`not a run: ${command.kind}`);
  return command.config;
}

function usageError(argv: string[], env: Record<string, string> = {}): string {
  try {
    parseCommand(argv, env);
  } catch (error) {
    expect(error).toBeInstanceOf(UsageError);
    return (error as Error).message;
  }
  throw new Error('no error');
}

describe('parseCommand', () => {
  it('defaults to port 8081 on 127.0.0.1, the memory backend, /healthz, JSON logs and a 30 s drain', () => {
    expect(config(UPSTREAM)).toEqual({
      upstream: new URL('http://127.0.0.1:8080'),
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
    });
  });

  it('reads every middleware option from its flag, in the engine’s types', () => {
    const parsed = config([
      ...UPSTREAM,
      '--idempotency-header-key',
      'X-Key',
      '--replay-header-key=X-Replayed',
      '--enforce-uuid4-formatting',
      '--expiry',
      'forever',
      '--applicable-methods',
      'post, put',
      '--required=true',
      '--no-fingerprint',
      '--lock-timeout',
      '2.5',
      '--max-key-length',
      '64',
      '--cacheable-content-types',
      'application/json,text/*',
      '--cache-server-errors',
      '--release-statuses',
      '401,429',
      '--max-response-bytes',
      '2048',
      '--unstored-responses',
      'release',
      '--max-request-bytes',
      '4096',
      '--on-backend-error',
      'fail-open',
      '--on-conflict',
      'wait',
      '--wait-timeout',
      '3',
      '--backend-timeout',
      '1',
      '--error-format',
      'problem',
    ]);
    expect(parsed.middleware).toEqual({
      idempotencyHeaderKey: 'X-Key',
      replayHeaderKey: 'X-Replayed',
      enforceUuid4Formatting: true,
      expiry: null,
      applicableMethods: ['post', 'put'],
      required: true,
      fingerprint: false,
      lockTimeout: 2.5,
      maxKeyLength: 64,
      cacheableContentTypes: ['application/json', 'text/*'],
      cacheServerErrors: true,
      releaseStatuses: [401, 429],
      maxResponseBytes: 2048,
      unstoredResponses: 'release',
      maxRequestBytes: 4096,
      onBackendError: 'fail-open',
      onConflict: 'wait',
      waitTimeout: 3,
      backendTimeout: 1,
      errorFormat: 'problem',
    });
    expect(config([...UPSTREAM, '--cacheable-content-types', '*']).middleware.cacheableContentTypes).toBe(
      '*',
    );
    expect(config([...UPSTREAM, '--expiry', '60']).middleware.expiry).toBe(60);
  });

  it('reads every flag from its IDEMPOTENCY_* variable, and a flag on the command line wins', () => {
    const env = {
      IDEMPOTENCY_UPSTREAM: 'https://api.internal:8443/v1',
      IDEMPOTENCY_PORT: '9000',
      IDEMPOTENCY_HOST: '0.0.0.0',
      IDEMPOTENCY_BACKEND: 'redis://cache:6379',
      IDEMPOTENCY_PREFIX: 'shop:',
      IDEMPOTENCY_TABLE: 'shop_keys',
      IDEMPOTENCY_SCOPE_HEADER: 'Authorization',
      IDEMPOTENCY_HEALTH_PATH: '',
      IDEMPOTENCY_LOG: 'none',
      IDEMPOTENCY_SHUTDOWN_TIMEOUT: '5',
      IDEMPOTENCY_REQUIRED: 'true',
      IDEMPOTENCY_FINGERPRINT: 'false',
      IDEMPOTENCY_LOCK_TIMEOUT: '30',
      IDEMPOTENCY_IDEMPOTENCY_HEADER_KEY: 'X-Key',
    };
    const fromEnv = parseCommand(['proxy'], env);
    expect(fromEnv).toEqual({
      kind: 'run',
      config: {
        upstream: new URL('https://api.internal:8443/v1'),
        port: 9000,
        host: '0.0.0.0',
        backend: 'redis://cache:6379',
        prefix: 'shop:',
        table: 'shop_keys',
        scopeHeaders: ['authorization'],
        healthPath: null,
        log: 'none',
        shutdownTimeout: 5,
        middleware: { required: true, fingerprint: false, lockTimeout: 30, idempotencyHeaderKey: 'X-Key' },
      },
    });
    const overridden = config(['--port', '9001', '--fingerprint', '--lock-timeout=10'], env);
    expect(overridden.port).toBe(9001);
    expect(overridden.middleware).toMatchObject({ fingerprint: true, lockTimeout: 10, required: true });
  });

  it('names the variable of a bad environment value', () => {
    expect(usageError(['proxy', ...UPSTREAM], { IDEMPOTENCY_REQUIRED: 'maybe' })).toMatch(
      /^IDEMPOTENCY_REQUIRED/,
    );
    expect(usageError(['proxy', ...UPSTREAM], { IDEMPOTENCY_PORT: 'http' })).toMatch(/^IDEMPOTENCY_PORT/);
  });

  it.each([
    [['proxy'], /--upstream is required/],
    [['serve', ...UPSTREAM], /Unknown command "serve"/],
    [['proxy', ...UPSTREAM, '--lock-timout', '3'], /Unknown flag --lock-timout/],
    [['proxy', ...UPSTREAM, '--port'], /--port needs a value/],
    [['proxy', ...UPSTREAM, '--port', '70000'], /--port must be at most 65535/],
    [['proxy', ...UPSTREAM, '--max-key-length', '1.5'], /--max-key-length must be a whole number/],
    [['proxy', ...UPSTREAM, '--lock-timeout', '-1'], /--lock-timeout must be a positive number/],
    [['proxy', ...UPSTREAM, '--error-format', 'xml'], /--error-format must be detail or problem/],
    [['proxy', ...UPSTREAM, '--required=perhaps'], /--required is on or off/],
    [['proxy', ...UPSTREAM, '--no-required=true'], /--no-required takes no value/],
    [['proxy', '--upstream', 'ftp://files'], /--upstream must be an http:\/\/ or https:\/\/ URL/],
    [['proxy', '--upstream', 'localhost'], /--upstream must be a URL/],
    [['proxy', ...UPSTREAM, 'extra'], /Unexpected argument "extra"/],
    [['proxy', ...UPSTREAM, '--health-path', 'healthz'], /--health-path must start with \//],
  ])('refuses %j', (argv, message) => {
    expect(usageError(argv)).toMatch(message);
  });

  it('answers help and version', () => {
    expect(parseCommand([], {})).toEqual({ kind: 'help' });
    expect(parseCommand(['proxy', '--help'], {})).toEqual({ kind: 'help' });
    expect(parseCommand(['--version'], {})).toEqual({ kind: 'version' });
  });
});

describe('--help', () => {
  it('has a flag for every middleware option', () => {
    const names = new Set(FLAGS.map((flag) => flag.name));
    expect(Object.keys(OPTION_FLAGS).sort()).toEqual([...KNOWN_OPTIONS].sort());
    for (const flag of Object.values(OPTION_FLAGS)) expect(names, flag).toContain(flag);
  });

  it('documents every flag, its default and its environment variable', async () => {
    const { code, stdout } = await runCommand(['proxy', '--help']);
    expect(code).toBe(0);
    expect(stdout).toBe(
      `${helpText((await import('../../package.json', { with: { type: 'json' } })).default.version)}\n`,
    );
    for (const flag of FLAGS) {
      expect(stdout, flag.name).toContain(
        flag.value === undefined ? `--${flag.name}, --no-${flag.name}` : `--${flag.name} ${flag.value}`,
      );
      expect(stdout, flag.name).toContain(`environment: ${envName(flag.name)}`);
    }
  }, 30_000);

  it('exits 2 with the flag named on a bad command line', async () => {
    const { code, stderr } = await runCommand([
      'proxy',
      '--upstream',
      'http://127.0.0.1:1',
      '--expiry',
      'soon',
    ]);
    expect(code).toBe(2);
    expect(stderr).toMatch(/--expiry must be a positive number of seconds, not "soon"/);
    expect(stderr).toContain('idempotency-header proxy --help');
  }, 30_000);
});

describe('main', () => {
  it('names the flag of an option the engine refuses, and exits 2', async () => {
    let stderr = '';
    const code = await main(
      ['proxy', ...UPSTREAM, '--lock-timeout', '0.5'],
      {},
      {
        stdout: () => {},
        stderr: (text) => {
          stderr += text;
        },
      },
    );
    expect(code).toBe(2);
    expect(stderr).toMatch(
      /^idempotency-header: Invalid --lock-timeout: expected a number of seconds, at least 1/,
    );
  });

  it('exits 2 for a table name the backend refuses, naming the option', async () => {
    let stderr = '';
    const code = await main(
      [
        'proxy',
        ...UPSTREAM,
        '--backend',
        'sqlite:/tmp/idempotency-header-never-created.db',
        '--table',
        'bad;name',
      ],
      {},
      {
        stdout: () => {},
        stderr: (text) => {
          stderr += text;
        },
      },
    );
    expect(code).toBe(2);
    expect(stderr).toMatch(/Invalid option `table`/);
  });

  it('exits 1 when the port is taken', async () => {
    const { createServer } = await import('node:net');
    const taken = createServer();
    await new Promise<void>((resolve) => taken.listen(0, '127.0.0.1', resolve));
    const port = (taken.address() as { port: number }).port;
    let stderr = '';
    const code = await main(
      ['proxy', ...UPSTREAM, '--port', String(port)],
      {},
      {
        stdout: () => {},
        stderr: (text) => {
          stderr += text;
        },
      },
    );
    taken.close();
    expect(code).toBe(1);
    expect(stderr).toContain(`cannot listen on 127.0.0.1:${port}`);
  });
});

describe('openBackend', () => {
  /** A loader that has only the modules given. */
  const only =
    (modules: Record<string, unknown>): ModuleLoader =>
    async (name) => {
      if (name in modules) return modules[name];
      // As Node.js words it: the package, not the module within it (`mysql2` for `mysql2/promise`).
      const pkg = name.split('/')[0];
      throw Object.assign(new Error(`Cannot find package '${pkg}' imported from /app/cli.mjs`), {
        code: 'ERR_MODULE_NOT_FOUND',
      });
    };

  it('opens the memory backend without any driver', async () => {
    const opened = await openBackend('memory', {}, only({}));
    expect(opened.name).toBe('MemoryBackend');
    await opened.close();
  });

  it.each([
    ['redis://127.0.0.1:6379', /needs the `ioredis` or `redis` package.*npm install ioredis/],
    ['postgres://postgres@127.0.0.1/test', /needs the `pg` package.*npm install pg/],
    ['mysql://root@127.0.0.1/test', /needs the `mysql2` package.*npm install mysql2$/],
    ['sqlite:./keys.db', /needs the `better-sqlite3` package.*npm install better-sqlite3/],
  ])('says which package to install when %s finds no driver', async (spec, message) => {
    const failure = await openBackend(spec, {}, only({})).catch((error: unknown) => error);
    expect(failure).toBeInstanceOf(BackendSetupError);
    expect((failure as Error).message).toMatch(message);
  });

  it('reports a driver that is installed but broken as it is, not as missing', async () => {
    const broken: ModuleLoader = async () => {
      throw Object.assign(new Error("Cannot find package 'cluster-key-slot' imported from ioredis"), {
        code: 'ERR_MODULE_NOT_FOUND',
      });
    };
    await expect(openBackend('redis://127.0.0.1:6379', {}, broken)).rejects.toThrow(
      /The ioredis package could not be loaded: Cannot find package 'cluster-key-slot'/,
    );
  });

  it('falls back to node-redis when ioredis is not installed', async () => {
    const created: object[] = [];
    const client = {
      on: () => client,
      connect: async () => {},
      close: async () => {},
      sendCommand: async () => null,
    };
    const opened = await openBackend(
      'redis://user:hunter2@cache:6379/0',
      { prefix: 'p:' },
      only({
        redis: {
          createClient: (options: object) => {
            created.push(options);
            return client;
          },
        },
      }),
    );
    expect(opened.name).toBe('RedisBackend');
    expect(opened.location).toBe('redis://user:***@cache:6379/0');
    expect(created).toEqual([
      expect.objectContaining({ url: 'redis://user:hunter2@cache:6379/0', disableOfflineQueue: true }),
    ]);
    await opened.close();
  });

  it.each(['mongodb://db', 'memcached', 'sqlite:'])('refuses %j, listing the backends', async (spec) => {
    await expect(openBackend(spec, {}, only({}))).rejects.toThrow(BackendSetupError);
  });
});

describe('scopeFromHeaders', () => {
  const req = (headers: Record<string, string | string[]>) => ({ headers }) as unknown as IncomingMessage;

  it('is a SHA-256 of the named headers, never their values, and undefined without them', () => {
    const scope = scopeFromHeaders(['authorization', 'x-tenant'])!;
    const alice = scope(req({ authorization: 'Bearer alice' }))!;
    expect(alice).toMatch(/^[0-9a-f]{64}$/);
    expect(scope(req({ authorization: 'Bearer alice' }))).toBe(alice);
    expect(scope(req({ authorization: 'Bearer bob' }))).not.toBe(alice);
    expect(scope(req({ authorization: 'Bearer alice', 'x-tenant': 't1' }))).not.toBe(alice);
    // Moving text from one header to the next is another scope.
    expect(scope(req({ authorization: 'ab', 'x-tenant': 'c' }))).not.toBe(
      scope(req({ authorization: 'a', 'x-tenant': 'bc' })),
    );
    expect(scope(req({}))).toBeUndefined();
    expect(scopeFromHeaders([])).toBeUndefined();
  });
});
