import { describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import { IdempotencyEngine } from '../../src/core/engine.js';
import { hasControlCharacter, isUuid4, unquoteKey } from '../../src/core/key.js';
import type { IdempotencyEvent, IdempotencyOptions } from '../../src/core/options.js';
import type { EngineReply } from '../../src/core/responses.js';

const backend = new MemoryBackend();

function engineWith(options: Partial<IdempotencyOptions> = {}): IdempotencyEngine {
  return new IdempotencyEngine({ backend, ...options });
}

function asReply(value: string | EngineReply | undefined): EngineReply {
  expect(typeof value).toBe('object');
  return value as EngineReply;
}

function bodyText(reply: EngineReply): string {
  return Buffer.from(reply.body).toString('utf8');
}

describe('unquoteKey', () => {
  it('returns a bare key as it is', () => {
    expect(unquoteKey('abc')).toBe('abc');
    expect(unquoteKey('a"b')).toBe('a"b');
    expect(unquoteKey('')).toBe('');
  });

  it('unquotes an RFC 8941 quoted string', () => {
    expect(unquoteKey('"abc"')).toBe('abc');
    expect(unquoteKey('"8e03978e-40d5-43e8-bc93-6894a57f9324"')).toBe('8e03978e-40d5-43e8-bc93-6894a57f9324');
    expect(unquoteKey('"with space"')).toBe('with space');
  });

  it('resolves the \\" and \\\\ escapes', () => {
    expect(unquoteKey('"a\\"b"')).toBe('a"b');
    expect(unquoteKey('"a\\\\b"')).toBe('a\\b');
    expect(unquoteKey('"\\\\"')).toBe('\\');
    expect(unquoteKey('"\\""')).toBe('"');
    expect(unquoteKey('"a\\\\\\"b"')).toBe('a\\"b');
    expect(unquoteKey('"x\\\\"')).toBe('x\\');
  });

  it('unquotes an empty quoted string to the empty string', () => {
    expect(unquoteKey('""')).toBe('');
  });

  it('leaves values that are not wholly quoted alone', () => {
    expect(unquoteKey('"')).toBe('"');
    expect(unquoteKey('"abc')).toBe('"abc');
    expect(unquoteKey('abc"')).toBe('abc"');
    expect(unquoteKey(" 'abc' ")).toBe(" 'abc' ");
    expect(unquoteKey("'abc'")).toBe("'abc'");
  });

  it('unquotes one level only', () => {
    expect(unquoteKey('""abc""')).toBe('"abc"');
  });
});

describe('hasControlCharacter', () => {
  it('finds C0 control characters and DEL', () => {
    for (const code of [0x00, 0x01, 0x09, 0x0a, 0x0d, 0x1b, 0x1f, 0x7f]) {
      expect(hasControlCharacter(`ab${String.fromCharCode(code)}cd`), `0x${code.toString(16)}`).toBe(true);
    }
  });

  it('accepts printable ASCII and non-ASCII characters', () => {
    expect(hasControlCharacter(' !"#$%&\'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~')).toBe(false);
    expect(hasControlCharacter('clé-ключ-鍵')).toBe(false);
    expect(hasControlCharacter('')).toBe(false);
  });
});

describe('isUuid4', () => {
  const CANONICAL = '8e03978e-40d5-43e8-bc93-6894a57f9324';

  describe('accepts', () => {
    it.each([
      ['canonical lower case', CANONICAL],
      ['canonical upper case', CANONICAL.toUpperCase()],
      ['canonical mixed case', '8E03978e-40D5-43e8-BC93-6894a57F9324'],
      ['the 32-hex form', CANONICAL.replaceAll('-', '')],
      ['the 32-hex form in upper case', CANONICAL.replaceAll('-', '').toUpperCase()],
      ['variant nibble 8', '00000000-0000-4000-8000-000000000000'],
      ['variant nibble 9', 'ffffffff-ffff-4fff-9fff-ffffffffffff'],
      ['variant nibble a', '12345678-1234-4234-a234-123456789abc'],
      ['variant nibble b', '12345678-1234-4234-b234-123456789abc'],
      ['crypto.randomUUID()', crypto.randomUUID()],
    ])('%s', (_, key) => {
      expect(isUuid4(key)).toBe(true);
    });

    it('every crypto.randomUUID(), with and without hyphens', () => {
      for (let i = 0; i < 200; i++) {
        const uuid = crypto.randomUUID();
        expect(isUuid4(uuid)).toBe(true);
        expect(isUuid4(uuid.replaceAll('-', ''))).toBe(true);
      }
    });
  });

  describe('refuses', () => {
    it.each([
      ['the nil UUID', '00000000-0000-0000-0000-000000000000'],
      ['the nil UUID without hyphens', '00000000000000000000000000000000'],
      ['the max UUID', 'ffffffff-ffff-ffff-ffff-ffffffffffff'],
      ['a v1 UUID', 'c232ab00-9414-11ec-b3c8-9f6bdeced846'],
      ['a v3 UUID', '5df41881-3aed-3515-88a7-2f4a814cf09e'],
      ['a v5 UUID', '2ed6657d-e927-568b-95e1-2665a8aea6a2'],
      ['a v7 UUID', '017f22e2-79b0-7cc3-98c4-dc0c0c07398f'],
      ['a v1 UUID without hyphens', 'c232ab00941411ecb3c89f6bdeced846'],
      ['the NCS variant (0)', '8e03978e-40d5-43e8-0c93-6894a57f9324'],
      ['the NCS variant (7)', '8e03978e-40d5-43e8-7c93-6894a57f9324'],
      ['the Microsoft variant (c)', '8e03978e-40d5-43e8-cc93-6894a57f9324'],
      ['the reserved variant (f)', '8e03978e-40d5-43e8-fc93-6894a57f9324'],
      ['a wrong variant without hyphens', '8e03978e40d543e8cc936894a57f9324'],
      ['braces', `{${CANONICAL}}`],
      ['a urn:uuid: prefix', `urn:uuid:${CANONICAL}`],
      ['hyphens in the wrong places', '8e03978e4-0d5-43e8-bc93-6894a57f9324'],
      ['a missing hyphen', '8e03978e-40d543e8-bc93-6894a57f9324'],
      ['only some hyphens', '8e03978e40d5-43e8-bc936894a57f9324'],
      ['an extra hyphen', '8e03978e-40d5-43e8-bc93-6894-a57f9324'],
      ['one digit short', CANONICAL.slice(0, -1)],
      ['one digit long', `${CANONICAL}0`],
      ['31 hex digits', CANONICAL.replaceAll('-', '').slice(0, -1)],
      ['33 hex digits', `${CANONICAL.replaceAll('-', '')}0`],
      ['a non-hex digit', '8e03978e-40d5-43e8-bc93-6894a57f932g'],
      ['surrounding whitespace', ` ${CANONICAL} `],
      ['a trailing newline', `${CANONICAL}\n`],
      ['the empty string', ''],
      ['a plain word', 'not-a-uuid'],
      ['36 characters that are not a UUID', 'x'.repeat(36)],
    ])('%s', (_, key) => {
      expect(isUuid4(key)).toBe(false);
    });
  });
});

describe('IdempotencyEngine.readKey', () => {
  describe('a missing key', () => {
    it.each([
      ['undefined', undefined],
      ['null', null],
      ['the empty string', ''],
      ['an empty array', []],
    ])('passes through for %s', (_, header) => {
      expect(engineWith().readKey('POST', header)).toBeUndefined();
    });

    it('answers 400 when the key is required', () => {
      const reply = asReply(engineWith({ required: true }).readKey('POST', undefined));
      expect(reply.kind).toBe('reply');
      expect(reply.status).toBe(400);
      expect(reply.replayed).toBe(false);
      expect(reply.headers).toEqual([['content-type', 'application/json']]);
      expect(bodyText(reply)).toBe(`{"detail":"'Idempotency-Key' header is required"}`);
    });

    it('answers 400 for an empty header when the key is required', () => {
      expect(asReply(engineWith({ required: true }).readKey('POST', '')).status).toBe(400);
    });

    it('names the configured header in the 400 body', () => {
      const reply = asReply(
        engineWith({ required: true, idempotencyHeaderKey: 'X-Key' }).readKey('POST', undefined),
      );
      expect(bodyText(reply)).toBe(`{"detail":"'X-Key' header is required"}`);
    });

    it('reports a missing-key event only when the key is required', () => {
      const events: IdempotencyEvent[] = [];
      engineWith({ onEvent: (event) => events.push(event) }).readKey('POST', undefined);
      expect(events).toEqual([]);
      engineWith({ required: true, onEvent: (event) => events.push(event) }).readKey('POST', undefined);
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({
        outcome: 'missing-key',
        keyHash: undefined,
        method: 'POST',
        status: 400,
      });
    });
  });

  describe('a valid key', () => {
    it('is returned as it is', () => {
      expect(engineWith().readKey('POST', 'order-42')).toBe('order-42');
    });

    it('is unquoted from its RFC 8941 form', () => {
      expect(engineWith().readKey('POST', '"order-42"')).toBe('order-42');
      expect(engineWith().readKey('POST', '"say \\"hi\\""')).toBe('say "hi"');
    });

    it('is read from a header given as a one-value array', () => {
      expect(engineWith().readKey('POST', ['only'])).toBe('only');
    });

    it('may contain a comma inside an RFC 8941 quoted string', () => {
      expect(engineWith().readKey('POST', '"a,b"')).toBe('a,b');
      expect(engineWith().readKey('POST', '"a\\",b"')).toBe('a",b');
      expect(engineWith().readKey('POST', '"a\\\\,b"')).toBe('a\\,b');
    });

    it('may contain a quote when it has no comma', () => {
      expect(engineWith().readKey('POST', 'ab"c')).toBe('ab"c');
      expect(engineWith().readKey('POST', '"abc')).toBe('"abc');
    });

    it('may be exactly maxKeyLength long', () => {
      const key = 'k'.repeat(255);
      expect(engineWith().readKey('POST', key)).toBe(key);
      expect(engineWith({ maxKeyLength: 8 }).readKey('POST', '12345678')).toBe('12345678');
    });

    it('is measured after unquoting', () => {
      expect(engineWith({ maxKeyLength: 8 }).readKey('POST', '"12345678"')).toBe('12345678');
    });

    it('may contain non-ASCII characters and spaces', () => {
      expect(engineWith().readKey('POST', 'clé à molette')).toBe('clé à molette');
    });

    it('is accepted as a v4 UUID, hyphenated or not, when UUIDs are enforced', () => {
      const engine = engineWith({ enforceUuid4Formatting: true });
      const uuid = crypto.randomUUID();
      expect(engine.readKey('POST', uuid)).toBe(uuid);
      expect(engine.readKey('POST', uuid.toUpperCase())).toBe(uuid.toUpperCase());
      expect(engine.readKey('POST', uuid.replaceAll('-', ''))).toBe(uuid.replaceAll('-', ''));
      expect(engine.readKey('POST', `"${uuid}"`)).toBe(uuid);
    });

    it('reports no event: the request has not been handled yet', () => {
      const events: IdempotencyEvent[] = [];
      engineWith({ onEvent: (event) => events.push(event) }).readKey('POST', 'fine');
      expect(events).toEqual([]);
    });
  });

  describe('several keys', () => {
    const several = [
      ['two header lines, as Node.js joins them', 'first, second'],
      ['two quoted keys', '"a", "b"'],
      ['the same key twice', 'k, k'],
      ['a bare comma', 'a,b'],
      ['a comma after a quoted key', '"a",b'],
      // A quote that opens no RFC 8941 string, or one left open, must not hide the lines joined after it.
      ['a line with an unclosed quoted string, then another line', '"abc, def'],
      ['a line with a quote inside a bare key, then another line', 'ab"c, d'],
      ['a line with a stray quote and backslashes, then two more', 'Ã©b\\\\b" ab, , order-1'],
      ['a closed quoted key followed by more text', '"a,b"c'],
      // An escape RFC 8941 does not have (`\a`) makes no quoted string: the `"` line after it does not close one.
      ['a line with an escape RFC 8941 has not, then a line holding a quote', String.raw`"xa \\\"b,\"\a, "`],
      ['an escaped letter, then another line', String.raw`"a\b, "`],
    ];

    it.each(several)('answers 400 to %s', (_, value) => {
      const reply = asReply(engineWith().readKey('POST', value));
      expect(reply.status).toBe(400);
      expect(bodyText(reply)).toBe(
        `{"detail":"'Idempotency-Key' header must be sent once, with one key (a key containing a comma must be a quoted string)"}`,
      );
    });

    it('still takes a quoted key with a comma and the escapes RFC 8941 has as one key', () => {
      expect(engineWith().readKey('POST', String.raw`"a, \"b\" \\c"`)).toBe(String.raw`a, "b" \c`);
    });

    it('answers 400 to several values handed over as an array', () => {
      expect(asReply(engineWith().readKey('POST', ['first', 'second'])).status).toBe(400);
    });

    it('reports an invalid-key event with status 400', () => {
      const events: IdempotencyEvent[] = [];
      engineWith({ onEvent: (event) => events.push(event) }).readKey('POST', 'a, b');
      expect(events).toEqual([expect.objectContaining({ outcome: 'invalid-key', status: 400 })]);
    });
  });

  describe('an invalid key', () => {
    it('answers 422 when longer than maxKeyLength', () => {
      const reply = asReply(engineWith().readKey('POST', 'k'.repeat(256)));
      expect(reply.status).toBe(422);
      expect(bodyText(reply)).toBe(
        `{"detail":"'Idempotency-Key' header value must be at most 255 characters"}`,
      );
      expect(asReply(engineWith({ maxKeyLength: 8 }).readKey('POST', '123456789')).status).toBe(422);
    });

    it.each([
      ['a NUL', 'a\u0000b'],
      ['a tab', 'a\tb'],
      ['a newline', 'a\nb'],
      ['a carriage return', 'a\rb'],
      ['an escape', 'a\u001bb'],
      ['DEL', 'a\u007fb'],
    ])('answers 422 when it contains %s', (_, key) => {
      const reply = asReply(engineWith().readKey('POST', key));
      expect(reply.status).toBe(422);
      expect(bodyText(reply)).toBe(
        `{"detail":"'Idempotency-Key' header value must not contain control characters"}`,
      );
    });

    it('answers 422 for a control character inside a quoted key', () => {
      expect(asReply(engineWith().readKey('POST', '"a\nb"')).status).toBe(422);
    });

    it('answers 422 for an empty quoted key', () => {
      expect(asReply(engineWith().readKey('POST', '""')).status).toBe(422);
    });

    it('answers 422 with the exact body for a key that is not a v4 UUID', () => {
      const engine = engineWith({ enforceUuid4Formatting: true });
      for (const key of [
        'not-a-uuid',
        '00000000-0000-0000-0000-000000000000',
        'c232ab00-9414-11ec-b3c8-9f6bdeced846',
      ]) {
        const reply = asReply(engine.readKey('POST', key));
        expect(reply.kind).toBe('reply');
        expect(reply.status).toBe(422);
        expect(reply.replayed).toBe(false);
        expect(reply.headers).toEqual([['content-type', 'application/json']]);
        expect(
          Buffer.from(reply.body).equals(
            Buffer.from(`{"detail":"'Idempotency-Key' header value must be formatted as a v4 UUID"}`),
          ),
        ).toBe(true);
      }
    });

    it('takes a v4 UUID, hyphenated, compact or quoted, when UUIDs are enforced', () => {
      const engine = engineWith({ enforceUuid4Formatting: true });
      const uuid = '3f1b6c1e-8a4d-4f5e-9b2c-7d8e9f0a1b2c';
      expect(engine.readKey('POST', uuid)).toBe(uuid);
      expect(engine.readKey('POST', uuid.replaceAll('-', ''))).toBe(uuid.replaceAll('-', ''));
      expect(engine.readKey('POST', `"${uuid}"`)).toBe(uuid);
    });

    it('refuses a v4 UUID longer than a maxKeyLength below 36 as too long, UUIDs enforced or not', () => {
      const uuid = '3f1b6c1e-8a4d-4f5e-9b2c-7d8e9f0a1b2c';
      for (const enforceUuid4Formatting of [true, false]) {
        const reply = asReply(engineWith({ enforceUuid4Formatting, maxKeyLength: 32 }).readKey('POST', uuid));
        expect(reply.status).toBe(422);
        expect(bodyText(reply)).toBe(
          `{"detail":"'Idempotency-Key' header value must be at most 32 characters"}`,
        );
      }
    });

    it('names the configured header in the UUID 422 body', () => {
      const engine = engineWith({
        enforceUuid4Formatting: true,
        idempotencyHeaderKey: 'X-Idempotency-Token',
      });
      expect(bodyText(asReply(engine.readKey('POST', 'nope')))).toBe(
        `{"detail":"'X-Idempotency-Token' header value must be formatted as a v4 UUID"}`,
      );
    });

    it('answers problem details when errorFormat is problem', () => {
      const engine = engineWith({ enforceUuid4Formatting: true, errorFormat: 'problem' });
      const reply = asReply(engine.readKey('POST', 'nope'));
      expect(reply.status).toBe(422);
      expect(reply.headers).toEqual([['content-type', 'application/problem+json']]);
      expect(JSON.parse(bodyText(reply))).toEqual({
        type: 'about:blank',
        title: 'Unprocessable Content',
        status: 422,
        detail: "'Idempotency-Key' header value must be formatted as a v4 UUID",
      });
    });

    it('accepts any key when UUIDs are not enforced', () => {
      expect(engineWith().readKey('POST', 'not-a-uuid')).toBe('not-a-uuid');
    });

    it('reports an invalid-key event without the key', () => {
      const events: IdempotencyEvent[] = [];
      const engine = engineWith({ enforceUuid4Formatting: true, onEvent: (event) => events.push(event) });
      engine.readKey('PATCH', 'secret-not-a-uuid');
      expect(events).toHaveLength(1);
      expect(events[0]).toMatchObject({
        outcome: 'invalid-key',
        keyHash: undefined,
        method: 'PATCH',
        status: 422,
      });
      expect(JSON.stringify(events)).not.toContain('secret-not-a-uuid');
    });
  });
});
