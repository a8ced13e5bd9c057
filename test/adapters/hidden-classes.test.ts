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

/** What the fixture reports for each setup, of its 8 pairs of requests after warm-up. */
type Seen = Record<string, { sameRequestClass: number; sameResponseClass: number; fastResponse: number }>;

async function seenInV8(): Promise<Seen> {
  const { stdout } = await run(process.execPath, ['--allow-natives-syntax', '--import', 'tsx', FIXTURE], {
    timeout: 60_000,
  });
  return JSON.parse(stdout.trim().split('\n').at(-1)!) as Seen;
}

/** Pairs of 8 that must share a class: a single pair may miss V8's cache of dictionary-mode classes. */
const MOST = 5;
/** Processes tried at most: see the test's note on a process where the two classes push each other out. */
const PROCESSES = 3;

describe('hidden classes of requests and responses, in V8', () => {
  it('shares one among Express 4 and 5 requests (and responses) of the methods the middleware handles, as bare Express does not', async () => {
    // V8 finds a dictionary-mode object's shared class in a small cache. In about one process in 40 here, the
    // request's class and the response's take the same place in it and push each other out at every request:
    // there the two stay in dictionary mode without sharing. So sharing is asked of one process of up to three;
    // everything else of every one.
    const shared = new Set<string>();
    for (let attempt = 0; attempt < PROCESSES && shared.size < 2; attempt++) {
      const seen = await seenInV8();
      for (const framework of ['Express 4', 'Express 5']) {
        expect(seen[`${framework}, bare`]).toMatchObject({ sameRequestClass: 0, sameResponseClass: 0 });
        const withMiddleware = seen[`${framework}, with the middleware`]!;
        // Dictionary mode, in every process: the class all such responses share.
        expect(withMiddleware.fastResponse).toBe(0);
        if (withMiddleware.sameRequestClass >= MOST && withMiddleware.sameResponseClass >= MOST) {
          shared.add(framework);
        }
      }
      // A request of a method the middleware does not handle is left as Express made it.
      expect(seen['Express 4, with the middleware, GET']).toEqual({
        sameRequestClass: 0,
        sameResponseClass: 0,
        fastResponse: 8,
      });
      // A node:http response already shares its class, through V8's tree of transitions: every pair, and it
      // keeps its fast properties.
      expect(seen['node:http, with the middleware']).toEqual({
        sameRequestClass: 8,
        sameResponseClass: 8,
        fastResponse: 8,
      });
    }
    expect([...shared].sort()).toEqual(['Express 4', 'Express 5']);
  });
});
