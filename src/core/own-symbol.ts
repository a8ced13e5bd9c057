/**
 * The symbol of one of an object's own properties, by its description; `null` when there is none. The frameworks'
 * and Node.js's internal symbols are not exported: the records they key (Fastify's reply headers and route
 * context, Node.js's outgoing headers, `@hono/node-server`'s response cache) are found this way, once, where
 * reading them saves the work the public getters do on every call.
 */
export function ownSymbol(target: object, description: string): symbol | null {
  return Object.getOwnPropertySymbols(target).find((own) => own.description === description) ?? null;
}
