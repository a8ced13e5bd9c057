import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { LARGEST_CELL, RecordArena, SLAB_BYTES } from '../../src/backends/_arena.js';
import type {
  HeaderPair,
  IdempotencyRecord,
  StoredResponse,
  TextBodyResponse,
} from '../../src/core/types.js';

/** A key as the engine makes them: a dash and a UUID. */
const KEY = '-6f1c7c1e-0c55-4f5e-9f43-2b0d3c9a1b7e';

function record(
  body: Uint8Array,
  headers: HeaderPair[] = [],
  fingerprint = 'f'.repeat(64),
): IdempotencyRecord {
  return { fingerprint, createdAt: 1_700_000_000_123, response: { status: 201, headers, body } };
}

/** A record as plain data, its body as an array, for deep comparison. */
function plain(stored: IdempotencyRecord) {
  const { response } = stored;
  return {
    ...stored,
    response: response === null ? null : { ...response, body: [...response.body] },
  };
}

describe('RecordArena', () => {
  it('gives back each record as it was stored', () => {
    const arena = new RecordArena();
    const records: IdempotencyRecord[] = [
      record(new Uint8Array(0)),
      record(new TextEncoder().encode('{"id":1}'), [
        ['content-type', 'application/json'],
        ['set-cookie', 'a=1'],
        ['set-cookie', 'b=2'],
        ['x-empty', ''],
        ['x-line', 'one\ntwo'],
        ['x-latin1', 'caf\u00e9 \u00ff'],
        ['x-wide', 'price \u20ac, a lone surrogate \ud800, an emoji \ud83d\ude00'],
      ]),
      record(new Uint8Array([0, 255, 1, 254]), [], ''),
      record(new Uint8Array(3), [], 'a custom fingerprint \u2603'),
      { fingerprint: 'f'.repeat(64), createdAt: 5, response: null },
      record(new Uint8Array(LARGEST_CELL * 3).fill(7), [['content-type', 'application/octet-stream']]),
    ];
    const keys = records.map((_each, i) => (i === 3 ? `5:t\u00e9n\u20ac:${KEY}` : `${KEY}${i}`));
    const handles = records.map((each, i) =>
      arena.store(keys[i]!, each, i === 0 ? Number.POSITIVE_INFINITY : 1000 + i),
    );
    records.forEach((each, i) => {
      const handle = handles[i]!;
      expect(arena.key(handle)).toBe(keys[i]);
      expect(arena.hasKey(handle, keys[i]!)).toBe(true);
      expect(plain(arena.read(handle))).toEqual(plain(each));
      expect(plain(arena.read(handle, each.fingerprint))).toEqual(plain(each));
      expect(arena.expiresAt(handle)).toBe(i === 0 ? Number.POSITIVE_INFINITY : 1000 + i);
      expect(arena.createdAt(handle)).toBe(each.createdAt);
      expect(arena.status(handle)).toBe(each.response?.status ?? null);
      expect(arena.bodyLength(handle)).toBe(each.response?.body.byteLength ?? 0);
      expect(arena.fingerprint(handle)).toBe(each.fingerprint);
      expect(arena.hasFingerprint(handle, each.fingerprint)).toBe(true);
    });
  });

  it.each([
    ['any strings', fc.string({ unit: 'binary', maxLength: 40 })],
    ['ASCII strings, written and read in one piece', fc.string({ maxLength: 40 })],
    // Longer than a record's usual strings: all ASCII (one byte a unit), and of any units (written again, each
    // string in one or two bytes a unit, once one is found that is not ASCII, the first or a later one).
    ['long ASCII strings', fc.string({ minLength: 60, maxLength: 200 })],
    ['long strings of any units', fc.string({ unit: 'binary', minLength: 60, maxLength: 200 })],
  ])('round-trips %s and any bytes', (_name, text) => {
    const arena = new RecordArena();
    fc.assert(
      fc.property(
        text,
        fc.array(fc.tuple(text, text), { maxLength: 6 }),
        fc.uint8Array({ maxLength: 3 * LARGEST_CELL }),
        fc.integer({ min: 100, max: 599 }),
        text,
        (fingerprint, headers, body, status, key) => {
          const stored: IdempotencyRecord = {
            fingerprint,
            createdAt: 42,
            response: { status, headers, body },
          };
          const handle = arena.store(key, stored, 99);
          expect(plain(arena.read(handle))).toEqual(plain(stored));
          expect(arena.key(handle)).toBe(key);
          expect(arena.fingerprint(handle)).toBe(fingerprint);
          expect(arena.hasKey(handle, key)).toBe(true);
          expect(arena.hasKey(handle, `${key}x`)).toBe(false);
          expect(arena.hasFingerprint(handle, fingerprint)).toBe(true);
          expect(arena.hasFingerprint(handle, `${fingerprint}x`)).toBe(false);
          arena.free(handle);
        },
      ),
      { numRuns: 500 },
    );
    // Every record was freed: nothing but empty slabs is left, and they are given back.
    arena.releaseEmptySlabs();
    expect(arena.slabCount).toBe(0);
  });

  it.each([
    ['ASCII', fc.string({ maxLength: 300 }), 300],
    ['any units, lone surrogates included', fc.string({ unit: 'binary', maxLength: 300 }), 300],
    [
      'any units, past a cell',
      fc.string({ unit: 'binary', minLength: LARGEST_CELL, maxLength: LARGEST_CELL + 50 }),
      30,
    ],
  ])('stores a body sent as text (%s) as the bytes Node.js sends for it', (_name, text, numRuns) => {
    const arena = new RecordArena();
    fc.assert(
      fc.property(text, fc.array(fc.tuple(text, text), { maxLength: 3 }), (body, headers) => {
        const sent = Buffer.from(body);
        const handed: TextBodyResponse = { status: 200, headers, body };
        const stored = { fingerprint: 'f'.repeat(64), createdAt: 7, response: handed as StoredResponse };
        const handle = arena.store(KEY, stored, 99);
        expect(arena.bodyLength(handle)).toBe(sent.byteLength);
        expect(plain(arena.read(handle))).toEqual(plain({ ...stored, response: { ...handed, body: sent } }));
        arena.free(handle);
      }),
      { numRuns },
    );
    arena.releaseEmptySlabs();
    expect(arena.slabCount).toBe(0);
  });

  it('tells keys and fingerprints apart where they lie: length, a narrow unit, a wide unit', () => {
    const arena = new RecordArena();
    const narrow = arena.store('wxyz', record(new Uint8Array(1), [], 'abcd'), 1);
    const wide = arena.store('wx\u20acz', record(new Uint8Array(1), [], 'ab\u20acd'), 1);
    // A wide key before a narrow fingerprint, and the other way round: each found where the other ends.
    const wideKey = arena.store('wx\u20acz', record(new Uint8Array(1), [], 'abcd'), 1);
    const narrowKey = arena.store('wxyz', record(new Uint8Array(1), [], 'ab\u20acd'), 1);
    expect(arena.hasKey(narrow, 'wxy')).toBe(false);
    expect(arena.hasKey(narrow, 'wxya')).toBe(false);
    expect(arena.hasKey(narrow, 'wx\u20acz')).toBe(false);
    expect(arena.hasKey(narrow, 'wxyz')).toBe(true);
    expect(arena.hasKey(wide, 'wxyz')).toBe(false);
    expect(arena.hasKey(wide, 'wx\u20acz')).toBe(true);
    expect(arena.hasFingerprint(wideKey, 'abcd')).toBe(true);
    expect(arena.fingerprint(wideKey)).toBe('abcd');
    expect(arena.hasFingerprint(narrowKey, 'ab\u20acd')).toBe(true);
    expect(arena.fingerprint(narrowKey)).toBe('ab\u20acd');
    expect(arena.hasKey(narrowKey, 'wxyz')).toBe(true);
    expect(arena.hasFingerprint(narrow, 'abc')).toBe(false);
    expect(arena.hasFingerprint(narrow, 'abce')).toBe(false);
    expect(arena.hasFingerprint(narrow, 'ab\u20acd')).toBe(false);
    expect(arena.hasFingerprint(wide, 'abcd')).toBe(false);
    expect(arena.hasFingerprint(wide, 'ab\u20ace')).toBe(false);
    expect(arena.hasFingerprint(wide, 'ab\u20acd')).toBe(true);
  });

  it('hands out a copy of the body, which a later record in the same cell does not change', () => {
    const arena = new RecordArena();
    const sent = new Uint8Array([1, 2, 3]);
    const first = arena.store(KEY, record(sent), 1);
    sent[0] = 9;
    const read = arena.read(first);
    expect([...read.response!.body]).toEqual([1, 2, 3]);
    expect(read.response!.body.buffer.byteLength).toBe(3);
    arena.free(first);
    const second = arena.store(KEY, record(new Uint8Array([4, 5, 6])), 1);
    expect(second).toBe(first);
    expect([...read.response!.body]).toEqual([1, 2, 3]);
  });

  it('reuses freed cells, and gives back slabs whose cells are all free', () => {
    const arena = new RecordArena();
    const body = new Uint8Array(100);
    // Enough records of one size for several slabs.
    const perSlab = Math.floor(SLAB_BYTES / 256);
    const handles = Array.from({ length: 3 * perSlab }, () => arena.store(KEY, record(body), 1));
    const slabs = arena.slabCount;
    expect(slabs).toBeGreaterThanOrEqual(3);
    for (const handle of handles.splice(0, perSlab)) arena.free(handle);
    // Freed cells are used again before any new slab.
    const again = Array.from({ length: perSlab }, () => arena.store(KEY, record(body), 1));
    expect(arena.slabCount).toBe(slabs);
    for (const handle of [...handles, ...again]) arena.free(handle);
    const kept = arena.store(KEY, record(body), 1);
    arena.releaseEmptySlabs();
    // Only the slab of the record still held stays.
    expect(arena.slabCount).toBe(1);
    expect([...arena.read(kept).response!.body]).toEqual([...body]);
    // Cells of the slabs given back are not handed out again; new records still fit.
    const after = Array.from({ length: 2 * perSlab }, (_, i) =>
      arena.store(KEY, record(new Uint8Array(100).fill(i % 256)), 1),
    );
    expect(after.map((handle) => arena.read(handle).response!.body[0])).toEqual(after.map((_, i) => i % 256));
    expect([...arena.read(kept).response!.body]).toEqual([...body]);
  });

  it('gives back the slabs of a burst of hundreds of thousands of records, keeping the free cells of the others', () => {
    const arena = new RecordArena();
    const body = new Uint8Array(8);
    const handles = Array.from({ length: 400_000 }, () => arena.store(KEY, record(body), 1));
    const slabs = arena.slabCount;
    // One record in a thousand stays in the first half: the slabs of the second half empty, and the other free cells
    // (close to 200 000) stay in use for new records.
    const kept = handles.filter((_, i) => i < 200_000 && i % 1000 === 0);
    handles.forEach((handle, i) => {
      if (i >= 200_000 || i % 1000 !== 0) arena.free(handle);
    });
    arena.releaseEmptySlabs();
    expect(arena.slabCount).toBeGreaterThan(slabs / 3);
    expect(arena.slabCount).toBeLessThan((2 * slabs) / 3);
    for (const handle of kept) expect([...arena.read(handle).response!.body]).toEqual([...body]);
    // New records fill the free cells first, without a new slab.
    const held = arena.slabCount;
    for (let i = 0; i < 100_000; i++) arena.store(KEY, record(body), 1);
    expect(arena.slabCount).toBe(held);
  });

  it('gives a large record a buffer of its own, given back when it is freed', () => {
    const arena = new RecordArena();
    const large = arena.store(KEY, record(new Uint8Array(LARGEST_CELL + 1)), 1);
    expect(arena.slabCount).toBe(1);
    expect(arena.bytesOf(large)).toBeGreaterThan(LARGEST_CELL);
    expect(arena.bytesOf(large)).toBeLessThan(LARGEST_CELL + 256);
    arena.free(large);
    expect(arena.slabCount).toBe(0);
  });

  it('sizes cells close to the record: at most a fifth unused above 128 bytes', () => {
    const arena = new RecordArena();
    for (let length = 0; length <= LARGEST_CELL - 200; length += 37) {
      const handle = arena.store(KEY, record(new Uint8Array(length)), 1);
      // The head, a word and the units of the key and of the fingerprint, the body.
      const needed = 28 + 8 + KEY.length + 64 + length;
      expect(arena.bytesOf(handle)).toBeGreaterThanOrEqual(needed);
      expect(arena.bytesOf(handle)).toBeLessThanOrEqual(Math.max(128, Math.ceil(needed * 1.25)));
    }
  });
});
