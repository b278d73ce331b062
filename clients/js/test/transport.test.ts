/** The client's HTTP behaviour against a scripted server: retries, idempotency keys, errors. */

import assert from "node:assert/strict";
import { createServer } from "node:net";
import { afterEach, beforeEach, describe, it } from "node:test";

import {
  AuthenticationError,
  Client,
  ConflictError,
  ConnectionError,
  NotFoundError,
  PreconditionFailedError,
  ServerError,
  TimeoutError,
  ValidationError,
  type RetryEvent,
} from "../src/index.js";
import { decode, encode } from "../src/safetensors.js";
import {
  MockServer,
  binary,
  hangUp,
  json,
  problem,
  sessionDocument,
  silence,
} from "./helpers/mock_server.js";

let server: MockServer;
let retries: RetryEvent[];

beforeEach(async () => {
  server = await new MockServer().start();
  retries = [];
});
afterEach(async () => server.stop());

function client(options: Partial<ConstructorParameters<typeof Client>[0]> = {}): Client {
  return new Client({
    baseUrl: server.url,
    backoffMs: 1,
    maxBackoffMs: 5,
    onRetry: (event) => retries.push(event),
    ...options,
  });
}

async function session(c: Client) {
  server.queue(json(200, sessionDocument()));
  const s = await c.getSession("s-1");
  server.requests.length = 0;
  return s;
}

const grads = { w: Float32Array.from([1, 2, 3, 4]), b: Float32Array.from([5, 6]) };
const stepReply = (step: number) =>
  binary(200, encode({ w: new Float32Array(4).fill(-0.5), b: new Float32Array(2) }, { step: String(step), lr: "[0.01]", applied: "true" }), {
    etag: `"${step}"`,
  });

describe("steps over safetensors", () => {
  it("sends gradients, params and loss as one safetensors body and reads the deltas", async () => {
    const s = await session(client());
    server.queue(stepReply(1));
    const result = await s.step(grads, { params: { w: new Float32Array(4), b: new Float32Array(2) }, loss: 0.75 });

    const sent = server.requests[0];
    assert.ok(sent);
    assert.equal(sent.url, "/v1/sessions/s-1/step?return=delta");
    assert.equal(sent.headers["content-type"], "application/vnd.optserve.safetensors");
    assert.equal(sent.headers["accept"], "application/vnd.optserve.safetensors");
    assert.match(String(sent.headers["idempotency-key"]), /^[0-9a-f-]{36}$/);
    const body = decode(sent.body);
    assert.deepEqual(Object.keys(body.tensors).sort(), ["b", "params/b", "params/w", "w"]);
    assert.deepEqual(body.tensors["w"]?.shape, [2, 2]); // the session's shape, not the flat length
    assert.deepEqual(Array.from(body.tensors["w"]?.data as Float32Array), [1, 2, 3, 4]);
    assert.deepEqual(body.metadata, { loss: "0.75" });

    assert.equal(result.step, 1);
    assert.deepEqual(result.lr, [0.01]);
    assert.equal(result.applied, true);
    assert.equal(result.evaluate, false);
    assert.ok(result.deltas?.["w"] instanceof Float32Array);
    assert.deepEqual(Array.from(result.deltas?.["w"] ?? []), [-0.5, -0.5, -0.5, -0.5]);
    assert.equal(result.params, null);
    assert.equal(s.currentStep, 1);
  });

  it("refuses a bare array when the session has several tensors", async () => {
    const s = await session(client());
    await assert.rejects(s.step(new Float32Array(4)), /one tensor; this one has 2/);
    assert.equal(server.requests.length, 0);
  });

  it("takes a bare array for a one-tensor session, and sends If-Match when asked", async () => {
    const c = client();
    server.queue(json(200, sessionDocument({ tensors: { x: { shape: [3] } }, step: 4 })));
    const s = await c.getSession("s-1");
    server.queue(binary(200, encode({ x: new Float32Array(3) }, { step: "5", lr: "[0.1]", applied: "true" })));
    await s.step(Float32Array.from([1, 2, 3]), { ifMatch: true });
    assert.equal(server.requests[1]?.headers["if-match"], '"4"');
    assert.deepEqual(Object.keys(decode(server.requests[1]?.body ?? new Uint8Array()).tensors), ["x"]);
  });
});

describe("uploadDtype", () => {
  it("rounds the gradients, not the parameter values, to the upload dtype", async () => {
    for (const [uploadDtype, label] of [["bfloat16", "BF16"], ["float16", "F16"]] as const) {
      const s = await session(client({ uploadDtype }));
      server.queue(stepReply(1));
      const params = { w: Float32Array.from([0.1, 0.2, 0.3, 0.4]), b: Float32Array.from([1, 2]) };
      await s.step({ w: Float32Array.from([1 + 2 ** -9, 2, 3, 4]), b: Float32Array.from([5, 6]) }, { params });
      const sent = decode(server.requests[0]?.body ?? new Uint8Array());
      assert.equal(sent.tensors["w"]?.dtype, label);
      assert.equal(sent.tensors["b"]?.dtype, label);
      assert.equal(sent.tensors["params/w"]?.dtype, "F32");
      // 1 + 2^-9 is a bfloat16 tie (rounds to 1), exact in float16.
      assert.equal(sent.tensors["w"]?.data[0], label === "BF16" ? 1 : 1 + 2 ** -9);
      server.requests.length = 0;
    }
  });

  it("is refused with JSON bodies", async () => {
    assert.throws(() => client({ format: "json", uploadDtype: "bfloat16" }), TypeError);
    const s = await session(client({ uploadDtype: "float16" }));
    await assert.rejects(s.step(grads, { format: "json" }), TypeError);
  });
});

describe("steps over JSON", () => {
  it("sends numbers (non-finite ones as Python reads them) and reads nested deltas", async () => {
    const s = await session(client({ format: "json" }));
    server.queue(json(200, { step: 1, lr: [0.01], applied: true, deltas: { w: [[0.5, 1], [1.5, 2]], b: [0, -1] } }));
    const result = await s.step({ w: Float32Array.from([0.5, Number.NaN, Infinity, -Infinity]), b: new Float32Array(2) }, { loss: 1.5 });
    const sent = server.requests[0];
    assert.equal(sent?.headers["content-type"], "application/json");
    assert.equal(sent?.body.toString(), '{"grads":{"w":[0.5,NaN,Infinity,-Infinity],"b":[0,0]},"loss":1.5}');
    assert.ok(result.deltas?.["w"] instanceof Float32Array);
    assert.deepEqual(Array.from(result.deltas?.["w"] ?? []), [0.5, 1, 1.5, 2]);
  });

  it("reads the non-finite numbers the server writes as strings", async () => {
    const s = await session(client({ format: "json" }));
    const deltas = { w: [["-inf", 1], ["nan", "inf"]], b: [0, -1] };
    server.queue(json(200, { step: 1, lr: ["inf"], applied: true, deltas }));
    const result = await s.step({ w: new Float32Array(4), b: new Float32Array(2) });
    assert.deepEqual(result.lr, [Infinity]);
    assert.deepEqual(Array.from(result.deltas?.["w"] ?? []), [-Infinity, 1, Number.NaN, Infinity]);
    server.queue(binary(200, encode({ w: new Float32Array(4), b: new Float32Array(2) }, { step: "2", lr: '["-inf"]', applied: "true" })));
    const binaryResult = await s.step({ w: new Float32Array(4), b: new Float32Array(2) }, { format: "safetensors" });
    assert.deepEqual(binaryResult.lr, [-Infinity]);
  });
});

describe("retries", () => {
  it("retries a step on 5xx and a dropped connection with the same Idempotency-Key", async () => {
    const s = await session(client());
    server.queue(problem(500, { title: "Internal" }), hangUp, problem(503, { title: "Unavailable" }), stepReply(1));
    const result = await s.step(grads);
    assert.equal(result.step, 1);
    assert.equal(result.attempts, 4);
    const keys = new Set(server.requests.map((r) => r.headers["idempotency-key"]));
    assert.equal(keys.size, 1);
    assert.equal(result.idempotencyKey, [...keys][0]);
    assert.equal(retries.length, 3);
  });

  it("uses a fresh key for each step call", async () => {
    const s = await session(client());
    server.queue(stepReply(1), stepReply(2));
    const first = await s.step(grads);
    const second = await s.step(grads);
    assert.notEqual(first.idempotencyKey, second.idempotencyKey);
  });

  it("retries the 409 of a step still in flight, not the 409 of an expired key", async () => {
    const s = await session(client());
    const inFlight = problem(409, { type: "https://optserve.dev/problems/step-in-flight", title: "Step in flight" });
    server.queue(inFlight, inFlight, stepReply(1));
    assert.equal((await s.step(grads)).attempts, 3);

    server.requests.length = 0;
    server.queue(problem(409, { type: "https://optserve.dev/problems/idempotency-key-expired", title: "Idempotency key expired" }));
    await assert.rejects(s.step(grads, { idempotencyKey: "old" }), ConflictError);
    assert.equal(server.requests.length, 1);
  });

  it("does not retry the 503 of a damaged session, but does retry other 503s", async () => {
    const s = await session(client());
    server.queue(problem(503, { type: "https://optserve.dev/problems/session-damaged", title: "Session damaged" }));
    await assert.rejects(s.step(grads), ServerError);
    assert.equal(server.requests.length, 1);

    server.requests.length = 0;
    server.queue(problem(503, { type: "https://optserve.dev/problems/storage-unavailable" }), stepReply(1));
    assert.equal((await s.step(grads)).attempts, 2);
  });

  it("gives up after `retries` extra attempts and throws the last error", async () => {
    const s = await session(client({ retries: 2 }));
    server.queue(problem(502, {}), problem(502, {}), problem(500, { title: "Internal", detail: "boom" }));
    await assert.rejects(s.step(grads), (error: unknown) => {
      assert.ok(error instanceof ServerError);
      assert.equal(error.status, 500);
      assert.equal(error.detail, "boom");
      return true;
    });
    assert.equal(server.requests.length, 3);
  });

  it("never retries a 4xx such as 422", async () => {
    const s = await session(client());
    server.queue(
      problem(422, {
        type: "https://optserve.dev/problems/invalid-input",
        title: "Invalid input",
        detail: "wrong shape",
        errors: [{ field: "grads.w", message: "expected shape [2, 2], got [3]" }],
      }),
    );
    await assert.rejects(s.step(grads), (error: unknown) => {
      assert.ok(error instanceof ValidationError);
      assert.equal(error.status, 422);
      assert.equal(error.type, "https://optserve.dev/problems/invalid-input");
      assert.equal(error.title, "Invalid input");
      assert.equal(error.detail, "wrong shape");
      assert.deepEqual(error.errors, [{ field: "grads.w", message: "expected shape [2, 2], got [3]" }]);
      assert.match(error.message, /422 Invalid input: wrong shape \[grads\.w: expected shape/);
      return true;
    });
    assert.equal(server.requests.length, 1);
  });

  it("does not resend a create on 500 or a dropped connection, but does on 503", async () => {
    const c = client();
    const config = { optimizer: { name: "SGD", lr: 0.1 }, params: { w: { shape: [2] } } };
    server.queue(problem(500, {}));
    await assert.rejects(c.createSession(config), ServerError);
    server.queue(hangUp);
    await assert.rejects(c.createSession(config), ConnectionError);
    assert.equal(server.requests.length, 2);
    server.queue(problem(503, {}), json(201, sessionDocument()));
    const s = await c.createSession(config);
    assert.equal(s.id, "s-1");
    assert.equal(server.requests.length, 4);
  });

  it("honours Retry-After, capped by maxBackoffMs", async () => {
    const c = client({ maxBackoffMs: 40 });
    server.queue(problem(429, {}, { "retry-after": "1" }), json(200, sessionDocument()));
    await c.getSession("s-1");
    assert.equal(retries[0]?.delayMs, 40);
    assert.equal(retries[0]?.error.status, 429);
  });

  it("reports a refused connection as ConnectionError after retrying", async () => {
    const port = await new Promise<number>((resolve) => {
      const probe = createServer().listen(0, "127.0.0.1", () => {
        const address = probe.address();
        probe.close(() => resolve(typeof address === "object" && address ? address.port : 0));
      });
    });
    const c = client({ baseUrl: `http://127.0.0.1:${port}`, retries: 2 });
    await assert.rejects(c.getSession("x"), (error: unknown) => {
      assert.ok(error instanceof ConnectionError);
      assert.equal(error.status, 0);
      assert.match(error.message, /ECONNREFUSED/);
      return true;
    });
    assert.equal(retries.length, 2);
  });

  it("times out an attempt that gets no answer, then retries it", async () => {
    const c = client({ timeoutMs: 100, retries: 1 });
    server.queue(silence, silence);
    await assert.rejects(c.getSession("s-1"), TimeoutError);
    assert.equal(server.requests.length, 2);
  });

  it("stops at once when the caller aborts", async () => {
    const c = client({ timeoutMs: 10_000 });
    server.queue(silence);
    const controller = new AbortController();
    setTimeout(() => controller.abort(new Error("user gave up")), 50);
    await assert.rejects(c.getSession("s-1", { signal: controller.signal }), /user gave up/);
    assert.equal(retries.length, 0);
  });
});

describe("errors and the rest of the API", () => {
  it("sends the API key and maps 401 to AuthenticationError", async () => {
    const c = client({ apiKey: "key1" });
    server.queue(problem(401, { title: "Unauthorized", detail: "missing or unknown API key" }));
    await assert.rejects(c.getSession("s-1"), AuthenticationError);
    assert.equal(server.requests[0]?.headers["authorization"], "Bearer key1");
  });

  it("exposes the current ETag on 412", async () => {
    const s = await session(client());
    server.queue(problem(412, { title: "Precondition Failed" }, { etag: '"7"' }));
    await assert.rejects(s.step(grads, { ifMatch: 3 }), (error: unknown) => {
      assert.ok(error instanceof PreconditionFailedError);
      assert.equal(error.etag, '"7"');
      assert.equal(error.currentStep, 7);
      return true;
    });
    assert.equal(server.requests[0]?.headers["if-match"], '"3"');
  });

  it("turns a non-JSON error body into the detail", async () => {
    const c = client({ retries: 0 });
    server.queue((_req, res) => res.writeHead(502, { "content-type": "text/html" }).end("<h1>Bad gateway</h1>"));
    await assert.rejects(c.getSession("s-1"), (error: unknown) => {
      assert.ok(error instanceof ServerError);
      assert.equal(error.detail, "<h1>Bad gateway</h1>");
      assert.equal(error.type, "about:blank");
      return true;
    });
  });

  it("deletes; a 404 on a retry counts as done, a 404 on the first attempt does not", async () => {
    const s = await session(client());
    server.queue((_req, res) => res.socket?.destroy(), problem(404, { title: "Not Found" }));
    await s.delete();
    assert.equal(server.requests.length, 2);
    assert.ok(server.requests.every((r) => r.method === "DELETE"));
    server.queue(problem(404, { title: "Not Found" }));
    await assert.rejects(s.delete(), NotFoundError);
  });

  it("creates a session with initial params as a safetensors body carrying the config", async () => {
    const c = client();
    server.queue(json(201, sessionDocument({ holds_params: true })));
    const s = await c.createSession({
      optimizer: { name: "Adam", lr: 0.001 },
      params: { w: { shape: [2, 2], data: [[1, 2], [3, 4]] }, b: { shape: [2], data: Float32Array.from([5, 6]) } },
      labels: { run: "t" },
    });
    assert.equal(s.holdsParams, true);
    const sent = server.requests[0];
    assert.equal(sent?.headers["content-type"], "application/vnd.optserve.safetensors");
    const body = decode(sent?.body ?? new Uint8Array());
    assert.deepEqual(Array.from(body.tensors["w"]?.data as Float32Array), [1, 2, 3, 4]);
    assert.deepEqual(body.tensors["w"]?.shape, [2, 2]);
    assert.deepEqual(JSON.parse(body.metadata["session"] ?? "{}"), {
      optimizer: { name: "Adam", lr: 0.001 },
      params: { w: { shape: [2, 2] }, b: { shape: [2] } },
      labels: { run: "t" },
    });
  });

  it("lists sessions page by page", async () => {
    const c = client();
    server.queue(
      json(200, { sessions: [sessionDocument({ id: "a" }), sessionDocument({ id: "b" })], next: "b" }),
      json(200, { sessions: [sessionDocument({ id: "c" })], next: null }),
    );
    const ids: string[] = [];
    for await (const s of c.sessions({ limit: 2 })) ids.push(s.id);
    assert.deepEqual(ids, ["a", "b", "c"]);
    assert.equal(server.requests[0]?.url, "/v1/sessions?limit=2");
    assert.equal(server.requests[1]?.url, "/v1/sessions?limit=2&after=b");
  });
});
