import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { utf8, utf8FitsIn } from '../../src/core/utf8.js';

describe('utf8FitsIn', () => {
  it('tells whether the UTF-8 Node.js sends for a string fits a limit, lone surrogates included', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 60 }), fc.nat({ max: 200 }), (text, limit) => {
        expect(utf8FitsIn(text, limit)).toBe(Buffer.byteLength(text) <= limit);
        expect([...utf8(text)]).toEqual([...Buffer.from(text)]);
        // Where there is no Buffer, `utf8` is TextEncoder's: the same bytes.
        expect([...new TextEncoder().encode(text)]).toEqual([...Buffer.from(text)]);
      }),
      { numRuns: 2000 },
    );
  });

  it.each([
    ['a surrogate pair, 4 bytes', '\ud83d\ude00', 4],
    ['a lone high surrogate at the end, 3 bytes', 'a\ud83d', 4],
    ['a lone low surrogate, 3 bytes', '\ude00', 3],
    ['two bytes a unit', '\u00e9\u00e9', 4],
    ['three bytes a unit', '\u20ac', 3],
  ])('counts %s', (_name, text, bytes) => {
    expect(utf8FitsIn(text, bytes)).toBe(true);
    expect(utf8FitsIn(text, bytes - 1)).toBe(false);
  });
});
