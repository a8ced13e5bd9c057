/**
 * The ledger of executions the chaos fixture server writes (`test/chaos/fixtures/ledger-server.ts`): one line per
 * run of the handler, `<key>\t<pid>\t<run id>`, appended by every process sharing the file. Counting a key's lines
 * counts its executions, whatever the clients saw.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** One execution of the handler. */
export interface Execution {
  key: string;
  pid: number;
  run: string;
}

/** A ledger file in a temporary directory of its own. */
export interface Ledger {
  readonly path: string;
  /** Every execution so far, in the order they were written. */
  read(): Execution[];
  /** The executions of each key. */
  byKey(): Map<string, Execution[]>;
  /** Deletes the file and its directory. */
  remove(): void;
}

export function createLedger(label = 'ledger'): Ledger {
  const directory = mkdtempSync(join(tmpdir(), `idempotency-chaos-${label}-`));
  const path = join(directory, 'ledger.tsv');
  writeFileSync(path, '');
  const read = (): Execution[] =>
    readFileSync(path, 'utf8')
      .split('\n')
      .filter((line) => line !== '')
      .map((line) => {
        const [key = '', pid = '0', run = ''] = line.split('\t');
        return { key, pid: Number(pid), run };
      });
  return {
    path,
    read,
    byKey() {
      const keys = new Map<string, Execution[]>();
      for (const execution of read()) {
        const runs = keys.get(execution.key);
        if (runs === undefined) keys.set(execution.key, [execution]);
        else runs.push(execution);
      }
      return keys;
    },
    remove: () => rmSync(directory, { recursive: true, force: true }),
  };
}
