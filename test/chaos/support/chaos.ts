/**
 * Sizes and reporting shared by the chaos scenarios.
 *
 * Every scenario has two sizes: the CI size, which runs inside `npm test` (and on CI, `CI=true`), and the full
 * size, run on demand with `CHAOS_FULL=1` (`npm run test:chaos` sets it unless `CI=true`): the 30 s soaks, the
 * 10 000-case fuzz runs, the longer leases.
 */

/** Whether the full-size scenarios run: `CHAOS_FULL=1`. */
export const FULL = process.env.CHAOS_FULL === '1';

/** `full` when {@link FULL}, else `ci`. */
export function size<T>(ci: T, full: T): T {
  return FULL ? full : ci;
}

/** A figure for a report: a count, a duration in ms (`ms`), or any text. */
export type Figure = number | string | { ms: number };

function format(value: Figure): string {
  if (typeof value === 'number') return Number.isInteger(value) ? String(value) : value.toFixed(2);
  if (typeof value === 'string') return value;
  return value.ms >= 10_000 ? `${(value.ms / 1000).toFixed(1)} s` : `${Math.round(value.ms)} ms`;
}

/**
 * Prints a scenario's figures on one block, so that a run's log says what was proven and with what margins:
 * `[chaos] crash (redis, full): 409s 12, retry-after error max 0 s, ...`.
 */
export function report(scenario: string, figures: Record<string, Figure>): void {
  const lines = Object.entries(figures).map(([name, value]) => `  ${name}: ${format(value)}`);
  console.info(`[chaos] ${scenario} (${FULL ? 'full' : 'ci'} size)\n${lines.join('\n')}`);
}

/** The largest of `values`, 0 when empty. */
export function max(values: readonly number[]): number {
  let largest = 0;
  for (const value of values) if (value > largest) largest = value;
  return largest;
}

/** The `p`-th percentile (0..100) of `values`, 0 when empty. */
export function percentile(values: readonly number[], p: number): number {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]!;
}

/** Polls `check` every `everyMs` until it returns a value other than `undefined`, or throws after `withinMs`. */
export async function waitFor<T>(
  what: string,
  check: () => T | undefined | Promise<T | undefined>,
  withinMs: number,
  everyMs = 50,
): Promise<T> {
  const deadline = performance.now() + withinMs;
  for (;;) {
    const value = await check();
    if (value !== undefined) return value;
    if (performance.now() > deadline) throw new Error(`Timed out after ${withinMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, everyMs));
  }
}
