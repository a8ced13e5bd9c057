/**
 * Which requests an instance of the middleware has taken: mounted more than once on a request's path (an
 * app-wide instance and a router's, a handler wrapped twice), the first instance that takes the key handles the
 * request and the others let it through. Without this, the inner instance would find the key in flight and answer
 * 409, which the outer one would then store as the request's outcome, and two captures of one `node:http`
 * response would each call the other's `end`.
 *
 * A mark is a property under a registered symbol (`Symbol.for`) on the request, or an entry of a `WeakSet`
 * registered on `globalThis` under another (see {@link markHeld} for which): either way two copies of the package
 * in one process (its ESM and CommonJS builds, two versions in a dependency tree) see each other's marks.
 */
import { hasAppPrototype } from './app-prototype.js';

const HELD: unique symbol = Symbol.for('idempotency-header.held') as typeof HELD;
type Marked = { [HELD]?: true };

/** The requests marked beside them rather than on them. */
const heldAside = sharedWeakSet(Symbol.for('idempotency-header.held-aside'));

/** The `WeakSet` registered on `globalThis` under `key` (made and registered if there is none yet). */
function sharedWeakSet(key: symbol): WeakSet<object> {
  const registry = globalThis as unknown as Record<symbol, unknown>;
  const found = registry[key];
  if (found instanceof WeakSet) return found as WeakSet<object>;
  const made = new WeakSet<object>();
  try {
    registry[key] = made;
  } catch {
    // A frozen global (a hardened realm): the set is this copy's own.
  }
  return made;
}

/** Whether an instance of the middleware took this request's key (the request object the adapter sees first). */
export function isHeld(request: object): boolean {
  return heldAside.has(request) || (request as Marked)[HELD] === true;
}

/**
 * Marks the request as taken by this instance: any other instance on its path lets it through. A property on a
 * request whose prototype is its class's; an entry of a `WeakSet` for a request given a prototype made for its
 * app (Express sets `app.request`, an `Object.create` of its own, on every request). V8 gives each such request
 * a hidden class of its own, which a new property copies: counted with callgrind, marking Express's requests so
 * cost some 45 000 instructions per first run, 5 % of one. On a request of its class's prototype the property is
 * the cheaper of the two.
 */
export function markHeld(request: object): void {
  if (hasAppPrototype(request)) heldAside.add(request);
  else markHeldInPlace(request);
}

/**
 * Marks the request with the property whatever its prototype: for a request the adapter knows shares its hidden
 * class with every other, as `@hono/node-server` makes each `Request` by `Object.create` of one prototype, and as
 * the `node:http` flow gives Express's requests one (`shareHiddenClass`). An entry of the `WeakSet` costs such a
 * request more: every one made for a young object is an ephemeron the garbage collector processes on each
 * scavenge.
 */
export function markHeldInPlace(request: object): void {
  (request as Marked)[HELD] = true;
}
