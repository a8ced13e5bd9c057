const UUID4_HYPHENATED = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i;
const UUID4_COMPACT = /^[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}$/i;

/**
 * Turns an RFC 8941 quoted string (`"abc"`, with `\"` and `\\` escapes) into its content; anything else is
 * returned as it is.
 */
export function unquoteKey(value: string): string {
  if (value.length < 2 || value.charCodeAt(0) !== 34 || value.charCodeAt(value.length - 1) !== 34)
    return value;
  const inner = value.slice(1, -1);
  return inner.includes('\\') ? inner.replace(/\\(["\\])/g, '$1') : inner;
}

/**
 * Whether a header value holds several values. Node.js and the Fetch API join repeated header lines with `, `, so
 * this is how two `Idempotency-Key` lines arrive. A value with a comma is one key only if it is one RFC 8941
 * quoted string, closed, with nothing after it: a quote elsewhere is an ordinary character, and a string left
 * open cannot tell its commas from the separators of the lines after it (`"abc` and `def` arrive as `"abc, def`).
 */
export function hasSeveralValues(value: string): boolean {
  if (!value.includes(',')) return false;
  let i = 0;
  while (value.charCodeAt(i) === 32 || value.charCodeAt(i) === 9) i++;
  if (value.charCodeAt(i) !== 34 /* " */) return true;
  for (i++; i < value.length; i++) {
    const code = value.charCodeAt(i);
    if (code === 92 /* \ */) {
      // RFC 8941 escapes only `\"` and `\\`: with any other escape the value is no quoted string, and its commas
      // may separate lines (`"a\b` and `"` arrive as `"a\b, "`).
      const escaped = value.charCodeAt(i + 1);
      if (escaped !== 34 && escaped !== 92) return true;
      i++;
    } else if (code === 34) break;
  }
  if (i >= value.length) return true;
  for (i++; i < value.length; i++) {
    const code = value.charCodeAt(i);
    if (code !== 32 && code !== 9) return true;
  }
  return false;
}

/** Whether the key contains a C0 control character or DEL, which no header can carry safely. */
export function hasControlCharacter(key: string): boolean {
  for (let i = 0; i < key.length; i++) {
    const code = key.charCodeAt(i);
    if (code < 0x20 || code === 0x7f) return true;
  }
  return false;
}

/**
 * Whether the key is a version 4 UUID: canonical hyphenated form or the 32-hex-digit form, version nibble 4 and
 * the RFC 4122 variant. The nil UUID, other versions and braced or URN forms are refused.
 */
export function isUuid4(key: string): boolean {
  return key.length === 36 ? UUID4_HYPHENATED.test(key) : key.length === 32 && UUID4_COMPACT.test(key);
}

/**
 * A `node:http` request's headers, seen by their shape only, so that adapters which must not import `node:http`
 * (Hono on `@hono/node-server`) read them the same way.
 */
export interface NodeRequestHeaders {
  readonly headers: Readonly<Record<string, string | string[] | undefined>>;
  readonly headersDistinct?: Readonly<Record<string, string[] | undefined>>;
}

/**
 * A header of a `node:http` request (`name` in lower case) as `readKey` takes it. Node.js joins repeated lines
 * with `, `, and then a pair such as `"a` and `b"` reads as the one quoted key `a, b`: a value with a comma is
 * looked at line by line.
 */
export function nodeRequestHeader(req: NodeRequestHeaders, name: string): string | string[] | undefined {
  const header = req.headers[name];
  if (typeof header !== 'string' || !header.includes(',')) return header;
  return req.headersDistinct?.[name] ?? header;
}
