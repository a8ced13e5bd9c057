/**
 * A minimal test runner with the shape the testkit expects (`describe`, `it`, `beforeAll`, `afterAll`): it
 * collects what a suite registers, then runs it and reports every test's outcome instead of failing. The testkit's
 * own tests use it to run the backend contract on a deliberately broken backend and check which cases fail.
 */
import type { TestFunctions } from '../../../src/testkit/index.js';

/** The outcome of one collected test. */
export interface TestOutcome {
  /** The names of the enclosing groups and of the test, joined by ' > '. */
  path: string;
  /** The test's own name. */
  name: string;
  status: 'pass' | 'fail' | 'skip';
  error?: unknown;
}

type Body = (context: unknown) => Promise<void>;
type Hook = () => Promise<void>;

interface Group {
  name: string;
  items: ({ kind: 'group'; group: Group } | { kind: 'test'; name: string; body: Body })[];
  before: Hook[];
  after: Hook[];
}

/** Thrown by the test context's `skip()`, as vitest does. */
class Skipped extends Error {}

/** A runner that collects registrations: pass `functions` to the suite, then `run()` it. */
export function collectingRunner(): {
  functions: Required<Pick<TestFunctions, 'describe' | 'it' | 'beforeAll' | 'afterAll'>>;
  run(): Promise<TestOutcome[]>;
  count(): number;
} {
  const root: Group = { name: '', items: [], before: [], after: [] };
  let current = root;
  const functions = {
    describe(name: string, body: () => void): void {
      const group: Group = { name, items: [], before: [], after: [] };
      current.items.push({ kind: 'group', group });
      const parent = current;
      current = group;
      try {
        body();
      } finally {
        current = parent;
      }
    },
    it(name: string, body: Body): void {
      current.items.push({ kind: 'test', name, body });
    },
    beforeAll(fn: Hook): void {
      current.before.push(fn);
    },
    afterAll(fn: Hook): void {
      current.after.push(fn);
    },
  };

  function countIn(group: Group): number {
    let total = 0;
    for (const item of group.items) total += item.kind === 'test' ? 1 : countIn(item.group);
    return total;
  }

  async function runGroup(group: Group, prefix: string[], outcomes: TestOutcome[], hookError?: unknown) {
    const path = group === root ? prefix : [...prefix, group.name];
    let error = hookError;
    if (error === undefined) {
      for (const hook of group.before) {
        try {
          await hook();
        } catch (caught) {
          error = caught;
          break;
        }
      }
    }
    for (const item of group.items) {
      if (item.kind === 'group') {
        await runGroup(item.group, path, outcomes, error);
        continue;
      }
      const outcome: TestOutcome = {
        path: [...path, item.name].join(' > '),
        name: item.name,
        status: 'pass',
      };
      if (error !== undefined) {
        outcomes.push({ ...outcome, status: 'fail', error });
        continue;
      }
      const context = {
        skip(reason?: string): never {
          throw new Skipped(reason);
        },
      };
      try {
        await item.body(context);
      } catch (caught) {
        outcome.status = caught instanceof Skipped ? 'skip' : 'fail';
        if (!(caught instanceof Skipped)) outcome.error = caught;
      }
      outcomes.push(outcome);
    }
    for (const hook of group.after) await hook();
  }

  return {
    functions,
    count: () => countIn(root),
    async run() {
      const outcomes: TestOutcome[] = [];
      await runGroup(root, [], outcomes);
      return outcomes;
    },
  };
}
