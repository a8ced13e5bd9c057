/**
 * Express gives each request and response a hidden class of its own, which makes every property access on them
 * miss V8's caches; the node:http flow (Express's, Nest's on Express, `withIdempotency`'s) gives them one shared
 * hidden class instead (`shareHiddenClass`). Proven in V8 itself: a child process with natives syntax compares two
 * requests in flight, bare and with the middleware.
 */
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { describe, expect, it } from 'vitest';
import { shareHiddenClass } from '../../src/adapters/node-http/dictionary-mode.js';

const run = promisify(execFile);
const FIXTURE = fileURLToPath(new URL('./fixtures/hidden-classes.ts', import.meta.url));

describe('shareHiddenClass', () => {
  it('leaves every property as it was: names, order, values and descriptors, symbols included', () => {
    const tag = Symbol('tag');
    const object: Record<string | symbol, unknown> = { b: 1, a: 'two', [tag]: 3 };
    Object.defineProperty(object, 'hidden', { value: 4, enumerable: false, writable: false });
    const before = Object.getOwnPropertyDescriptors(object);
    const keys = Reflect.ownKeys(object);
    shareHiddenClass(object);
    expect(Reflect.ownKeys(object)).toEqual(keys);
    expect(Object.getOwnPropertyDescriptors(object)).toEqual(before);
  });

  it('leaves a frozen or non-extensible object alone, without throwing', () => {
    const frozen = Object.freeze({ a: 1 });
    const sealed = Object.preventExtensions({ b: 2 });
    expect(() => shareHiddenClass(frozen)).not.toThrow();
    expect(() => shareHiddenClass(sealed)).not.toThrow();
    expect(Reflect.ownKeys(frozen)).toEqual(['a']);
    expect(Reflect.ownKeys(sealed)).toEqual(['b']);
  });

  it('leaves nothing behind on a proxy', () => {
    const target: Record<string | symbol, unknown> = { a: 1 };
    const proxy = new Proxy(target, {});
    shareHiddenClass(proxy);
    expect(Reflect.ownKeys(target)).toEqual(['a']);
  });
});

describe('hidden classes of requests and responses, in V8', () => {
  it('shares one among Express 4 and 5 requests (and responses) of the methods the middleware handles, as bare Express does not', async () => {
    const { stdout } = await run(process.execPath, ['--allow-natives-syntax', '--import', 'tsx', FIXTURE], {
      timeout: 60_000,
    });
    const seen = JSON.parse(stdout.trim().split('\n').at(-1)!) as Record<
      string,
      { sameRequestClass: boolean; sameResponseClass: boolean; fastResponse: boolean }
    >;
    // The state of affairs the middleware mends: with it alone two requests' classes match.
    for (const framework of ['Express 4', 'Express 5']) {
      expect(seen[`${framework}, bare`]).toMatchObject({ sameRequestClass: false, sameResponseClass: false });
      expect(seen[`${framework}, with the middleware`]).toEqual({
        sameRequestClass: true,
        sameResponseClass: true,
        // Dictionary mode: the one hidden class all such responses share.
        fastResponse: false,
      });
    }
    // A request of a method the middleware does not handle is left as Express made it.
    expect(seen['Express 4, with the middleware, GET']).toEqual({
      sameRequestClass: false,
      sameResponseClass: false,
      fastResponse: true,
    });
    // A node:http response already shares its class: it keeps its fast properties.
    expect(seen['node:http, with the middleware']).toEqual({
      sameRequestClass: true,
      sameResponseClass: true,
      fastResponse: true,
    });
  });
});
