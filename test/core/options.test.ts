import { describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { IdempotencyEngine } from '../../src/core/engine.js';
import { IdempotencyError } from '../../src/core/errors.js';
import {
  DEFAULT_APPLICABLE_METHODS,
  DEFAULT_EXPIRY,
  DEFAULT_IDEMPOTENCY_HEADER_KEY,
  DEFAULT_LOCK_TIMEOUT,
  DEFAULT_MAX_KEY_LENGTH,
  DEFAULT_MAX_REQUEST_BYTES,
  DEFAULT_MAX_RESPONSE_BYTES,
  DEFAULT_REPLAY_HEADER_KEY,
  type IdempotencyOptions,
} from '../../src/core/options.js';

const backend = new MemoryBackend();

/** Builds an engine from untyped options: invalid values are the point of these tests. */
function construct(options: Record<string, unknown>): IdempotencyEngine {
  return new IdempotencyEngine(options as unknown as IdempotencyOptions);
}

/** The error `construct` throws, asserting that it throws an option error at all. */
function constructionError(options: Record<string, unknown>): IdempotencyError {
  try {
    construct(options);
  } catch (error) {
    expect(error).toBeInstanceOf(IdempotencyError);
    expect((error as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_OPTION');
    return error as IdempotencyError;
  }
  throw new Error(`construction with ${JSON.stringify(Object.keys(options))} did not throw`);
}

/** [option, invalid value]: each must throw an option error naming the option. */
const INVALID: readonly [string, unknown][] = [
  ['idempotencyHeaderKey', 'bad header'],
  ['idempotencyHeaderKey', ''],
  ['idempotencyHeaderKey', 42],
  ['idempotencyHeaderKey', 'Idempotency-Key:'],
  ['replayHeaderKey', 'bad header'],
  ['replayHeaderKey', ''],
  ['replayHeaderKey', true],
  ['enforceUuid4Formatting', 'true'],
  ['enforceUuid4Formatting', 1],
  ['expiry', 0],
  ['expiry', -1],
  ['expiry', '10'],
  ['expiry', Number.NaN],
  ['expiry', Number.POSITIVE_INFINITY],
  ['expiry', false],
  ['expiry', 1e13],
  ['expiry', 3.2e9],
  ['applicableMethods', []],
  ['applicableMethods', ['PO ST']],
  ['applicableMethods', 'POST'],
  ['applicableMethods', ['POST', 7]],
  ['applicableMethods', ['']],
  ['applicableMethods', null],
  ['required', 'yes'],
  ['required', 0],
  ['fingerprint', 'yes'],
  ['fingerprint', 1],
  ['fingerprint', null],
  ['scope', 'x'],
  ['scope', {}],
  ['scope', null],
  ['lockTimeout', 0],
  ['lockTimeout', -5],
  ['lockTimeout', '60'],
  ['lockTimeout', Number.NaN],
  ['lockTimeout', null],
  ['lockTimeout', 0.5],
  ['lockTimeout', 1e12],
  ['releaseStatuses', [99]],
  ['releaseStatuses', [1000]],
  ['releaseStatuses', ['429']],
  ['releaseStatuses', 429],
  ['releaseStatuses', [429.5]],
  ['unstoredResponses', 'keep'],
  ['backendTimeout', 0],
  ['backendTimeout', -1],
  ['backendTimeout', '2'],
  ['backendTimeout', 4e9],
  ['unstoredResponses', true],
  ['maxKeyLength', 1.5],
  ['maxKeyLength', 0],
  ['maxKeyLength', -1],
  ['maxKeyLength', '255'],
  ['maxKeyLength', Number.POSITIVE_INFINITY],
  ['cacheableContentTypes', 'json'],
  ['cacheableContentTypes', 'application/json'],
  ['cacheableContentTypes', ['json']],
  ['cacheableContentTypes', ['application/json', 3]],
  ['cacheableContentTypes', ['application json']],
  ['cacheableContentTypes', ['*']],
  ['cacheableContentTypes', ['application/*+json']],
  ['cacheableContentTypes', ['*/json']],
  ['cacheableContentTypes', null],
  ['cacheServerErrors', 'no'],
  ['cacheServerErrors', 1],
  ['maxResponseBytes', 0],
  ['maxResponseBytes', 1.5],
  ['maxResponseBytes', '1MB'],
  ['maxRequestBytes', 0],
  ['maxRequestBytes', -5],
  ['maxRequestBytes', Number.POSITIVE_INFINITY],
  ['onBackendError', 'open'],
  ['onBackendError', 'fail_closed'],
  ['onBackendError', true],
  ['errorFormat', 'xml'],
  ['errorFormat', 'Problem'],
  ['onEvent', 1],
  ['onEvent', 'console.log'],
  ['onEvent', null],
];

describe('options', () => {
  describe('invalid values fail at construction', () => {
    it('accepts times up to 100 years, which every backend can store, and says so past it', () => {
      const hundredYears = 100 * 365.25 * 24 * 60 * 60;
      const { options } = construct({ backend, expiry: hundredYears, lockTimeout: hundredYears });
      expect(options.expiryMs).toBe(hundredYears * 1000);
      expect(options.lockTimeoutMs).toBe(hundredYears * 1000);
      for (const name of ['expiry', 'lockTimeout', 'waitTimeout', 'backendTimeout']) {
        const error = constructionError({ backend, [name]: hundredYears + 1 });
        expect(error.message).toContain(`\`${name}\``);
        expect(error.message).toContain('at most 3155760000 (100 years)');
      }
    });

    it.each(INVALID)('rejects %s = %j, naming the option', (name, value) => {
      const error = constructionError({ backend, [name]: value });
      expect(error.message).toContain(`\`${name}\``);
    });

    it('covers every option of the public API', () => {
      const named = new Set(INVALID.map(([name]) => name));
      for (const option of [
        'idempotencyHeaderKey',
        'replayHeaderKey',
        'enforceUuid4Formatting',
        'expiry',
        'applicableMethods',
        'required',
        'fingerprint',
        'scope',
        'lockTimeout',
        'maxKeyLength',
        'cacheableContentTypes',
        'cacheServerErrors',
        'maxResponseBytes',
        'maxRequestBytes',
        'onBackendError',
        'errorFormat',
        'onEvent',
      ]) {
        expect(named, option).toContain(option);
      }
    });

    it('says what the option accepts and what it received', () => {
      const error = constructionError({ backend, expiry: -1 });
      expect(error.message).toMatch(/positive number of seconds/);
      expect(error.message).toMatch(/null/);
      expect(error.message).toContain('-1');
      expect(constructionError({ backend, errorFormat: 'xml' }).message).toMatch(
        /'detail' or 'problem'.*"xml"/,
      );
    });

    it('rejects a missing backend', () => {
      expect(constructionError({}).message).toContain('`backend`');
      expect(constructionError({ backend: undefined }).message).toContain('`backend`');
      expect(constructionError({ expiry: 10 }).message).toContain('`backend`');
    });

    it.each([
      ['an empty object', {}],
      ['null', null],
      ['a string', 'memory'],
      ['a class instead of an instance', MemoryBackend],
      [
        'an object missing renew',
        { acquire: () => undefined, complete: () => undefined, release: () => undefined },
      ],
    ])('rejects %s as backend', (_, value) => {
      expect(constructionError({ backend: value }).message).toContain('`backend`');
    });

    it('accepts any object with the four backend methods, class instance or not', () => {
      const plain = {
        acquire: () => ({ state: 'acquired', token: '1' }),
        complete: () => true,
        release: () => true,
        renew: () => true,
      };
      expect(construct({ backend: plain }).options.backend).toBe(plain);
    });

    it('rejects an unknown option name, naming it', () => {
      const error = constructionError({ backend, expiery: 10 });
      expect(error.message).toContain('`expiery`');
    });

    it.each([
      ['undefined', undefined],
      ['null', null],
      ['a string', 'options'],
    ])('rejects %s in place of the options object', (_, value) => {
      let thrown: unknown;
      try {
        new IdempotencyEngine(value as unknown as IdempotencyOptions);
      } catch (error) {
        thrown = error;
      }
      expect(thrown).toBeInstanceOf(IdempotencyError);
      expect((thrown as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_OPTION');
    });

    it('is an Error subclass with a stable name', () => {
      const error = constructionError({ backend, lockTimeout: 0 });
      expect(error).toBeInstanceOf(Error);
      expect(error.name).toBe('IdempotencyError');
    });
  });

  describe('defaults', () => {
    it('resolves every option to its documented default', () => {
      const { options } = construct({ backend });
      expect(options.backend).toBe(backend);
      expect(options.headerName).toBe(DEFAULT_IDEMPOTENCY_HEADER_KEY);
      expect(options.headerName).toBe('Idempotency-Key');
      expect(options.headerNameLower).toBe('idempotency-key');
      expect(options.replayHeaderKey).toBe(DEFAULT_REPLAY_HEADER_KEY);
      expect(options.replayHeaderKey).toBe('Idempotent-Replayed');
      expect(options.enforceUuid4Formatting).toBe(false);
      expect(options.expiryMs).toBe(DEFAULT_EXPIRY * 1000);
      expect(options.expiryMs).toBe(86_400_000);
      expect([...options.applicableMethods]).toEqual(['POST', 'PATCH']);
      expect(DEFAULT_APPLICABLE_METHODS).toEqual(['POST', 'PATCH']);
      expect(options.required).toBe(false);
      expect(options.fingerprint).toBe(true);
      expect(options.scope).toBeUndefined();
      expect(options.lockTimeoutMs).toBe(DEFAULT_LOCK_TIMEOUT * 1000);
      expect(options.lockTimeoutMs).toBe(60_000);
      expect(options.maxKeyLength).toBe(DEFAULT_MAX_KEY_LENGTH);
      expect(options.maxKeyLength).toBe(255);
      expect(options.isCacheableType('application/json')).toBe(true);
      expect(options.isCacheableType('text/plain')).toBe(false);
      expect(options.cacheServerErrors).toBe(false);
      expect(options.maxResponseBytes).toBe(DEFAULT_MAX_RESPONSE_BYTES);
      expect(options.maxResponseBytes).toBe(1_048_576);
      expect(options.maxRequestBytes).toBe(DEFAULT_MAX_REQUEST_BYTES);
      expect(options.maxRequestBytes).toBe(1_048_576);
      expect(options.failOpen).toBe(false);
      expect(options.errorFormat).toBe('detail');
      expect(options.onEvent).toBeUndefined();
    });

    it('treats options set to undefined as not given', () => {
      const { options } = construct({
        backend,
        expiry: undefined,
        lockTimeout: undefined,
        onEvent: undefined,
      });
      expect(options.expiryMs).toBe(86_400_000);
      expect(options.lockTimeoutMs).toBe(60_000);
      expect(options.onEvent).toBeUndefined();
    });

    it('exposes the lower-cased header name and the replay header name on the engine', () => {
      const engine = construct({
        backend,
        idempotencyHeaderKey: 'X-Request-Key',
        replayHeaderKey: 'X-Replayed',
      });
      expect(engine.headerName).toBe('x-request-key');
      expect(engine.options.headerName).toBe('X-Request-Key');
      expect(engine.replayHeaderKey).toBe('X-Replayed');
    });
  });

  describe('valid values resolve to internal units', () => {
    it('converts expiry from seconds to milliseconds', () => {
      expect(construct({ backend, expiry: 10 }).options.expiryMs).toBe(10_000);
      expect(construct({ backend, expiry: 0.5 }).options.expiryMs).toBe(500);
    });

    it('keeps expiry: null as null (forever)', () => {
      expect(construct({ backend, expiry: null }).options.expiryMs).toBeNull();
    });

    it('converts lockTimeout from seconds to milliseconds', () => {
      expect(construct({ backend, lockTimeout: 1.5 }).options.lockTimeoutMs).toBe(1500);
      expect(construct({ backend, lockTimeout: 120 }).options.lockTimeoutMs).toBe(120_000);
    });

    it('upper-cases applicable methods', () => {
      const engine = construct({ backend, applicableMethods: ['post', 'Patch', 'PUT', 'delete'] });
      expect([...engine.options.applicableMethods].sort()).toEqual(['DELETE', 'PATCH', 'POST', 'PUT']);
      expect(engine.handles('PUT')).toBe(true);
      expect(engine.handles('put')).toBe(true);
      expect(engine.handles('delete')).toBe(true);
      expect(engine.handles('GET')).toBe(false);
    });

    it('handles POST and PATCH by default, in any case, and nothing else', () => {
      const engine = construct({ backend });
      for (const method of ['POST', 'post', 'PATCH', 'patch', 'Post'])
        expect(engine.handles(method)).toBe(true);
      for (const method of ['GET', 'HEAD', 'PUT', 'DELETE', 'OPTIONS'])
        expect(engine.handles(method)).toBe(false);
    });

    it('keeps the other values as given', () => {
      const scope = () => 'tenant';
      const fingerprint = () => 'fp';
      const onEvent = () => undefined;
      const { options } = construct({
        backend,
        enforceUuid4Formatting: true,
        required: true,
        fingerprint,
        scope,
        maxKeyLength: 64,
        cacheServerErrors: true,
        maxResponseBytes: 1024,
        onBackendError: 'fail-open',
        errorFormat: 'problem',
        onEvent,
      });
      expect(options.enforceUuid4Formatting).toBe(true);
      expect(options.required).toBe(true);
      expect(options.fingerprint).toBe(fingerprint);
      expect(options.scope).toBe(scope);
      expect(options.maxKeyLength).toBe(64);
      expect(options.cacheServerErrors).toBe(true);
      expect(options.maxResponseBytes).toBe(1024);
      expect(options.failOpen).toBe(true);
      expect(options.errorFormat).toBe('problem');
      expect(options.onEvent).toBe(onEvent);
    });

    it('needs the request body only for the built-in fingerprint', () => {
      expect(construct({ backend }).needsBody).toBe(true);
      expect(construct({ backend, fingerprint: true }).needsBody).toBe(true);
      expect(construct({ backend, fingerprint: false }).needsBody).toBe(false);
      expect(construct({ backend, fingerprint: () => 'x' }).needsBody).toBe(false);
    });

    it("accepts '*' and lists of media type patterns for cacheableContentTypes", () => {
      expect(construct({ backend, cacheableContentTypes: '*' }).options.isCacheableType('text/html')).toBe(
        true,
      );
      const listed = construct({ backend, cacheableContentTypes: ['text/*', 'application/xml', '*/*+json'] });
      expect(listed.options.isCacheableType('text/csv')).toBe(true);
      expect(listed.options.isCacheableType('application/xml')).toBe(true);
      expect(listed.options.isCacheableType('application/problem+json')).toBe(true);
      expect(listed.options.isCacheableType('application/json')).toBe(false);
      expect(
        construct({ backend, cacheableContentTypes: ['*/*'] }).options.isCacheableType('image/png'),
      ).toBe(true);
    });

    it("maps onBackendError 'fail-closed' to failOpen false", () => {
      expect(construct({ backend, onBackendError: 'fail-closed' }).options.failOpen).toBe(false);
    });
  });
});
