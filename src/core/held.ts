/**
 * Which requests an instance of the middleware has taken: mounted more than once on a request's path (an
 * app-wide instance and a router's, a handler wrapped twice), the first instance that takes the key handles the
 * request and the others let it through. Without this, the inner instance would find the key in flight and answer
 * 409, which the outer one would then store as the request's outcome, and two captures of one `node:http`
 * response would each call the other's `end`.
 *
 * A property under a registered symbol (`Symbol.for`) rather than a `WeakSet`: two copies of the package in one
 * process (its ESM and CommonJS builds, two versions in a dependency tree) see each other's mark, and the request
 * carries its own mark without an entry the garbage collector processes on every scavenge.
 */
const HELD: unique symbol = Symbol.for('idempotency-header.held') as typeof HELD;
type Marked = { [HELD]?: true };

/** Whether an instance of the middleware took this request's key (the request object the adapter sees first). */
export function isHeld(request: object): boolean {
  return (request as Marked)[HELD] === true;
}

/** Marks the request as taken by this instance: any other instance on its path lets it through. */
export function markHeld(request: object): void {
  (request as Marked)[HELD] = true;
}
