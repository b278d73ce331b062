/**
 * A federated client of an optserve session: fetch the round's params (long poll), train,
 * submit. Every update carries an `Idempotency-Key`, a fresh one per update that its
 * retries reuse, so the server counts it once however often the network makes us send it.
 * FedProx clients read `round.proximalMu` and add `proximalGradient` to their gradient.
 */

import type { Client } from "./client.js";
import { SafetensorsError, decode, encode, type FloatArray, type TensorInput } from "./safetensors.js";
import { randomUUID } from "./uuid.js";
import { JSON_TYPE, SAFETENSORS_TYPE, parseJson } from "./wire.js";

/** The server's longest long poll, in seconds. */
export const MAX_WAIT_S = 60;

/** What a client trains from: the params of a round (async mode: of a version). */
export interface FederatedRound {
  /** The round; null in async mode. */
  number: number | null;
  /** The session's step: the `base_version` of an asynchronous update. */
  version: number;
  params: Record<string, FloatArray>;
  shapes: Record<string, number[]>;
  /** FedProx's mu: add mu/2 * ||w - params||^2 to the local loss (0: plain FedAvg). */
  proximalMu: number;
  /** `eta_l` of Flower's adaptive presets. */
  clientLr: number | null;
}

export interface SubmitOptions {
  /** The client's new values, or... */
  params?: Record<string, FloatArray>;
  /** ...their difference from the round's params. Exactly one of the two. */
  delta?: Record<string, FloatArray>;
  numExamples?: number;
  /** Default: a fresh random key. */
  idempotencyKey?: string;
  signal?: AbortSignal;
}

export type Trainer = (
  round: FederatedRound,
) => Promise<{ params: Record<string, FloatArray>; numExamples: number }> | {
  params: Record<string, FloatArray>;
  numExamples: number;
};

export class FederatedClient {
  constructor(
    private readonly client: Client,
    readonly sessionId: string,
    readonly clientId: string,
  ) {}

  private path(suffix: string): string {
    return `/v1/sessions/${encodeURIComponent(this.sessionId)}${suffix}`;
  }

  /** `GET .../round`: where aggregation stands. */
  async roundDocument(signal?: AbortSignal): Promise<Record<string, unknown>> {
    const response = await this.client.transport.request({
      method: "GET",
      path: this.path("/round"),
      accept: JSON_TYPE,
      idempotent: true,
      ...(signal ? { signal } : {}),
    });
    return parseJson(new TextDecoder().decode(response.body)) as Record<string, unknown>;
  }

  /**
   * The params to train from; with `after`, a long poll of up to `waitS` seconds for the
   * round (async: version) after it. Null when nothing newer came.
   */
  async fetch(options: { after?: number; waitS?: number; signal?: AbortSignal } = {}): Promise<FederatedRound | null> {
    const { after, waitS = 0, signal } = options;
    const query = after === undefined ? {} : { after, wait: Math.min(Math.max(waitS, 0), MAX_WAIT_S) };
    const response = await this.client.transport.request({
      method: "GET",
      path: this.path("/round/params"),
      query,
      accept: SAFETENSORS_TYPE,
      idempotent: true,
      ...(signal ? { signal } : {}),
    });
    if (response.status === 204) return null;
    const decoded = decode(response.body);
    const params: Record<string, FloatArray> = {};
    const shapes: Record<string, number[]> = {};
    for (const [name, tensor] of Object.entries(decoded.tensors)) {
      if (!(tensor.data instanceof Float32Array || tensor.data instanceof Float64Array)) {
        throw new SafetensorsError(`tensor "${name}" is ${tensor.dtype}, expected a float dtype`);
      }
      params[name] = tensor.data;
      shapes[name] = tensor.shape;
    }
    const document = await this.roundDocument(signal);
    const round = decoded.metadata["round"];
    return {
      number: round ? Number(round) : null,
      version: Number(decoded.metadata["version"]),
      params,
      shapes,
      proximalMu: typeof document["proximal_mu"] === "number" ? document["proximal_mu"] : 0,
      clientLr: typeof document["client_lr"] === "number" ? document["client_lr"] : null,
    };
  }

  /** The first round after `after` (null: the current one), polling until it opens. */
  async nextRound(after: number | null, timeoutMs = 600_000, signal?: AbortSignal): Promise<FederatedRound> {
    if (after === null) {
      const current = await this.fetch(signal ? { signal } : {});
      if (current === null) throw new Error("the server answered no params without 'after'");
      return current;
    }
    const giveUp = Date.now() + timeoutMs;
    for (let left = timeoutMs; left > 0; left = giveUp - Date.now()) {
      const fetched = await this.fetch({ after, waitS: Math.min(left / 1000, 30), ...(signal ? { signal } : {}) });
      if (fetched !== null) return fetched;
    }
    throw new Error(`no round after ${after} within ${timeoutMs} ms`);
  }

  /** Send an update for the round (async: version) `trainedFrom` came from. */
  async submit(trainedFrom: FederatedRound, options: SubmitOptions): Promise<Record<string, unknown>> {
    const { params, delta, numExamples, idempotencyKey, signal } = options;
    if ((params === undefined) === (delta === undefined)) {
      throw new TypeError("give exactly one of params and delta");
    }
    const form = params !== undefined ? "params" : "delta";
    const values = (params ?? delta) as Record<string, FloatArray>;
    const tensors: Record<string, TensorInput> = {};
    for (const [name, data] of Object.entries(values)) {
      tensors[`${form}/${name}`] = { data, shape: trainedFrom.shapes[name] ?? [data.length] };
    }
    const metadata: Record<string, string> = { client_id: this.clientId };
    if (trainedFrom.number !== null) metadata["round"] = String(trainedFrom.number);
    else metadata["base_version"] = String(trainedFrom.version);
    if (numExamples !== undefined) metadata["num_examples"] = String(numExamples);
    const response = await this.client.transport.request({
      method: "POST",
      path: this.path("/updates"),
      body: encode(tensors, metadata),
      contentType: SAFETENSORS_TYPE,
      accept: JSON_TYPE,
      headers: { "Idempotency-Key": idempotencyKey ?? randomUUID() },
      idempotent: true, // the key makes a repeat harmless
      ...(signal ? { signal } : {}),
    });
    return parseJson(new TextDecoder().decode(response.body)) as Record<string, unknown>;
  }

  /** Take part in `rounds` consecutive rounds from the current one; the replies. */
  async run(train: Trainer, rounds: number, timeoutMs = 600_000): Promise<Record<string, unknown>[]> {
    const replies: Record<string, unknown>[] = [];
    let after: number | null = null;
    for (let i = 0; i < rounds; i++) {
      const current = await this.nextRound(after, timeoutMs);
      const trained = await train(current);
      replies.push(await this.submit(current, { params: trained.params, numExamples: trained.numExamples }));
      after = current.number ?? current.version;
    }
    return replies;
  }
}

/** FedProx's mu/2 * ||w - w_global||^2 over all tensors (Li et al., 2020). */
export function proximalTerm(
  params: Record<string, ArrayLike<number>>,
  globalParams: Record<string, ArrayLike<number>>,
  mu: number,
): number {
  let total = 0;
  for (const [name, global] of Object.entries(globalParams)) {
    const local = params[name];
    if (local === undefined) throw new TypeError(`params lack "${name}"`);
    for (let i = 0; i < global.length; i++) {
      const d = (local[i] as number) - (global[i] as number);
      total += d * d;
    }
  }
  return 0.5 * mu * total;
}

/** The gradient of `proximalTerm`: mu * (w - w_global), per tensor, in the params' type. */
export function proximalGradient(
  params: Record<string, FloatArray>,
  globalParams: Record<string, ArrayLike<number>>,
  mu: number,
): Record<string, FloatArray> {
  const out: Record<string, FloatArray> = {};
  for (const [name, local] of Object.entries(params)) {
    const global = globalParams[name];
    if (global === undefined) throw new TypeError(`global params lack "${name}"`);
    const grad = local instanceof Float32Array ? new Float32Array(local.length) : new Float64Array(local.length);
    for (let i = 0; i < local.length; i++) grad[i] = mu * ((local[i] as number) - (global[i] as number));
    out[name] = grad;
  }
  return out;
}
