import { createHash } from 'node:crypto';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { webSha256 } from '../../src/core/digest.js';
import {
  canonicalJson,
  canonicalJsonByMember,
  computeFingerprint as fingerprintWith,
  isMultipart,
  multipartBoundary,
  type RequestBody,
  requestTarget,
  withBoundary,
} from '../../src/core/fingerprint.js';
import { nodeSha256 } from '../../src/runtime/node-sha256.js';

const HEX_64 = /^[0-9a-f]{64}$/;

/**
 * The canonical JSON the package's writers are held to, in its plainest form: recursive, object keys sorted at every
 * depth, `toJSON` honoured, members `JSON.stringify` leaves out left out (and written as `null` in arrays).
 */
function canonicalJsonByHand(value: unknown): string {
  if (value === null || typeof value !== 'object') return JSON.stringify(value) ?? 'null';
  const withToJson = value as { toJSON?: () => unknown };
  if (typeof withToJson.toJSON === 'function') return canonicalJsonByHand(withToJson.toJSON());
  const skipped = (member: unknown) =>
    member === undefined || typeof member === 'function' || typeof member === 'symbol';
  if (Array.isArray(value)) {
    return `[${Array.from(value, (item) => (skipped(item) ? 'null' : canonicalJsonByHand(item))).join(',')}]`;
  }
  const record = value as Record<string, unknown>;
  const members = Object.keys(record)
    .sort()
    .filter((name) => !skipped(record[name]))
    .map((name) => `${JSON.stringify(name)}:${canonicalJsonByHand(record[name])}`);
  return `{${members.join(',')}}`;
}
const bytes = (text: string) => new TextEncoder().encode(text);
/** The fingerprint as the Node.js adapters compute it (synchronously). */
const computeFingerprint = (method: string, url: string, body: RequestBody) =>
  fingerprintWith(method, url, body, nodeSha256) as string;

describe('computeFingerprint', () => {
  it('is a 64-digit lower-case hex SHA-256', () => {
    expect(computeFingerprint('POST', '/orders', bytes('{"a":1}'))).toMatch(HEX_64);
    expect(computeFingerprint('POST', '/orders', undefined)).toMatch(HEX_64);
    expect(computeFingerprint('POST', '/orders', { a: 1 })).toMatch(HEX_64);
  });

  it('gives the same hash for the same inputs', () => {
    const a = computeFingerprint('POST', '/orders?x=1', bytes('{"amount":10}'));
    const b = computeFingerprint('POST', '/orders?x=1', bytes('{"amount":10}'));
    expect(a).toBe(b);
    expect(computeFingerprint('PATCH', '/o', { a: [1, 2] })).toBe(
      computeFingerprint('PATCH', '/o', { a: [1, 2] }),
    );
  });

  it('is the documented SHA-256 over method, path and body', () => {
    const expected = createHash('sha256').update('POST /orders?x=1\n{"amount":10}').digest('hex');
    expect(computeFingerprint('POST', '/orders?x=1', bytes('{"amount":10}'))).toBe(expected);
    expect(computeFingerprint('POST', '/orders?x=1', { amount: 10 })).toBe(expected);
  });

  describe('changes with', () => {
    const base = computeFingerprint('POST', '/orders?x=1', bytes('{"amount":10}'));

    it('the method', () => {
      expect(computeFingerprint('PATCH', '/orders?x=1', bytes('{"amount":10}'))).not.toBe(base);
    });

    it('the path', () => {
      expect(computeFingerprint('POST', '/refunds?x=1', bytes('{"amount":10}'))).not.toBe(base);
    });

    it('the query string', () => {
      expect(computeFingerprint('POST', '/orders?x=2', bytes('{"amount":10}'))).not.toBe(base);
      expect(computeFingerprint('POST', '/orders', bytes('{"amount":10}'))).not.toBe(base);
    });

    it('the body', () => {
      expect(computeFingerprint('POST', '/orders?x=1', bytes('{"amount":11}'))).not.toBe(base);
      expect(computeFingerprint('POST', '/orders?x=1', bytes(''))).not.toBe(base);
      expect(computeFingerprint('POST', '/orders?x=1', { amount: 11 })).not.toBe(base);
    });

    it('the body of a parsed value, at any depth', () => {
      expect(computeFingerprint('POST', '/o', { a: { b: [1, 2] } })).not.toBe(
        computeFingerprint('POST', '/o', { a: { b: [1, 3] } }),
      );
    });

    it('the order of array items', () => {
      expect(computeFingerprint('POST', '/o', [1, 2])).not.toBe(computeFingerprint('POST', '/o', [2, 1]));
    });

    it('the split between path and body', () => {
      expect(computeFingerprint('POST', '/ab', bytes('c'))).not.toBe(
        computeFingerprint('POST', '/a', bytes('bc')),
      );
    });
  });

  describe('does not change with', () => {
    it('the order of object keys, at every depth', () => {
      expect(computeFingerprint('POST', '/o', { a: 1, b: { c: 2, d: 3 } })).toBe(
        computeFingerprint('POST', '/o', { b: { d: 3, c: 2 }, a: 1 }),
      );
    });

    it('the kind of byte container holding the same bytes', () => {
      const expected = computeFingerprint('POST', '/o', bytes('{"a":1}'));
      expect(computeFingerprint('POST', '/o', Buffer.from('{"a":1}'))).toBe(expected);
      expect(computeFingerprint('POST', '/o', new Uint8Array([...bytes('{"a":1}')]))).toBe(expected);
      const padded = Buffer.from('xx{"a":1}yy');
      expect(computeFingerprint('POST', '/o', padded.subarray(2, -2))).toBe(expected);
    });

    it('an ArrayBuffer or DataView holding the same bytes', () => {
      const expected = computeFingerprint('POST', '/o', bytes('{"a":1}'));
      const buffer = bytes('{"a":1}').buffer;
      expect(computeFingerprint('POST', '/o', buffer)).toBe(expected);
      expect(computeFingerprint('POST', '/o', new DataView(buffer))).toBe(expected);
      expect(computeFingerprint('POST', '/o', bytes('{"a":2}').buffer)).not.toBe(expected);
    });

    it('a string body or its UTF-8 bytes', () => {
      const text = '{"name":"Zoë","city":"東京","emoji":"🎉"}';
      expect(computeFingerprint('POST', '/o', text)).toBe(computeFingerprint('POST', '/o', bytes(text)));
      expect(computeFingerprint('POST', '/o', text)).toBe(
        computeFingerprint('POST', '/o', Buffer.from(text, 'utf8')),
      );
    });
  });

  it('hashes a missing body like an empty one', () => {
    const none = computeFingerprint('POST', '/o', undefined);
    expect(computeFingerprint('POST', '/o', new Uint8Array(0))).toBe(none);
    expect(computeFingerprint('POST', '/o', '')).toBe(none);
  });

  it('tells a parsed null body from no body', () => {
    expect(computeFingerprint('POST', '/o', null)).not.toBe(computeFingerprint('POST', '/o', undefined));
  });

  it('tells parsed bodies of different types apart', () => {
    const hashes = [{}, [], null, 'x', { '0': 1 }, [1]].map((body) => computeFingerprint('POST', '/o', body));
    expect(new Set(hashes).size).toBe(hashes.length);
  });
});

describe('multipart bodies', () => {
  const form = (boundary: string, value: string) =>
    bytes(
      `--${boundary}\r\nContent-Disposition: form-data; name="a"\r\n\r\n${value}\r\n` +
        `--${boundary}\r\nContent-Disposition: form-data; name="b"\r\n\r\n-- not a delimiter --\r\n--${boundary}--\r\n`,
    );
  const fingerprint = (
    boundary: string,
    value: string,
    contentType = `multipart/form-data; boundary=${boundary}`,
  ) => fingerprintWith('POST', '/upload', form(boundary, value), nodeSha256, contentType) as string;

  it('reads the boundary of a multipart Content-Type, quoted or not, in any case; none for other types', () => {
    expect(multipartBoundary('multipart/form-data; boundary=----abc123')).toBe('----abc123');
    expect(multipartBoundary('Multipart/Mixed;Boundary="gc0p4Jq0M2Yt08j34c0p"; charset=utf-8')).toBe(
      'gc0p4Jq0M2Yt08j34c0p',
    );
    expect(multipartBoundary('multipart/form-data; boundary="with space"')).toBe('with space');
    expect(multipartBoundary('multipart/form-data')).toBeUndefined();
    expect(multipartBoundary('application/json; boundary=x')).toBeUndefined();
    expect(multipartBoundary(undefined)).toBeUndefined();
  });

  it('tells a multipart type as the expression does, whatever the first character, spaces before it included', () => {
    const lead = fc.constantFrom('', ' ', '\t', '\u00a0', '\u2003', '\ufeff', '\n ');
    const type = fc.oneof(
      fc.constantFrom(
        'multipart/',
        'MULTIPART/mixed',
        'Multipart/form-data',
        'application/json',
        'text/plain',
      ),
      fc.string({ unit: 'binary', maxLength: 12 }),
    );
    fc.assert(
      fc.property(lead, type, (space, value) => {
        expect(isMultipart(space + value)).toBe(/^\s*multipart\//i.test(space + value));
      }),
      { numRuns: 3000 },
    );
    expect(isMultipart(undefined)).toBe(false);
  });

  it('hashes a form the same whatever its boundary, and its parts byte for byte', () => {
    const first = fingerprint('----formdata-undici-0123456789', 'one');
    expect(fingerprint('----WebKitFormBoundaryABCDEF', 'one')).toBe(first);
    expect(fingerprint('x', 'one', 'multipart/form-data; boundary="x"')).toBe(first);
    expect(fingerprint('----formdata-undici-0123456789', 'One')).not.toBe(first);
    // The same bytes under another type are hashed as they are.
    const raw = fingerprintWith('POST', '/upload', form('b1', 'one'), nodeSha256, 'application/octet-stream');
    expect(raw).toBe(computeFingerprint('POST', '/upload', form('b1', 'one')));
    expect(raw).not.toBe(fingerprint('b2', 'one', 'application/octet-stream'));
  });

  it('cuts a body at each delimiter and nowhere else, copying nothing', () => {
    const body = bytes('--bXX--b--bb--b');
    const pieces = withBoundary(body, 'b', 'R');
    expect(pieces.map((piece) => new TextDecoder().decode(piece)).join('')).toBe('--RXX--R--Rb--R');
    expect(pieces.filter((piece) => piece.buffer === body.buffer).length).toBe(5);
    expect(withBoundary(bytes('no delimiter'), 'b', 'R').map((piece) => piece.byteLength)).toEqual([12]);
    expect(withBoundary(new Uint8Array(0), 'b', 'R').map((piece) => piece.byteLength)).toEqual([0]);
  });
});

/** Half of a surrogate pair, alone: JSON.stringify writes it as an escape. */
const loneSurrogate = fc.integer({ min: 0xd800, max: 0xdfff }).map((unit) => String.fromCharCode(unit));

describe('canonicalJson', () => {
  it('sorts object keys at every depth', () => {
    expect(canonicalJson({ b: 1, a: { d: 2, c: [{ z: 1, y: 2 }] } })).toBe(
      '{"a":{"c":[{"y":2,"z":1}],"d":2},"b":1}',
    );
    expect(canonicalJson({ a: 1, b: { c: 2, d: 3 } })).toBe(canonicalJson({ b: { d: 3, c: 2 }, a: 1 }));
    // The reference form, which the package's writers are compared with below, on its own.
    expect(canonicalJsonByHand({ b: 1, a: { d: 2, c: [{ z: 1, y: 2 }] } })).toBe(
      '{"a":{"c":[{"y":2,"z":1}],"d":2},"b":1}',
    );
  });

  it('keeps the order of array items', () => {
    expect(canonicalJson([3, 1, 2])).toBe('[3,1,2]');
    expect(canonicalJson([{ b: 1, a: 2 }, 'x'])).toBe('[{"a":2,"b":1},"x"]');
  });

  it.each([
    ['a flat object', { a: 1, b: 'two', c: true }],
    ['nested arrays', { a: [1, [2, [3, []]], { b: [null] }] }],
    ['null', null],
    ['null members', { a: null, b: [null, null] }],
    ['booleans', { f: false, t: true }],
    ['numbers', { a: 0, b: -1.5, c: 1e21, d: 2 ** 53, e: -0, f: 0.1 }],
    ['non-finite numbers', { a: Number.NaN, b: Number.POSITIVE_INFINITY, c: [Number.NEGATIVE_INFINITY] }],
    [
      'strings needing escapes',
      { a: 'quote " backslash \\ newline \n tab \t', b: '\u0000\u001f', c: '東京 🎉' },
    ],
    ['keys needing escapes', { '\n': 3, '"': 1, '\\': 2 }],
    ['lone surrogates', { a: '\ud800', b: `x\udfffy${'z'.repeat(70)}`, '\udc00': ['\udbff'] }],
    ['Dates', { at: new Date(Date.UTC(2024, 0, 2, 3, 4, 5, 6)), list: [new Date(0)] }],
    ['an object with toJSON', { a: { toJSON: () => ({ x: 1 }) } }],
    ['an empty object and array', { a: {}, b: [] }],
    ['a top-level array', [1, 'a', null, true, { a: 1 }]],
    ['a top-level string', 'just a string'],
    ['a top-level number', 42],
    ['a top-level boolean', false],
    ['a top-level Date', new Date(Date.UTC(2000, 0, 1))],
  ])('matches JSON.stringify on already-sorted input: %s', (_, value) => {
    expect(canonicalJson(value)).toBe(JSON.stringify(value));
  });

  it('drops undefined, function and symbol members of objects, as JSON.stringify does', () => {
    const value = { a: undefined, b: 1, c: () => 1, d: Symbol('s'), e: { f: undefined } };
    expect(canonicalJson(value)).toBe(JSON.stringify(value));
    expect(canonicalJson(value)).toBe('{"b":1,"e":{}}');
  });

  it('writes undefined, function and symbol array items as null, as JSON.stringify does', () => {
    const value = [undefined, () => 1, Symbol('s'), 1];
    expect(canonicalJson(value)).toBe(JSON.stringify(value));
    expect(canonicalJson(value)).toBe('[null,null,null,1]');
  });

  it('writes a top-level undefined as null', () => {
    expect(canonicalJson(undefined)).toBe('null');
  });

  it('sorts keys by code unit, like Array.prototype.sort', () => {
    expect(canonicalJson({ b: 1, B: 2, a: 3, _: 4, '10': 5, '9': 6 })).toBe(
      '{"10":5,"9":6,"B":2,"_":4,"a":3,"b":1}',
    );
  });

  it('equals the member-by-member form on any JSON document, keys in any order', () => {
    // Keys drawn so that sorting matters: letters of both cases, integer-like and digit-led keys, `__proto__`.
    const key = fc.oneof(
      fc.string({ maxLength: 4 }),
      fc.constantFrom('__proto__', 'toJSON', '0', '1', '9', '10', '01', '-1', 'a', 'B', 'é', '😀'),
    );
    const document = fc.letrec((tie) => ({
      value: fc.oneof(
        { depthSize: 'small' },
        fc.oneof(
          fc.string(),
          // Any code point, lone surrogates and control characters among them, in short and long strings.
          fc.string({ unit: 'binary', maxLength: 80 }),
          fc.string({
            unit: fc.oneof(fc.string({ minLength: 1, maxLength: 1 }), loneSurrogate),
            maxLength: 8,
          }),
          fc.double(),
          fc.integer(),
          fc.boolean(),
          fc.constant(null),
        ),
        fc.array(tie('value'), { maxLength: 4 }),
        fc.array(fc.tuple(key, tie('value')), { maxLength: 6 }).map(objectFromEntries),
      ),
    })).value;
    fc.assert(
      fc.property(document, (value) => {
        expect(canonicalJson(value)).toBe(canonicalJsonByHand(value));
        expect(canonicalJsonByMember(value)).toBe(canonicalJsonByHand(value));
        // As a body parser hands it over: `__proto__` as an own key, numbers as JSON has them.
        const parsed = JSON.parse(JSON.stringify(value)) as unknown;
        expect(canonicalJson(parsed)).toBe(canonicalJsonByHand(parsed));
        expect(canonicalJsonByMember(parsed)).toBe(canonicalJsonByHand(parsed));
      }),
      { numRuns: 2000 },
    );
  });

  it('equals the member-by-member form on values JSON.stringify alone would not write in key order', () => {
    class Point {
      constructor(
        readonly y: number,
        readonly x: number,
      ) {}
    }
    const values: unknown[] = [
      { b: new Point(1, 2), a: [new Point(3, 4)] },
      { b: { toJSON: () => ({ d: 1, c: 2 }) }, a: 1 },
      { a: Object.assign([2, 1], { toJSON: () => ({ z: 1, y: 2 }) }) },
      { z: new Date(0), a: undefined, m: () => 1, s: Symbol('s') },
      Object.assign(Object.create(null) as object, { b: 1, a: 2 }),
      { a: new Map([['b', 1]]), b: new Uint8Array([1, 2]) },
      JSON.parse('{"b":1,"__proto__":{"d":1,"c":2},"a":2}'),
      { b: 1, '2': 'x', '10': 'y', a: { '1': 1, '0': 0 } },
    ];
    for (const value of values) {
      expect(canonicalJson(value)).toBe(canonicalJsonByHand(value));
      expect(canonicalJsonByMember(value)).toBe(canonicalJsonByHand(value));
    }
    for (const value of [undefined, () => 1, 'x', 1.5, null, [undefined, () => 1, Symbol('s')]]) {
      expect(canonicalJsonByMember(value)).toBe(canonicalJsonByHand(value));
    }
  });

  it('writes a value nested deeper than the call stack goes, as a body parser accepts it', () => {
    const depth = 50_000;
    const arrays = '['.repeat(depth) + ']'.repeat(depth);
    expect(canonicalJson(JSON.parse(arrays))).toBe(arrays);
    const objects = `${'{"b":1,"a":'.repeat(depth)}0${'}'.repeat(depth)}`;
    expect(canonicalJson(JSON.parse(objects))).toBe(`${'{"a":'.repeat(depth)}0${',"b":1}'.repeat(depth)}`);
  });

  it('refuses a value that contains itself, naming the error', () => {
    const value: Record<string, unknown> = { a: 1 };
    value.self = { back: [value] };
    expect(() => canonicalJson(value)).toThrow(
      expect.objectContaining({
        code: 'ERR_IDEMPOTENCY_BODY',
        message: expect.stringMatching(/contains itself/),
      }),
    );
    // Shared, not circular: written twice, as JSON.stringify writes it.
    const shared = { x: 1 };
    expect(canonicalJsonByMember({ b: shared, a: [shared] })).toBe('{"a":[{"x":1}],"b":{"x":1}}');
  });

  it('is valid JSON that parses back to an equal value', () => {
    const value = { z: [1, { y: 'x', x: null }], a: { c: true, b: 0.5 } };
    expect(JSON.parse(canonicalJson(value))).toEqual(value);
  });
});

describe('the SHA-256 implementations', () => {
  const inputs: (string | Uint8Array)[][] = [
    ['-abc'],
    ['POST /orders\n', bytes('{"a":1}')],
    ['café ☕'],
    [''],
    ['x', new Uint8Array(0), 'y'],
    // Joined into one buffer below 64 KiB, multi-byte characters included; hashed piece by piece above.
    ['POST /cafés/☕\n', bytes('{"é":"☕"}'), '😀'],
    ['POST /orders\n', new Uint8Array(64 * 1024 - 14).fill(7)],
    ['POST /orders\n', new Uint8Array(64 * 1024).fill(7)],
    ['☕'.repeat(30_000), bytes('x')],
  ];

  it.each(inputs)('agree with node:crypto on %j', async (...parts) => {
    const expected = createHash('sha256');
    for (const part of parts) expected.update(part);
    const hex = expected.digest('hex');
    expect(nodeSha256(parts)).toBe(hex);
    expect(await webSha256(parts)).toBe(hex);
  });

  it('agree with node:crypto on any parts: ASCII, other characters past ASCII ones, lone surrogates, bytes', () => {
    const text = fc.oneof(
      fc.string({ maxLength: 300, unit: 'binary' }),
      fc.string({ maxLength: 300 }).map((ascii) => `${ascii}é`),
      fc.string({ minLength: 250, maxLength: 300 }),
    );
    const part = fc.oneof(text, fc.uint8Array({ maxLength: 300 }));
    fc.assert(
      fc.property(fc.array(part, { minLength: 1, maxLength: 4 }), (parts) => {
        const expected = createHash('sha256');
        for (const piece of parts) expected.update(piece);
        expect(nodeSha256(parts)).toBe(expected.digest('hex'));
      }),
      { numRuns: 1000 },
    );
  });

  it('hash each input alone when one buffer is reused for the joined parts: nothing of a longer one before it', () => {
    const sequence: (string | Uint8Array)[][] = [
      ['POST /long\n', new Uint8Array(5000).fill(9)],
      ['POST /a\n', bytes('{}')],
      ['☕'.repeat(400), bytes('x')],
      ['b', new Uint8Array(0)],
    ];
    for (const parts of sequence) {
      const expected = createHash('sha256');
      for (const part of parts) expected.update(part);
      expect(nodeSha256(parts)).toBe(expected.digest('hex'));
    }
  });
});

describe('requestTarget', () => {
  it('keeps a path with its query string as it is', () => {
    expect(requestTarget('/orders?x=1&y=%20')).toBe('/orders?x=1&y=%20');
    expect(requestTarget('/')).toBe('/');
  });

  it('cuts an absolute URL down to its path and query string, without the fragment', () => {
    expect(requestTarget('https://api.example.com/orders?x=1')).toBe('/orders?x=1');
    expect(requestTarget('http://127.0.0.1:3000/a/b#frag')).toBe('/a/b');
    expect(requestTarget('http://example.com')).toBe('/');
    expect(requestTarget('http://example.com?q=1')).toBe('/?q=1');
  });

  it('leaves anything else alone', () => {
    expect(requestTarget('*')).toBe('*');
    expect(requestTarget('orders')).toBe('orders');
  });
});

/** An object with these own members, in this order (`__proto__` as an own key, as `JSON.parse` makes it). */
function objectFromEntries(entries: readonly [string, unknown][]): Record<string, unknown> {
  const object: Record<string, unknown> = {};
  for (const [name, value] of entries)
    Object.defineProperty(object, name, { value, enumerable: true, writable: true, configurable: true });
  return object;
}
