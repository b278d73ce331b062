/**
 * The federated client against a real optserve server started by this file: rounds with
 * long polls, a retried update counted once, async deltas, and FedProx's term.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Client, FederatedClient, proximalGradient, proximalTerm, ValidationError } from "../src/index.js";
import { startServer, type LiveServer } from "./helpers/live_server.js";

let server: LiveServer;

before(async () => {
  server = await startServer();
});
after(async () => server?.stop());

const start = { w: { shape: [2, 2], data: [1, 2, 3, 4] }, b: { shape: [1], data: [0.5] } };

function shifted(params: Record<string, Float32Array | Float64Array>, by: number): Record<string, Float64Array> {
  const out: Record<string, Float64Array> = {};
  for (const [name, values] of Object.entries(params)) out[name] = Float64Array.from(values, (v) => v + by);
  return out;
}

describe("FederatedClient", () => {
  it("two clients run rounds; the server averages by num_examples", async () => {
    const client = new Client({ baseUrl: server.url, backoffMs: 20 });
    const session = await client.createSession({
      optimizer: { name: "FedAvg" },
      params: start,
      dtype: "float64",
      aggregation: { mode: "rounds", clients_per_round: 2, proximal_mu: 0.05 },
    });
    const members = [0, 1].map((i) => new FederatedClient(client, session.id, `c${i}`));
    const replies = await Promise.all(
      members.map((member, i) =>
        member.run((round) => ({ params: shifted(round.params, i + 1), numExamples: 10 * (i + 1) }), 3, 30_000),
      ),
    );
    assert.deepEqual(
      replies.map((r) => r.length),
      [3, 3],
    );
    const current = await members[0]!.fetch();
    assert.ok(current !== null);
    assert.equal(current.number, 4);
    assert.equal(current.proximalMu, 0.05);
    // Each round moves every value by the weighted shift (1 * 10 + 2 * 20) / 30.
    const moved = (3 * (1 * 10 + 2 * 20)) / 30;
    assert.ok(Math.abs((current.params["w"]![0] as number) - (1 + moved)) < 1e-12);
    await session.delete();
  });

  it("a retried update with its key counts once; the key on another update is refused", async () => {
    const client = new Client({ baseUrl: server.url, backoffMs: 20 });
    const session = await client.createSession({
      optimizer: { name: "FedAvg" },
      params: start,
      dtype: "float64",
      aggregation: { mode: "rounds", clients_per_round: 3 },
    });
    const me = new FederatedClient(client, session.id, "a");
    const round = await me.fetch();
    assert.ok(round !== null && round.number === 1);
    const params = shifted(round.params, 1);
    const first = await me.submit(round, { params, numExamples: 2, idempotencyKey: "k" });
    const again = await me.submit(round, { params, numExamples: 2, idempotencyKey: "k" });
    assert.equal(first["duplicate"], false);
    assert.equal(again["duplicate"], true);
    assert.equal((await me.roundDocument())["received"], 1);
    const other = new FederatedClient(client, session.id, "b");
    await assert.rejects(other.submit(round, { params, numExamples: 2, idempotencyKey: "k" }), ValidationError);
    assert.equal(await me.fetch({ after: 1, waitS: 0.1 }), null);
    await assert.rejects(me.submit(round, {}), TypeError);
    await session.delete();
  });

  it("async mode sends deltas from a version", async () => {
    const client = new Client({ baseUrl: server.url, backoffMs: 20 });
    const session = await client.createSession({
      optimizer: { name: "FedAvg" },
      params: start,
      dtype: "float64",
      aggregation: { mode: "async" },
    });
    const me = new FederatedClient(client, session.id, "a");
    const round = await me.nextRound(null);
    assert.equal(round.number, null);
    const delta = { w: new Float64Array([1, 1, 1, 1]), b: new Float64Array([1]) };
    const reply = await me.submit(round, { delta });
    assert.equal(reply["version"], 1);
    const later = await me.nextRound(0, 5_000);
    assert.deepEqual(Array.from(later.params["w"]!), [2, 3, 4, 5]);
    await session.delete();
  });

  it("proximalTerm and proximalGradient are mu/2 ||w - w_g||^2 and its gradient", () => {
    const w = { a: new Float64Array([1, 2, 3]) };
    const g = { a: new Float64Array([0.5, 2, 5]) };
    const mu = 0.2;
    assert.ok(Math.abs(proximalTerm(w, g, mu) - 0.1 * (0.25 + 0 + 4)) < 1e-15);
    // The gradient against central differences of the term.
    const grad = proximalGradient(w, g, mu)["a"]!;
    for (let i = 0; i < 3; i++) {
      const h = 1e-6;
      const up = { a: Float64Array.from(w.a) };
      const down = { a: Float64Array.from(w.a) };
      up.a[i]! += h;
      down.a[i]! -= h;
      const numeric = (proximalTerm(up, g, mu) - proximalTerm(down, g, mu)) / (2 * h);
      assert.ok(Math.abs((grad[i] as number) - numeric) < 1e-8);
    }
  });
});
