/**
 * Decides which responses are stored by their `Content-Type`. Parameters (`; charset=utf-8`) are ignored and
 * comparison is case-insensitive. Patterns: an exact media type (`text/plain`), a whole type (`text/*`), a
 * structured-syntax suffix (`*\/*+json`), or any type (`*\/*`). `text/event-stream` never matches.
 */
export type MediaTypeMatcher = (contentType: string | undefined) => boolean;

const EVENT_STREAM = 'text/event-stream';

/** The default: `application/json` and every `+json` type. */
export const JSON_MEDIA_TYPES: readonly string[] = Object.freeze(['application/json', '*/*+json']);

/**
 * Whether a `Content-Type` is `text/event-stream`, in any case and with any parameters. A quick look for the
 * subtype first: most responses are not streams, and their essence need not be cut out.
 */
export function isEventStream(contentType: string | undefined): boolean {
  return (
    contentType !== undefined &&
    EVENT_STREAM_SUBTYPE.test(contentType) &&
    essence(contentType) === EVENT_STREAM
  );
}

const EVENT_STREAM_SUBTYPE = /event-stream/i;

/** Lower-cased media type without parameters, e.g. `application/json` for `Application/JSON; charset=utf-8`. */
export function essence(contentType: string): string {
  const semicolon = contentType.indexOf(';');
  return (semicolon === -1 ? contentType : contentType.slice(0, semicolon)).trim().toLowerCase();
}

/** Content types whose answer is remembered; responses repeat a handful of them. Past it, the memo starts over. */
const MEMO_LIMIT = 64;

/**
 * Builds the matcher for `cacheableContentTypes` once, at construction. Its answers are memoised by the
 * `Content-Type` value: parsing a media type costs allocations on every response, a lookup does not. The last
 * answer comes first, compared as a string: a value read from a request or response is a new string each time,
 * which a `Map` must hash before it can look it up, and most come with the type the last one had.
 */
export function createMediaTypeMatcher(patterns: '*' | readonly string[]): MediaTypeMatcher {
  const match = createUnmemoisedMatcher(patterns);
  const memo = new Map<string, boolean>();
  let lastType: string | undefined;
  let lastAnswer = false;
  return function matchesMediaType(contentType) {
    if (contentType === undefined) return match(contentType);
    if (contentType === lastType) return lastAnswer;
    let answer = memo.get(contentType);
    if (answer === undefined) {
      answer = match(contentType);
      if (memo.size >= MEMO_LIMIT) memo.clear();
      memo.set(contentType, answer);
    }
    lastType = contentType;
    lastAnswer = answer;
    return answer;
  };
}

function createUnmemoisedMatcher(patterns: '*' | readonly string[]): MediaTypeMatcher {
  if (patterns === '*') {
    return function anyButEventStream(contentType) {
      return !isEventStream(contentType);
    };
  }
  const exact = new Set<string>();
  const wholeTypes: string[] = [];
  const suffixes: string[] = [];
  let anyType = false;
  for (const pattern of patterns.map(essence)) {
    if (pattern === '*/*') anyType = true;
    else if (pattern.startsWith('*/*+')) suffixes.push(pattern.slice(3));
    else if (pattern.endsWith('/*')) wholeTypes.push(pattern.slice(0, -1));
    else exact.add(pattern);
  }
  return function matchesMediaType(contentType) {
    if (contentType === undefined) return false;
    const type = essence(contentType);
    if (type === EVENT_STREAM) return false;
    if (anyType || exact.has(type)) return true;
    for (const prefix of wholeTypes) if (type.startsWith(prefix)) return true;
    for (const suffix of suffixes) if (type.endsWith(suffix)) return true;
    return false;
  };
}
