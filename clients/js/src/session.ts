/** A handle on one server-side optimizer session. */

import { encode, type DType, type FloatArray, type TensorInput } from "./safetensors.js";
import { errorFromResponse, type Transport } from "./transport.js";
import type {
  AddGroupOptions,
  Change,
  GroupEditOptions,
  SessionDocument,
  StepHistory,
  StepMetrics,
  StepOptions,
  StepRecord,
  StepResult,
  TensorSpec,
  UploadDtype,
  Values,
  WireFormat,
} from "./types.js";
import { randomUUID } from "./uuid.js";
import {
  JSON_TYPE,
  SAFETENSORS_TYPE,
  decodeFloatTensors,
  isSafetensors,
  numberFrom,
  numbersFrom,
  parseJson,
  shapeFor,
  toJson,
  toTypedArray,
} from "./wire.js";

/** Tensors named `params/<name>` in a step body or response are parameter values. */
const PARAMS_PREFIX = "params/";
/** The most change-log entries one page may hold (the server's limit). */
const CHANGES_PAGE = 1000;

export interface SessionContext {
  transport: Transport;
  format: WireFormat;
  uploadDtype?: UploadDtype | undefined;
}

const UPLOAD_WIRE_DTYPE: Record<UploadDtype, DType> = { bfloat16: "BF16", float16: "F16" };

/** `uploadDtype` as given, refused where it cannot apply (JSON bodies are decimal text). */
export function checkUploadDtype(uploadDtype: UploadDtype | undefined, format: WireFormat): UploadDtype | undefined {
  if (uploadDtype !== undefined && !(uploadDtype in UPLOAD_WIRE_DTYPE)) {
    throw new TypeError(`uploadDtype must be "bfloat16" or "float16", got ${JSON.stringify(uploadDtype)}`);
  }
  if (uploadDtype !== undefined && format !== "safetensors") {
    throw new TypeError("uploadDtype needs the safetensors format (JSON sends decimal text)");
  }
  return uploadDtype;
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

  /** Whether a step may leave tensors out (the session's `missing_grads: "skip"`). */
  get skipsMissing(): boolean {
    return this.document.missing_grads === "skip";
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
   * A session created with `missing_grads: "skip"` takes any subset of its tensors (those
   * left out are skipped, as torch skips a parameter whose grad is null) and answers with
   * deltas for the sent ones only; any other session needs every tensor, and a missing one
   * is refused here, before anything is sent.
   *
   * The request carries an Idempotency-Key, reused by every automatic retry of this call, so
   * a retry after a lost response gets the stored answer and the step applies exactly once.
   */
  async step(grads: Record<string, FloatArray> | FloatArray, options: StepOptions = {}): Promise<StepResult> {
    const named = this.nameGrads(grads);
    this.checkComplete(named);
    const format = options.format ?? this.context.format;
    const returnMode = options.return ?? "delta";
    const idempotencyKey = options.idempotencyKey ?? randomUUID();
    const headers: Record<string, string> = { "Idempotency-Key": idempotencyKey, ...this.precondition(options.ifMatch) };

    const shapes = this.shapes;
    const uploadDtype = checkUploadDtype(this.context.uploadDtype, format);
    let body: Uint8Array<ArrayBuffer> | string;
    if (format === "safetensors") {
      const tensors: Record<string, TensorInput> = {};
      for (const [name, data] of Object.entries(named)) {
        const shape = shapeFor(shapes[name], data.length);
        // The gradients only: parameter values are never rounded.
        tensors[name] = uploadDtype === undefined ? { data, shape } : { data, shape, dtype: UPLOAD_WIRE_DTYPE[uploadDtype] };
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

  /** The `If-Match` header for a step number, or for the step last seen (`true`). */
  private precondition(ifMatch: number | boolean | undefined): Record<string, string> {
    if (ifMatch === undefined || ifMatch === false) return {};
    return { "If-Match": `"${ifMatch === true ? this.currentStep : ifMatch}"` };
  }

  /** A session that does not skip missing gradients needs one for each of its tensors. */
  private checkComplete(named: Record<string, FloatArray>): void {
    if (this.skipsMissing) return;
    const missing = Object.keys(this.document.tensors ?? {}).filter((name) => !(name in named));
    if (missing.length === 0) return;
    throw new TypeError(
      `no gradient for ${missing.map((name) => JSON.stringify(name)).join(", ")}: session ${this.id} ` +
        `has missing_grads "${this.document.missing_grads ?? "error"}", so each step sends every tensor; ` +
        `create it with missing_grads: "skip" to leave tensors out as torch skips a parameter whose grad is null`,
    );
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
    let metrics: StepMetrics | null;
    let accumulated: number | null;
    let of: number | null;
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
      metrics = metadata["metrics"] !== undefined ? metricsFrom(parseJson(metadata["metrics"])) : null;
      accumulated = metadata["accumulated"] !== undefined ? Number(metadata["accumulated"]) : null;
      of = metadata["of"] !== undefined ? Number(metadata["of"]) : null;
      for (const [name, data] of Object.entries(tensors)) {
        if (name.startsWith(PARAMS_PREFIX)) {
          (params ??= {})[name.slice(PARAMS_PREFIX.length)] = data;
        } else if (returnMode === "params") {
          (params ??= {})[name] = data;
        } else {
          (deltas ??= {})[name] = data;
        }
      }
      // A delta reply always names its tensors; with none sent (a partial step) it names none.
      if (returnMode === "delta" && deltas === null) deltas = {};
    } else {
      const json = parseJson(new TextDecoder().decode(body)) as Record<string, unknown>;
      step = Number(json["step"]);
      lr = numbersFrom(json["lr"]);
      applied = json["applied"] !== false;
      evaluate = json["evaluate"] === true;
      skipped = typeof json["skipped"] === "string" ? json["skipped"] : null;
      replayed = json["replayed"] === true;
      metrics = metricsFrom(json["metrics"]);
      accumulated = typeof json["accumulated"] === "number" ? json["accumulated"] : null;
      of = typeof json["of"] === "number" ? json["of"] : null;
      deltas = this.typed(json["deltas"]);
      params = this.typed(json["params"]);
    }
    if (Number.isFinite(step)) this.currentStep = step;
    if (lr.length > 0) this.lr = lr;
    return { step, lr, applied, evaluate, skipped, replayed, metrics, accumulated, of, deltas, params };
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
  async params(
    options: { format?: WireFormat; average?: boolean; signal?: AbortSignal } = {},
  ): Promise<Record<string, FloatArray>> {
    const format = options.format ?? this.context.format;
    const response = await this.context.transport.request({
      method: "GET",
      path: `${this.path}/params`,
      ...(options.average ? { query: { average: "true" } } : {}),
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

  /**
   * Set hyperparameters of `param_groups[index]` from the next step on, as torch's
   * `optimizer.param_groups[index][key] = value` does (a running schedule continues from
   * the edited value). Recorded in `changes()`; returns the new session document.
   * Setting the same values twice is the same as once, so this call is retried like a GET.
   */
  async editGroup(index: number, values: Record<string, unknown>, options: GroupEditOptions = {}): Promise<SessionDocument> {
    if (!Number.isInteger(index) || index < 0) {
      throw new TypeError(`a param group index is a non-negative integer, got ${String(index)}`);
    }
    const response = await this.context.transport.request({
      method: "PATCH",
      path: `${this.path}/param_groups/${index}`,
      body: toJson({ ...values, reason: options.reason }),
      contentType: JSON_TYPE,
      accept: JSON_TYPE,
      headers: this.precondition(options.ifMatch),
      idempotent: true,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    return this.adopt(response.body);
  }

  /**
   * Add tensors as a new last param group, as torch's `add_param_group` does: `params` maps
   * each new name to its shape and, for a session that holds its parameters, its initial
   * `data` (as createSession takes them); `groupOptions` are the group's own hyperparameters
   * (the optimizer's are the default). Returns the new session document, whose `tensors`
   * and `param_groups` include the added ones. Not retried once it may have been sent.
   */
  async addGroup(
    params: Record<string, TensorSpec>,
    groupOptions: Record<string, unknown> = {},
    options: AddGroupOptions = {},
  ): Promise<SessionDocument> {
    if ("params" in groupOptions || "reason" in groupOptions) {
      throw new TypeError("pass the tensors as addGroup's first argument and the reason in its last");
    }
    const specs = Object.entries(params);
    const withoutData = specs.filter(([, spec]) => spec.data === undefined).map(([name]) => name);
    if (this.holdsParams && withoutData.length > 0) {
      throw new TypeError(
        `session ${this.id} holds its parameters: give the added tensors their initial data (missing for ${withoutData.join(", ")})`,
      );
    }
    if (!this.holdsParams && withoutData.length < specs.length) {
      throw new TypeError(`session ${this.id} does not hold its parameters: add tensors with a shape and no data`);
    }
    const tensors: Record<string, { shape: number[]; data?: FloatArray }> = {};
    for (const [name, spec] of specs) {
      tensors[name] = spec.data === undefined ? { shape: spec.shape } : { shape: spec.shape, data: toTypedArray(spec.data, this.dtype) };
    }
    const response = await this.context.transport.request({
      method: "POST",
      path: `${this.path}/param_groups`,
      body: toJson({ ...groupOptions, params: tensors, reason: options.reason }),
      contentType: JSON_TYPE,
      accept: JSON_TYPE,
      headers: this.precondition(options.ifMatch),
      idempotent: false,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    return this.adopt(response.body);
  }

  /** The whole change log, oldest first: every group edit (one entry per field) and added group. */
  async changes(options: { signal?: AbortSignal } = {}): Promise<Change[]> {
    const entries: Change[] = [];
    let after: number | undefined;
    for (;;) {
      const response = await this.context.transport.request({
        method: "GET",
        path: `${this.path}/changes`,
        query: { limit: CHANGES_PAGE, after },
        accept: JSON_TYPE,
        idempotent: true,
        ...(options.signal ? { signal: options.signal } : {}),
      });
      const page = parseJson(new TextDecoder().decode(response.body)) as { changes?: Change[]; next?: number | null };
      entries.push(...(page.changes ?? []));
      if (typeof page.next !== "number") return entries;
      after = page.next;
    }
  }

  /** The step history, oldest first, as far back as the server's retention keeps it. */
  async steps(options: { signal?: AbortSignal } = {}): Promise<StepRecord[]> {
    const records: StepRecord[] = [];
    let after: number | undefined;
    for (;;) {
      const response = await this.context.transport.request({
        method: "GET",
        path: `${this.path}/steps`,
        query: { limit: CHANGES_PAGE, after },
        accept: JSON_TYPE,
        idempotent: true,
        ...(options.signal ? { signal: options.signal } : {}),
      });
      const page = parseJson(new TextDecoder().decode(response.body)) as {
        steps?: Record<string, unknown>[];
        next?: number | null;
      };
      for (const raw of page.steps ?? []) records.push(recordFrom(raw));
      if (typeof page.next !== "number") return records;
      after = page.next;
    }
  }

  /** {@link steps} as columns of arrays (see `StepHistory`), ready to plot. */
  async stepHistory(options: { signal?: AbortSignal } = {}): Promise<StepHistory> {
    return historyColumns(await this.steps(options));
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

function metricsFrom(value: unknown): StepMetrics | null {
  if (value === null || typeof value !== "object") return null;
  const out: Record<string, number> = {};
  for (const [key, raw] of Object.entries(value as Record<string, unknown>)) out[key] = numberFrom(raw);
  return out as unknown as StepMetrics;
}

function recordFrom(raw: Record<string, unknown>): StepRecord {
  return {
    seq: Number(raw["seq"]),
    step: Number(raw["step"]),
    time: String(raw["time"]),
    lr: numbersFrom(raw["lr"]),
    applied: raw["applied"] === true,
    skipped: typeof raw["skipped"] === "string" ? raw["skipped"] : null,
    metrics: metricsFrom(raw["metrics"]),
  };
}

/** Records as columns; `lr` has one array per group (as many as the widest record has). */
export function historyColumns(records: StepRecord[]): StepHistory {
  const groups = Math.max(0, ...records.map((r) => r.lr.length));
  const metric = (name: keyof StepMetrics): (number | null)[] =>
    records.map((r) => (r.metrics && r.metrics[name] !== undefined ? (r.metrics[name] as number) : null));
  return {
    seq: records.map((r) => r.seq),
    step: records.map((r) => r.step),
    time: records.map((r) => r.time),
    applied: records.map((r) => r.applied),
    skipped: records.map((r) => r.skipped),
    lr: Array.from({ length: groups }, (_, g) => records.map((r) => r.lr[g] ?? Number.NaN)),
    grad_norm: metric("grad_norm"),
    update_norm: metric("update_norm"),
    param_norm: metric("param_norm"),
    loss: metric("loss"),
  };
}
