/**
 * The testkit's contract suite catches broken backends: run on a backend with one deliberate defect each (a
 * check-then-set acquire, unfenced writes, leases that never lapse, lossy bodies…), the cases that guard against
 * that defect fail; run on the same backend without the defect, and on MemoryBackend, nothing fails. The suite
 * runs on a small collecting runner (test/testkit/support/collect.ts) so its failures can be inspected here.
 */
import { describe, expect, it } from 'vitest';
import { MemoryBackend } from '../../src/backends/memory.js';
import type { Backend } from '../../src/core/types.js';
import { type BackendContractContext, describeBackendContract } from '../../src/testkit/index.js';
import { collectingRunner, type TestOutcome } from './support/collect.js';
import { type Flaws, ToyBackend } from './support/toy-backend.js';

/** Runs the whole contract on the backend `setup` makes and returns every test's outcome. */
async function runContract(setup: () => BackendContractContext): Promise<TestOutcome[]> {
  const runner = collectingRunner();
  describeBackendContract('under test', setup, runner.functions);
  const outcomes = await runner.run();
  expect(outcomes).toHaveLength(runner.count());
  return outcomes;
}

/** The toy backend's four required methods, bound, without its optional `inspect` and `forget`. */
function requiredMethodsOf(toy: ToyBackend): Backend {
  return {
    acquire: toy.acquire.bind(toy),
    complete: toy.complete.bind(toy),
    release: toy.release.bind(toy),
    renew: toy.renew.bind(toy),
  };
}

/** `group > test` of every failed test, without the run's own name. */
function failures(outcomes: TestOutcome[]): string[] {
  return outcomes
    .filter((outcome) => outcome.status === 'fail')
    .map((outcome) => outcome.path.split(' > ').slice(1).join(' > '));
}

const RACE =
  'acquire > lets exactly one of 50 parallel acquires on one key win and answers the other 49 in-flight';
const TAKEOVER =
  'leases > lets a new acquire take over a lapsed lease with a new token and fences the old token out';
const RACING_COMPLETES =
  'complete > lets exactly one of two racing completes with different tokens win, and only its holder';

/** Each defect, and cases that must fail because of it. */
const DEFECTS: [description: string, flaws: Flaws, mustFail: string[]][] = [
  ['acquire reads, yields, then writes (check-then-set)', { yieldsBetweenReadAndWrite: true }, [RACE]],
  [
    'complete ignores the token',
    { unfencedComplete: true },
    [TAKEOVER, 'complete > returns false for a wrong token and stores nothing', RACING_COMPLETES],
  ],
  [
    'release ignores the token',
    { unfencedRelease: true },
    [
      TAKEOVER,
      'release > frees the key so the next acquire wins, and a second release with the same token is harmless',
      'release > returns false for a token that does not hold the key and keeps the lock',
    ],
  ],
  [
    'renew ignores the token',
    { unfencedRenew: true },
    [
      TAKEOVER,
      'leases > returns false from renew with a token that does not hold the key, and leaves the lease alone',
    ],
  ],
  [
    'every holder of a key gets the same token',
    { tokenIsTheKey: true },
    ['acquire > gives every acquire of a free key a different token', TAKEOVER, RACING_COMPLETES],
  ],
  [
    'a lease never lapses',
    { leasesNeverLapse: true },
    [TAKEOVER, 'leases > lets a different fingerprint take over a lapsed lease'],
  ],
  [
    'records never expire',
    { recordsNeverExpire: true },
    [
      'complete > frees the key once a short ttl has passed, so acquire wins again',
      'complete > keeps a record stored with ttlMs null after a short ttl beside it has expired',
    ],
  ],
  [
    'ttlMs null is read as 0',
    { nullTtlIsZero: true },
    ['complete > keeps a record stored with ttlMs null after a short ttl beside it has expired'],
  ],
  [
    'keys are Unicode-normalised',
    { normalisesKeys: true },
    ["acquire > keeps keys that differ only by ':' or unicode characters apart"],
  ],
  [
    'bodies are stored as UTF-8 text',
    { bodiesAsText: true },
    [
      'complete > round-trips a body with all 256 byte values byte for byte',
      'complete > round-trips a 200 KB random body byte for byte',
    ],
  ],
  [
    'headers come back sorted',
    { sortsHeaders: true },
    ['complete > round-trips status and headers, repeated names included, in order'],
  ],
  [
    'retryAfterMs is in seconds',
    { retryAfterInSeconds: true },
    ['acquire > answers in-flight with retryAfterMs within (0, leaseMs] while the key is held'],
  ],
  [
    'forget deletes a running request’s lock without force',
    { forgetIgnoresForce: true },
    [
      'inspect and forget (optional operator API) > refuses to forget a lock unless forced, and a forced forget fences its holder out',
    ],
  ],
];

describe('the backend contract from the testkit', () => {
  it('passes MemoryBackend with no failure', async () => {
    const outcomes = await runContract(() => {
      const backend = new MemoryBackend();
      return { backend, teardown: () => backend.close() };
    });
    expect(failures(outcomes)).toEqual([]);
    // Only the peers case is skipped: MemoryBackend instances share nothing.
    expect(outcomes.filter((outcome) => outcome.status === 'skip').map((outcome) => outcome.name)).toEqual([
      "sees the other instances' locks, records, releases and expiries",
    ]);
  });

  it('passes the toy backend without defects, with a peer, and skips nothing', async () => {
    const outcomes = await runContract(() => {
      const backend = new ToyBackend();
      return { backend, peers: [backend.peer()] };
    });
    expect(failures(outcomes)).toEqual([]);
    expect(outcomes.every((outcome) => outcome.status === 'pass')).toBe(true);
  });

  // Concurrent: each run waits on timers, and the runs share nothing.
  describe.concurrent.each(DEFECTS)('on a backend where %s', (_, flaws, mustFail) => {
    it('fails the cases that guard against it', async ({ expect }) => {
      const outcomes = await runContract(() => {
        const backend = new ToyBackend(flaws);
        return { backend, peers: [backend.peer()] };
      });
      const failed = failures(outcomes);
      expect(failed).toEqual(expect.arrayContaining(mustFail));
      // Every failure is an assertion about the backend, never a crash of the suite itself.
      for (const outcome of outcomes.filter((each) => each.status === 'fail')) {
        expect(outcome.error, outcome.path).toMatchObject({ name: 'AssertionError' });
      }
    });
  });

  it('needs peers to catch an acquire that is atomic in one instance only (a mutex per process)', async () => {
    const flaws: Flaws = { mutexPerInstance: true, yieldsBetweenReadAndWrite: true };
    const alone = await runContract(() => ({ backend: new ToyBackend(flaws) }));
    expect(failures(alone)).toEqual([]);
    const withPeers = await runContract(() => {
      const backend = new ToyBackend(flaws);
      return { backend, peers: [backend.peer(), backend.peer()] };
    });
    expect(failures(withPeers)).toEqual([RACE]);
  });

  it('skips the operator cases for a backend without inspect and forget, and fails them when requires names them', async () => {
    const bare = () => requiredMethodsOf(new ToyBackend());
    const operatorCases = (outcomes: TestOutcome[]) =>
      outcomes.filter((outcome) => outcome.path.includes('(optional operator API)'));

    const skipped = operatorCases(await runContract(() => ({ backend: bare() })));
    expect(skipped.length).toBeGreaterThanOrEqual(10);
    expect(skipped.every((outcome) => outcome.status === 'skip')).toBe(true);

    const runner = collectingRunner();
    describeBackendContract('required', () => ({ backend: bare() }), runner.functions, {
      requires: ['inspect', 'forget'],
    });
    const failed = operatorCases(await runner.run());
    expect(failed).toHaveLength(skipped.length);
    for (const outcome of failed) {
      expect(outcome.status, outcome.path).toBe('fail');
      expect(String(outcome.error)).toMatch(
        /the backend has no (inspect|forget)\(\), which options.requires names/,
      );
    }
  });

  it('fails, rather than skips, a case that checks a required forget() through an inspect() the backend lacks', async () => {
    const toy = new ToyBackend();
    const forgetOnly = { ...requiredMethodsOf(toy), forget: toy.forget.bind(toy) };
    const runner = collectingRunner();
    describeBackendContract('forget required', () => ({ backend: forgetOnly }), runner.functions, {
      requires: ['forget'],
    });
    const operatorCases = (await runner.run()).filter((outcome) =>
      outcome.path.includes('(optional operator API)'),
    );
    const failed = operatorCases.filter((outcome) => outcome.status === 'fail');
    expect(failed.length).toBeGreaterThanOrEqual(3);
    for (const outcome of failed) {
      expect(String(outcome.error), outcome.path).toMatch(
        /checks forget\(\), which options.requires names, through inspect\(\), which the backend lacks/,
      );
    }
    // What is skipped checks inspect() alone.
    for (const outcome of operatorCases.filter((outcome) => outcome.status === 'skip')) {
      expect(outcome.path.split(' > ').at(-1)).not.toMatch(/forget/i);
    }
    expect(failed.map((outcome) => outcome.path)).toContainEqual(
      expect.stringMatching(
        /refuses to forget a lock unless forced, and a forced forget fences its holder out$/,
      ),
    );
  });

  it('names a backend method that never settles, in the cases that call it, and goes on with the others', async () => {
    const hangingRenew = {
      ...requiredMethodsOf(new ToyBackend()),
      renew: () => new Promise<boolean>(() => {}),
    };
    const runner = collectingRunner();
    describeBackendContract('hanging renew', () => ({ backend: hangingRenew }), runner.functions, {
      timing: { callTimeoutMs: 200 },
    });
    const outcomes = await runner.run();
    const failed = outcomes.filter((outcome) => outcome.status === 'fail');
    expect(failed.length).toBeGreaterThanOrEqual(3);
    for (const outcome of failed) {
      expect(String(outcome.error), outcome.path).toMatch(/renew\(\) did not settle within 200 ms/);
    }
    expect(outcomes.filter((outcome) => outcome.status === 'pass').length).toBeGreaterThan(20);
  });

  it('fails every case, naming the cause, when setup throws', async () => {
    const outcomes = await runContract(() => {
      throw new Error('cannot connect');
    });
    expect(outcomes.length).toBeGreaterThan(30);
    for (const outcome of outcomes) {
      expect(outcome.status).toBe('fail');
      expect(String(outcome.error)).toContain('cannot connect');
    }
  });

  it('refuses test functions without once-per-run hooks, and bad timing, at registration', () => {
    const { describe: describeFn, it: itFn } = collectingRunner().functions;
    expect(() =>
      describeBackendContract('x', () => ({ backend: new ToyBackend() }), { describe: describeFn, it: itFn }),
    ).toThrow(/beforeAll and afterAll .* or before and after/);
    const { functions } = collectingRunner();
    expect(() =>
      describeBackendContract('x', () => ({ backend: new ToyBackend() }), functions, {
        timing: { shortLeaseMs: 500, lapseWaitMs: 400 },
      }),
    ).toThrow(/lapseWaitMs \(400\) must be longer than timing.shortLeaseMs \(500\)/);
    expect(() =>
      describeBackendContract('x', () => ({ backend: new ToyBackend() }), functions, { concurrency: 0 }),
    ).toThrow(/concurrency must be a positive number/);
  });

  it('honours timing options: a backend whose expiry is late passes with longer waits', async () => {
    // Leases and records end 300 ms late: safe, but slower than the default waits allow for.
    const late: Flaws = { lateExpiryMs: 300 };
    expect(failures(await runContract(() => ({ backend: new ToyBackend(late) })))).toContain(TAKEOVER);
    const runner = collectingRunner();
    describeBackendContract('late', () => ({ backend: new ToyBackend(late) }), runner.functions, {
      timing: { shortLeaseMs: 150, shortTtlMs: 200, lapseWaitMs: 700 },
      concurrency: 20,
    });
    const outcomes = await runner.run();
    expect(failures(outcomes)).toEqual([]);
    expect(outcomes.map((outcome) => outcome.name)).toContain(
      'lets exactly one of 20 parallel acquires on one key win and answers the other 19 in-flight',
    );
  });
});
