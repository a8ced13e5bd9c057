/** The property added and deleted again by {@link shareHiddenClass}; never left on an object. */
const PROBE: unique symbol = Symbol('idempotency-header.probe');

/**
 * Gives an object whose hidden class is its own a hidden class shared by every object like it, and leaves any
 * other object as it was. Property values, order and descriptors are untouched.
 *
 * Express gives every request and response its app's prototype with `Object.setPrototypeOf`. V8 then takes the
 * object's hidden class out of its tree of transitions, so that each property added afterwards (by Express, the
 * app, body parsers, Node.js's own `ServerResponse`) makes a new hidden class for that one object. No two requests
 * share one: every property access on them misses V8's inline caches and its stub cache, and a miss costs some
 * 1 000 instructions, half of all the instructions of a bare Express 4 request. In dictionary mode the object
 * shares one hidden class with every other object of the same prototype and constructor, so that the caches hold,
 * and a property read is a hash lookup. V8 finds that class in a small cache, where now and then (about one process
 * in 40) the request's class and the response's take the same place and push each other out at every request:
 * there nothing is shared, and requests run as they would without this step, with its cost on top.
 *
 * Adding a property and deleting it again does this: V8 undoes the last transition of a hidden class that has its
 * place in the tree (the object is as it was), and turns an object whose hidden class has none to dictionary mode.
 * Other engines do what their own rules say, which changes nothing but speed.
 */
export function shareHiddenClass(object: object): void {
  // A frozen or sealed object (a test's stand-in) takes no property, and has no hidden class to share.
  if (!Object.isExtensible(object)) return;
  const probed = object as { [PROBE]?: undefined };
  probed[PROBE] = undefined;
  delete probed[PROBE];
}
