/**
 * The marks that tell an instance of the middleware a request was taken by another: on the request (a request of
 * its class's prototype) or beside it (a request given a prototype made for its app, as Express does), and seen
 * whichever copy of the package made them.
 */
import { IncomingMessage } from 'node:http';
import { Socket } from 'node:net';
import express from 'express';
import { describe, expect, it } from 'vitest';
import { isHeld, markHeld, markHeldInPlace } from '../../src/core/held.js';

/** A request as Express hands it on: its prototype is the app's `request`, an `Object.create` of Express's own. */
function expressRequest(): IncomingMessage {
  const app = express();
  const req = new IncomingMessage(new Socket());
  Object.setPrototypeOf(req, app.request);
  return req;
}

describe('held marks', () => {
  it('marks a request of its class with a registered symbol on it', () => {
    const req = new IncomingMessage(new Socket());
    expect(isHeld(req)).toBe(false);
    markHeld(req);
    expect(isHeld(req)).toBe(true);
    expect((req as unknown as Record<symbol, unknown>)[Symbol.for('idempotency-header.held')]).toBe(true);
    const request = new Request('http://localhost/orders', { method: 'POST' });
    markHeld(request);
    expect(Object.getOwnPropertySymbols(request).map(String)).toContain('Symbol(idempotency-header.held)');
  });

  it("marks Express's requests beside them, with no property added, and sees the mark", () => {
    const req = expressRequest();
    const before = Reflect.ownKeys(req);
    expect(isHeld(req)).toBe(false);
    markHeld(req);
    expect(isHeld(req)).toBe(true);
    expect(Reflect.ownKeys(req)).toEqual(before);
    expect(isHeld(expressRequest())).toBe(false);
  });

  it('marks in place a request the adapter knows shares its hidden class, whatever its prototype', () => {
    // As @hono/node-server makes its requests: Object.create of one prototype shared by all.
    const prototype = Object.create(Request.prototype) as object;
    const request = Object.create(prototype) as object;
    markHeldInPlace(request);
    expect(isHeld(request)).toBe(true);
    expect(Object.getOwnPropertySymbols(request).map(String)).toContain('Symbol(idempotency-header.held)');
    const shared = (globalThis as unknown as Record<symbol, unknown>)[
      Symbol.for('idempotency-header.held-aside')
    ] as WeakSet<object>;
    expect(shared.has(request)).toBe(false);
    expect(isHeld(Object.create(prototype) as object)).toBe(false);
  });

  it('sees the marks another copy of the package made, either way', () => {
    const marked = new IncomingMessage(new Socket());
    (marked as unknown as Record<symbol, unknown>)[Symbol.for('idempotency-header.held')] = true;
    expect(isHeld(marked)).toBe(true);

    const aside = expressRequest();
    const shared = (globalThis as unknown as Record<symbol, unknown>)[
      Symbol.for('idempotency-header.held-aside')
    ];
    expect(shared).toBeInstanceOf(WeakSet);
    (shared as WeakSet<object>).add(aside);
    expect(isHeld(aside)).toBe(true);
    // A mark on an Express request made the other way (a copy that always sets the property) is seen too.
    const property = expressRequest();
    (property as unknown as Record<symbol, unknown>)[Symbol.for('idempotency-header.held')] = true;
    expect(isHeld(property)).toBe(true);
  });
});
