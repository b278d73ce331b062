/**
 * Accumulation replies, step metrics and the step history (records and columns) against a
 * real optserve server started by this file.
 */

import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";

import { Client } from "../src/index.js";
import { startServer, type LiveServer } from "./helpers/live_server.js";

let server: LiveServer;

before(async () => {
  server = await startServer();
});
after(async () => server?.stop());

describe("accumulation and the step history", () => {
  for (const format of ["safetensors", "json"] as const) {
    it(`two posts make one step, and the history reads back as arrays, over ${format}`, async () => {
      const client = new Client({ baseUrl: server.url, backoffMs: 20, format });
      const session = await client.createSession({
        optimizer: { name: "SGD", lr: 0.1 },
        schedule: { name: "StepLR", step_size: 1, gamma: 0.5 },
        params: { w: { shape: [2], data: [1, 2] } },
        dtype: "float64",
        accumulate: { steps: 2 },
        averaging: { kind: "swa" },
      });
      const posts = [
        [1, 3],
        [3, 5],
        [2, 2],
        [4, 0],
      ];
      const replies = [];
      for (const [n, g] of posts.entries()) {
        replies.push(await session.step({ w: new Float64Array(g as number[]) }, { loss: n }));
      }
      assert.deepEqual(
        replies.map((r) => [r.applied, r.accumulated, r.of]),
        [
          [false, 1, 2],
          [true, 0, 2],
          [false, 1, 2],
          [true, 0, 2],
        ],
      );
      assert.equal(replies[0]?.metrics, null);
      // The first step's mean gradient is [2, 4]; SGD at lr 0.1 moves w by [-0.2, -0.4].
      const first = replies[1]?.metrics;
      assert.ok(first);
      assert.ok(Math.abs(first.grad_norm - Math.hypot(2, 4)) < 1e-12);
      assert.ok(Math.abs(first.update_norm - Math.hypot(0.2, 0.4)) < 1e-12);
      assert.equal(first.loss, 0.5);
      const records = await session.steps();
      assert.deepEqual(
        records.map((r) => [r.step, r.lr[0], r.applied]),
        [
          [1, 0.1, true],
          [2, 0.05, true],
        ],
      );
      const columns = await session.stepHistory();
      assert.deepEqual(columns.step, [1, 2]);
      assert.deepEqual(columns.lr, [[0.1, 0.05]]);
      assert.deepEqual(columns.loss, [0.5, 2.5]);
      assert.equal(columns.grad_norm[0], first.grad_norm);
      // SWA from step 0: the equal average of the weights after steps 1 and 2.
      const held = (await session.params()).w as Float64Array;
      const average = (await session.params({ average: true })).w as Float64Array;
      const afterFirst = [0.8, 1.6];
      for (let i = 0; i < 2; i++) {
        assert.ok(Math.abs((average[i] as number) - ((afterFirst[i] as number) + (held[i] as number)) / 2) < 1e-12);
      }
    });
  }
});
