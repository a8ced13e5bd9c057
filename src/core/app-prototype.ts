/**
 * Whether an object's prototype is not a class's (one with a `constructor` of its own): a prototype made for an
 * app, as Express gives every request `app.request` and every response `app.response`, each an `Object.create`
 * of its own. V8 then gives each such object a hidden class of its own, which every new property copies; an
 * object of its class's prototype may still be given such a prototype by a framework that runs later.
 */
export function hasAppPrototype(value: object): boolean {
  const prototype = Object.getPrototypeOf(value) as object | null;
  return prototype !== null && !isClassPrototype(prototype);
}

/** Whether an object is a class's prototype: one with a `constructor` of its own. */
export function isClassPrototype(prototype: object): boolean {
  return Object.hasOwn(prototype, 'constructor');
}
