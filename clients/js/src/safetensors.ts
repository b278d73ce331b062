/**
 * The safetensors file format, encoded and decoded with nothing but typed arrays.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON header
 * (`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}`),
 * then the data buffer; offsets are relative to the buffer's start. Decoding is strict in
 * the way the reference implementation is: every byte of the buffer belongs to exactly one
 * tensor, in offset order, and every tensor's byte length matches its shape and dtype.
 */

export type DType =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U64"
  | "U32"
  | "U16"
  | "U8"
  | "BOOL";

export type FloatArray = Float32Array | Float64Array;

export type DecodedArray =
  | Float64Array
  | Float32Array
  | BigInt64Array
  | BigUint64Array
  | Int32Array
  | Uint32Array
  | Int16Array
  | Uint16Array
  | Int8Array
  | Uint8Array;

/** A decoded tensor: F16 and BF16 are widened to Float32Array, BOOL is a Uint8Array of 0/1. */
export interface Tensor {
  dtype: DType;
  shape: number[];
  data: DecodedArray;
}

/**
 * What `encode` takes per name: a typed array (a 1-D tensor, or the shape given), optionally
 * with a target dtype. F16 and BF16 are produced from float input, rounding to nearest even.
 */
export type TensorInput =
  | DecodedArray
  | { data: DecodedArray | ArrayLike<number>; shape?: number[]; dtype?: DType };

export interface DecodeOptions {
  /** Refuse files with more tensors than this (a cheap guard before any allocation). */
  maxTensors?: number;
}

export interface Decoded {
  tensors: Record<string, Tensor>;
  metadata: Record<string, string>;
}

/** A malformed, truncated or unsupported safetensors file, or input that cannot be encoded. */
export class SafetensorsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SafetensorsError";
  }
}

const ITEM_SIZE: Record<DType, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
};

/** The reference implementation refuses headers above 100 MB; so do we. */
const MAX_HEADER_BYTES = 100_000_000;
const METADATA_KEY = "__metadata__";
const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

export function isDType(value: unknown): value is DType {
  return typeof value === "string" && Object.prototype.hasOwnProperty.call(ITEM_SIZE, value);
}

export function itemSize(dtype: DType): number {
  return ITEM_SIZE[dtype];
}

export function elementCount(shape: readonly number[]): number {
  let count = 1;
  for (const dim of shape) count *= dim;
  return count;
}

// ---------------------------------------------------------------------------------------------
// Decoding

export function decode(input: Uint8Array | ArrayBuffer, options: DecodeOptions = {}): Decoded {
  const bytes = input instanceof Uint8Array ? input : new Uint8Array(input);
  if (bytes.byteLength < 8) {
    throw new SafetensorsError(
      `truncated: ${bytes.byteLength} bytes, need at least 8 for the header length`,
    );
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const lengthLow = view.getUint32(0, true);
  const lengthHigh = view.getUint32(4, true);
  if (lengthHigh !== 0 || lengthLow > MAX_HEADER_BYTES) {
    throw new SafetensorsError(`header too large: the limit is ${MAX_HEADER_BYTES} bytes`);
  }
  const headerEnd = 8 + lengthLow;
  if (headerEnd > bytes.byteLength) {
    throw new SafetensorsError(
      `truncated: header claims ${lengthLow} bytes, only ${bytes.byteLength - 8} follow`,
    );
  }
  const header = parseHeader(bytes.subarray(8, headerEnd));
  const buffer = bytes.subarray(headerEnd);

  const metadata = parseMetadata(header[METADATA_KEY]);
  const names = Object.keys(header).filter((name) => name !== METADATA_KEY);
  if (options.maxTensors !== undefined && names.length > options.maxTensors) {
    throw new SafetensorsError(
      `too many tensors: ${names.length}, the limit is ${options.maxTensors}`,
    );
  }
  const entries = names.map((name) => parseEntry(name, header[name]));

  // Every byte of the buffer must belong to exactly one tensor: sorted by offset, each
  // tensor starts where the previous one ended and the last ends at the end of the file.
  entries.sort((a, b) => a.begin - b.begin || a.end - b.end);
  let expectedBegin = 0;
  for (const entry of entries) {
    if (entry.begin !== expectedBegin) {
      throw new SafetensorsError(
        `invalid offsets for "${entry.name}": begins at ${entry.begin}, expected ${expectedBegin}`,
      );
    }
    const expectedBytes = elementCount(entry.shape) * ITEM_SIZE[entry.dtype];
    if (entry.end - entry.begin !== expectedBytes) {
      throw new SafetensorsError(
        `tensor "${entry.name}" has ${entry.end - entry.begin} bytes, its shape ` +
          `[${entry.shape.join(", ")}] and dtype ${entry.dtype} need ${expectedBytes}`,
      );
    }
    expectedBegin = entry.end;
  }
  if (expectedBegin !== buffer.byteLength) {
    throw new SafetensorsError(
      expectedBegin > buffer.byteLength
        ? `truncated: tensors need ${expectedBegin} data bytes, only ${buffer.byteLength} present`
        : `${buffer.byteLength - expectedBegin} trailing bytes after the last tensor`,
    );
  }

  const tensors: Record<string, Tensor> = {};
  for (const entry of entries) {
    tensors[entry.name] = {
      dtype: entry.dtype,
      shape: entry.shape,
      data: readArray(entry.dtype, buffer.subarray(entry.begin, entry.end)),
    };
  }
  return { tensors, metadata };
}

interface HeaderEntry {
  name: string;
  dtype: DType;
  shape: number[];
  begin: number;
  end: number;
}

function parseHeader(raw: Uint8Array): Record<string, unknown> {
  let text: string;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(raw);
  } catch {
    throw new SafetensorsError("header is not valid UTF-8");
  }
  if (!text.startsWith("{")) {
    throw new SafetensorsError("header does not start with '{'");
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (error) {
    throw new SafetensorsError(`header is not valid JSON: ${(error as Error).message}`);
  }
  if (!isPlainObject(parsed)) {
    throw new SafetensorsError("header is not a JSON object");
  }
  return parsed;
}

function parseMetadata(raw: unknown): Record<string, string> {
  const metadata: Record<string, string> = {};
  if (raw === undefined || raw === null) return metadata;
  if (!isPlainObject(raw)) {
    throw new SafetensorsError(`"${METADATA_KEY}" must be an object of strings`);
  }
  for (const [key, value] of Object.entries(raw)) {
    if (typeof value !== "string") {
      throw new SafetensorsError(`metadata value for "${key}" is not a string`);
    }
    metadata[key] = value;
  }
  return metadata;
}

function parseEntry(name: string, raw: unknown): HeaderEntry {
  if (!isPlainObject(raw)) {
    throw new SafetensorsError(`tensor "${name}": entry is not an object`);
  }
  const { dtype, shape, data_offsets: offsets } = raw;
  if (!isDType(dtype)) {
    throw new SafetensorsError(`tensor "${name}": unsupported dtype ${JSON.stringify(dtype)}`);
  }
  if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
    throw new SafetensorsError(`tensor "${name}": shape must be a list of non-negative integers`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInteger)) {
    throw new SafetensorsError(`tensor "${name}": data_offsets must be [begin, end]`);
  }
  const [begin, end] = offsets as [number, number];
  if (end < begin) {
    throw new SafetensorsError(`tensor "${name}": data_offsets end ${end} is before begin ${begin}`);
  }
  return { name, dtype, shape: shape as number[], begin, end };
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isNonNegativeInteger(value: unknown): value is number {
  return typeof value === "number" && Number.isSafeInteger(value) && value >= 0;
}

/** Copies the bytes out, so the result is aligned and independent of the input buffer. */
function readArray(dtype: DType, raw: Uint8Array): DecodedArray {
  const count = raw.byteLength / ITEM_SIZE[dtype];
  if (dtype === "F16" || dtype === "BF16") {
    const out = new Float32Array(count);
    const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
    const widen = dtype === "F16" ? halfToFloat : bfloat16ToFloat;
    for (let i = 0; i < count; i++) out[i] = widen(view.getUint16(2 * i, true));
    return out;
  }
  // Not raw.slice(): on a Node Buffer that returns a view into a shared pool, not a copy.
  const copy = new Uint8Array(raw.byteLength);
  copy.set(raw);
  if (!LITTLE_ENDIAN) swapBytes(copy, ITEM_SIZE[dtype]);
  const buffer = copy.buffer;
  switch (dtype) {
    case "F64":
      return new Float64Array(buffer);
    case "F32":
      return new Float32Array(buffer);
    case "I64":
      return new BigInt64Array(buffer);
    case "I32":
      return new Int32Array(buffer);
    case "I16":
      return new Int16Array(buffer);
    case "I8":
      return new Int8Array(buffer);
    case "U64":
      return new BigUint64Array(buffer);
    case "U32":
      return new Uint32Array(buffer);
    case "U16":
      return new Uint16Array(buffer);
    case "U8":
    case "BOOL":
      return copy;
  }
}

function swapBytes(bytes: Uint8Array, width: number): void {
  if (width === 1) return;
  for (let i = 0; i < bytes.length; i += width) {
    for (let lo = i, hi = i + width - 1; lo < hi; lo++, hi--) {
      const tmp = bytes[lo] as number;
      bytes[lo] = bytes[hi] as number;
      bytes[hi] = tmp;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions (IEEE binary16 and bfloat16), exact in the widening direction.

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

export function halfToFloat(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;
  if (exponent === 0x1f) return fraction ? Number.NaN : sign * Number.POSITIVE_INFINITY;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

export function bfloat16ToFloat(bits: number): number {
  u32[0] = (bits & 0xffff) << 16;
  return f32[0] as number;
}

/** Round to the nearest binary16 value, ties to even; overflow goes to infinity. */
export function floatToHalf(value: number): number {
  f32[0] = value; // first to float32, as every framework's float -> half conversion does
  const bits = u32[0] as number;
  const sign = (bits >>> 16) & 0x8000;
  const exponent = (bits >>> 23) & 0xff;
  const mantissa = bits & 0x7fffff;
  if (exponent === 0xff) return sign | 0x7c00 | (mantissa ? 0x200 : 0);
  const unbiased = exponent - 127;
  if (unbiased > 15) return sign | 0x7c00;
  if (unbiased >= -14) {
    // Normal half: keep 10 mantissa bits, round the 13 dropped ones to nearest even.
    let half = ((unbiased + 15) << 10) | (mantissa >> 13);
    const dropped = mantissa & 0x1fff;
    if (dropped > 0x1000 || (dropped === 0x1000 && half & 1)) half += 1; // may carry to inf
    return sign | half;
  }
  if (unbiased < -25) return sign; // below half the smallest subnormal: rounds to zero
  // Subnormal half: the value is (1.mantissa) * 2^unbiased = m * 2^-24 with m possibly
  // fractional; round m to nearest even.
  const full = mantissa | 0x800000;
  const shift = -unbiased - 14 + 13; // bits dropped from the 24-bit significand
  let half = full >>> shift;
  const dropped = full & ((1 << shift) - 1);
  const midpoint = 1 << (shift - 1);
  if (dropped > midpoint || (dropped === midpoint && half & 1)) half += 1;
  return sign | half;
}

/** Round to the nearest bfloat16 value, ties to even (NaN stays a quiet NaN). */
export function floatToBfloat16(value: number): number {
  f32[0] = value;
  const bits = u32[0] as number;
  if ((bits & 0x7f800000) === 0x7f800000 && bits & 0x7fffff) return ((bits >>> 16) | 0x40) & 0xffff;
  const rounded = bits + 0x7fff + ((bits >>> 16) & 1);
  return (rounded >>> 16) & 0xffff;
}

// ---------------------------------------------------------------------------------------------
// Encoding

/**
 * Encode tensors (and string metadata) as a safetensors file. The header is padded with
 * spaces to a multiple of 8 bytes, as the reference writer does, so every tensor in the
 * buffer is 8-byte aligned when the file is memory-mapped.
 */
export function encode(
  tensors: Record<string, TensorInput>,
  metadata?: Record<string, string>,
): Uint8Array<ArrayBuffer> {
  const prepared = Object.entries(tensors).map(([name, input]) => prepare(name, input));
  // Widest dtypes first keeps every tensor aligned to its own item size.
  prepared.sort((a, b) => ITEM_SIZE[b.dtype] - ITEM_SIZE[a.dtype] || compare(a.name, b.name));

  const header: Record<string, unknown> = {};
  if (metadata !== undefined && Object.keys(metadata).length > 0) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== "string") {
        throw new SafetensorsError(`metadata value for "${key}" is not a string`);
      }
    }
    header[METADATA_KEY] = metadata;
  }
  let offset = 0;
  for (const tensor of prepared) {
    header[tensor.name] = {
      dtype: tensor.dtype,
      shape: tensor.shape,
      data_offsets: [offset, offset + tensor.bytes.byteLength],
    };
    offset += tensor.bytes.byteLength;
  }
  let headerBytes = new TextEncoder().encode(JSON.stringify(header));
  const padded = Math.ceil(headerBytes.byteLength / 8) * 8;
  if (padded !== headerBytes.byteLength) {
    const withPadding = new Uint8Array(padded).fill(0x20);
    withPadding.set(headerBytes);
    headerBytes = withPadding;
  }

  const out = new Uint8Array(8 + headerBytes.byteLength + offset);
  const view = new DataView(out.buffer);
  view.setUint32(0, headerBytes.byteLength, true);
  view.setUint32(4, 0, true);
  out.set(headerBytes, 8);
  let position = 8 + headerBytes.byteLength;
  for (const tensor of prepared) {
    out.set(tensor.bytes, position);
    position += tensor.bytes.byteLength;
  }
  return out;
}

interface Prepared {
  name: string;
  dtype: DType;
  shape: number[];
  bytes: Uint8Array;
}

function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function prepare(name: string, input: TensorInput): Prepared {
  if (name === METADATA_KEY || name.length === 0) {
    throw new SafetensorsError(`invalid tensor name ${JSON.stringify(name)}`);
  }
  const spec = ArrayBuffer.isView(input) ? { data: input } : input;
  const data = spec.data;
  const dtype = spec.dtype ?? nativeDType(data);
  if (dtype === undefined) {
    throw new SafetensorsError(
      `tensor "${name}": give a dtype, a ${data.constructor.name} has no safetensors dtype`,
    );
  }
  const shape = spec.shape ?? [data.length];
  if (!shape.every(isNonNegativeInteger)) {
    throw new SafetensorsError(`tensor "${name}": shape must be a list of non-negative integers`);
  }
  if (elementCount(shape) !== data.length) {
    throw new SafetensorsError(
      `tensor "${name}": ${data.length} values do not fill shape [${shape.join(", ")}]`,
    );
  }
  return { name, dtype, shape: [...shape], bytes: toBytes(name, dtype, data) };
}

function nativeDType(data: DecodedArray | ArrayLike<number>): DType | undefined {
  if (data instanceof Float64Array) return "F64";
  if (data instanceof Float32Array) return "F32";
  if (data instanceof BigInt64Array) return "I64";
  if (data instanceof BigUint64Array) return "U64";
  if (data instanceof Int32Array) return "I32";
  if (data instanceof Uint32Array) return "U32";
  if (data instanceof Int16Array) return "I16";
  if (data instanceof Uint16Array) return "U16";
  if (data instanceof Int8Array) return "I8";
  if (data instanceof Uint8Array) return "U8";
  return undefined;
}

function toBytes(name: string, dtype: DType, data: DecodedArray | ArrayLike<number>): Uint8Array {
  const count = data.length;
  if (dtype === "F16" || dtype === "BF16") {
    const narrow = dtype === "F16" ? floatToHalf : floatToBfloat16;
    const out = new Uint8Array(count * 2);
    const view = new DataView(out.buffer);
    for (let i = 0; i < count; i++) view.setUint16(2 * i, narrow(Number(data[i])), true);
    return out;
  }
  // Other dtypes: the array must already be of that type, its bytes are copied as they are.
  const native = nativeDType(data);
  const compatible = native === dtype || (dtype === "BOOL" && native === "U8");
  if (!compatible || !ArrayBuffer.isView(data)) {
    throw new SafetensorsError(
      `tensor "${name}": dtype ${dtype} needs a matching typed array, got ${data.constructor.name}`,
    );
  }
  const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength).slice();
  if (!LITTLE_ENDIAN) swapBytes(bytes, ITEM_SIZE[dtype]);
  return bytes;
}
