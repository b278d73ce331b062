/** Partial steps, group edits, added groups and the change log against a scripted server. */

import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it } from "node:test";

import { Client, ConnectionError, ServerError } from "../src/index.js";
import { decode, encode } from "../src/safetensors.js";
import { MockServer, binary, hangUp, json, problem, sessionDocument } from "./helpers/mock_server.js";

let server: MockServer;

beforeEach(async () => {
  server = await new MockServer().start();
});
afterEach(async () => server.stop());

function client(format: "json" | "safetensors" = "safetensors"): Client {
  return new Client({ baseUrl: server.url, backoffMs: 1, maxBackoffMs: 5, format });
}

async function session(overrides: Record<string, unknown> = {}, format: "json" | "safetensors" = "safetensors") {
  server.queue(json(200, sessionDocument(overrides)));
  const s = await client(format).getSession("s-1");
  server.requests.length = 0;
  return s;
}

const bodyOf = (index: number): unknown => JSON.parse(server.requests[index]?.body.toString() ?? "null");

describe("partial steps", () => {
  it("a session without missing_grads skip refuses a missing tensor before sending", async () => {
    for (const missing of [undefined, "error"]) {
      const s = await session(missing === undefined ? {} : { missing_grads: missing });
      assert.equal(s.skipsMissing, false);
      await assert.rejects(s.step({ w: new Float32Array(4) }), (error: unknown) => {
        assert.ok(error instanceof TypeError);
        assert.match(error.message, /no gradient for "b"/);
        assert.match(error.message, /missing_grads: "skip"/);
        return true;
      });
      assert.equal(server.requests.length, 0);
    }
  });

  it("a skip session sends only the given tensors and reads only the deltas sent back", async () => {
    const s = await session({ missing_grads: "skip" });
    assert.equal(s.skipsMissing, true);
    server.queue(binary(200, encode({ w: new Float32Array(4).fill(-1) }, { step: "1", lr: "[0.01]", applied: "true" })));
    const result = await s.step({ w: new Float32Array(4).fill(1) });
    assert.deepEqual(Object.keys(decode(server.requests[0]?.body ?? new Uint8Array()).tensors), ["w"]);
    assert.deepEqual(Object.keys(result.deltas ?? {}), ["w"]);
  });

  it("a delta reply that names no tensor is an empty record in both formats", async () => {
    const binaryStep = await session({ missing_grads: "skip" });
    server.queue(binary(200, encode({}, { step: "1", lr: "[0.01]", applied: "true" })));
    assert.deepEqual((await binaryStep.step({})).deltas, {});

    const jsonStep = await session({ missing_grads: "skip" }, "json");
    server.queue(json(200, { step: 1, lr: [0.01], applied: true, deltas: {} }));
    assert.deepEqual((await jsonStep.step({})).deltas, {});
    assert.equal(server.requests[0]?.body.toString(), '{"grads":{}}');
  });
});

describe("group edits", () => {
  it("PATCHes the values with the reason and If-Match, and adopts the document", async () => {
    const s = await session({ step: 3 });
    const edited = sessionDocument({ step: 3, lr: [0.5], param_groups: [{ params: ["w", "b"], lr: 0.5 }] });
    server.queue(json(200, edited));
    const document = await s.editGroup(0, { lr: 0.5, betas: [0.8, 0.9] }, { reason: "warm restart", ifMatch: true });
    const sent = server.requests[0];
    assert.equal(sent?.method, "PATCH");
    assert.equal(sent?.url, "/v1/sessions/s-1/param_groups/0");
    assert.equal(sent?.headers["content-type"], "application/json");
    assert.equal(sent?.headers["if-match"], '"3"');
    assert.deepEqual(bodyOf(0), { lr: 0.5, betas: [0.8, 0.9], reason: "warm restart" });
    assert.deepEqual(document, edited);
    assert.deepEqual(s.document, edited);
    assert.deepEqual(s.lr, [0.5]);
  });

  it("is retried after a lost answer or a 5xx: the same values set twice are set once", async () => {
    const s = await session();
    server.queue(hangUp, problem(500, {}), json(200, sessionDocument({ lr: [0.2] })));
    await s.editGroup(0, { lr: 0.2 });
    assert.equal(server.requests.length, 3);
    assert.ok(server.requests.every((r) => r.body.toString() === '{"lr":0.2}'));
    assert.deepEqual(s.lr, [0.2]);
  });

  it("refuses an index that is not a non-negative integer without sending", async () => {
    const s = await session();
    await assert.rejects(s.editGroup(-1, { lr: 0.1 }), TypeError);
    await assert.rejects(s.editGroup(0.5, { lr: 0.1 }), TypeError);
    assert.equal(server.requests.length, 0);
  });
});

describe("added groups", () => {
  it("POSTs shapes and options, and adopts the document with the new tensors", async () => {
    const s = await session({ step: 2 });
    const added = sessionDocument({
      step: 2,
      lr: [0.01, 0.001],
      tensors: { w: { shape: [2, 2] }, b: { shape: [2] }, head: { shape: [3] } },
      param_groups: [{ params: ["w", "b"] }, { params: ["head"], lr: 0.001 }],
    });
    server.queue(json(200, added));
    await s.addGroup({ head: { shape: [3] } }, { lr: 0.001 }, { reason: "unfreeze", ifMatch: 2 });
    const sent = server.requests[0];
    assert.equal(sent?.method, "POST");
    assert.equal(sent?.url, "/v1/sessions/s-1/param_groups");
    assert.equal(sent?.headers["if-match"], '"2"');
    assert.deepEqual(bodyOf(0), { lr: 0.001, params: { head: { shape: [3] } }, reason: "unfreeze" });
    assert.deepEqual(s.shapes, { w: [2, 2], b: [2], head: [3] });
    assert.deepEqual(s.lr, [0.01, 0.001]);
    // The cached document now has head, so a complete step needs it.
    await assert.rejects(s.step({ w: new Float32Array(4), b: new Float32Array(2) }), /no gradient for "head"/);
  });

  it("sends initial values flat, in the session's dtype, for a session that holds params", async () => {
    const s = await session({ holds_params: true, dtype: "float64" });
    server.queue(json(200, sessionDocument({ holds_params: true, dtype: "float64" })));
    await s.addGroup({ head: { shape: [2, 2], data: [[0.1, 0.2], [0.3, 1e-300]] } });
    assert.deepEqual(bodyOf(0), { params: { head: { shape: [2, 2], data: [0.1, 0.2, 0.3, 1e-300] } } });
  });

  it("refuses data that does not fit the session's holding of params, before sending", async () => {
    const holding = await session({ holds_params: true });
    await assert.rejects(holding.addGroup({ head: { shape: [2] } }), /holds its parameters.*head/);
    const notHolding = await session();
    await assert.rejects(notHolding.addGroup({ head: { shape: [2], data: [1, 2] } }), /does not hold its parameters/);
    await assert.rejects(notHolding.addGroup({ head: { shape: [2] } }, { params: ["x"] }), TypeError);
    assert.equal(server.requests.length, 0);
  });

  it("is not resent after a lost answer or a 500, since it may have been applied", async () => {
    const s = await session();
    server.queue(hangUp);
    await assert.rejects(s.addGroup({ head: { shape: [2] } }), ConnectionError);
    server.queue(problem(500, {}));
    await assert.rejects(s.addGroup({ head: { shape: [2] } }), ServerError);
    assert.equal(server.requests.length, 2);
    assert.deepEqual(s.shapes, { w: [2, 2], b: [2] });
  });
});

describe("the change log", () => {
  it("follows next until the last page and returns every entry in order", async () => {
    const s = await session();
    const entry = (seq: number, field: string) => ({
      seq,
      step: seq,
      group: 0,
      field,
      old: 0.1,
      new: 0.2,
      time: "2026-01-01T00:00:00.000Z",
      reason: null,
    });
    server.queue(
      json(200, { changes: [entry(1, "lr"), entry(2, "lr")], next: 2 }),
      json(200, { changes: [entry(3, "momentum")], next: null }),
    );
    const changes = await s.changes();
    assert.deepEqual(
      changes.map((c) => [c.seq, c.field]),
      [
        [1, "lr"],
        [2, "lr"],
        [3, "momentum"],
      ],
    );
    assert.deepEqual(
      server.requests.map((r) => r.url),
      ["/v1/sessions/s-1/changes?limit=1000", "/v1/sessions/s-1/changes?limit=1000&after=2"],
    );
  });
});
