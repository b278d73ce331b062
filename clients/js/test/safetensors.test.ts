import assert from "node:assert/strict";
import { describe, it } from "node:test";

import {
  SafetensorsError,
  bfloat16ToFloat,
  decode,
  encode,
  floatToBfloat16,
  floatToHalf,
  halfToFloat,
  type Tensor,
} from "../src/safetensors.js";

/** Deterministic pseudo-random floats (mulberry32) so failures reproduce. */
function randomFloats(count: number, seed: number): number[] {
  let state = seed >>> 0;
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out.push((((t ^ (t >>> 14)) >>> 0) / 4294967296) * 200 - 100);
  }
  return out;
}

function floats(tensor: Tensor | undefined): number[] {
  assert.ok(tensor !== undefined, "tensor missing");
  assert.ok(tensor.data instanceof Float32Array || tensor.data instanceof Float64Array);
  return Array.from(tensor.data);
}

/** A file built by hand, so the decoder's checks are tested against bytes we control. */
function rawFile(header: unknown, data: Uint8Array, headerText?: string): Uint8Array {
  const text = new TextEncoder().encode(headerText ?? JSON.stringify(header));
  const out = new Uint8Array(8 + text.length + data.length);
  new DataView(out.buffer).setUint32(0, text.length, true);
  out.set(text, 8);
  out.set(data, 8 + text.length);
  return out;
}

describe("safetensors round trips", () => {
  it("keeps F32 and F64 values, shapes and metadata exactly", () => {
    const f32 = Float32Array.from(randomFloats(12, 1));
    const f64 = Float64Array.from(randomFloats(7, 2));
    const bytes = encode(
      { "layer.weight": { data: f32, shape: [3, 4] }, bias: f64 },
      { step: "3", note: "é ✓" },
    );
    const { tensors, metadata } = decode(bytes);
    assert.deepEqual(metadata, { step: "3", note: "é ✓" });
    assert.equal(tensors["layer.weight"]?.dtype, "F32");
    assert.deepEqual(tensors["layer.weight"]?.shape, [3, 4]);
    assert.deepEqual(tensors["layer.weight"]?.data, f32);
    assert.equal(tensors["bias"]?.dtype, "F64");
    assert.deepEqual(tensors["bias"]?.shape, [7]);
    assert.deepEqual(tensors["bias"]?.data, f64);
  });

  it("keeps integer dtypes, scalars and empty tensors", () => {
    const ints = Int32Array.from([-3, 0, 7, 2 ** 31 - 1]);
    const bigs = BigInt64Array.from([-(2n ** 62n), 5n]);
    const bytes = encode({
      ints,
      bigs,
      small: Int8Array.from([-128, 127]),
      scalar: { data: Float64Array.from([Math.PI]), shape: [] },
      empty: { data: new Float32Array(0), shape: [0, 5] },
    });
    const { tensors } = decode(bytes);
    assert.deepEqual(tensors["ints"]?.data, ints);
    assert.deepEqual(tensors["bigs"]?.data, bigs);
    assert.deepEqual(tensors["small"]?.data, Int8Array.from([-128, 127]));
    assert.deepEqual(tensors["scalar"]?.shape, []);
    assert.equal(tensors["scalar"]?.data[0], Math.PI);
    assert.deepEqual(tensors["empty"]?.shape, [0, 5]);
    assert.equal(tensors["empty"]?.data.length, 0);
  });

  it("writes a header padded to 8 bytes and 8-byte aligned tensors", () => {
    const bytes = encode({ a: Float64Array.from([1]), b: Float32Array.from([1, 2, 3]), c: Float64Array.from([2]) });
    const headerLength = new DataView(bytes.buffer).getUint32(0, true);
    assert.equal(headerLength % 8, 0);
    const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength))) as Record<
      string,
      { data_offsets: [number, number] }
    >;
    for (const name of ["a", "c"]) assert.equal((header[name]?.data_offsets[0] ?? 1) % 8, 0);
  });

  it("returns arrays that do not alias the input, even at odd offsets", () => {
    const inner = encode({ x: Float64Array.from([1.5, -2.5]) });
    const shifted = new Uint8Array(inner.length + 3);
    shifted.set(inner, 3);
    const { tensors } = decode(shifted.subarray(3));
    assert.deepEqual(floats(tensors["x"]), [1.5, -2.5]);
    shifted.fill(0);
    assert.deepEqual(floats(tensors["x"]), [1.5, -2.5]);
  });

  it("decodes a Node Buffer, which may be a view into a shared memory pool", () => {
    const bytes = encode({ x: Float64Array.from([0.25, 8]) });
    const pooled = Buffer.from(bytes); // small Buffers share one pool, at some byteOffset
    assert.deepEqual(floats(decode(pooled).tensors["x"]), [0.25, 8]);
  });

  it("encodes F16 and BF16 with round-to-nearest-even and decodes them widened", () => {
    const values = [0, -0, 1, -2.5, 65504, 1e-7, 3.14159, 70000, Number.NEGATIVE_INFINITY];
    const bytes = encode({
      half: { data: values, dtype: "F16" },
      brain: { data: values, dtype: "BF16", shape: [3, 3] },
    });
    const { tensors } = decode(bytes);
    assert.equal(tensors["half"]?.dtype, "F16");
    assert.ok(tensors["half"]?.data instanceof Float32Array);
    const half = Array.from(tensors["half"]?.data as Float32Array);
    assert.deepEqual(half.slice(0, 5), [0, -0, 1, -2.5, 65504]);
    assert.equal(half[5], 2 ** -24 * 2); // 1e-7 is nearest to 2 subnormal units (1.19e-7)
    assert.equal(half[6], 3.140625);
    assert.equal(half[7], Number.POSITIVE_INFINITY); // beyond the largest half
    assert.equal(half[8], Number.NEGATIVE_INFINITY);
    const brain = Array.from(tensors["brain"]?.data as Float32Array);
    assert.equal(brain[6], 3.140625);
    assert.equal(brain[7], 70144);
  });
});

describe("half-precision conversions", () => {
  it("F16: every bit pattern widens and narrows back to itself", () => {
    for (let bits = 0; bits < 0x10000; bits++) {
      const value = halfToFloat(bits);
      if (Number.isNaN(value)) {
        assert.ok(Number.isNaN(halfToFloat(floatToHalf(value))));
        continue;
      }
      assert.equal(floatToHalf(value), bits, `bits 0x${bits.toString(16)}`);
    }
  });

  it("F16: halfway values round to the even neighbour", () => {
    const one = 0x3c00;
    const ulp = 2 ** -10;
    assert.equal(floatToHalf(1 + ulp / 2), one); // tie, 1.0 is even
    assert.equal(floatToHalf(1 + 1.5 * ulp), one + 2); // tie, rounds up to even
    assert.equal(floatToHalf(1 + ulp / 2 + 2 ** -20), one + 1); // just above the tie
    assert.equal(floatToHalf(2 ** -25), 0); // half the smallest subnormal: tie to zero
    assert.equal(floatToHalf(2 ** -25 * 1.5), 1);
    assert.equal(floatToHalf(65520), 0x7c00); // rounds up past the largest finite half
  });

  it("BF16: every bit pattern widens and narrows back to itself; ties go to even", () => {
    for (let bits = 0; bits < 0x10000; bits++) {
      const value = bfloat16ToFloat(bits);
      if (Number.isNaN(value)) continue;
      assert.equal(floatToBfloat16(value), bits, `bits 0x${bits.toString(16)}`);
    }
    assert.equal(floatToBfloat16(1 + 2 ** -8), 0x3f80); // tie, stays at even 1.0
    assert.equal(floatToBfloat16(1 + 3 * 2 ** -8), 0x3f82); // tie, up to even
    assert.ok(Number.isNaN(bfloat16ToFloat(floatToBfloat16(Number.NaN))));
  });
});

describe("safetensors strict decoding", () => {
  const eightBytes = new Uint8Array(8);
  const good = { x: { dtype: "F32", shape: [2], data_offsets: [0, 8] } };

  const cases: Array<[string, Uint8Array, RegExp]> = [
    ["too short for the length", new Uint8Array(5), /truncated/],
    [
      "header length past the end",
      (() => {
        const file = rawFile(good, eightBytes);
        new DataView(file.buffer).setUint32(0, 5000, true);
        return file;
      })(),
      /truncated/,
    ],
    [
      "absurd header length",
      (() => {
        const file = rawFile(good, eightBytes);
        new DataView(file.buffer).setUint32(4, 1, true);
        return file;
      })(),
      /too large/,
    ],
    ["truncated data", rawFile(good, new Uint8Array(4)), /truncated/],
    ["trailing bytes", rawFile(good, new Uint8Array(12)), /trailing/],
    ["not JSON", rawFile(null, eightBytes, "{not json}"), /not valid JSON/],
    ["not an object", rawFile(null, eightBytes, "[1, 2]"), /start with|not a JSON object/],
    ["bad UTF-8", rawFile(null, eightBytes, "{\"\uFFFD\"}").fill(0xff, 9, 11), /UTF-8/],
    ["unknown dtype", rawFile({ x: { dtype: "F7", shape: [2], data_offsets: [0, 8] } }, eightBytes), /dtype/],
    ["negative dim", rawFile({ x: { dtype: "F32", shape: [-2], data_offsets: [0, 8] } }, eightBytes), /shape/],
    ["size mismatch", rawFile({ x: { dtype: "F32", shape: [3], data_offsets: [0, 8] } }, eightBytes), /need 12/],
    ["reversed offsets", rawFile({ x: { dtype: "F32", shape: [2], data_offsets: [8, 0] } }, eightBytes), /before/],
    [
      "gap between tensors",
      rawFile(
        {
          a: { dtype: "F32", shape: [1], data_offsets: [0, 4] },
          b: { dtype: "F32", shape: [1], data_offsets: [8, 12] },
        },
        new Uint8Array(12),
      ),
      /expected 4/,
    ],
    [
      "overlapping tensors",
      rawFile(
        {
          a: { dtype: "F32", shape: [2], data_offsets: [0, 8] },
          b: { dtype: "F32", shape: [1], data_offsets: [4, 8] },
        },
        eightBytes,
      ),
      /invalid offsets/,
    ],
    ["metadata not strings", rawFile({ ...good, __metadata__: { step: 3 } }, eightBytes), /not a string/],
  ];

  for (const [name, bytes, message] of cases) {
    it(`rejects ${name}`, () => {
      assert.throws(() => decode(bytes), (error: unknown) => {
        assert.ok(error instanceof SafetensorsError, String(error));
        assert.match(error.message, message);
        return true;
      });
    });
  }

  it("accepts the hand-built file the failure cases are variations of", () => {
    const values = new Uint8Array(Float32Array.from([1, 2]).buffer);
    assert.deepEqual(floats(decode(rawFile(good, values)).tensors["x"]), [1, 2]);
  });

  it("refuses more tensors than maxTensors", () => {
    const bytes = encode({ a: new Float32Array(1), b: new Float32Array(1), c: new Float32Array(1) });
    assert.throws(() => decode(bytes, { maxTensors: 2 }), /too many tensors/);
    assert.equal(Object.keys(decode(bytes, { maxTensors: 3 }).tensors).length, 3);
  });

  it("rejects every truncation of a valid file", () => {
    const bytes = encode({ w: { data: Float32Array.from(randomFloats(6, 3)), shape: [2, 3] } }, { k: "v" });
    for (let length = 0; length < bytes.length; length++) {
      assert.throws(() => decode(bytes.subarray(0, length)), SafetensorsError, `length ${length}`);
    }
  });

  it("refuses to encode values that do not fill the shape, or a dtype they cannot be", () => {
    assert.throws(() => encode({ x: { data: new Float32Array(5), shape: [2, 2] } }), /do not fill/);
    assert.throws(() => encode({ x: { data: new Float32Array(2), dtype: "F64" } }), /matching typed array/);
    assert.throws(() => encode({ __metadata__: new Float32Array(1) }), /invalid tensor name/);
  });
});
