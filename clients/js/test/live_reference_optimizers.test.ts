/**
 * The optimizers torch lacks, stepped from JavaScript over both wires, against their
 * reference packages run in Python on the same gradients (tests/core/torch_reference.py
 * builds each package's optimizer from the same session config). Skipped where a package is
 * not installed; the Python suite checks the same numbers against committed fixtures.
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { after, before, describe, it } from "node:test";

import { Client, type SessionConfig } from "../src/index.js";
import { PYTHON, REPO_ROOT, startServer, type LiveServer } from "./helpers/live_server.js";
import { gradient, maxAbsDifference } from "./helpers/reference.js";

const STEPS = 30;
// Square: a non-square matrix's first SOAP statistic is singular, and LAPACK builds pick its
// null-space basis differently (docs/torch-compatibility.md).
const SHAPES: Record<string, number[]> = { w: [4, 4], b: [4] };

/** Each optimizer with non-default arguments, and the largest difference it is allowed. */
const OPTIMIZERS: { optimizer: SessionConfig["optimizer"]; module: string; tolerance: number }[] = [
  { optimizer: { name: "Lion", lr: 0.003, betas: [0.8, 0.95], weight_decay: 0.1 }, module: "lion_pytorch", tolerance: 1e-12 },
  { optimizer: { name: "AdamWScheduleFree", lr: 0.01, warmup_steps: 5 }, module: "schedulefree", tolerance: 1e-12 },
  { optimizer: { name: "Prodigy", lr: 1.0, d_coef: 0.5, d0: 1e-3 }, module: "prodigyopt", tolerance: 1e-10 },
  { optimizer: { name: "CAME", lr: 0.002 }, module: "came_pytorch", tolerance: 1e-12 },
  // The package refreshes its eigenbases in float32 even for float64 tensors.
  { optimizer: { name: "SOAP", lr: 0.003, precondition_frequency: 4 }, module: "pytorch_optimizer", tolerance: 1e-5 },
];

const REFERENCE_SCRIPT = `
import json, sys
import importlib.util
import numpy as np
config, initial, grads = json.loads(sys.stdin.read())
from tests.core.parity_inputs import Inputs
from tests.core.torch_reference import run_torch
inputs = Inputs(
    steps=len(grads),
    initial={k: np.array(v, dtype=np.float64).reshape(config["params"][k]["shape"]) for k, v in initial.items()},
    grads=[{k: np.array(v, dtype=np.float64).reshape(config["params"][k]["shape"]) for k, v in g.items()} for g in grads],
    losses=[0.0] * len(grads),
)
print(json.dumps({k: np.asarray(v).ravel().tolist() for k, v in run_torch(config, inputs).items()}))
`;

function installed(module: string): boolean {
  const probe = `import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("${module}") and importlib.util.find_spec("torch") else 1)`;
  try {
    execFileSync(PYTHON, ["-c", probe], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

function size(name: string): number {
  return (SHAPES[name] as number[]).reduce((a, b) => a * b, 1);
}

let server: LiveServer;
before(async () => {
  server = await startServer();
});
after(async () => server?.stop());

describe("optimizers torch lacks, from JavaScript", () => {
  for (const { optimizer, module, tolerance } of OPTIMIZERS) {
    for (const format of ["safetensors", "json"] as const) {
      it(`${optimizer.name} over ${format} equals ${module}`, { skip: !installed(module) && `${module} is not installed` }, async () => {
        const initial = Object.fromEntries(
          Object.keys(SHAPES).map((name, i) => [name, Array.from(gradient(size(name), 0, i + 7))]),
        );
        const config: SessionConfig = {
          optimizer,
          params: Object.fromEntries(
            Object.entries(SHAPES).map(([name, shape]) => [name, { shape, data: Float64Array.from(initial[name] as number[]) }]),
          ),
          param_groups: [{ params: ["b"], lr: (optimizer["lr"] as number) / 2 }],
          dtype: "float64",
        };
        if (optimizer.name === "Prodigy") delete config.param_groups; // its groups share one lr
        const session = await new Client({ baseUrl: server.url, format }).createSession(config);
        const sent: Record<string, number[]>[] = [];
        for (let step = 1; step <= STEPS; step++) {
          const grads = Object.fromEntries(Object.keys(SHAPES).map((name, i) => [name, gradient(size(name), step, i + 1)]));
          sent.push(Object.fromEntries(Object.entries(grads).map(([name, g]) => [name, Array.from(g)])));
          await session.step(grads);
        }
        const got = await session.params();
        const referenceConfig = {
          ...config,
          params: Object.fromEntries(Object.entries(SHAPES).map(([name, shape]) => [name, { shape }])),
        };
        const expected = JSON.parse(
          execFileSync(PYTHON, ["-c", REFERENCE_SCRIPT], {
            cwd: REPO_ROOT,
            input: JSON.stringify([referenceConfig, initial, sent]),
            encoding: "utf8",
          }),
        ) as Record<string, number[]>;
        for (const name of Object.keys(SHAPES)) {
          const difference = maxAbsDifference(got[name] as Float64Array, expected[name] as number[]);
          assert.ok(difference <= tolerance, `${optimizer.name} ${name}: off by ${difference}`);
          assert.ok(maxAbsDifference(got[name] as Float64Array, initial[name] as number[]) > 1e-4, `${name} did not move`);
        }
      });
    }
  }
});
