/**
 * The JS codec against the reference: files written here are read by Python's `safetensors`
 * package, and files it writes are read here. Python prints what it read (or wrote) as JSON
 * and the values are compared exactly.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, describe, it } from "node:test";

import { decode, encode, floatToBfloat16, bfloat16ToFloat, floatToHalf, halfToFloat } from "../src/safetensors.js";

const PYTHON = process.env["OPTSERVE_PYTHON"] ?? "python3";
const workDir = mkdtempSync(join(tmpdir(), "optserve-js-st-"));
after(() => rmSync(workDir, { recursive: true, force: true }));

function python(script: string, ...args: string[]): unknown {
  const output = execFileSync(PYTHON, ["-c", script, ...args], { encoding: "utf8" });
  return JSON.parse(output);
}

interface PyTensor {
  dtype: string;
  shape: number[];
  values: number[];
}

const READ_SCRIPT = `
import json, sys
import numpy as np
import safetensors
from safetensors.numpy import load_file

path = sys.argv[1]
with open(path, "rb") as f:
    infos = safetensors.deserialize(f.read())
out = {"tensors": {}, "metadata": {}}
if all(info["dtype"] not in ("BF16", "bfloat16") for _, info in infos):
    with safetensors.safe_open(path, framework="np") as f:
        out["metadata"] = f.metadata() or {}
    for name, array in load_file(path).items():
        out["tensors"][name] = {"dtype": str(array.dtype), "shape": list(array.shape),
                                "values": array.astype(float).reshape(-1).tolist()}
else:
    # numpy has no bfloat16: read through the format-level deserializer and widen by hand.
    for name, info in infos:
        bits = np.frombuffer(bytes(info["data"]), dtype="<u2").astype(np.uint32) << 16
        out["tensors"][name] = {"dtype": "BF16", "shape": list(info["shape"]),
                                "values": bits.view(np.float32).astype(float).tolist()}
print(json.dumps(out))
`;

const WRITE_SCRIPT = `
import json, sys
import numpy as np
import safetensors
from safetensors.numpy import save_file

path, bf16_path = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(7)
tensors = {
    "w.f32": rng.normal(size=(2, 3)).astype(np.float32),
    "w.f64": rng.normal(size=(5,)),
    "w.f16": rng.normal(size=(4, 1)).astype(np.float16),
    "ids": np.array([-5, 0, 2**40], dtype=np.int64),
}
save_file(tensors, path, metadata={"step": "12", "lr": "[0.001]"})
out = {name: {"dtype": str(a.dtype), "shape": list(a.shape), "values": a.astype(float).reshape(-1).tolist()}
       for name, a in tensors.items()}

# bfloat16 through the format-level serializer: the bits are float32's upper halves.
f32 = rng.normal(size=(3,)).astype(np.float32)
bits = (f32.view(np.uint32) >> 16).astype("<u2")
if hasattr(safetensors, "TensorSpec"):
    spec = safetensors.TensorSpec(dtype="bfloat16", shape=[3], data_ptr=bits.ctypes.data,
                                  data_len=bits.nbytes)
else:
    spec = {"dtype": "bfloat16", "shape": [3], "data": bits.tobytes()}
with open(bf16_path, "wb") as f:
    f.write(bytes(safetensors.serialize({"b": spec}, metadata=None)))
out["b"] = {"dtype": "BF16", "shape": [3],
            "values": (bits.astype(np.uint32) << 16).view(np.float32).astype(float).tolist()}
print(json.dumps(out))
`;

describe("cross-language safetensors", () => {
  it("Python's safetensors reads what the JS encoder writes", () => {
    const f32 = Float32Array.from([0.1, -2.5, 3e-8, 1e30, -0, 7]);
    const f64 = Float64Array.from([Math.PI, -1e-300, 2 ** 53 + 2]);
    const halfValues = [0.1, -65504, 2 ** -24, 1.0009765625];
    const ints = Int32Array.from([-7, 2 ** 31 - 1]);
    const path = join(workDir, "from-js.safetensors");
    writeFileSync(
      path,
      encode(
        {
          "layer.weight": { data: f32, shape: [2, 3] },
          "layer.bias": f64,
          half: { data: halfValues, dtype: "F16", shape: [2, 2] },
          ints,
        },
        { session: '{"optimizer": {"name": "Adam"}}', loss: "0.25" },
      ),
    );
    const read = python(READ_SCRIPT, path) as { tensors: Record<string, PyTensor>; metadata: Record<string, string> };
    assert.deepEqual(read.metadata, { session: '{"optimizer": {"name": "Adam"}}', loss: "0.25" });
    assert.deepEqual(read.tensors["layer.weight"], { dtype: "float32", shape: [2, 3], values: Array.from(f32) });
    assert.deepEqual(read.tensors["layer.bias"], { dtype: "float64", shape: [3], values: Array.from(f64) });
    assert.deepEqual(read.tensors["half"], {
      dtype: "float16",
      shape: [2, 2],
      values: halfValues.map((v) => halfToFloat(floatToHalf(v))),
    });
    assert.deepEqual(read.tensors["ints"], { dtype: "int32", shape: [2], values: Array.from(ints) });
  });

  it("Python's safetensors reads BF16 written by the JS encoder", () => {
    const values = [1, -3.140625, 1e-3, 65280];
    const path = join(workDir, "bf16-from-js.safetensors");
    writeFileSync(path, encode({ b: { data: values, dtype: "BF16" } }));
    const read = python(READ_SCRIPT, path) as { tensors: Record<string, PyTensor> };
    assert.deepEqual(read.tensors["b"], {
      dtype: "BF16",
      shape: [4],
      values: values.map((v) => bfloat16ToFloat(floatToBfloat16(v))),
    });
  });

  it("the JS decoder reads what Python's safetensors writes", () => {
    const path = join(workDir, "from-py.safetensors");
    const bf16Path = join(workDir, "bf16-from-py.safetensors");
    const written = python(WRITE_SCRIPT, path, bf16Path) as Record<string, PyTensor>;
    const { tensors, metadata } = decode(readFileSync(path));
    assert.deepEqual(metadata, { step: "12", lr: "[0.001]" });
    const dtypes: Record<string, string> = { float32: "F32", float64: "F64", float16: "F16", int64: "I64" };
    for (const name of ["w.f32", "w.f64", "w.f16", "ids"]) {
      const expected = written[name] as PyTensor;
      const tensor = tensors[name];
      assert.ok(tensor, `missing ${name}`);
      assert.equal(tensor.dtype, dtypes[expected.dtype]);
      assert.deepEqual(tensor.shape, expected.shape);
      assert.deepEqual(Array.from(tensor.data as ArrayLike<number | bigint>, Number), expected.values, name);
    }
    const bf16 = decode(readFileSync(bf16Path)).tensors["b"];
    assert.equal(bf16?.dtype, "BF16");
    assert.deepEqual(Array.from(bf16?.data as Float32Array), written["b"]?.values);
  });
});
