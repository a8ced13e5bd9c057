/**
 * SqliteBackend given a path in an app that has not installed `better-sqlite3` (an optional peer dependency): the
 * first operation fails with a backend error that names the package to install, and keeps the loader's error as
 * its cause. The package is made unloadable here, which only a module mock can do inside one test process.
 */
import { describe, expect, it, vi } from 'vitest';
import { SqliteBackend } from '../../src/backends/sqlite.js';
import { IdempotencyError } from '../../src/core/errors.js';
import { sqliteDirectory } from '../support/sql.js';

vi.mock('better-sqlite3', () => {
  throw new Error("Cannot find package 'better-sqlite3'");
});

describe('SqliteBackend without better-sqlite3 installed', () => {
  it('fails its first operation with ERR_IDEMPOTENCY_BACKEND naming the package, and the next with the same error', async () => {
    const directory = sqliteDirectory('missing-driver');
    const backend = new SqliteBackend({ database: directory.path('keys.db') });
    try {
      const failures: unknown[] = [];
      for (let attempt = 0; attempt < 2; attempt++) {
        const failure = await Promise.resolve()
          .then(() => backend.acquire('-key', 'f'.repeat(64), 30_000))
          .then(
            () => undefined,
            (error: unknown) => error,
          );
        expect(failure).toBeInstanceOf(IdempotencyError);
        expect((failure as IdempotencyError).code).toBe('ERR_IDEMPOTENCY_BACKEND');
        expect((failure as Error).message).toContain('npm install better-sqlite3');
        expect((failure as Error).cause).toBeDefined();
        failures.push(failure);
      }
      // Loaded once: the next operation gets the same error, without resolving the module again.
      expect(failures[1]).toBe(failures[0]);
    } finally {
      backend.close();
      directory.remove();
    }
  });
});
