import type { HeaderPair, IdempotencyRecord } from '../core/types.js';

/**
 * Where {@link MemoryBackend} keeps its records: as bytes in a few large buffers rather than as objects.
 *
 * A stored record lives until it expires, often for a day. Kept as objects (the record, its strings, its body),
 * each one was copied twice by the young-generation collector and then marked again by every full collection,
 * and under a flood of first runs that cost more than the rest of the backend put together. Written here, a
 * record is no object at all: its key's map entry holds a small integer, its handle, and the collector has
 * nothing of it to copy or to mark.
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
 * | 16–19 | status (int32; -1 for a record without its response) |
 * | 20–23 | number of headers (uint32) |
 * | 24–27 | body length (uint32) |
 * | 28– | the fingerprint, then each header's name and value, as strings; then the body |
 *
 * A string is a uint32 `units << 1 | wide`, then its UTF-16 code units: one byte each when every unit is below
 * 256 (a hex fingerprint, a header), two otherwise. Any JavaScript string comes back as it went in.
 */

/** Largest record kept in a shared slab; a larger one gets a buffer of its own. */
export const LARGEST_CELL = 8192;
/** Size of one slab of cells. */
export const SLAB_BYTES = 256 * 1024;
/** Cells per slab at most (the smallest cell's count): a handle is `slab * CELLS_PER_SLAB + cell`. */
const CELLS_PER_SLAB = 4096;
/** Slabs at most, so that every handle is a small integer, which a map holds without an object of its own. */
const MOST_SLABS = 2 ** 30 / CELLS_PER_SLAB;

const HEAD_BYTES = 28;
const EXPIRES = 0;
const CREATED = 8;
const STATUS = 16;
const HEADER_COUNT = 20;
const BODY_LENGTH = 24;

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
  readonly view: DataView;
  /** The size index of its cells, or -1 for a slab holding one large record. */
  readonly sizeIndex: number;
  readonly cellBytes: number;
  /** Cells in use. */
  used: number;
}

/** The cells of one size: the free ones, and the newest slab's cells never used yet. */
interface CellSize {
  readonly free: number[];
  /** The slab cells are carved from next, -1 when none; its next never-used cell. */
  slab: number;
  next: number;
  cells: number;
}

const NO_SLAB = -1;

/** Records as bytes in shared buffers, each known by a small integer handle. */
export class RecordArena {
  #slabs: (Slab | undefined)[] = [];
  /** Slab numbers given back, to be used again. */
  #unusedSlabs: number[] = [];
  #sizes: CellSize[] = CELL_SIZES.map(() => ({ free: [], slab: NO_SLAB, next: 0, cells: 0 }));

  /**
   * Writes a record and returns its handle. Throws a `RangeError` when no buffer can be had for it.
   */
  store(record: IdempotencyRecord, expiresAt: number): number {
    // Sized as if every string took one byte per unit, the common case, and written so; a string that does not
    // fit that is met while writing, and the record is then written again, sized exactly.
    return this.#write(record, expiresAt, false) ?? (this.#write(record, expiresAt, true) as number);
  }

  /** Writes the record; `undefined` when a string needs two bytes per unit and `exact` is off. */
  #write(record: IdempotencyRecord, expiresAt: number, exact: boolean): number | undefined {
    const response = record.response;
    const size = exact ? exactSize(record) : HEAD_BYTES + recordUnits(record);
    const handle = this.#allocate(size);
    const slab = this.#slabs[slabOf(handle)]!;
    const view = slab.view;
    const bytes = slab.bytes;
    const at = cellOf(handle) * slab.cellBytes;
    view.setFloat64(at + EXPIRES, expiresAt, true);
    view.setFloat64(at + CREATED, record.createdAt, true);
    view.setInt32(at + STATUS, response === null ? -1 : response.status, true);
    let offset = writeString(view, bytes, at + HEAD_BYTES, record.fingerprint, exact);
    if (response === null) {
      view.setUint32(at + HEADER_COUNT, 0, true);
      view.setUint32(at + BODY_LENGTH, 0, true);
    } else {
      const { headers, body } = response;
      view.setUint32(at + HEADER_COUNT, headers.length, true);
      view.setUint32(at + BODY_LENGTH, body.byteLength, true);
      for (let i = 0; i < headers.length && offset !== -1; i++) {
        const header = headers[i]!;
        offset = writeString(view, bytes, offset, header[0], exact);
        if (offset !== -1) offset = writeString(view, bytes, offset, header[1], exact);
      }
      if (offset !== -1) bytes.set(body, offset);
    }
    if (offset !== -1) return handle;
    this.free(handle);
    return undefined;
  }

  /** Bytes the record takes: its cell, or its own buffer. */
  bytesOf(handle: number): number {
    return this.#slabs[slabOf(handle)]!.cellBytes;
  }

  expiresAt(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.view.getFloat64(cellOf(handle) * slab.cellBytes + EXPIRES, true);
  }

  createdAt(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.view.getFloat64(cellOf(handle) * slab.cellBytes + CREATED, true);
  }

  /** The stored status, `null` for a record without its response. */
  status(handle: number): number | null {
    const slab = this.#slabs[slabOf(handle)]!;
    const status = slab.view.getInt32(cellOf(handle) * slab.cellBytes + STATUS, true);
    return status === -1 ? null : status;
  }

  bodyLength(handle: number): number {
    const slab = this.#slabs[slabOf(handle)]!;
    return slab.view.getUint32(cellOf(handle) * slab.cellBytes + BODY_LENGTH, true);
  }

  /** Whether the record's fingerprint is `fingerprint`, compared where it lies. */
  hasFingerprint(handle: number, fingerprint: string): boolean {
    const slab = this.#slabs[slabOf(handle)]!;
    return stringEquals(slab.view, slab.bytes, cellOf(handle) * slab.cellBytes + HEAD_BYTES, fingerprint);
  }

  fingerprint(handle: number): string {
    const slab = this.#slabs[slabOf(handle)]!;
    return readString(slab.view, slab.bytes, cellOf(handle) * slab.cellBytes + HEAD_BYTES).value;
  }

  /** The record, made anew: its body is a copy, which a later store in the same cell cannot change. */
  read(handle: number): IdempotencyRecord {
    const slab = this.#slabs[slabOf(handle)]!;
    const { view, bytes } = slab;
    const at = cellOf(handle) * slab.cellBytes;
    const createdAt = view.getFloat64(at + CREATED, true);
    let read = readString(view, bytes, at + HEAD_BYTES);
    const fingerprint = read.value;
    const status = view.getInt32(at + STATUS, true);
    if (status === -1) return { fingerprint, createdAt, response: null };
    const count = view.getUint32(at + HEADER_COUNT, true);
    const headers: HeaderPair[] = [];
    for (let i = 0; i < count; i++) {
      read = readString(view, bytes, read.end);
      const name = read.value;
      read = readString(view, bytes, read.end);
      headers.push([name, read.value]);
    }
    const length = view.getUint32(at + BODY_LENGTH, true);
    const body = bytes.slice(read.end, read.end + length);
    return { fingerprint, createdAt, response: { status, headers, body } };
  }

  /** Frees the record's cell for another record, or gives its own buffer back. */
  free(handle: number): void {
    const number = slabOf(handle);
    const slab = this.#slabs[number]!;
    slab.used--;
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
      const kept = cells.free.filter((handle) => !empty.has(slabOf(handle)));
      cells.free.length = 0;
      cells.free.push(...kept);
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
    this.#sizes = CELL_SIZES.map(() => ({ free: [], slab: NO_SLAB, next: 0, cells: 0 }));
  }

  #allocate(size: number): number {
    if (size > LARGEST_CELL) return this.#newSlab(-1, (size + 7) & ~7, 1) * CELLS_PER_SLAB;
    const sizeIndex = SIZE_INDEX[(size + 15) >> 4]!;
    const cells = this.#sizes[sizeIndex]!;
    let handle = cells.free.pop();
    if (handle === undefined) {
      if (cells.slab === NO_SLAB || cells.next === cells.cells) {
        const cellBytes = CELL_SIZES[sizeIndex]!;
        cells.cells = Math.min(CELLS_PER_SLAB, Math.floor(SLAB_BYTES / cellBytes));
        cells.slab = this.#newSlab(sizeIndex, cellBytes, cells.cells);
        cells.next = 0;
      }
      handle = cells.slab * CELLS_PER_SLAB + cells.next++;
    }
    this.#slabs[slabOf(handle)]!.used++;
    return handle;
  }

  #newSlab(sizeIndex: number, cellBytes: number, cells: number): number {
    const number = this.#unusedSlabs.pop() ?? this.#slabs.length;
    if (number >= MOST_SLABS) throw new RangeError('MemoryBackend has no room for another buffer');
    const bytes = new Uint8Array(cellBytes * cells);
    this.#slabs[number] = {
      bytes,
      view: new DataView(bytes.buffer),
      sizeIndex,
      cellBytes,
      used: 0,
    };
    return number;
  }

  #giveBack(number: number): void {
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

/** A record's size when each of its strings takes one byte per unit (4 bytes of length before each). */
function recordUnits(record: IdempotencyRecord): number {
  const response = record.response;
  let size = 4 + record.fingerprint.length;
  if (response === null) return size;
  const headers = response.headers;
  for (let i = 0; i < headers.length; i++) {
    const header = headers[i]!;
    size += 8 + header[0].length + header[1].length;
  }
  return size + response.body.byteLength;
}

/** A record's size, each string taking the bytes it needs. */
function exactSize(record: IdempotencyRecord): number {
  const response = record.response;
  let size = HEAD_BYTES + stringBytes(record.fingerprint);
  if (response === null) return size;
  for (const [name, value] of response.headers) size += stringBytes(name) + stringBytes(value);
  return size + response.body.byteLength;
}

/** Bytes `value` takes as a stored string. */
function stringBytes(value: string): number {
  return 4 + (isNarrow(value) ? 1 : 2) * value.length;
}

function isNarrow(value: string): boolean {
  for (let i = 0; i < value.length; i++) if (value.charCodeAt(i) > 0xff) return false;
  return true;
}

/**
 * Writes `value` at `at` and returns where it ends. Unless `exact`, the record was sized for one byte per unit:
 * -1 when a unit does not fit in one.
 */
function writeString(view: DataView, bytes: Uint8Array, at: number, value: string, exact: boolean): number {
  const units = value.length;
  const start = at + 4;
  if (!exact || isNarrow(value)) {
    for (let i = 0; i < units; i++) {
      const unit = value.charCodeAt(i);
      if (unit > 0xff) return -1;
      bytes[start + i] = unit;
    }
    view.setUint32(at, units << 1, true);
    return start + units;
  }
  view.setUint32(at, (units << 1) | 1, true);
  for (let i = 0; i < units; i++) view.setUint16(start + 2 * i, value.charCodeAt(i), true);
  return start + 2 * units;
}

/** Reading a string gives where the next field starts. */
interface ReadString {
  value: string;
  end: number;
}

/** Code units per `String.fromCharCode` call, well under the engines' argument limits. */
const CHUNK_UNITS = 4096;

function readString(view: DataView, bytes: Uint8Array, at: number): ReadString {
  const word = view.getUint32(at, true);
  const units = word >>> 1;
  const start = at + 4;
  if ((word & 1) === 0) {
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

function stringEquals(view: DataView, bytes: Uint8Array, at: number, value: string): boolean {
  const word = view.getUint32(at, true);
  const units = word >>> 1;
  if (units !== value.length) return false;
  const start = at + 4;
  if ((word & 1) === 0) {
    for (let i = 0; i < units; i++) if (bytes[start + i] !== value.charCodeAt(i)) return false;
    return true;
  }
  for (let i = 0; i < units; i++)
    if (view.getUint16(start + 2 * i, true) !== value.charCodeAt(i)) return false;
  return true;
}
