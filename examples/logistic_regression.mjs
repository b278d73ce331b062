#!/usr/bin/env node
// Logistic regression in plain JavaScript, trained through an optserve session.
//
// The data, the model, the loss and its gradient live here; the optimizer (Adam with a
// step-decay schedule) lives on the server. Each step sends the gradient and adds the
// returned deltas to the local weights. The run checks its own result and exits non-zero
// if the model did not learn.
//
//   cd clients/js && npm ci && npm run build && cd ../..
//   node examples/logistic_regression.mjs --url http://127.0.0.1:8000 [--api-key KEY]

import { parseArgs } from "node:util";

import { Client, applyDeltas } from "../clients/js/dist/index.js";

const { values: args } = parseArgs({
  options: {
    url: { type: "string", default: process.env.OPTSERVE_URL ?? "http://127.0.0.1:8000" },
    "api-key": { type: "string", default: process.env.OPTSERVE_API_KEY },
    steps: { type: "string", default: "150" },
  },
});
const STEPS = Number(args.steps);
const FEATURES = 4;
const SAMPLES = 400;

/** mulberry32: a small seeded generator, so every run sees the same data. */
function generator(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Two overlapping clouds: labels from a hidden linear rule plus noise. */
function makeData(random) {
  const trueWeight = [2.0, -3.0, 0.5, 1.5];
  const trueBias = 0.25;
  const x = new Float32Array(SAMPLES * FEATURES);
  const y = new Float32Array(SAMPLES);
  for (let i = 0; i < SAMPLES; i++) {
    let z = trueBias;
    for (let j = 0; j < FEATURES; j++) {
      const value = random() * 4 - 2;
      x[i * FEATURES + j] = value;
      z += trueWeight[j] * value;
    }
    y[i] = z + (random() - 0.5) * 1.5 > 0 ? 1 : 0;
  }
  return { x, y };
}

const sigmoid = (z) => 1 / (1 + Math.exp(-z));

/** Mean binary cross-entropy, its gradient with respect to weight and bias, and accuracy. */
function lossAndGradient({ x, y }, params) {
  const gradWeight = new Float32Array(FEATURES);
  const gradBias = new Float32Array(1);
  let loss = 0;
  let correct = 0;
  for (let i = 0; i < SAMPLES; i++) {
    let z = params.bias[0];
    for (let j = 0; j < FEATURES; j++) z += params.weight[j] * x[i * FEATURES + j];
    const p = sigmoid(z);
    loss -= y[i] * Math.log(Math.max(p, 1e-12)) + (1 - y[i]) * Math.log(Math.max(1 - p, 1e-12));
    correct += (p > 0.5) === (y[i] === 1) ? 1 : 0;
    const error = (p - y[i]) / SAMPLES;
    for (let j = 0; j < FEATURES; j++) gradWeight[j] += error * x[i * FEATURES + j];
    gradBias[0] += error;
  }
  return { loss: loss / SAMPLES, accuracy: correct / SAMPLES, grads: { weight: gradWeight, bias: gradBias } };
}

async function main() {
  const data = makeData(generator(42));
  const client = new Client({ baseUrl: args.url, apiKey: args["api-key"] });
  const session = await client.createSession({
    optimizer: { name: "Adam", lr: 0.1 },
    schedule: { name: "StepLR", step_size: 50, gamma: 0.5 },
    params: { weight: { shape: [FEATURES] }, bias: { shape: [1] } },
    dtype: "float32",
    labels: { example: "logistic_regression" },
  });
  console.log(`session ${session.id}: Adam(lr=0.1) with StepLR(50, 0.5), ${STEPS} steps`);

  const params = { weight: new Float32Array(FEATURES), bias: new Float32Array(1) };
  const initial = lossAndGradient(data, params);
  let current = initial;
  try {
    for (let step = 1; step <= STEPS; step++) {
      const result = await session.step(current.grads);
      applyDeltas(params, result.deltas);
      current = lossAndGradient(data, params);
      if (step % 25 === 0 || step === 1) {
        const lr = result.lr[0].toExponential(2);
        console.log(`step ${String(step).padStart(4)}  loss ${current.loss.toFixed(4)}  accuracy ${current.accuracy.toFixed(3)}  lr ${lr}`);
      }
    }
    const document = await session.refresh();
    if (document.step !== STEPS) throw new Error(`server counted ${document.step} steps, expected ${STEPS}`);
  } finally {
    await session.delete();
  }

  console.log(`loss ${initial.loss.toFixed(4)} -> ${current.loss.toFixed(4)}, accuracy ${current.accuracy.toFixed(3)}`);
  console.log(`weight [${Array.from(params.weight, (w) => w.toFixed(2)).join(", ")}], bias ${params.bias[0].toFixed(2)}`);
  // The labels are noisy, so a perfect fit is impossible; these bounds still need learning.
  if (!(current.loss < 0.2 && current.accuracy > 0.93)) {
    console.error("FAILED: the model did not learn well enough");
    process.exit(1);
  }
  console.log("OK");
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
