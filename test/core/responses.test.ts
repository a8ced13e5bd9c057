import { describe, expect, it } from 'vitest';
import { isStoredHeader, REMOVED_HEADER, setMembership, storedHeaders } from '../../src/core/responses.js';
import type { HeaderPair } from '../../src/core/types.js';

const UNSTORED = [
  'connection',
  'keep-alive',
  'proxy-authenticate',
  'proxy-authorization',
  'proxy-connection',
  'te',
  'trailer',
  'transfer-encoding',
  'upgrade',
  'set-cookie',
  'date',
  'content-length',
];

/** Names of the same lengths as unstored ones, and others: each must be stored. */
const STORED = [
  'content-type',
  'etag',
  'vary',
  'location',
  'x-trailer',
  'tE-x',
  'dates',
  'x-upgrade',
  'link',
  'age',
  // Longer than the length bits go: 31 units and more.
  'x-a-header-name-of-31-code-unit',
  'access-control-allow-credentials',
];

describe('setMembership', () => {
  it('finds names of every length, those past the length bits (31 units and more) included', () => {
    const lengths = [1, 2, 30, 31, 32, 33, 64, 200];
    const names = lengths.map((length) => 'n'.repeat(length));
    const isMember = setMembership(new Set(names));
    for (const name of names) expect(isMember(name), `${name.length} units`).toBe(true);
    // Same lengths, other names; and lengths no member has.
    for (const length of lengths) expect(isMember('m'.repeat(length)), `${length} units`).toBe(false);
    for (const length of [0, 3, 29]) expect(isMember('n'.repeat(length)), `${length} units`).toBe(false);
  });

  it('answers no for a long name when the set holds only short ones', () => {
    const isMember = setMembership(new Set(['te', 'date']));
    expect(isMember('x'.repeat(31))).toBe(false);
    expect(isMember('x'.repeat(40))).toBe(false);
    expect(isMember('te')).toBe(true);
  });
});

describe('storedHeaders', () => {
  it.each(UNSTORED)('leaves out %s, in any case, and its removal', (name) => {
    expect(isStoredHeader(name)).toBe(false);
    const pairs: HeaderPair[] = [
      ['content-type', 'application/json'],
      [name, 'x'],
      [name.toUpperCase(), 'y'],
      [REMOVED_HEADER, name],
    ];
    expect(storedHeaders(pairs)).toEqual([['content-type', 'application/json']]);
  });

  it.each(STORED)('keeps %s, lower-cased', (name) => {
    expect(isStoredHeader(name.toLowerCase())).toBe(true);
    expect(storedHeaders([[name, 'v']])).toEqual([[name.toLowerCase(), 'v']]);
    expect(storedHeaders([[REMOVED_HEADER, name.toLowerCase()]])).toEqual([
      [REMOVED_HEADER, name.toLowerCase()],
    ]);
  });

  it('returns a list that is already as stored unchanged, the same array', () => {
    const pairs: HeaderPair[] = [
      ['content-type', 'application/json'],
      ['x-request-id', '1'],
      [REMOVED_HEADER, 'x-powered-by'],
    ];
    expect(storedHeaders(pairs)).toBe(pairs);
  });

  it('lower-cases a name with one upper-case letter anywhere in it', () => {
    for (const name of ['Etag', 'etaG', 'x-Id', 'X-ID']) {
      expect(storedHeaders([[name, 'v']])).toEqual([[name.toLowerCase(), 'v']]);
    }
  });
});
