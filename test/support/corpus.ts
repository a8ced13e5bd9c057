/**
 * Handler behaviours for the differential tests: every way a handler commonly (and not so commonly) writes a
 * response through `node:http` and Express, including the ways it fails. Each is deterministic, so that the bare
 * app and the app with the middleware can be compared byte for byte.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import { Readable } from 'node:stream';
import { setImmediate as nextTurn } from 'node:timers/promises';
import type { Response } from 'express';

/** Continues the chain: with an error, the framework's error handling (or the listener failing) takes over. */
export type Next = (error?: unknown) => void;

/** One handler behaviour. */
export interface CorpusCase {
  readonly name: string;
  /** Uses Express's response methods (`res.json`, `res.redirect`, …): run under Express only. */
  readonly express?: boolean;
  /**
   * With `compression` mounted, the bare app itself never answers: compression drops `write` callbacks, and never
   * ends a response whose `writeHead` threw.
   */
  readonly hangsUnderCompression?: boolean;
  readonly handler: (req: IncomingMessage, res: ServerResponse, next: Next) => void | Promise<void>;
}

const JSON_TYPE = 'application/json';
const doc = (value: unknown) => JSON.stringify(value);
const large = (size: number) => Buffer.from(`{"pad":"${'x'.repeat(size - 10)}"}`);

export const CORPUS: readonly CorpusCase[] = [
  {
    name: 'statusCode and setHeader, one end',
    handler: (_req, res) => {
      res.statusCode = 201;
      res.setHeader('Content-Type', JSON_TYPE);
      res.setHeader('Location', '/orders/1');
      res.end(doc({ id: 1 }));
    },
  },
  {
    name: 'writeHead with a reason phrase',
    handler: (_req, res) => {
      res.writeHead(201, 'Made It', { 'Content-Type': JSON_TYPE });
      res.end(doc({ id: 2 }));
    },
  },
  {
    name: 'writeHead with an undefined reason and headers',
    handler: (_req, res) => {
      res.writeHead(201, undefined, { 'content-type': JSON_TYPE, 'x-case': 'undefined-reason' });
      res.end(doc({ id: 3 }));
    },
  },
  {
    name: 'writeHead with a header object, no reason',
    handler: (_req, res) => {
      res.writeHead(200, { 'Content-Type': JSON_TYPE, 'X-Number': 7 });
      res.end(doc({ id: 4 }));
    },
  },
  {
    name: 'writeHead with a flat header list and a repeated name',
    handler: (_req, res) => {
      res.setHeader('X-Multi', 'replaced');
      res.writeHead(200, ['Content-Type', JSON_TYPE, 'X-Multi', 'a', 'X-Multi', 'b']);
      res.end(doc({ id: 5 }));
    },
  },
  {
    name: 'writeHead with a nested header list',
    handler: (_req, res) => {
      res.writeHead(200, [
        ['content-type', JSON_TYPE],
        ['x-nested', '1'],
      ] as unknown as string[]);
      res.end(doc({ id: 6 }));
    },
  },
  {
    name: 'setHeader then many writes',
    handler: async (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.write('[');
      for (let i = 0; i < 5; i++) {
        res.write(`${i},`);
        await nextTurn();
      }
      res.end('5]');
    },
  },
  {
    name: 'Buffer, Uint8Array and string chunks',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.write(Buffer.from('{"a":'));
      res.write(new Uint8Array([49, 44]));
      res.write('"b":"');
      res.write('c3VjY2Vzcw==', 'base64');
      res.end('"}');
    },
  },
  {
    name: 'end with a callback',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.end(doc({ callback: true }), () => {});
    },
  },
  {
    name: 'write with a callback',
    hangsUnderCompression: true,
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.write('{"written":', () => {
        res.end('true}');
      });
    },
  },
  {
    name: 'flushHeaders then the body later',
    handler: async (_req, res) => {
      res.statusCode = 202;
      res.setHeader('content-type', JSON_TYPE);
      res.flushHeaders();
      await nextTurn();
      res.end(doc({ flushed: true }));
    },
  },
  {
    name: 'cork and uncork',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.cork();
      res.write('{"corked":');
      res.write('true}');
      res.uncork();
      res.end();
    },
  },
  {
    name: 'a piped stream',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      Readable.from(['{"piped":', '[1,2,3]', '}']).pipe(res);
    },
  },
  {
    name: 'a manual Content-Length',
    handler: (_req, res) => {
      const body = doc({ length: 'manual' });
      res.setHeader('content-type', JSON_TYPE);
      res.setHeader('content-length', Buffer.byteLength(body));
      res.write(body.slice(0, 5));
      res.end(body.slice(5));
    },
  },
  {
    name: 'a redirect',
    handler: (_req, res) => {
      res.statusCode = 302;
      res.setHeader('location', '/elsewhere');
      res.setHeader('content-type', JSON_TYPE);
      res.end();
    },
  },
  {
    name: '204 without a body',
    handler: (_req, res) => {
      res.statusCode = 204;
      res.setHeader('content-type', JSON_TYPE);
      res.end();
    },
  },
  {
    name: '204 with a body Node.js drops',
    handler: (_req, res) => {
      res.writeHead(204, { 'content-type': JSON_TYPE });
      res.end('{"dropped":true}');
    },
  },
  {
    name: '304 with an ETag',
    handler: (_req, res) => {
      res.statusCode = 304;
      res.setHeader('etag', '"v1"');
      res.setHeader('content-type', JSON_TYPE);
      res.end();
    },
  },
  {
    name: 'cookies',
    handler: (_req, res) => {
      res.setHeader('set-cookie', ['a=1; Path=/', 'b=2; HttpOnly']);
      res.setHeader('content-type', JSON_TYPE);
      res.end(doc({ cookies: 2 }));
    },
  },
  {
    name: 'Vary set by the handler',
    handler: (_req, res) => {
      res.setHeader('vary', 'Accept-Language');
      res.setHeader('content-type', JSON_TYPE);
      res.end(doc({ vary: true }));
    },
  },
  {
    name: 'a header set then removed',
    handler: (_req, res) => {
      res.setHeader('x-temporary', '1');
      res.removeHeader('x-temporary');
      res.setHeader('content-type', JSON_TYPE);
      res.end(doc({ removed: true }));
    },
  },
  {
    name: 'an empty JSON body',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.end();
    },
  },
  {
    name: 'a 100 KiB body in one end',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.end(large(100 * 1024));
    },
  },
  {
    name: 'a 1.5 MiB body in 64 KiB writes (over maxResponseBytes)',
    handler: async (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      const body = large(1536 * 1024);
      for (let offset = 0; offset < body.length; offset += 65_536) {
        res.write(body.subarray(offset, offset + 65_536));
        if (offset % (4 * 65_536) === 0) await nextTurn();
      }
      res.end();
    },
  },
  {
    name: 'a 2 MiB body in one end (over maxResponseBytes)',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.end(large(2 * 1024 * 1024));
    },
  },
  {
    name: 'binary bytes',
    handler: (_req, res) => {
      res.setHeader('content-type', 'application/octet-stream');
      res.end(Buffer.from(Array.from({ length: 256 }, (_, i) => i)));
    },
  },
  {
    name: 'text/plain (not stored)',
    handler: (_req, res) => {
      res.setHeader('content-type', 'text/plain; charset=utf-8');
      res.write('line 1\n');
      res.end('line 2\n');
    },
  },
  {
    name: 'an event stream',
    handler: async (_req, res) => {
      res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
      res.write('data: one\n\n');
      await nextTurn();
      res.end('data: two\n\n');
    },
  },
  {
    name: 'trailers',
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': JSON_TYPE, trailer: 'x-checksum' });
      res.write('{"trailers":');
      res.addTrailers({ 'x-checksum': 'abc' });
      res.end('true}');
    },
  },
  {
    name: 'a 503',
    handler: (_req, res) => {
      res.writeHead(503, { 'content-type': JSON_TYPE, 'retry-after': '3' });
      res.end(doc({ down: true }));
    },
  },
  {
    name: 'a 429 refusal',
    handler: (_req, res) => {
      res.writeHead(429, { 'content-type': JSON_TYPE, 'retry-after': '1' });
      res.end(doc({ slow: 'down' }));
    },
  },
  {
    name: 'a synchronous throw',
    handler: () => {
      throw new Error('thrown before writing');
    },
  },
  {
    name: 'a failure after setHeader, later',
    handler: async (_req, res, next) => {
      res.setHeader('content-type', JSON_TYPE);
      res.setHeader('x-before-failure', '1');
      await nextTurn();
      next(new Error('failed after setHeader'));
    },
  },
  {
    name: 'a partial write, then a failure',
    handler: async (_req, res, next) => {
      res.writeHead(200, { 'content-type': JSON_TYPE });
      res.write('{"half":');
      await nextTurn();
      next(new Error('failed halfway'));
    },
  },
  {
    name: 'a partial implicit-head write, then a failure',
    handler: (_req, res, next) => {
      res.setHeader('content-type', JSON_TYPE);
      res.write('{"half":');
      next(new Error('failed halfway, implicit head'));
    },
  },
  {
    name: 'an ended response, then a failure',
    handler: (_req, res, next) => {
      res.setHeader('content-type', JSON_TYPE);
      res.end(doc({ ended: true }));
      next(new Error('failed after ending'));
    },
  },
  {
    name: 'writeHead with an invalid status',
    hangsUnderCompression: true,
    handler: (_req, res) => {
      res.writeHead(1000, { 'content-type': JSON_TYPE });
      res.end('{}');
    },
  },
  {
    name: 'an invalid statusCode, then end',
    handler: (_req, res) => {
      res.statusCode = 99;
      res.setHeader('content-type', JSON_TYPE);
      res.end('{}');
    },
  },
  {
    name: 'setHeader after writeHead',
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': JSON_TYPE });
      res.setHeader('x-too-late', '1');
      res.end('{}');
    },
  },
  {
    name: 'an invalid header value',
    handler: (_req, res) => {
      res.setHeader('content-type', JSON_TYPE);
      res.setHeader('x-bad', 'line\nbreak');
      res.end('{}');
    },
  },
  // Express's own response methods.
  {
    name: 'res.status().json()',
    express: true,
    handler: (_req, res) => {
      (res as Response).status(201).json({ id: 'express' });
    },
  },
  {
    name: 'res.send(Buffer) with res.type',
    express: true,
    handler: (_req, res) => {
      (res as Response).type('json').send(Buffer.from('{"buffer":true}'));
    },
  },
  {
    name: 'res.redirect(303)',
    express: true,
    handler: (_req, res) => {
      (res as Response).redirect(303, '/orders/9');
    },
  },
  {
    name: 'res.sendStatus(202)',
    express: true,
    handler: (_req, res) => {
      (res as Response).sendStatus(202);
    },
  },
  {
    name: 'res.cookie, res.vary and res.location with json',
    express: true,
    handler: (_req, res) => {
      const response = res as Response;
      response.cookie('session', 'abc', { httpOnly: true });
      response.vary('Accept');
      response.location('/orders/10');
      response.status(201).json({ id: 10 });
    },
  },
  {
    name: 'res.json with an ETag that makes a fresh request 304',
    express: true,
    handler: (_req, res) => {
      (res as Response).json({ etag: 'weak' });
    },
  },
];
