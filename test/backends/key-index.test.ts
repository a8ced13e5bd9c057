import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { hashKey, KeyIndex, type KeyOwner } from '../../src/backends/_key-index.js';

/**
 * An index whose entries are numbered as the test hands them out, each number's key remembered, as the memory
 * backend's locks and records remember theirs. `asked` counts the key comparisons the index made.
 */
function indexWith(hash?: (key: string) => number) {
  const keyOf = new Map<number, string>();
  let asked = 0;
  const owner: KeyOwner = {
    isKeyOf(value, key) {
      asked++;
      return keyOf.get(value) === key;
    },
    keyOf(value) {
      const key = keyOf.get(value);
      if (key === undefined) throw new Error(`no key for entry ${value}`);
      return key;
    },
  };
  let next = 0;
  const index = new KeyIndex(owner, hash);
  return {
    index,
    asked: () => asked,
    /** A new entry number for `key`, negative every other time, as locks are. */
    number(key: string): number {
      next++;
      const value = next % 2 === 0 ? next : ~next;
      keyOf.set(value, key);
      return value;
    },
  };
}

type Operation =
  | { kind: 'set'; key: string }
  | { kind: 'get'; key: string }
  | { kind: 'delete'; key: string }
  | { kind: 'clear' };

/** Runs the operations on the index and on a `Map`, and checks that they answer alike after each one. */
function matchesMap(hash: ((key: string) => number) | undefined, operations: Operation[]): void {
  const { index, number } = indexWith(hash);
  const reference = new Map<string, number>();
  for (const operation of operations) {
    if (operation.kind === 'set') {
      const value = number(operation.key);
      index.set(operation.key, value);
      reference.set(operation.key, value);
    } else if (operation.kind === 'get') {
      expect(index.get(operation.key)).toBe(reference.get(operation.key));
    } else if (operation.kind === 'delete') {
      expect(index.delete(operation.key)).toBe(reference.delete(operation.key));
    } else {
      index.clear();
      reference.clear();
    }
    expect(index.size).toBe(reference.size);
  }
  for (const [key, value] of reference) expect(index.get(key)).toBe(value);
  expect(index.values().sort((a, b) => a - b)).toEqual([...reference.values()].sort((a, b) => a - b));
}

// Mostly from a pool of 60, so that keys set are got and deleted again, and clusters form and break up.
const keys = fc.oneof(
  { weight: 8, arbitrary: fc.nat(59).map((i) => `key-${i}`) },
  { weight: 1, arbitrary: fc.uuid() },
  { weight: 1, arbitrary: fc.string({ unit: 'binary' }) },
);
const operations = fc.array(
  fc.oneof(
    { weight: 50, arbitrary: keys.map((key) => ({ kind: 'set' as const, key })) },
    { weight: 30, arbitrary: keys.map((key) => ({ kind: 'get' as const, key })) },
    { weight: 30, arbitrary: keys.map((key) => ({ kind: 'delete' as const, key })) },
    // Rare: clusters have to grow before they can break up.
    { weight: 1, arbitrary: fc.constant({ kind: 'clear' as const }) },
  ),
  { maxLength: 300 },
);

describe('KeyIndex', () => {
  it.each([
    ['its own hash', undefined],
    // Every key meets every other: each is compared, and past 32 they all overflow.
    ['one hash for every key', () => 7],
    // Four hashes: keys cluster in a few neighbouring slots, and are moved back as others are deleted.
    ['four hashes, in neighbouring slots', (key: string) => (hashKey(key) & 3) + 1020],
    // Slots on both sides of the table's end, where clusters wrap around.
    ['hashes around the end of the table', (key: string) => 1020 + (hashKey(key) & 7)],
    ['a hash of 0, which marks empty slots', () => 0],
  ])('answers as a Map does, with %s', (_name, hash) => {
    fc.assert(
      fc.property(operations, (sequence) => matchesMap(hash, sequence)),
      { numRuns: 300 },
    );
  });

  it('answers as a Map does once grown, with clusters across the end of the grown table', () => {
    // 1 500 keys grow the table to 4 096 slots; their hashes point at slots 3 000 to 5 047, so that in the grown
    // table clusters wrap around its end, and deletes move entries back across it.
    const hash = (key: string) => 3000 + (hashKey(key) & 2047);
    const pool = Array.from({ length: 1500 }, (_, i) => `grown-${i}`);
    const poolKeys = fc.nat(pool.length - 1).map((i) => pool[i]!);
    const mixed = fc.array(
      fc.oneof(
        { weight: 2, arbitrary: poolKeys.map((key) => ({ kind: 'set' as const, key })) },
        { weight: 2, arbitrary: poolKeys.map((key) => ({ kind: 'get' as const, key })) },
        { weight: 3, arbitrary: poolKeys.map((key) => ({ kind: 'delete' as const, key })) },
      ),
      { minLength: 1000, maxLength: 2000 },
    );
    const fill: Operation[] = pool.map((key) => ({ kind: 'set', key }));
    fc.assert(
      fc.property(mixed, (sequence) => matchesMap(hash, [...fill, ...sequence])),
      { numRuns: 10 },
    );
  });

  it('holds 200 000 keys, growing, and finds each with about one comparison', () => {
    const { index, number, asked } = indexWith();
    const all = Array.from(
      { length: 200_000 },
      (_, i) => `-${i.toString(16).padStart(8, '0')}-7b1c-4e0a-9c11-5d7e0f3a2b9c`,
    );
    const values = all.map((key) => {
      const value = number(key);
      index.set(key, value);
      return value;
    });
    expect(index.size).toBe(all.length);
    const before = asked();
    expect(all.filter((key, i) => index.get(key) !== values[i])).toEqual([]);
    expect((asked() - before) / all.length).toBeLessThan(1.01);
    expect(all.filter((key, i) => i % 2 === 0 && !index.delete(key))).toEqual([]);
    expect(index.size).toBe(all.length / 2);
    expect(all.filter((key, i) => index.get(key) !== (i % 2 === 0 ? undefined : values[i]))).toEqual([]);
  });

  it('bounds the work of keys made to meet: past 32 in a row, they overflow to a Map', () => {
    const { index, number, asked } = indexWith(() => 42);
    const crafted = Array.from({ length: 2000 }, (_, i) => `crafted-${i}`);
    for (const key of crafted) index.set(key, number(key));
    const before = asked();
    for (const key of crafted) expect(index.get(key)).toBeDefined();
    expect(index.get('absent')).toBeUndefined();
    // At most 32 comparisons per lookup, not one per key held.
    expect(asked() - before).toBeLessThanOrEqual(32 * (crafted.length + 1));
  });
});
