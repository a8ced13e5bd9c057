/** What {@link LeaseList} needs of an entry: where it is in the list, `-1` when it is not in one. */
export interface Listed {
  leaseSlot: number;
}

/**
 * The requests whose leases the engine renews: added when a request takes its key, removed when it settles,
 * walked only by the renewal timer. An array with each entry's index kept on the entry, so that adding and
 * removing cost a store each: a `Set` rehashes and shrinks its table as a few dozen requests come and go
 * thousands of times a second.
 */
export class LeaseList<T extends Listed> {
  readonly #entries: T[] = [];

  get size(): number {
    return this.#entries.length;
  }

  add(entry: T): void {
    if (entry.leaseSlot !== -1) return;
    entry.leaseSlot = this.#entries.length;
    this.#entries.push(entry);
  }

  /** Removes the entry, if listed, by moving the last entry into its place. */
  delete(entry: T): void {
    const slot = entry.leaseSlot;
    if (slot === -1) return;
    entry.leaseSlot = -1;
    const last = this.#entries.pop()!;
    if (last === entry) return;
    this.#entries[slot] = last;
    last.leaseSlot = slot;
  }

  /** The entries as they are now: the list may change while they are walked. */
  snapshot(): readonly T[] {
    return this.#entries.slice();
  }
}
