/** A handle on one server-side optimizer session. */

import { encode, type FloatArray, type TensorInput } from "./safetensors.js";
import { errorFromResponse, type Transport } from "./transport.js";
import type {
  SessionDocument,
  StepOptions,
  StepResult,
  Values,
  WireFormat,
} from "./types.js";
import { randomUUID } from "./uuid.js";
import {
  JSON_TYPE,
  SAFETENSORS_TYPE,
  decodeFloatTensors,
  isSafetensors,
  numbersFrom,
  parseJson,
  shapeFor,
  toJson,
  toTypedArray,
} from "./wire.js";

/** Tensors named `params/<name>` in a step body or response are parameter values. */
const PARAMS_PREFIX = "params/";

export interface SessionContext {
  transport: Transport;
  format: WireFormat;
}

export class Session {
  /** The latest session document seen (from create, get, refresh or scheduleStep). */
  document: SessionDocument;
  /** The session's step as of the last response seen by this object. */
  currentStep: number;
  /** The learning rate of each group as of the last response. */
  lr: number[];
  private readonly context: SessionContext;

  constructor(context: SessionContext, document: SessionDocument) {
    this.context = context;
    this.document = document;
    this.currentStep = document.step;
    this.lr = numbersFrom(document.lr);
  }

  get id(): string {
    return this.document.id;
  }

  get dtype(): "float32" | "float64" {
    return this.document.dtype === "float64" ? "float64" : "float32";
  }

  get holdsParams(): boolean {
    return this.document.holds_params === true;
  }

  /** Tensor name -> shape. */
  get shapes(): Record<string, number[]> {
    const shapes: Record<string, number[]> = {};
    for (const [name, spec] of Object.entries(this.document.tensors ?? {})) shapes[name] = spec.shape;
    return shapes;
  }

  /** ETag-style precondition for the step this object last saw. */
  get etag(): string {
    return `"${this.currentStep}"`;
  }

  private get path(): string {
    return `/v1/sessions/${encodeURIComponent(this.id)}`;
  }

  /**
   * Send one step's gradients; returns the deltas (or new params) as typed arrays of the
   * session's dtype. A session with a single tensor also takes a bare typed array.
   *
   * The request carries an Idempotency-Key, reused by every automatic retry of this call, so
   * a retry after a lost response gets the stored answer and the step applies exactly once.
   */
  async step(grads: Record<string, FloatArray> | FloatArray, options: StepOptions = {}): Promise<StepResult> {
    const named = this.nameGrads(grads);
    const format = options.format ?? this.context.format;
    const returnMode = options.return ?? "delta";
    const idempotencyKey = options.idempotencyKey ?? randomUUID();
    const headers: Record<string, string> = { "Idempotency-Key": idempotencyKey };
    if (options.ifMatch !== undefined && options.ifMatch !== false) {
      headers["If-Match"] = `"${options.ifMatch === true ? this.currentStep : options.ifMatch}"`;
    }

    const shapes = this.shapes;
    let body: Uint8Array<ArrayBuffer> | string;
    if (format === "safetensors") {
      const tensors: Record<string, TensorInput> = {};
      for (const [name, data] of Object.entries(named)) {
        tensors[name] = { data, shape: shapeFor(shapes[name], data.length) };
      }
      for (const [name, data] of Object.entries(options.params ?? {})) {
        tensors[PARAMS_PREFIX + name] = { data, shape: shapeFor(shapes[name], data.length) };
      }
      const metadata: Record<string, string> = {};
      if (options.loss !== undefined) metadata["loss"] = String(options.loss);
      body = encode(tensors, metadata);
    } else {
      body = toJson({ grads: named, params: options.params, loss: options.loss });
    }

    const response = await this.context.transport.request({
      method: "POST",
      path: `${this.path}/step`,
      query: { return: returnMode },
      body,
      contentType: format === "safetensors" ? SAFETENSORS_TYPE : JSON_TYPE,
      accept: format === "safetensors" ? SAFETENSORS_TYPE : JSON_TYPE,
      headers,
      idempotent: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });

    const result = this.parseStep(response.body, response.contentType, returnMode);
    const replayedHeader = response.headers.get("idempotent-replayed") ?? response.headers.get("x-idempotent-replayed");
    return {
      ...result,
      replayed: result.replayed || replayedHeader === "true",
      idempotencyKey,
      attempts: response.attempts,
    };
  }

  private nameGrads(grads: Record<string, FloatArray> | FloatArray): Record<string, FloatArray> {
    if (!ArrayBuffer.isView(grads)) return grads;
    const names = Object.keys(this.document.tensors ?? {});
    if (names.length !== 1) {
      throw new TypeError(
        `a bare gradient array needs a session with one tensor; this one has ${names.length}`,
      );
    }
    return { [names[0] as string]: grads };
  }

  private parseStep(
    body: Uint8Array,
    contentType: string | null,
    returnMode: string,
  ): Omit<StepResult, "idempotencyKey" | "attempts"> {
    let step: number;
    let lr: number[];
    let applied: boolean;
    let evaluate: boolean;
    let skipped: string | null;
    let replayed: boolean;
    let deltas: Record<string, FloatArray> | null = null;
    let params: Record<string, FloatArray> | null = null;

    if (isSafetensors(contentType)) {
      const { tensors, metadata } = decodeFloatTensors(body);
      step = Number(metadata["step"]);
      lr = metadata["lr"] !== undefined ? numbersFrom(parseJson(metadata["lr"])) : [];
      applied = metadata["applied"] !== "false";
      evaluate = metadata["evaluate"] === "true";
      skipped = metadata["skipped"] ?? null;
      replayed = metadata["replayed"] === "true";
      for (const [name, data] of Object.entries(tensors)) {
        if (name.startsWith(PARAMS_PREFIX)) {
          (params ??= {})[name.slice(PARAMS_PREFIX.length)] = data;
        } else if (returnMode === "params") {
          (params ??= {})[name] = data;
        } else {
          (deltas ??= {})[name] = data;
        }
      }
      if (returnMode === "delta" && deltas === null && Object.keys(this.shapes).length === 0) deltas = {};
    } else {
      const json = parseJson(new TextDecoder().decode(body)) as Record<string, unknown>;
      step = Number(json["step"]);
      lr = numbersFrom(json["lr"]);
      applied = json["applied"] !== false;
      evaluate = json["evaluate"] === true;
      skipped = typeof json["skipped"] === "string" ? json["skipped"] : null;
      replayed = json["replayed"] === true;
      deltas = this.typed(json["deltas"]);
      params = this.typed(json["params"]);
    }
    if (Number.isFinite(step)) this.currentStep = step;
    if (lr.length > 0) this.lr = lr;
    return { step, lr, applied, evaluate, skipped, replayed, deltas, params };
  }

  private typed(values: unknown): Record<string, FloatArray> | null {
    if (typeof values !== "object" || values === null) return null;
    const out: Record<string, FloatArray> = {};
    for (const [name, value] of Object.entries(values as Record<string, Values>)) {
      out[name] = toTypedArray(value, this.dtype);
    }
    return out;
  }

  /** The parameters a session holds (`GET .../params`). */
  async params(options: { format?: WireFormat; signal?: AbortSignal } = {}): Promise<Record<string, FloatArray>> {
    const format = options.format ?? this.context.format;
    const response = await this.context.transport.request({
      method: "GET",
      path: `${this.path}/params`,
      accept: format === "safetensors" ? SAFETENSORS_TYPE : JSON_TYPE,
      idempotent: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (isSafetensors(response.contentType)) return decodeFloatTensors(response.body).tensors;
    const json = parseJson(new TextDecoder().decode(response.body)) as Record<string, unknown>;
    // Either {name: values} or wrapped as {"params": {name: values}}.
    const inner = typeof json["params"] === "object" && json["params"] !== null ? json["params"] : json;
    return this.typed(inner) ?? {};
  }

  /**
   * The session's full checkpoint as safetensors bytes (config, step, schedule position,
   * optimizer state, params if held). `client.restoreSession(bytes)` continues it exactly.
   */
  async state(options: { signal?: AbortSignal } = {}): Promise<Uint8Array> {
    const response = await this.context.transport.request({
      method: "GET",
      path: `${this.path}/state`,
      accept: SAFETENSORS_TYPE,
      idempotent: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    return response.body;
  }

  /** Advance a manual schedule; ReduceLROnPlateau needs the metric. */
  async scheduleStep(metric?: number, options: { signal?: AbortSignal } = {}): Promise<SessionDocument> {
    const response = await this.context.transport.request({
      method: "POST",
      path: `${this.path}/schedule/step`,
      body: toJson(metric === undefined ? {} : { metric }),
      contentType: JSON_TYPE,
      accept: JSON_TYPE,
      idempotent: false,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    return this.adopt(response.body);
  }

  /** Re-read the session document. */
  async refresh(options: { signal?: AbortSignal } = {}): Promise<SessionDocument> {
    const response = await this.context.transport.request({
      method: "GET",
      path: this.path,
      accept: JSON_TYPE,
      idempotent: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    return this.adopt(response.body);
  }

  /**
   * Delete the session. When an earlier attempt of this call may have deleted it already
   * (its response was lost and the call retried), the retry's 404 counts as success.
   */
  async delete(options: { signal?: AbortSignal } = {}): Promise<void> {
    const response = await this.context.transport.request({
      method: "DELETE",
      path: this.path,
      idempotent: true,
      accept404: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (response.status === 404 && response.attempts === 1) throw errorFromResponse(response);
  }

  private adopt(body: Uint8Array): SessionDocument {
    const document = parseJson(new TextDecoder().decode(body)) as SessionDocument;
    this.document = document;
    this.currentStep = document.step;
    this.lr = numbersFrom(document.lr);
    return document;
  }
}
