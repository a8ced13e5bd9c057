import * as crypto from 'node:crypto';
import type { Sha256 } from '../core/digest.js';

const { createHash } = crypto;

/** `crypto.hash` (Node.js 20.12+), with the equivalent Hash object on older 20.x releases. */
const oneShotHash: (algorithm: string, data: string, encoding: 'hex') => string =
  typeof crypto.hash === 'function'
    ? crypto.hash
    : (algorithm, data, encoding) => createHash(algorithm).update(data).digest(encoding);

/**
 * The engine's SHA-256 on `node:crypto`, synchronous. One-shot hashing of a single string is less than half
 * the cost of a Hash object fed piece by piece, and most requests hash one string (method, path, parsed body).
 */
export const nodeSha256: Sha256 = function nodeSha256(parts) {
  if (parts.length === 1 && typeof parts[0] === 'string') return oneShotHash('sha256', parts[0], 'hex');
  const hash = createHash('sha256');
  for (const part of parts) hash.update(part);
  return hash.digest('hex');
};
