/** Converting tensors between typed arrays, JSON values and safetensors bodies. */

import { SafetensorsError, decode, elementCount, type FloatArray } from "./safetensors.js";
import type { NestedNumbers, Values } from "./types.js";

export const SAFETENSORS_TYPE = "application/vnd.optserve.safetensors";
export const JSON_TYPE = "application/json";

export type DTypeName = "float32" | "float64";

export function isSafetensors(contentType: string | null): boolean {
  return contentType !== null && /safetensors|octet-stream/i.test(contentType);
}

/**
 * JSON text in which typed arrays become number lists. Non-finite numbers are written as
 * NaN / Infinity / -Infinity (as Python's json module reads and writes them) rather than
 * JSON.stringify's silent `null`, so the server can name the problem.
 */
export function toJson(value: unknown): string {
  if (ArrayBuffer.isView(value) && !(value instanceof DataView)) {
    return "[" + Array.from(value as unknown as ArrayLike<number>, numberText).join(",") + "]";
  }
  if (typeof value === "number") return numberText(value);
  if (Array.isArray(value)) return "[" + value.map((item) => toJson(item ?? null)).join(",") + "]";
  if (typeof value === "object" && value !== null) {
    const members = Object.entries(value)
      .filter(([, member]) => member !== undefined)
      .map(([key, member]) => JSON.stringify(key) + ":" + toJson(member));
    return "{" + members.join(",") + "}";
  }
  return JSON.stringify(value) ?? "null";
}

function numberText(value: number): string {
  if (Number.isFinite(value)) return JSON.stringify(value);
  if (Number.isNaN(value)) return "NaN";
  return value > 0 ? "Infinity" : "-Infinity";
}

/** The server writes a non-finite float as one of these strings (JSON has no token for it). */
const NONFINITE: Record<string, number> = { inf: Infinity, "-inf": -Infinity, nan: Number.NaN };

/** A number the server wrote: a JSON number, or "inf", "-inf" or "nan". */
export function numberFrom(value: unknown): number {
  if (typeof value === "number") return value;
  if (typeof value === "string" && value in NONFINITE) return NONFINITE[value] as number;
  throw new TypeError(`expected a number, got ${JSON.stringify(value)}`);
}

/** A list of numbers the server wrote (an `lr` list), non-finite ones as strings. */
export function numbersFrom(value: unknown): number[] {
  return Array.isArray(value) ? value.map(numberFrom) : [];
}

/** Parse JSON; NaN / Infinity literals (which older servers wrote) are read as numbers. */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (error) {
    // Only touch tokens outside strings: NaN, Infinity, -Infinity -> sentinel strings.
    const patched = text.replace(
      /("(?:[^"\\]|\\.)*")|(-?Infinity|NaN)/g,
      (match, quoted: string | undefined) => (quoted !== undefined ? match : `"__nonfinite__${match}"`),
    );
    if (patched === text) throw error;
    return JSON.parse(patched, (_key, value: unknown) => {
      if (typeof value === "string" && value.startsWith("__nonfinite__")) {
        return Number(value.slice("__nonfinite__".length));
      }
      return value;
    });
  }
}

/** A flat typed array of the session's dtype from a typed array or (nested) numbers. */
export function toTypedArray(values: Values, dtype: DTypeName): FloatArray {
  const Kind = dtype === "float64" ? Float64Array : Float32Array;
  if (values instanceof Kind) return values;
  if (ArrayBuffer.isView(values)) return Kind.from(values as ArrayLike<number>);
  const flat: number[] = [];
  flattenInto(values, flat);
  return Kind.from(flat);
}

function flattenInto(values: number | NestedNumbers | number[], out: number[]): void {
  if (Array.isArray(values)) {
    for (const item of values) flattenInto(item, out);
  } else if (typeof values === "number") {
    out.push(values);
  } else if (typeof values === "string") {
    out.push(numberFrom(values));
  } else if (values === null) {
    out.push(Number.NaN);
  } else {
    throw new TypeError(`expected numbers, got ${typeof values}`);
  }
}

/** Decode a safetensors body into float arrays (F16/BF16 widened, dtype kept otherwise). */
export function decodeFloatTensors(body: Uint8Array): {
  tensors: Record<string, FloatArray>;
  metadata: Record<string, string>;
} {
  const decoded = decode(body);
  const tensors: Record<string, FloatArray> = {};
  for (const [name, tensor] of Object.entries(decoded.tensors)) {
    if (!(tensor.data instanceof Float32Array || tensor.data instanceof Float64Array)) {
      throw new SafetensorsError(`tensor "${name}" is ${tensor.dtype}, expected a float dtype`);
    }
    tensors[name] = tensor.data;
  }
  return { tensors, metadata: decoded.metadata };
}

/** The shape to send for a tensor: the session's, unless the values plainly do not fit it
 * (then their own length, so the server's shape check names the mismatch). */
export function shapeFor(expected: number[] | undefined, length: number): number[] {
  if (expected !== undefined && elementCount(expected) === length) return expected;
  return [length];
}
