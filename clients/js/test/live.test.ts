/**
 * The client against a real optserve server started by this file: numbers checked against
 * reference optimizers, both wire formats, idempotent retries, typed errors, checkpoints,
 * catalogs, and the JavaScript example run end to end.
 */

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { after, before, describe, it } from "node:test";
import { promisify } from "node:util";

import {
  AuthenticationError,
  Client,
  ConflictError,
  NotFoundError,
  PreconditionFailedError,
  ValidationError,
  applyDeltas,
  type FetchLike,
  type FloatArray,
  type SessionConfig,
} from "../src/index.js";
import { REPO_ROOT, startServer, type LiveServer } from "./helpers/live_server.js";
import { ReferenceAdam, ReferenceSGD, gradient, maxAbsDifference } from "./helpers/reference.js";

const TOLERANCE = 1e-6;
let server: LiveServer;

before(async () => {
  server = await startServer({ OPTSERVE_API_KEYS: "t1:key1,t2:key2" });
});
after(async () => server?.stop());

function client(options: { apiKey?: string; format?: "json" | "safetensors"; fetch?: FetchLike } = {}): Client {
  return new Client({ baseUrl: server.url, apiKey: "key1", backoffMs: 20, ...options });
}

const shapes = { "layer.weight": [3, 2], "layer.bias": [2] } as const;

function tensorsFor(step: number, Kind: Float32ArrayConstructor | Float64ArrayConstructor): Record<string, FloatArray> {
  return {
    "layer.weight": Kind.from(gradient(6, step, 1)),
    "layer.bias": Kind.from(gradient(2, step, 2)),
  };
}

function adamConfig(dtype: "float32" | "float64"): SessionConfig {
  return {
    optimizer: { name: "adam", lr: 0.01, betas: [0.9, 0.99] },
    params: { "layer.weight": { shape: [3, 2] }, "layer.bias": { shape: [2] } },
    dtype,
  };
}

describe("numbers match reference optimizers", () => {
  for (const format of ["safetensors", "json"] as const) {
    it(`Adam, float64, over ${format}`, async () => {
      const session = await client({ format }).createSession(adamConfig("float64"));
      assert.equal(session.dtype, "float64");
      assert.deepEqual(session.shapes, shapes);
      const reference = { "layer.weight": new ReferenceAdam(6, 0.01, 0.9, 0.99), "layer.bias": new ReferenceAdam(2, 0.01, 0.9, 0.99) };
      for (let step = 1; step <= 10; step++) {
        const grads = tensorsFor(step, Float64Array);
        const result = await session.step(grads);
        assert.equal(result.step, step);
        assert.deepEqual(result.lr, [0.01]);
        assert.equal(result.applied, true);
        for (const name of Object.keys(shapes) as Array<keyof typeof shapes>) {
          const delta = result.deltas?.[name];
          assert.ok(delta instanceof Float64Array, `${name} should come back as Float64Array`);
          const expected = reference[name].step(grads[name] as Float64Array);
          assert.ok(maxAbsDifference(delta, expected) < TOLERANCE, `${name} at step ${step}`);
        }
      }
      await session.delete();
    });

    it(`SGD with momentum and weight decay, float32, params sent, over ${format}`, async () => {
      const session = await client({ format }).createSession({
        optimizer: { name: "SGD", lr: 0.05, momentum: 0.9, weight_decay: 0.01, nesterov: true },
        params: { "layer.weight": { shape: [3, 2] }, "layer.bias": { shape: [2] } },
      });
      const params: Record<string, Float32Array> = {
        "layer.weight": Float32Array.from([0.5, -0.25, 1, 2, -1.5, 0.125]),
        "layer.bias": Float32Array.from([0.1, -0.1]),
      };
      const reference = { "layer.weight": new ReferenceSGD(0.05, 0.9, 0.01, 0, true), "layer.bias": new ReferenceSGD(0.05, 0.9, 0.01, 0, true) };

      await assert.rejects(session.step(tensorsFor(1, Float32Array)), (error: unknown) => {
        assert.ok(error instanceof ValidationError);
        assert.match(error.type, /params-required$/);
        return true;
      });

      for (let step = 1; step <= 10; step++) {
        const grads = tensorsFor(step, Float32Array);
        const result = await session.step(grads, { params });
        for (const name of Object.keys(shapes) as Array<keyof typeof shapes>) {
          const delta = result.deltas?.[name];
          assert.ok(delta instanceof Float32Array, `${name} should come back as Float32Array`);
          const expected = reference[name].step(grads[name] as Float32Array, params[name] as Float32Array);
          assert.ok(maxAbsDifference(delta, expected) < TOLERANCE, `${name} at step ${step}`);
        }
        applyDeltas(params, result.deltas);
      }
      assert.equal((await session.refresh()).step, 10);
    });
  }
});

describe("idempotent retries", () => {
  it("a step whose response is lost is retried with its key and applied once", async () => {
    let dropped = 0;
    // Lets the request reach the server, then loses the answer, as a dropped connection would.
    const lossy: FetchLike = async (input, init) => {
      const response = await fetch(input, init);
      if (init.method === "POST" && input.includes("/step?return=") && dropped === 0) {
        await response.arrayBuffer();
        dropped += 1;
        throw new TypeError("fetch failed");
      }
      return response;
    };
    const session = await client({ fetch: lossy }).createSession(adamConfig("float64"));
    const reference = new ReferenceAdam(6, 0.01, 0.9, 0.99);
    const grads = tensorsFor(1, Float64Array);

    const result = await session.step(grads);
    assert.equal(dropped, 1);
    assert.equal(result.attempts, 2);
    assert.equal(result.replayed, true);
    assert.equal(result.step, 1);
    assert.ok(maxAbsDifference(result.deltas?.["layer.weight"] ?? [], reference.step(grads["layer.weight"] as Float64Array)) < TOLERANCE);
    assert.equal((await session.refresh()).step, 1, "the lost step must not be applied twice");

    // The same key again, by hand: the stored answer, nothing applied.
    const again = await session.step(grads, { idempotencyKey: result.idempotencyKey });
    assert.equal(again.replayed, true);
    assert.equal(again.step, 1);
    assert.deepEqual(again.deltas, result.deltas);
    // The same key with another body is refused.
    await assert.rejects(session.step(tensorsFor(2, Float64Array), { idempotencyKey: result.idempotencyKey }), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.match(error.type, /idempotency-key-reused$/);
      return true;
    });
    assert.equal((await session.refresh()).step, 1);
  });
});

describe("errors are typed problem documents", () => {
  it("authentication and tenancy", async () => {
    await assert.rejects(client({ apiKey: "wrong" }).listSessions(), AuthenticationError);
    const mine = await client().createSession(adamConfig("float32"));
    await assert.rejects(client({ apiKey: "key2" }).getSession(mine.id), NotFoundError);
    await assert.rejects(client().getSession("no-such-session"), NotFoundError);
  });

  it("bad hyperparameters name the field", async () => {
    await assert.rejects(
      client().createSession({ ...adamConfig("float32"), optimizer: { name: "Adam", lr: -1 } }),
      (error: unknown) => {
        assert.ok(error instanceof ValidationError);
        assert.equal(error.status, 422);
        assert.ok(error.errors.some((e) => e.field === "optimizer.lr"), JSON.stringify(error.problem));
        assert.match(error.message, /lr/);
        return true;
      },
    );
  });

  it("wrong shapes, non-finite values and stale If-Match change nothing", async () => {
    const session = await client().createSession(adamConfig("float32"));
    await session.step(tensorsFor(1, Float32Array));
    await assert.rejects(session.step({ "layer.weight": new Float32Array(5), "layer.bias": new Float32Array(2) }), ValidationError);
    const nan = tensorsFor(2, Float32Array);
    (nan["layer.bias"] as Float32Array)[1] = Number.NaN;
    await assert.rejects(session.step(nan), ValidationError);
    await assert.rejects(session.step(nan, { format: "json" }), ValidationError);
    await assert.rejects(session.step(tensorsFor(2, Float32Array), { ifMatch: 0 }), (error: unknown) => {
      assert.ok(error instanceof PreconditionFailedError);
      assert.equal(error.currentStep, 1);
      return true;
    });
    assert.equal((await session.refresh()).step, 1);
    assert.equal((await session.step(tensorsFor(2, Float32Array), { ifMatch: true })).step, 2);
  });

  it("nonfinite: skip reports the skipped step instead of failing", async () => {
    const session = await client().createSession({ ...adamConfig("float32"), nonfinite: "skip" });
    const grads = tensorsFor(1, Float32Array);
    (grads["layer.weight"] as Float32Array)[0] = Number.POSITIVE_INFINITY;
    const result = await session.step(grads);
    assert.equal(result.applied, false);
    assert.equal(typeof result.skipped, "string");
    assert.equal(result.step, 0);
  });

  it("reading params from a session that holds none is a ConflictError", async () => {
    const session = await client().createSession(adamConfig("float32"));
    await assert.rejects(session.params(), ConflictError);
  });
});

describe("held params, checkpoints, schedules and catalogs", () => {
  it("a parameter-server session: initial values, return=params, params(), state() and restore", async () => {
    const c = client();
    const session = await c.createSession({
      optimizer: { name: "AdamW", lr: 0.01, weight_decay: 0.1 },
      schedule: { name: "CosineAnnealingLR", T_max: 20 },
      params: {
        "layer.weight": { shape: [3, 2], data: [[1, 2], [3, 4], [5, 6]] },
        "layer.bias": { shape: [2], data: Float32Array.from([-1, 1]) },
      },
    });
    assert.equal(session.holdsParams, true);
    const start = await session.params();
    assert.deepEqual(Array.from(start["layer.weight"] ?? []), [1, 2, 3, 4, 5, 6]);

    for (let step = 1; step <= 3; step++) await session.step(tensorsFor(step, Float32Array));
    const next = await session.step(tensorsFor(4, Float32Array), { return: "params" });
    assert.equal(next.deltas, null);
    const held = await session.params({ format: "json" });
    assert.deepEqual(Array.from(next.params?.["layer.weight"] ?? []), Array.from(held["layer.weight"] ?? []));

    const checkpoint = await session.state();
    const restored = await c.restoreSession(checkpoint);
    assert.notEqual(restored.id, session.id);
    assert.equal(restored.currentStep, 4);
    assert.deepEqual(restored.lr, session.lr);
    const a = await session.step(tensorsFor(5, Float32Array));
    const b = await restored.step(tensorsFor(5, Float32Array));
    assert.deepEqual(b.deltas, a.deltas, "the restored session must continue exactly");
    assert.deepEqual(b.lr, a.lr);
  });

  it("LBFGS with a line search asks for points until its step completes (ask/tell)", async () => {
    const target = [1, -2, 3];
    const weight = [1, 10, 0.5];
    const session = await client().createSession({
      optimizer: { name: "LBFGS", lr: 1, line_search_fn: "strong_wolfe", max_iter: 20 },
      params: { x: { shape: [3], data: Float64Array.from([0, 0, 0]) } },
      dtype: "float64",
    });
    let x = (await session.params())["x"] as Float64Array;
    const lossAt = (p: Float64Array) => p.reduce((sum, v, j) => sum + (weight[j] as number) * (v - (target[j] as number)) ** 2, 0);
    let evaluations = 0;
    for (;;) {
      const grad = x.map((v, j) => 2 * (weight[j] as number) * (v - (target[j] as number)));
      const result = await session.step(grad, { loss: lossAt(x), return: "params" });
      evaluations += 1;
      const next = result.params?.["x"];
      assert.ok(next instanceof Float64Array);
      x = next;
      if (!result.evaluate) {
        assert.equal(result.step, 1, "one torch step() completes after all its closure calls");
        break;
      }
      assert.equal(result.step, 0);
      assert.ok(evaluations < 25, "the line search should finish well within max_iter");
    }
    assert.ok(evaluations > 2);
    assert.ok(lossAt(x) < 1e-8, `loss ${lossAt(x)} after one LBFGS step on a quadratic`);
  });

  it("manual schedule steps, preview, catalogs and listing", async () => {
    const c = client({ apiKey: "key2" });
    const session = await c.createSession({
      ...adamConfig("float32"),
      schedule: { name: "StepLR", step_size: 1, gamma: 0.5, interval: "manual" },
      labels: { suite: "js-live" },
    });
    await session.step(tensorsFor(1, Float32Array));
    assert.deepEqual(session.lr, [0.01]);
    const document = await session.scheduleStep();
    assert.deepEqual(document.lr, [0.005]);
    assert.deepEqual(session.lr, [0.005]);

    const lrs = await c.preview({ optimizer: { name: "SGD", lr: 1 }, schedule: { name: "StepLR", step_size: 2, gamma: 0.5 }, steps: 5 });
    assert.deepEqual(lrs, [[1], [1], [0.5], [0.5], [0.25]]);

    const optimizers = await c.optimizers();
    assert.ok(optimizers.some((entry) => entry.name === "AdamW"));
    assert.ok((await c.schedules()).some((entry) => entry.name === "CosineAnnealingLR"));

    const extra = await c.createSession(adamConfig("float32"));
    const ids: string[] = [];
    for await (const listed of c.sessions({ limit: 1 })) ids.push(listed.id);
    assert.ok(ids.includes(session.id) && ids.includes(extra.id));
    assert.equal(new Set(ids).size, ids.length);
    await extra.delete();
    await assert.rejects(extra.refresh(), NotFoundError);
    assert.equal(await c.health(), true);
    assert.equal(await c.ready(), true);
  });
});

describe("the JavaScript example", () => {
  it("examples/logistic_regression.mjs trains through the server and passes its own check", async () => {
    const { stdout } = await promisify(execFile)(
      process.execPath,
      ["examples/logistic_regression.mjs", "--url", server.url, "--api-key", "key1"],
      { cwd: REPO_ROOT },
    );
    assert.match(stdout, /\nOK\n?$/);
  });
});
