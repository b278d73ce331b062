/**
 * Partial steps, group edits, added groups and the change log against a real optserve
 * server started by this file, the numbers checked against reference optimizers that are
 * changed the way torch's param_groups are.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import {
  Client,
  PreconditionFailedError,
  ValidationError,
  type FloatArray,
  type ParamGroupConfig,
  type SessionConfig,
} from "../src/index.js";
import { startServer, type LiveServer } from "./helpers/live_server.js";
import { ReferenceAdam, ReferenceSGD, gradient, maxAbsDifference } from "./helpers/reference.js";

const TOLERANCE = 1e-9;
let server: LiveServer;

before(async () => {
  server = await startServer({ OPTSERVE_API_KEYS: "t1:key1" });
});
after(async () => server?.stop());

function client(format: "json" | "safetensors" = "safetensors"): Client {
  return new Client({ baseUrl: server.url, apiKey: "key1", backoffMs: 20, format });
}

const SIZES: Record<string, number> = { w: 6, b: 2, head: 4 };
const SHAPES: Record<string, number[]> = { w: [3, 2], b: [2], head: [4] };

function grads(step: number, names: string[]): Record<string, Float64Array> {
  return Object.fromEntries(names.map((name, i) => [name, gradient(SIZES[name] as number, step, i + 1)]));
}

function assertClose(actual: FloatArray | undefined, expected: ArrayLike<number>, what: string): void {
  assert.ok(actual instanceof Float64Array, `${what} should come back as Float64Array`);
  const difference = maxAbsDifference(actual, expected);
  assert.ok(difference < TOLERANCE, `${what}: off by ${difference}`);
}

function config(optimizer: SessionConfig["optimizer"], extra: Partial<SessionConfig> = {}): SessionConfig {
  return {
    optimizer,
    params: { w: { shape: SHAPES["w"] as number[] }, b: { shape: SHAPES["b"] as number[] } },
    dtype: "float64",
    ...extra,
  };
}

describe("partial steps", () => {
  for (const format of ["safetensors", "json"] as const) {
    it(`with missing_grads skip, a left-out tensor does not move, over ${format}`, async () => {
      const session = await client(format).createSession(config({ name: "Adam", lr: 0.01 }, { missing_grads: "skip" }));
      assert.equal(session.document.missing_grads, "skip");
      assert.equal(session.skipsMissing, true);
      // One reference per tensor: Adam's step count is per tensor, so a skipped tensor's
      // bias correction lags behind, as in torch.
      const reference = { w: new ReferenceAdam(6, 0.01), b: new ReferenceAdam(2, 0.01) };
      for (let step = 1; step <= 9; step++) {
        const names = step % 3 === 0 ? ["w"] : step % 4 === 0 ? ["b"] : ["w", "b"];
        const sent = grads(step, names);
        const result = await session.step(sent);
        assert.equal(result.step, step);
        assert.deepEqual(Object.keys(result.deltas ?? {}).sort(), [...names].sort(), `deltas at step ${step}`);
        for (const name of names) {
          assertClose(result.deltas?.[name], reference[name as "w" | "b"].step(sent[name] as Float64Array), `${name} at step ${step}`);
        }
      }
      // Nothing sent: a step of an optimizer none of whose tensors has a gradient.
      const empty = await session.step({});
      assert.equal(empty.step, 10);
      assert.deepEqual(empty.deltas, {});
      const next = grads(11, ["w", "b"]);
      const result = await session.step(next);
      assertClose(result.deltas?.["b"], reference.b.step(next["b"] as Float64Array), "b after an empty step");
    });
  }

  it("without skip a missing tensor is refused before sending; an unknown one is a 422 either way", async () => {
    const strict = await client().createSession(config({ name: "SGD", lr: 0.1 }));
    assert.equal(strict.document.missing_grads, "error");
    await assert.rejects(strict.step(grads(1, ["w"])), (error: unknown) => {
      assert.ok(error instanceof TypeError);
      assert.match(error.message, /no gradient for "b".*missing_grads "error"/);
      return true;
    });
    const unknown = { ...grads(1, ["w", "b"]), nope: new Float64Array(2) };
    await assert.rejects(strict.step(unknown), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.match(error.detail, /unknown tensor 'nope'/);
      return true;
    });
    assert.equal((await strict.refresh()).step, 0);

    const skipping = await client("json").createSession(config({ name: "SGD", lr: 0.1 }, { missing_grads: "skip" }));
    await assert.rejects(skipping.step({ nope: new Float64Array(2) }), ValidationError);
    assert.equal((await skipping.refresh()).step, 0);
  });

  it("LBFGS answers with every tensor: it reads zeros for a missing gradient", async () => {
    const lr = 0.5;
    const session = await client().createSession(config({ name: "LBFGS", lr, max_iter: 1 }, { missing_grads: "skip" }));
    const g = gradient(6, 1, 1);
    const result = await session.step({ w: g }, { loss: 1 });
    assert.deepEqual(Object.keys(result.deltas ?? {}).sort(), ["b", "w"]);
    // torch's first LBFGS step: -min(1, 1 / |g|_1) * lr * g, over all tensors.
    const t = Math.min(1, 1 / g.reduce((sum, v) => sum + Math.abs(v), 0)) * lr;
    assertClose(result.deltas?.["w"], g.map((v) => -t * v), "w");
    assertClose(result.deltas?.["b"], [0, 0], "b");
  });
});

describe("group edits", () => {
  it("an edit applies from the next step on and a running schedule continues from it", async () => {
    const gamma = 0.9;
    const session = await client().createSession(
      config({ name: "SGD", lr: 0.1, momentum: 0.9 }, { schedule: { name: "ExponentialLR", gamma } }),
    );
    const reference = { w: new ReferenceSGD(0.1, 0.9), b: new ReferenceSGD(0.1, 0.9) };
    const params = { w: new Float64Array(6), b: new Float64Array(2) };
    let lr = 0.1;
    for (let step = 1; step <= 8; step++) {
      if (step === 4) {
        const document = await session.editGroup(0, { lr: 0.3, momentum: 0.5 }, { reason: "warm restart", ifMatch: true });
        lr = 0.3;
        for (const r of Object.values(reference)) r.momentum = 0.5;
        assert.deepEqual(document.lr, [0.3]);
        assert.deepEqual(session.lr, [0.3]);
        assert.equal(session.document.param_groups?.[0]?.["momentum"], 0.5);
        assert.equal(session.currentStep, 3, "an edit is not a step");
      }
      const sent = grads(step, ["w", "b"]);
      const result = await session.step(sent);
      for (const [name, r] of Object.entries(reference)) {
        r.lr = lr;
        const expected = r.step(sent[name] as Float64Array, params[name as "w" | "b"]);
        assertClose(result.deltas?.[name], expected, `${name} at step ${step}`);
      }
      lr *= gamma; // ExponentialLR is chainable: it scales whatever the group's lr is now
      assert.ok(Math.abs((result.lr[0] as number) - lr) < 1e-15, `lr after step ${step}: ${result.lr[0]} vs ${lr}`);
    }

    const changes = await session.changes();
    assert.deepEqual(
      changes.map((c) => [c.step, c.group, c.field, c.new, c.reason]),
      [
        [3, 0, "lr", 0.3, "warm restart"],
        [3, 0, "momentum", 0.5, "warm restart"],
      ],
    );
    assert.ok(Math.abs((changes[0]?.old as number) - 0.1 * gamma ** 3) < 1e-15, `old lr ${String(changes[0]?.old)}`);
    assert.equal(changes[1]?.old, 0.9);
    assert.equal(changes[0]?.seq, changes[1]?.seq, "one edit, one event");
    assert.ok(!Number.isNaN(Date.parse(changes[0]?.time ?? "")), `time ${changes[0]?.time}`);
  });

  it("a bad or stale edit is a typed 4xx and changes nothing", async () => {
    const session = await client().createSession(config({ name: "Adam", lr: 0.01 }));
    await session.step(grads(1, ["w", "b"]));
    const before = await session.refresh();
    const state = await session.state();

    const refusals: Array<[number, Record<string, unknown>, RegExp]> = [
      [0, { colour: 1 }, /no hyperparameter 'colour'/],
      [0, { lr: -1 }, /Invalid learning rate/],
      [0, { amsgrad: true }, /after the first step/],
      [7, { lr: 0.1 }, /param_groups\[7\] does not exist/],
    ];
    for (const [index, values, words] of refusals) {
      await assert.rejects(session.editGroup(index, values), (error: unknown) => {
        assert.ok(error instanceof ValidationError, `${JSON.stringify(values)}: ${String(error)}`);
        assert.equal(error.status, 422);
        assert.match(error.detail, words);
        return true;
      });
    }
    await assert.rejects(session.editGroup(0, { lr: 0.1 }, { ifMatch: 0 }), (error: unknown) => {
      assert.ok(error instanceof PreconditionFailedError);
      assert.equal(error.currentStep, 1);
      return true;
    });
    await assert.rejects(session.addGroup({ w: { shape: [3, 2] } }), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.match(error.detail, /'w'/);
      return true;
    });

    assert.deepEqual(await session.refresh(), before);
    assert.deepEqual(await session.state(), state);
    assert.deepEqual(await session.changes(), []);
  });
});

describe("added groups", () => {
  it("a held-params session adds tensors with their values, and they step as after add_param_group", async () => {
    const initial = {
      w: Float64Array.from([0.5, -0.25, 1, 2, -1.5, 0.125]),
      b: Float64Array.from([0.1, -0.1]),
      head: Float64Array.from([1, -2, 3, -4]),
    };
    const session = await client().createSession({
      optimizer: { name: "Adam", lr: 0.01 },
      params: { w: { shape: [3, 2], data: initial.w }, b: { shape: [2], data: initial.b } },
      dtype: "float64",
    });
    const reference = { w: new ReferenceAdam(6, 0.01), b: new ReferenceAdam(2, 0.01), head: new ReferenceAdam(4, 0.001) };
    const expected = { w: Float64Array.from(initial.w), b: Float64Array.from(initial.b), head: Float64Array.from(initial.head) };
    const stepAll = async (step: number, names: Array<"w" | "b" | "head">): Promise<void> => {
      const sent = grads(step, names);
      const result = await session.step(sent);
      for (const name of names) {
        const delta = reference[name].step(sent[name] as Float64Array);
        assertClose(result.deltas?.[name], delta, `${name} at step ${step}`);
        expected[name].forEach((v, i) => (expected[name][i] = v + (delta[i] as number)));
      }
    };
    await stepAll(1, ["w", "b"]);
    await stepAll(2, ["w", "b"]);

    const document = await session.addGroup({ head: { shape: [4], data: [[1, -2], [3, -4]] } }, { lr: 0.001 }, { reason: "unfreeze" });
    assert.deepEqual(document.tensors["head"], { shape: [4] });
    assert.deepEqual(document.param_groups?.[1]?.params, ["head"]);
    assert.deepEqual(document.lr, [0.01, 0.001]);
    assert.deepEqual(session.shapes, { w: [3, 2], b: [2], head: [4] });
    assert.equal(session.currentStep, 2);
    // The session does not skip missing gradients, and head is now one of its tensors.
    await assert.rejects(session.step(grads(3, ["w", "b"])), /no gradient for "head"/);

    for (let step = 3; step <= 6; step++) await stepAll(step, ["w", "b", "head"]);
    const held = await session.params();
    for (const name of ["w", "b", "head"] as const) assertClose(held[name], expected[name], `held ${name}`);

    const changes = await session.changes();
    assert.equal(changes.length, 1);
    assert.deepEqual(
      [changes[0]?.step, changes[0]?.group, changes[0]?.field, changes[0]?.old, changes[0]?.new, changes[0]?.reason],
      [2, 1, "params", null, ["head"], "unfreeze"],
    );
  });

  it("a session that skips missing gradients can step the added group alone", async () => {
    const session = await client("json").createSession(config({ name: "SGD", lr: 0.1, momentum: 0.9 }, { missing_grads: "skip" }));
    await session.step(grads(1, ["w", "b"]));
    await session.addGroup({ head: { shape: [4] } }, { lr: 0.05, momentum: 0 }, { ifMatch: true });
    assert.deepEqual(session.lr, [0.1, 0.05]);
    const sent = grads(2, ["head"]);
    const result = await session.step(sent);
    assert.deepEqual(Object.keys(result.deltas ?? {}), ["head"]);
    assertClose(result.deltas?.["head"], new ReferenceSGD(0.05).step(sent["head"] as Float64Array, new Float64Array(4)), "head");
  });
});

describe("an optimizer per group", () => {
  it("a group naming its own optimizer steps with it, and the document says which", async () => {
    const groups: ParamGroupConfig[] = [{ params: ["b"], optimizer: { name: "Adam", lr: 0.02 }, betas: [0.8, 0.99] }];
    const session = await client("json").createSession(config({ name: "SGD", lr: 0.1, momentum: 0.9 }, { param_groups: groups }));
    assert.deepEqual(
      session.document.param_groups?.map((g) => g.optimizer),
      ["SGD", "Adam"],
    );
    assert.equal(session.document.param_groups?.[1]?.["momentum"], undefined);
    const sgd = new ReferenceSGD(0.1, 0.9);
    const adam = new ReferenceAdam(2, 0.02, 0.8, 0.99);
    for (let step = 1; step <= 5; step++) {
      const sent = grads(step, ["w", "b"]);
      const result = await session.step(sent);
      assertClose(result.deltas?.["w"], sgd.step(sent["w"] as Float64Array, new Float64Array(6)), `w at ${step}`);
      assertClose(result.deltas?.["b"], adam.step(sent["b"] as Float64Array), `b at ${step}`);
    }
    await assert.rejects(session.editGroup(1, { optimizer: { name: "SGD" } }), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.equal(error.errors[0]?.field, "param_groups[1].optimizer");
      return true;
    });
  });

  it("Muon on a vector is refused naming the group's field", async () => {
    const groups: ParamGroupConfig[] = [{ params: ["b"], optimizer: { name: "Muon" } }];
    await assert.rejects(client().createSession(config({ name: "AdamW" }, { param_groups: groups })), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.equal(error.errors[0]?.field, "param_groups[0].params");
      assert.match(error.detail, /Muon only supports 2D parameters/);
      return true;
    });
  });
});
