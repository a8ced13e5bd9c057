/**
 * Garbage in, never a crash out: fast-check sends every adapter requests with random key headers (unicode, control
 * characters, 8 KiB values, RFC 8941 quoted forms with and without escapes, commas, whitespace, repeated header
 * lines in any capitalisation), random bodies (binary, invalid JSON, empty, up to 5 MiB), random methods, paths
 * and content types. Requests go over raw sockets, so that bytes `fetch` would refuse reach the server as sent.
 *
 * For every request: an answer arrives, complete, within 10 s (never a hang); it is never a 5xx (the app's
 * handler always answers 201, so a 5xx could only come from the middleware); a JSON body parses; and the backend
 * (a counting wrapper around MemoryBackend) never sees a key that SPEC §2 step 3 refuses: a repeated header, a
 * control character, more than 255 characters, an empty key. A request whose key header is invalid never touches
 * the backend at all. After each run the server still answers.
 *
 * Sizes: 10 500 cases over the seven adapters with `CHAOS_FULL=1`, a tenth of that otherwise. A failure prints
 * fast-check's seed and the shrunk request.
 */

import express from 'express';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Backend, IdempotencyRecord } from '../../src/core/types.js';
import { createFastifyServerFactory } from '../support/fastify.js';
import { createFetchServerFactory, createHonoServerFactory } from '../support/hono.js';
import {
  createExpressServerFactory,
  createNodeServerFactory,
  express4,
  type ServerFactory,
  type TestServer,
} from '../support/http.js';
import { createKoaServerFactory, koa3 } from '../support/koa.js';
import { exchange, type RawRequest, type RawResponse } from '../support/raw-http.js';
import { max, report, size } from './support/chaos.js';

const MAX_KEY_LENGTH = 255;
/** The middleware's default `maxRequestBytes`: larger bodies it reads itself get 413 with `Connection: close`. */
const MAX_REQUEST_BYTES = 1_048_576;
const ANSWER_WITHIN_MS = 10_000;
const MiB = 1024 * 1024;

/** Counts every backend call and keeps the key of every acquire. */
class CountingBackend implements Backend {
  calls = 0;
  readonly acquired: string[] = [];
  readonly inner = new MemoryBackend();

  acquire(key: string, fingerprint: string, leaseMs: number) {
    this.calls++;
    this.acquired.push(key);
    return this.inner.acquire(key, fingerprint, leaseMs);
  }
  complete(key: string, token: string, record: IdempotencyRecord, ttlMs: number | null) {
    this.calls++;
    return this.inner.complete(key, token, record, ttlMs);
  }
  release(key: string, token: string) {
    this.calls++;
    return this.inner.release(key, token);
  }
  renew(key: string, token: string, leaseMs: number) {
    this.calls++;
    return this.inner.renew(key, token, leaseMs);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// What a request is made of

/** A header value as bytes on the wire, written as a latin1 string (one char per byte). */
const utf8 = (text: string) => Buffer.from(text, 'utf8').toString('latin1');

/** A few valid keys, reused so that replays, 409s and 422s happen between random requests. */
const KEY_POOL = ['order-1', 'b7a8e3f2-6c1d-4e5f-9a0b-1c2d3e4f5a6b', '"quoted-key"', 'k'];

const controlCharacter = fc
  .integer({ min: 0, max: 0x1f })
  .chain((code) => fc.constantFrom(String.fromCharCode(code), '\x7f'));

const keyValue: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...KEY_POOL) },
  { weight: 3, arbitrary: fc.string({ unit: 'grapheme', minLength: 1, maxLength: 40 }).map(utf8) },
  { weight: 2, arbitrary: fc.string({ unit: 'binary', maxLength: 40 }).map(utf8) },
  {
    weight: 2,
    arbitrary: fc
      .tuple(fc.string({ maxLength: 10 }), controlCharacter, fc.string({ maxLength: 10 }))
      .map(([a, c, b]) => `${a}${c}${b}`),
  },
  {
    weight: 1,
    arbitrary: fc
      .tuple(fc.integer({ min: 200, max: 8192 }), fc.constantFrom('a', 'é', '-'))
      .map(([length, char]) => utf8(char.repeat(length)).slice(0, length)),
  },
  { weight: 1, arbitrary: fc.constant('x'.repeat(MAX_KEY_LENGTH)) },
  { weight: 1, arbitrary: fc.constant('x'.repeat(MAX_KEY_LENGTH + 1)) },
  {
    // RFC 8941 quoted strings, escapes included, well formed or not.
    weight: 3,
    arbitrary: fc
      .tuple(
        fc.string({
          maxLength: 20,
          unit: fc.constantFrom('a', 'b', ',', ' ', '"', '\\', '\\"', '\\\\', 'é'),
        }),
        fc.constantFrom('""', '"', '', '"x'),
      )
      .map(([inner, quotes]) => (quotes === '""' ? `"${utf8(inner)}"` : `${quotes}${utf8(inner)}`)),
  },
  {
    weight: 1,
    arbitrary: fc.constantFrom('', ' ', '\t', ' a ', 'a, b', 'a,b', '"a,b"', '"a", "b"', ',', '""'),
  },
);

/** The key header lines of a request: none, one, or several, in any capitalisation. */
const keyHeaders = fc.oneof(
  { weight: 1, arbitrary: fc.constant([] as [string, string][]) },
  {
    weight: 8,
    arbitrary: fc
      .array(
        fc.tuple(
          fc.constantFrom('Idempotency-Key', 'idempotency-key', 'IDEMPOTENCY-KEY', 'iDeMpOtEnCy-KeY'),
          keyValue,
        ),
        {
          minLength: 1,
          maxLength: 3,
        },
      )
      .map((lines) => lines as [string, string][]),
  },
);

const contentType = fc.constantFrom(
  undefined,
  'application/json',
  'application/json; charset=utf-8',
  'application/problem+json',
  'text/plain',
  'text/plain; charset=latin1',
  'application/octet-stream',
  'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=xyz',
  'garbage',
  'application/json; charset=utf-16',
  '*/*',
);

/** A body of `length` bytes of a repeating pattern: cheap to make, even at 5 MiB. */
const patterned = (length: number) => Buffer.alloc(length, 'idempotency-');

const body: fc.Arbitrary<Buffer | undefined> = fc.oneof(
  { weight: 2, arbitrary: fc.constant(undefined) },
  { weight: 1, arbitrary: fc.constant(Buffer.alloc(0)) },
  {
    weight: 4,
    arbitrary: fc.jsonValue({ maxDepth: 3 }).map((value) => Buffer.from(JSON.stringify(value) ?? 'null')),
  },
  {
    weight: 2,
    arbitrary: fc
      .constantFrom('{', '{"a":', '[1,2', 'nul', '{"a":1}}', '\u0000', 'a=1&b=2')
      .map((text) => Buffer.from(text)),
  },
  { weight: 3, arbitrary: fc.uint8Array({ maxLength: 4096 }).map((bytes) => Buffer.from(bytes)) },
  { weight: 1, arbitrary: fc.integer({ min: 64 * 1024, max: 5 * MiB }).map(patterned) },
);

const method = fc.constantFrom(
  'POST',
  'POST',
  'POST',
  'PATCH',
  'PATCH',
  'PUT',
  'GET',
  'DELETE',
  'OPTIONS',
  'HEAD',
);

const path = fc.oneof(
  { weight: 5, arbitrary: fc.constant('/orders') },
  {
    weight: 2,
    arbitrary: fc.string({ maxLength: 20 }).map((query) => `/orders?${encodeURIComponent(query)}`),
  },
  { weight: 1, arbitrary: fc.constant('/elsewhere') },
);

interface Case {
  method: string;
  path: string;
  keys: [string, string][];
  contentType: string | undefined;
  body: Buffer | undefined;
}

const cases: fc.Arbitrary<Case> = fc.record({ method, path, keys: keyHeaders, contentType, body });

// ---------------------------------------------------------------------------------------------------------------
// The oracle: SPEC §2 steps 2 and 3, written independently of src/core/key.ts

const OWS = /^[ \t]+|[ \t]+$/g;

function hasControl(text: string): boolean {
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    if (code <= 0x1f || code === 0x7f) return true;
  }
  return false;
}

/**
 * Whether a value with a comma holds several values: it is one key only when it is one closed RFC 8941 quoted
 * string (`\` escaping the next character) with nothing around it, since Node.js joins repeated lines with `, `.
 */
function severalValues(text: string): boolean {
  return text.includes(',') && !/^"(?:[^"\\]|\\.)*"$/s.test(text);
}

function unquote(text: string): string {
  if (text.length < 2 || !text.startsWith('"') || !text.endsWith('"')) return text;
  return text.slice(1, -1).replace(/\\(["\\])/g, '$1');
}

/**
 * Whether the request's key header must be refused before any backend call: several lines (or values), a control
 * character anywhere in it, or an unquoted key that is too long. (A key that is valid may still not reach the
 * backend: a method the middleware does not handle, an empty header, a body over the limit.)
 */
function refusedKey(lines: readonly [string, string][]): boolean {
  if (lines.length > 1) return true;
  if (lines.length === 0) return false;
  const value = lines[0]![1].replace(OWS, '');
  if (value === '') return false;
  if (hasControl(value) || severalValues(value)) return true;
  const key = unquote(value);
  return key === '' || key.length > MAX_KEY_LENGTH || hasControl(key);
}

/** Whether a storage key (no scope: `-<key>`) holds a key SPEC §2 step 3 accepts. */
function acceptableStorageKey(storageKey: string): boolean {
  const key = storageKey.slice(1);
  return storageKey.startsWith('-') && key !== '' && key.length <= MAX_KEY_LENGTH && !hasControl(key);
}

// ---------------------------------------------------------------------------------------------------------------
// The adapters

const ADAPTERS: { name: string; factory: ServerFactory; runs: number }[] = [
  { name: 'node:http', factory: createNodeServerFactory(), runs: size(300, 4000) },
  {
    name: 'Express 5, parsers after',
    factory: createExpressServerFactory(express, 'after'),
    runs: size(200, 2000),
  },
  {
    name: 'Express 4, parsers before',
    factory: createExpressServerFactory(express4, 'before'),
    runs: size(100, 1000),
  },
  { name: 'Fastify', factory: createFastifyServerFactory(), runs: size(100, 1000) },
  { name: 'Hono', factory: createHonoServerFactory(), runs: size(100, 1000) },
  { name: 'fetch handler', factory: createFetchServerFactory(), runs: size(50, 500) },
  { name: 'Koa 3, parser after', factory: createKoaServerFactory(koa3, 'after'), runs: size(100, 1000) },
];

describe('chaos: fuzzed requests never crash, hang or 5xx the middleware, and invalid keys never reach the backend', () => {
  const totals = { cases: 0 };

  afterAll(() => {
    report('fuzz: all adapters', { cases: totals.cases });
  });

  describe.each(ADAPTERS)('$name', ({ name, factory, runs }) => {
    const backend = new CountingBackend();
    let server: TestServer;
    let port: number;

    beforeAll(async () => {
      server = await factory(
        { backend },
        {
          '/orders': (req) => ({
            status: 201,
            headers: [['content-type', 'application/json']],
            chunks: [JSON.stringify({ ok: true, method: req.method })],
          }),
        },
      );
      port = Number(new URL(server.url).port);
    });

    afterAll(async () => {
      await server?.close();
      backend.inner.close();
    });

    it(
      `answers ${runs} random requests without a 5xx, a hang or an invalid key reaching the backend`,
      async () => {
        const statuses: Record<number, number> = {};
        const elapsed: number[] = [];
        let refusedKeys = 0;
        let bigBodies = 0;
        let cutOff = 0;
        await fc.assert(
          fc.asyncProperty(cases, async (request) => {
            const callsBefore = backend.calls;
            const acquiredBefore = backend.acquired.length;
            const raw: RawRequest = {
              method: request.method,
              path: request.path,
              headers: [
                ...request.keys,
                ...(request.contentType === undefined
                  ? []
                  : [['Content-Type', request.contentType] as const]),
                ['Connection', 'close'],
              ],
              ...(request.body === undefined ? {} : { body: request.body }),
            };
            const started = performance.now();
            let response: RawResponse;
            try {
              response = await exchange(port, raw, undefined, ANSWER_WITHIN_MS);
            } catch (error) {
              // The server may close the connection while a body over the limit is still being written (413 with
              // `Connection: close`, as documented): the client may then see the reset instead of the answer.
              if ((request.body?.length ?? 0) > MAX_REQUEST_BYTES) {
                cutOff++;
                return;
              }
              throw error;
            }
            elapsed.push(performance.now() - started);
            if ((request.body?.length ?? 0) > MAX_REQUEST_BYTES) bigBodies++;
            // A hang is a hang, whatever the body: only a connection cut while a body over the limit was being sent
            // is excused below.
            expect(response.timedOut, 'no answer in time').toBeUndefined();

            if (!response.complete && (request.body?.length ?? 0) > MAX_REQUEST_BYTES) {
              cutOff++;
              return;
            }
            expect(response.complete, 'the answer was cut short').toBe(true);
            statuses[response.status] = (statuses[response.status] ?? 0) + 1;
            expect(response.status, response.body.toString('latin1').slice(0, 300)).toBeLessThan(500);
            expect(response.status).toBeGreaterThanOrEqual(200);
            const type = response.headers.find(([header]) => header === 'content-type')?.[1] ?? '';
            if (type.includes('json') && request.method !== 'HEAD' && response.body.length > 0)
              expect(() => JSON.parse(response.body.toString('utf8'))).not.toThrow();

            const reached = backend.acquired.slice(acquiredBefore);
            for (const key of reached) expect(acceptableStorageKey(key), JSON.stringify(key)).toBe(true);
            if (refusedKey(request.keys)) {
              refusedKeys++;
              expect(backend.calls, 'an invalid key reached the backend').toBe(callsBefore);
              if (request.method === 'POST' || request.method === 'PATCH')
                expect([400, 413, 415, 422, 431]).toContain(response.status);
            }
          }),
          { numRuns: runs, endOnFailure: true },
        );
        totals.cases += runs;

        // Still serving.
        const health = await exchange(
          port,
          {
            method: 'POST',
            path: '/orders',
            headers: [['Content-Type', 'application/json']],
            body: Buffer.from('{}'),
          },
          undefined,
        );
        expect(health.status).toBe(201);

        report(`fuzz: ${name}`, {
          cases: runs,
          answers: Object.entries(statuses)
            .map(([status, count]) => `${status}: ${count}`)
            .join(', '),
          'requests with a key the middleware must refuse (none reached the backend)': refusedKeys,
          'keys that reached the backend (all valid)': backend.acquired.length,
          'bodies over maxRequestBytes': bigBodies,
          'cut off while sending a body over the limit': cutOff,
          'slowest answer': { ms: max(elapsed) },
        });
      },
      size(120_000, 900_000),
    );
  });
});
