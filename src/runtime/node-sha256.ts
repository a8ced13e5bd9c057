import * as crypto from 'node:crypto';
import type { Sha256 } from '../core/digest.js';
import { sha256On } from './builtin-sha256.js';

/** The engine's SHA-256 on `node:crypto`, synchronous: see {@link sha256On}. */
export const nodeSha256: Sha256 = sha256On(crypto);
