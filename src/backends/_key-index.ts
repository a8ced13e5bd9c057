/**
 * Where {@link MemoryBackend} finds each key's entry: a hash table of small integers in a typed array, not a `Map`
 * of strings.
 *
 * A key lives as long as its record, often for a day. Kept as a `Map` key, each one was a string the young
 * generation collector copied twice and every full collection marked again, in a table the collector scanned as
 * well; under a flood of first runs that made the map of keys the costliest part of the store. Here a key is no
 * object at all: the table holds its 32-bit hash and its entry's number, and the key itself is kept by whoever
 * owns the entry (a record's key in its arena cell, a lock's in the lock), which the table asks when two hashes
 * meet.
 *
 * Open addressing with linear probing, at most half full, entries deleted by shifting the ones after them back
 * (no tombstones). No entry lies more than {@link MOST_PROBES} slots past the slot its hash points to: a key that
 * finds no room that near goes to a plain `Map` instead. Every lookup is so bounded, whatever keys a client
 * chooses: keys made to share hashes or slots, which an unseeded hash lets anyone compute, only end up in that
 * `Map`, whose hash V8 seeds afresh in every process.
 */

/** Slots a key is looked for in, from the one its hash points to. */
const MOST_PROBES = 32;
const FIRST_CAPACITY = 1024;
/** A stored hash is never 0: 0 marks an empty slot. */
const EMPTY = 0;

/** What the owner of the entries tells the index about them. */
export interface KeyOwner {
  /** Whether `key` is the key of the entry numbered `value`. */
  isKeyOf(value: number, key: string): boolean;
  /** The key of the entry numbered `value`. */
  keyOf(value: number): string;
}

/** The 32-bit FNV-1a hash of a key's UTF-16 code units. */
export function hashKey(key: string): number {
  let hash = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) hash = Math.imul(hash ^ key.charCodeAt(i), 0x01000193);
  return hash;
}

/** Keys mapped to non-negative or negative 32-bit integers (entry numbers), found through {@link KeyOwner}. */
export class KeyIndex {
  readonly #owner: KeyOwner;
  readonly #hash: (key: string) => number;
  /**
   * The slots, each two numbers side by side: the key's hash at `2 * slot`, its entry's number after it. One
   * array rather than two, so that a lookup in a table larger than the CPU's caches misses once, not twice.
   */
  #slots = new Int32Array(2 * FIRST_CAPACITY);
  /** Slots in the table, less one: a hash's slot is `hash & mask`. */
  #mask = FIRST_CAPACITY - 1;
  /** Entries in the table. */
  #count = 0;
  /** Keys that found no slot near enough. */
  #overflow = new Map<string, number>();
  #lastKey: string | undefined;
  #lastHash = 0;

  /** @param hash - the hash of a key; another only in tests, to make keys meet. */
  constructor(owner: KeyOwner, hash: (key: string) => number = hashKey) {
    this.#owner = owner;
    this.#hash = hash;
  }

  get size(): number {
    return this.#count + this.#overflow.size;
  }

  /** The key's entry number, `undefined` when the key has none. */
  get(key: string): number | undefined {
    const slot = this.#slotOf(key, this.#hashOf(key));
    if (slot !== -1) return this.#slots[2 * slot + 1];
    return this.#overflow.size === 0 ? undefined : this.#overflow.get(key);
  }

  /** Sets the key's entry number, in place of the one it had. */
  set(key: string, value: number): void {
    const hash = this.#hashOf(key);
    const slot = this.#slotOf(key, hash);
    if (slot !== -1) {
      this.#slots[2 * slot + 1] = value;
      return;
    }
    const overflow = this.#overflow;
    if (overflow.size !== 0 && overflow.has(key)) {
      overflow.set(key, value);
      return;
    }
    if ((this.#count + 1) * 2 > this.#mask + 1) this.#grow();
    if (this.#place(hash, value)) this.#count++;
    else overflow.set(key, value);
  }

  /** Removes the key's entry; whether it had one. */
  delete(key: string): boolean {
    const slot = this.#slotOf(key, this.#hashOf(key));
    if (slot === -1) return this.#overflow.size !== 0 && this.#overflow.delete(key);
    this.#remove(slot);
    return true;
  }

  /** Every entry number, in no particular order. Change the index only after. */
  values(): number[] {
    const values: number[] = [];
    const slots = this.#slots;
    for (let at = 0; at < slots.length; at += 2) if (slots[at] !== EMPTY) values.push(slots[at + 1]!);
    for (const value of this.#overflow.values()) values.push(value);
    return values;
  }

  clear(): void {
    this.#slots = new Int32Array(2 * FIRST_CAPACITY);
    this.#mask = FIRST_CAPACITY - 1;
    this.#count = 0;
    this.#overflow = new Map();
  }

  /**
   * The key's hash as stored: a 32-bit integer, never {@link EMPTY}. The last one is kept: a store looks a key up
   * and then sets it, one right after the other.
   */
  #hashOf(key: string): number {
    if (key === this.#lastKey) return this.#lastHash;
    const hash = this.#hash(key) | 0 || 1;
    this.#lastKey = key;
    this.#lastHash = hash;
    return hash;
  }

  /** The slot that holds the key, or -1. */
  #slotOf(key: string, hash: number): number {
    const slots = this.#slots;
    const mask = this.#mask;
    for (let probe = 0, slot = hash & mask; probe < MOST_PROBES; probe++, slot = (slot + 1) & mask) {
      const found = slots[2 * slot];
      if (found === EMPTY) return -1;
      if (found === hash && this.#owner.isKeyOf(slots[2 * slot + 1]!, key)) return slot;
    }
    return -1;
  }

  /** Puts an entry in the first empty slot near its hash's; whether there was one. */
  #place(hash: number, value: number): boolean {
    const slots = this.#slots;
    const mask = this.#mask;
    for (let probe = 0, slot = hash & mask; probe < MOST_PROBES; probe++, slot = (slot + 1) & mask) {
      if (slots[2 * slot] === EMPTY) {
        slots[2 * slot] = hash;
        slots[2 * slot + 1] = value;
        return true;
      }
    }
    return false;
  }

  /**
   * Empties a slot, then moves back each entry after it (up to the next empty slot) that may take the freed slot,
   * so that no lookup meets an empty slot before the entry it looks for.
   */
  #remove(slot: number): void {
    const slots = this.#slots;
    const mask = this.#mask;
    let free = slot;
    for (let next = (slot + 1) & mask; slots[2 * next] !== EMPTY; next = (next + 1) & mask) {
      const home = slots[2 * next]! & mask;
      // The entry stays when its home lies after the free slot, up to where it is (cyclically).
      const stays = free <= next ? free < home && home <= next : free < home || home <= next;
      if (stays) continue;
      slots[2 * free] = slots[2 * next]!;
      slots[2 * free + 1] = slots[2 * next + 1]!;
      free = next;
    }
    slots[2 * free] = EMPTY;
    this.#count--;
  }

  /** Doubles the table; an entry that finds no slot near its hash's in the new one goes to the overflow map. */
  #grow(): void {
    const slots = this.#slots;
    this.#slots = new Int32Array(slots.length * 2);
    this.#mask = slots.length - 1;
    this.#count = 0;
    for (let at = 0; at < slots.length; at += 2) {
      const hash = slots[at]!;
      if (hash === EMPTY) continue;
      const value = slots[at + 1]!;
      if (this.#place(hash, value)) this.#count++;
      else this.#overflow.set(this.#owner.keyOf(value), value);
    }
  }
}
