import type { IncomingMessage } from 'node:http';
import { isMultipart, type RequestBody } from '../../core/fingerprint.js';
import { READ_STREAM } from './flow.js';

/** What Express's body parsers (and frameworks built on them, such as NestJS) leave on a request. */
interface ParsedFields {
  body?: unknown;
  rawBody?: unknown;
}

/**
 * What the fingerprint hashes: the stream itself when nobody read the body yet; once a parser consumed it, the raw
 * bytes if it kept them (`req.rawBody`, from its `verify` option, or NestJS's `rawBody: true`), else the parsed
 * body it left in `req.body` (`body-parser` 1 and 2, Express 4's and 5's); or else nothing trustworthy, which the
 * flow refuses. A multipart body consumed before the middleware is never taken from `req.body`: its files are not
 * there, and two uploads that differ only in their files would get one fingerprint.
 */
export function parsedBodyOf(req: IncomingMessage): RequestBody | typeof READ_STREAM {
  if (!req.readableEnded) return READ_STREAM;
  const { body, rawBody } = req as unknown as ParsedFields;
  if (rawBody instanceof Uint8Array) return rawBody;
  return body !== undefined && !isMultipart(req.headers['content-type'])
    ? (body as RequestBody)
    : READ_STREAM;
}
