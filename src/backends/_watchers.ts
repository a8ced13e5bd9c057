/**
 * The requests of one backend waiting for keys to change (`Backend.watch`), woken by the backend's own news that a
 * key was stored or released: an in-process call, a Redis message or a PostgreSQL notification.
 */
export class KeyWatchers {
  readonly #byKey = new Map<string, Set<() => void>>();

  /**
   * Resolves once {@link wake} is called for `key`, or {@link wakeAll}, or `signal` aborts. `ready`: the
   * backend's notifications while they are still being set up; a notification sent before they are could pass
   * unheard, so the waiter is woken when `ready` settles, to look again.
   */
  watch(key: string, signal: AbortSignal, ready?: Promise<unknown>): Promise<void> {
    return new Promise((resolve) => {
      if (signal.aborted) return resolve();
      let watchers = this.#byKey.get(key);
      if (watchers === undefined) {
        watchers = new Set();
        this.#byKey.set(key, watchers);
      }
      const done = () => {
        watchers.delete(done);
        if (watchers.size === 0 && this.#byKey.get(key) === watchers) this.#byKey.delete(key);
        signal.removeEventListener('abort', done);
        resolve();
      };
      watchers.add(done);
      signal.addEventListener('abort', done, { once: true });
      ready?.then(done, done);
    });
  }

  /** Wakes every waiter on `key`. */
  wake(key: string): void {
    if (this.#byKey.size === 0) return;
    const watchers = this.#byKey.get(key);
    if (watchers !== undefined) for (const wake of [...watchers]) wake();
  }

  /** Wakes every waiter: news may have been missed (a notification connection was down). */
  wakeAll(): void {
    for (const watchers of [...this.#byKey.values()]) for (const wake of [...watchers]) wake();
  }
}
