import { describe, expect, it } from 'vitest';
import { LeaseList } from '../../src/core/leases.js';

const entry = (name: string) => ({ name, leaseSlot: -1 });

describe('LeaseList', () => {
  it('holds each entry once, and removes any of them, first, middle or last', () => {
    const list = new LeaseList<ReturnType<typeof entry>>();
    const a = entry('a');
    const b = entry('b');
    const c = entry('c');
    const d = entry('d');
    for (const item of [a, b, c, d, a]) list.add(item);
    expect(list.size).toBe(4);
    list.delete(b);
    expect(list.snapshot().map((item) => item.name)).toEqual(['a', 'd', 'c']);
    list.delete(d);
    list.delete(d);
    list.delete(a);
    expect(list.snapshot().map((item) => item.name)).toEqual(['c']);
    expect([a, b, d].map((item) => item.leaseSlot)).toEqual([-1, -1, -1]);
    list.add(b);
    list.delete(c);
    expect(list.snapshot().map((item) => item.name)).toEqual(['b']);
    expect(b.leaseSlot).toBe(0);
  });

  it('keeps every slot pointing at its entry through many adds and removes', () => {
    const list = new LeaseList<ReturnType<typeof entry>>();
    const all = Array.from({ length: 200 }, (_, i) => entry(String(i)));
    const held = new Set<ReturnType<typeof entry>>();
    let seed = 7;
    const random = () => {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      return seed / 2 ** 31;
    };
    for (let step = 0; step < 5000; step++) {
      const item = all[Math.floor(random() * all.length)]!;
      if (random() < 0.5) {
        list.add(item);
        held.add(item);
      } else {
        list.delete(item);
        held.delete(item);
      }
    }
    const listed = list.snapshot();
    expect(new Set(listed)).toEqual(held);
    expect(listed.every((item, i) => item.leaseSlot === i)).toBe(true);
    expect(all.filter((item) => !held.has(item)).every((item) => item.leaseSlot === -1)).toBe(true);
  });

  it('gives a snapshot that stays as it was while the list changes', () => {
    const list = new LeaseList<ReturnType<typeof entry>>();
    const items = ['a', 'b', 'c'].map(entry);
    for (const item of items) list.add(item);
    const seen: string[] = [];
    for (const item of list.snapshot()) {
      seen.push(item.name);
      list.delete(item);
    }
    expect(seen).toEqual(['a', 'b', 'c']);
    expect(list.size).toBe(0);
  });
});
