import type { HeaderPair, IdempotencyRecord, StoredResponse, TextBodyResponse } from '../core/types.js';
import { utf8 } from '../core/utf8.js';

/**
 * Where {@link MemoryBackend} keeps its records: as bytes in a few large buffers rather than as objects.
 *
 * A stored record lives until it expires, often for a day. Kept as objects (the record, its strings, its body),
 * each one was copied twice by the young-generation collector and then marked again by every full collection,
 * and under a flood of first runs that cost more than the rest of the backend put together. Written here, a
 * record is no object at all: its key's entry in the index holds a small integer, its handle, and the collector
 * has nothing of it to copy or to mark. The record keeps its own key, which the index compares where it lies.
 *
 * Records of up to {@link LARGEST_CELL} bytes go into cells of a few sizes, carved from slabs of
 * {@link SLAB_BYTES}; a freed cell is reused by the next record of its size, and a slab whose cells are all free
 * is given back by {@link RecordArena.releaseEmptySlabs}. A larger record gets a buffer of its own, given back
 * when it is freed.
 *
 * A record's layout, at its cell's offset:
 *
 * | bytes | field |
 * | --- | --- |
 * | 0–7 | when it expires (float64, milliseconds; `Infinity` for never) |
 * | 8–15 | `createdAt` (float64) |
 * | 16–19 | status plus one (uint32; 0 for a record without its response) |
 * | 20–23 | number of headers (uint32; its top bit set when every string is ASCII) |
 * | 24–27 | body length (uint32) |
 * | 28– | one uint32 per string: the key, the fingerprint, then each header's name and value |
 * | then | the strings' code units, one after the other; then the body |
 *
 * A string's word is `units << 1 | wide`: its UTF-16 code units take one byte each when every one is below 256
 * (a hex fingerprint, a header), two otherwise. Any JavaScript string comes back as it went in. A record whose
 * strings are all ASCII, nearly every one, is marked so, and its strings are read back in one native call.
 */

/** Largest record kept in a shared slab; a larger one gets a buffer of its own. */
export const LARGEST_CELL = 8192;
/** Size of one slab of cells, at most. */
export const SLAB_BYTES = 256 * 1024;
/** Cells per slab at most (the smallest cell's count): a handle is `slab * CELLS_PER_SLAB + cell`. */
const CELLS_PER_SLAB = 4096;
/** Slabs at most, so that every handle is a small integer, which a map holds without an object of its own. */
const MOST_SLABS = 2 ** 30 / CELLS_PER_SLAB;

const HEAD_BYTES = 28;
/** The head's 32-bit fields, counted in 32-bit words from the cell's start (the float64s take words 0 to 3). */
const STATUS = 4;
const HEADER_COUNT = 5;
const BODY_LENGTH = 6;
/** The first string's word. */
const WORDS = 7;
/** Each string's place among a record's strings: the key, the fingerprint, then the headers' names and values. */
const KEY = 0;
const FINGERPRINT = 1;
const FIRST_HEADER = 2;
/** Set in the header count of a record whose strings are all ASCII, each byte one unit. */
const ASCII = 0x80000000;
const COUNT = 0x7fffffff;

/** Cell sizes: 64 to 128 by 16, then four sizes per doubling up to {@link LARGEST_CELL} (at most 20 % unused). */
const CELL_SIZES: readonly number[] = (() => {
  const sizes = [64, 80, 96, 112, 128];
  for (let power = 128; power < LARGEST_CELL; power *= 2) {
    for (let step = 1; step <= 4; step++) sizes.push(power + (power / 4) * step);
  }
  return sizes;
})();

/** The cell size index for each record size, by 16-byte steps: a lookup instead of a search per record. */
const SIZE_INDEX = (() => {
  const index = new Uint8Array(LARGEST_CELL / 16 + 1);
  let size = 0;
  for (let step = 0; step < index.length; step++) {
    while (CELL_SIZES[size]! < step * 16) size++;
    index[step] = size;
  }
  return index;
})();

/** A buffer of cells of one size, or of one large record. */
interface Slab {
  readonly bytes: Uint8Array;
  /** The same bytes as numbers: a cell starts on an 8-byte boundary, and its head's fields lie on their own. */
  readonly f64: Float64Array;
  readonly u32: Uint32Array;
  /** For two-byte strings, whose units may lie on any byte. */
  readonly view: DataView;
  /** The size index of its cells, or -1 for a slab holding one large record. */
  readonly sizeIndex: number;
  readonly cellBytes: number;
  /** Cells in use. */
  used: number;
}

/** The cells of one size: the free ones, and the newest slab's cells never used yet. */
interface CellSize {
  free: number[];
  /** The slab cells are carved from next, -1 when none; its next never-used cell. */
  slab: number;
  next: number;
  cells: number;
}

const NO_SLAB = -1;

/** Records as bytes in shared buffers, each known by a small integer handle. */
export class RecordArena {
  readonly #slabBytes: number;
  #slabs: (Slab | undefined)[] = [];
  /** Bytes of every buffer held, and of the cells in use in them. */
  #heldBytes = 0;
  #usedBytes = 0;
  /** Slab numbers given back, to be used again. */
  #unusedSlabs: number[] = [];
  #sizes: CellSize[] = CELL_SIZES.map(() => ({ free: [], slab: NO_SLAB, next: 0, cells: 0 }));

  /**
   * @param slabBytes - size of a buffer of cells, from {@link LARGEST_CELL} to {@link SLAB_BYTES}: a store bounded
   *   to little memory takes it in smaller pieces.
   */
  constructor(slabBytes: number = SLAB_BYTES) {
    this.#slabBytes = Math.min(SLAB_BYTES, Math.max(LARGEST_CELL, slabBytes));
  }

  /**
   * Bytes held in buffers but in no record: cells freed and not yet reused, and the cells of the newest buffers
   * not used yet. Memory all the same, until a record takes them or {@link releaseEmptySlabs} gives them back.
   */
  get idleBytes(): number {
    return this.#heldBytes - this.#usedBytes;
  }

  /**
   * Writes a record and returns its handle. Throws a `RangeError` when no buffer can be had for it.
   */
  store(key: string, record: IdempotencyRecord, expiresAt: number): number {
    return this.#writeAscii(key, record, expiresAt) ?? this.#writeExact(key, record, expiresAt);
  }

  /**
   * Writes a record whose strings are all ASCII, the common case (a UUID key, a hex fingerprint, header names and
   * values), one byte per unit: joined into one flat string and encoded by one native call, which copies a byte
   * per unit where a loop of `charCodeAt` took some 38 instructions per unit. `undefined`, and the cell given
   * back, when one of them is not ASCII.
   */
  #writeAscii(key: string, record: IdempotencyRecord, expiresAt: number): number | undefined {
    const response = record.response;
    const headers = response === null ? NO_HEADERS : response.headers;
    const fingerprint = record.fingerprint;
    const body = response === null ? EMPTY : bodyOf(response);
    // A body sent as text goes at the end of the same string, and is encoded with the rest.
    const text = joinStrings(key, fingerprint, headers, typeof body === 'string' ? body : '');
    const units = text.length;
    const strings = HEAD_BYTES + 4 * (FIRST_HEADER + 2 * headers.length);
    const handle = this.#allocate(strings + units + (typeof body === 'string' ? 0 : body.byteLength));
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    const bytes = slab.bytes;
    const to = at + strings + units;
    // UTF-8 of ASCII is the ASCII itself: all of it read and as many bytes written as units, or it was not ASCII.
    const { read, written } = encoder.encodeInto(text, bytes.subarray(at + strings, to));
    if (read !== units || written !== units) {
      this.free(handle);
      return undefined;
    }
    writeHead(slab, at, record, expiresAt, body.length);
    const u32 = slab.u32;
    u32[(at >> 2) + HEADER_COUNT] = headers.length | ASCII;
    const words = (at >> 2) + WORDS;
    u32[words + KEY] = key.length << 1;
    u32[words + FINGERPRINT] = fingerprint.length << 1;
    for (let i = 0; i < headers.length; i++) {
      const header = headers[i]!;
      u32[words + FIRST_HEADER + 2 * i] = header[0].length << 1;
      u32[words + FIRST_HEADER + 1 + 2 * i] = header[1].length << 1;
    }
    if (typeof body !== 'string') bytes.set(body, to);
    return handle;
  }

  /** Writes any record: each string in one byte per unit when it can, two otherwise. */
  #writeExact(key: string, record: IdempotencyRecord, expiresAt: number): number {
    const response = record.response;
    const headers = response === null ? NO_HEADERS : response.headers;
    const all = [key, record.fingerprint];
    for (const [name, value] of headers) all.push(name, value);
    const narrow = all.map(isNarrow);
    const handed = response === null ? EMPTY : bodyOf(response);
    const body = typeof handed === 'string' ? utf8(handed) : handed;
    let size = HEAD_BYTES + 4 * all.length + body.byteLength;
    all.forEach((value, i) => {
      size += (narrow[i] ? 1 : 2) * value.length;
    });
    const handle = this.#allocate(size);
    const slab = this.#slabs[slabOf(handle)]!;
    const { view, bytes } = slab;
    const at = cellOf(handle) * slab.cellBytes;
    writeHead(slab, at, record, expiresAt, body.byteLength);
    let offset = at + HEAD_BYTES + 4 * all.length;
    all.forEach((value, i) => {
      slab.u32[(at >> 2) + WORDS + i] = (value.length << 1) | (narrow[i] ? 0 : 1);
      if (narrow[i]) for (let unit = 0; unit < value.length; unit++) bytes[offset++] = value.charCodeAt(unit);
      else {
        for (let unit = 0; unit < value.length; unit++, offset += 2)
          view.setUint16(offset, value.charCodeAt(unit), true);
      }
    });
    bytes.set(body, offset);
    return handle;
  }

  /** Bytes the record takes: its cell, or its own buffer. */
  bytesOf(handle: number): number {
    return this.#slabs[slabOf(handle)]!.cellBytes;
  }

  expiresAt(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.f64[(cellOf(handle) * slab.cellBytes) >> 3]!;
  }

  createdAt(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.f64[((cellOf(handle) * slab.cellBytes) >> 3) + 1]!;
  }

  /** The stored status, `null` for a record without its response. */
  status(handle: number): number | null {
    const slab = this.#slabs[slabOf(handle)]!;
    return statusOf(slab, cellOf(handle) * slab.cellBytes);
  }

  bodyLength(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.u32[((cellOf(handle) * slab.cellBytes) >> 2) + BODY_LENGTH]!;
  }

  /** Whether the record's key is `key`, compared where it lies. */
  hasKey(handle: number, key: string): boolean {
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    return stringEquals(slab, (at >> 2) + WORDS + KEY, stringsStart(slab, at), key);
  }

  key(handle: number): string {
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    return readString(slab, (at >> 2) + WORDS + KEY, stringsStart(slab, at)).value;
  }

  /** Whether the record's fingerprint is `fingerprint`, compared where it lies. */
  hasFingerprint(handle: number, fingerprint: string): boolean {
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    return stringEquals(slab, (at >> 2) + WORDS + FINGERPRINT, fingerprintStart(slab, at), fingerprint);
  }

  fingerprint(handle: number): string {
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    return readString(slab, (at >> 2) + WORDS + FINGERPRINT, fingerprintStart(slab, at)).value;
  }

  /**
   * The record, made anew: its body is a copy, which a later store in the same cell cannot change. `fingerprint`:
   * the record's own, when the caller has just compared it, so that it need not be read.
   */
  read(handle: number, fingerprint?: string): IdempotencyRecord {
    const slab = this.#slabs[slabOf(handle)]!;
    const at = cellOf(handle) * slab.cellBytes;
    const count = headerCount(slab, at);
    const ascii = (slab.u32[(at >> 2) + HEADER_COUNT]! & ASCII) !== 0;
    const { values, end } = ascii ? asciiStrings(slab, at, count) : stringsOneByOne(slab, at, count);
    const createdAt = slab.f64[(at >> 3) + 1]!;
    const status = statusOf(slab, at);
    if (status === null)
      return { fingerprint: fingerprint ?? values[FINGERPRINT]!, createdAt, response: null };
    const headers: HeaderPair[] = [];
    for (let i = FIRST_HEADER; i < FIRST_HEADER + 2 * count; i += 2)
      headers.push([values[i]!, values[i + 1]!]);
    const body = slab.bytes.slice(end, end + slab.u32[(at >> 2) + BODY_LENGTH]!);
    return {
      fingerprint: fingerprint ?? values[FINGERPRINT]!,
      createdAt,
      response: { status, headers, body },
    };
  }

  /** Frees the record's cell for another record, or gives its own buffer back. */
  free(handle: number): void {
    const number = slabOf(handle);
    const slab = this.#slabs[number]!;
    slab.used--;
    this.#usedBytes -= slab.cellBytes;
    if (slab.sizeIndex === -1) this.#giveBack(number);
    else this.#sizes[slab.sizeIndex]!.free.push(handle);
  }

  /** Gives back the slabs whose cells are all free, so that memory taken in a burst does not stay taken. */
  releaseEmptySlabs(): void {
    for (const cells of this.#sizes) {
      const empty = new Set<number>();
      for (const handle of cells.free) {
        const number = slabOf(handle);
        if (this.#slabs[number]!.used === 0) empty.add(number);
      }
      if (cells.slab !== NO_SLAB && this.#slabs[cells.slab]!.used === 0) empty.add(cells.slab);
      if (empty.size === 0) continue;
      cells.free = cells.free.filter((handle) => !empty.has(slabOf(handle)));
      if (empty.has(cells.slab)) cells.slab = NO_SLAB;
      for (const number of empty) this.#giveBack(number);
    }
  }

  /** Number of slabs held, large records' buffers included. */
  get slabCount(): number {
    return this.#slabs.length - this.#unusedSlabs.length;
  }

  /** Forgets every record. */
  clear(): void {
    this.#slabs = [];
    this.#unusedSlabs = [];
    this.#heldBytes = 0;
    this.#usedBytes = 0;
    this.#sizes = CELL_SIZES.map(() => ({ free: [], slab: NO_SLAB, next: 0, cells: 0 }));
  }

  #allocate(size: number): number {
    if (size > LARGEST_CELL) {
      const number = this.#newSlab(-1, (size + 7) & ~7, 1);
      this.#slabs[number]!.used = 1;
      this.#usedBytes += this.#slabs[number]!.cellBytes;
      return number * CELLS_PER_SLAB;
    }
    const sizeIndex = SIZE_INDEX[(size + 15) >> 4]!;
    const cells = this.#sizes[sizeIndex]!;
    let handle = cells.free.pop();
    if (handle === undefined) {
      if (cells.slab === NO_SLAB || cells.next === cells.cells) {
        const cellBytes = CELL_SIZES[sizeIndex]!;
        cells.cells = Math.min(CELLS_PER_SLAB, Math.floor(this.#slabBytes / cellBytes));
        cells.slab = this.#newSlab(sizeIndex, cellBytes, cells.cells);
        cells.next = 0;
      }
      handle = cells.slab * CELLS_PER_SLAB + cells.next++;
    }
    const slab = this.#slabs[slabOf(handle)]!;
    slab.used++;
    this.#usedBytes += slab.cellBytes;
    return handle;
  }

  #newSlab(sizeIndex: number, cellBytes: number, cells: number): number {
    const number = this.#unusedSlabs.pop() ?? this.#slabs.length;
    if (number >= MOST_SLABS) throw new RangeError('MemoryBackend has no room for another buffer');
    const bytes = new Uint8Array(cellBytes * cells);
    this.#heldBytes += bytes.byteLength;
    this.#slabs[number] = {
      bytes,
      f64: new Float64Array(bytes.buffer),
      u32: new Uint32Array(bytes.buffer),
      view: new DataView(bytes.buffer),
      sizeIndex,
      cellBytes,
      used: 0,
    };
    return number;
  }

  #giveBack(number: number): void {
    this.#heldBytes -= this.#slabs[number]!.bytes.byteLength;
    this.#slabs[number] = undefined;
    this.#unusedSlabs.push(number);
  }
}

function slabOf(handle: number): number {
  return (handle / CELLS_PER_SLAB) | 0;
}

function cellOf(handle: number): number {
  return handle & (CELLS_PER_SLAB - 1);
}

const encoder = new TextEncoder();

/**
 * A record's strings end to end, as one flat string: the key, the fingerprint, each header's name and value, and
 * `body` (the body when it was sent as text, or nothing).
 */
function joinStrings(key: string, fingerprint: string, headers: readonly HeaderPair[], body: string): string {
  const parts: string[] = new Array(3 + 2 * headers.length);
  parts[0] = key;
  parts[1] = fingerprint;
  for (let i = 0; i < headers.length; i++) {
    parts[2 + 2 * i] = headers[i]![0];
    parts[3 + 2 * i] = headers[i]![1];
  }
  parts[2 + 2 * headers.length] = body;
  return parts.join('');
}

const EMPTY = new Uint8Array(0);

/** A response's body as the engine handed it over: bytes, or the text it was sent as (see `TEXT_BODIES`). */
function bodyOf(response: StoredResponse): Uint8Array | string {
  return (response as TextBodyResponse).body;
}

const NO_HEADERS: readonly HeaderPair[] = [];

function writeHead(
  slab: Slab,
  at: number,
  record: IdempotencyRecord,
  expiresAt: number,
  bodyLength: number,
): void {
  const response = record.response;
  const { f64, u32 } = slab;
  f64[at >> 3] = expiresAt;
  f64[(at >> 3) + 1] = record.createdAt;
  const base = at >> 2;
  // The status plus one: 0 for a record without its response.
  u32[base + STATUS] = response === null ? 0 : response.status + 1;
  u32[base + HEADER_COUNT] = response === null ? 0 : response.headers.length;
  u32[base + BODY_LENGTH] = bodyLength;
}

function statusOf(slab: Slab, at: number): number | null {
  const stored = slab.u32[(at >> 2) + STATUS]!;
  return stored === 0 ? null : stored - 1;
}

/** Where a record's strings start: after its head and one word per string (key, fingerprint, 2 per header). */
function stringsStart(slab: Slab, at: number): number {
  return at + HEAD_BYTES + 4 * (FIRST_HEADER + 2 * headerCount(slab, at));
}

/** Where a record's fingerprint starts: after its key, in one or two bytes per unit. */
function fingerprintStart(slab: Slab, at: number): number {
  const word = slab.u32[(at >> 2) + WORDS + KEY]!;
  return stringsStart(slab, at) + (word >>> 1) * ((word & 1) + 1);
}

/** Whether the string whose word is `slab.u32[word]` and whose units start at byte `start` is `value`. */
function stringEquals(slab: Slab, word: number, start: number, value: string): boolean {
  const header = slab.u32[word]!;
  const units = header >>> 1;
  if (units !== value.length) return false;
  if ((header & 1) === 0) {
    const bytes = slab.bytes;
    for (let i = 0; i < units; i++) if (bytes[start + i] !== value.charCodeAt(i)) return false;
    return true;
  }
  const view = slab.view;
  for (let i = 0; i < units; i++)
    if (view.getUint16(start + 2 * i, true) !== value.charCodeAt(i)) return false;
  return true;
}

function headerCount(slab: Slab, at: number): number {
  return slab.u32[(at >> 2) + HEADER_COUNT]! & COUNT;
}

const decoder = new TextDecoder();

/** A record's strings (the key, the fingerprint, then each header's name and value) and where the body starts. */
interface RecordStrings {
  values: string[];
  end: number;
}

/** The strings of a record whose strings are all ASCII: decoded in one native call, then cut. */
function asciiStrings(slab: Slab, at: number, count: number): RecordStrings {
  const { u32 } = slab;
  const words = (at >> 2) + WORDS;
  let units = 0;
  const last = words + FIRST_HEADER + 2 * count;
  for (let word = words; word < last; word++) units += u32[word]! >>> 1;
  const start = stringsStart(slab, at);
  const text = decoder.decode(slab.bytes.subarray(start, start + units));
  const values: string[] = [];
  for (let word = words, from = 0; word < last; word++) {
    const to = from + (u32[word]! >>> 1);
    values.push(text.slice(from, to));
    from = to;
  }
  return { values, end: start + units };
}

/** The strings of any record, one by one, each in one or two bytes per unit. */
function stringsOneByOne(slab: Slab, at: number, count: number): RecordStrings {
  const words = (at >> 2) + WORDS;
  const values: string[] = [];
  let end = stringsStart(slab, at);
  for (let word = words; word < words + FIRST_HEADER + 2 * count; word++) {
    const read = readString(slab, word, end);
    values.push(read.value);
    end = read.end;
  }
  return { values, end };
}

function isNarrow(value: string): boolean {
  for (let i = 0; i < value.length; i++) if (value.charCodeAt(i) > 0xff) return false;
  return true;
}

/** Reading a string gives where the next field starts. */
interface ReadString {
  value: string;
  end: number;
}

/** Code units per `String.fromCharCode` call, well under the engines' argument limits. */
const CHUNK_UNITS = 4096;

/** The string whose word is `slab.u32[word]` and whose units start at byte `start`. */
function readString(slab: Slab, word: number, start: number): ReadString {
  const { bytes, view } = slab;
  const header = slab.u32[word]!;
  const units = header >>> 1;
  if ((header & 1) === 0) {
    let value = '';
    for (let i = 0; i < units; i += CHUNK_UNITS) {
      const chunk = bytes.subarray(start + i, start + Math.min(units, i + CHUNK_UNITS));
      value += String.fromCharCode.apply(null, chunk as unknown as number[]);
    }
    return { value, end: start + units };
  }
  const codes: number[] = new Array(units);
  for (let i = 0; i < units; i++) codes[i] = view.getUint16(start + 2 * i, true);
  let value = '';
  for (let i = 0; i < units; i += CHUNK_UNITS) {
    value += String.fromCharCode.apply(null, codes.slice(i, i + CHUNK_UNITS));
  }
  return { value, end: start + 2 * units };
}
