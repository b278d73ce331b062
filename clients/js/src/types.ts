/** Shapes of what goes over the wire, as DESIGN.md §3 describes them. Keys are the server's. */

import type { FloatArray } from "./safetensors.js";

/** A tensor's values: a typed array, or plain numbers (flat or nested to the shape). */
export type Values = FloatArray | number[] | NestedNumbers;
export interface NestedNumbers extends Array<number | NestedNumbers> {}

/** How the server writes a non-finite float, and how a config may give one: JSON has no
 * token for infinity. `Infinity` as a number is accepted in requests too. */
export type NonFinite = "inf" | "-inf" | "nan";

/** An optimizer: torch's class name (any case) and torch's constructor arguments. */
export interface OptimizerConfig {
  name: string;
  [hyperparameter: string]: unknown;
}

/**
 * A schedule: a `torch.optim.lr_scheduler` class name and its constructor arguments, plus
 * `interval` ("step" or "manual") and `every`. SequentialLR and ChainedScheduler take
 * `schedulers: [...]`.
 */
export interface ScheduleConfig {
  name: string;
  interval?: "step" | "manual";
  every?: number;
  [argument: string]: unknown;
}

export interface TensorSpec {
  shape: number[];
  /** Initial values; if any tensor has them, all must, and the session holds the params. */
  data?: Values;
}

/**
 * A param group of a session config: its tensors and hyperparameter overrides, and
 * optionally its own optimizer (Muon for the 2-D weights, say, beside the session's AdamW).
 * The overrides apply on top of that optimizer's constructor arguments; without one the
 * group belongs to the session's `optimizer`.
 */
export interface ParamGroupConfig {
  params: string[];
  optimizer?: OptimizerConfig;
  [override: string]: unknown;
}

/** A param group as the session document shows it: every hyperparameter's current value,
 * and the class name of the optimizer that steps it. */
export interface ParamGroupState {
  params: string[];
  optimizer: string;
  [hyperparameter: string]: unknown;
}

/** The body of `POST /v1/sessions`. */
export interface SessionConfig {
  optimizer: OptimizerConfig;
  schedule?: ScheduleConfig | null;
  params: Record<string, TensorSpec>;
  param_groups?: ParamGroupConfig[];
  dtype?: "float32" | "float64";
  /** `norm_type` "inf" (or Infinity) is the max norm; the document echoes it as "inf". */
  clip_grad_norm?: { max_norm: number | NonFinite; norm_type?: number | NonFinite } | null;
  clip_grad_value?: { clip_value: number } | number | null;
  nonfinite?: "error" | "skip";
  /**
   * "error" (the default): every step sends every tensor, so a typo cannot silently freeze
   * one. "skip": a step may leave tensors out, as torch skips a parameter whose `grad` is
   * null (their state does not move).
   */
  missing_grads?: MissingGrads;
  /** Every `steps`-th step post applies one step to the mean ("mean") or sum of the posts. */
  accumulate?: { steps: number; reduction?: "mean" | "sum" } | null;
  /** Averaged weights of held params, read with `session.params({ average: true })`. */
  averaging?: { kind: "ema"; decay?: number } | { kind: "swa"; start?: number; every?: number } | null;
  labels?: Record<string, string>;
  [key: string]: unknown;
}

export type MissingGrads = "error" | "skip";

/** The session document the server returns (unknown extra members are kept). */
export interface SessionDocument {
  id: string;
  step: number;
  /** The current learning rate of each parameter group. */
  lr: number[];
  optimizer: OptimizerConfig;
  schedule?: ScheduleConfig | null;
  param_groups?: ParamGroupState[];
  tensors: Record<string, { shape: number[] }>;
  holds_params: boolean;
  dtype: "float32" | "float64";
  nonfinite?: "error" | "skip";
  missing_grads?: MissingGrads;
  clip_grad_norm?: unknown;
  clip_grad_value?: unknown;
  skipped_steps?: number;
  /** Micro-batches in the running sum of an accumulation (0 without one). */
  accumulated?: number;
  created_at?: string;
  updated_at?: string;
  labels?: Record<string, string>;
  [key: string]: unknown;
}

/** How tensors travel: safetensors (binary, exact, compact; the default) or JSON. */
export type WireFormat = "safetensors" | "json";

/** A narrower dtype step gradients are rounded to for the upload (`ClientOptions.uploadDtype`). */
export type UploadDtype = "bfloat16" | "float16";

/** What a step returns besides its metadata. */
export type ReturnMode = "delta" | "params" | "none";

export interface StepOptions {
  /** Parameter values, for sessions that do not hold them and need them (weight decay). */
  params?: Record<string, FloatArray>;
  /** The loss at the current params (LBFGS uses it). */
  loss?: number;
  format?: WireFormat;
  /** "delta" (default): new - old per tensor; "params": the new values; "none": nothing. */
  return?: ReturnMode;
  /**
   * Only apply if the session is at this step (sent as If-Match); `true` means the step
   * this Session object last saw. A mismatch throws PreconditionFailedError.
   */
  ifMatch?: number | boolean;
  /** Defaults to a fresh random UUID per call; reused across this call's retries. */
  idempotencyKey?: string;
  signal?: AbortSignal;
}

export interface StepResult {
  /** The session's step after this request. */
  step: number;
  lr: number[];
  /** False when a non-finite gradient was skipped (nonfinite: "skip"). */
  applied: boolean;
  /** LBFGS ask/tell: the server wants the loss and gradient at `params` next. */
  evaluate: boolean;
  /** Why the step was skipped, when it was. */
  skipped: string | null;
  /** True when the server answered from its idempotency record (nothing applied again). */
  replayed: boolean;
  /** An applied step's norms (grad_norm before clipping, update_norm, param_norm) and loss. */
  metrics: StepMetrics | null;
  /** With `accumulate`: micro-batches in the session's running sum after this post. */
  accumulated: number | null;
  /** With `accumulate`: micro-batches per optimizer step. */
  of: number | null;
  /**
   * new - old per tensor (return "delta"): the tensors the step sent (a partial step names
   * only those; LBFGS moves every tensor, so it names all).
   */
  deltas: Record<string, FloatArray> | null;
  /** New values (return "params"), or the point to evaluate next (LBFGS ask/tell). */
  params: Record<string, FloatArray> | null;
  idempotencyKey: string;
  /** HTTP attempts used, retries included. */
  attempts: number;
}

/** Options of `session.editGroup(index, values, options)`. */
export interface GroupEditOptions {
  /** Recorded with the change in the log (`session.changes()`). */
  reason?: string;
  /** As for a step: only apply at this step (`true`: the step this Session object last saw). */
  ifMatch?: number | boolean;
  signal?: AbortSignal;
}

/** Options of `session.addGroup(params, groupOptions, options)`. */
export interface AddGroupOptions {
  /** Recorded with the change in the log (`session.changes()`). */
  reason?: string;
  /** As for a step: only apply at this step (`true`: the step this Session object last saw). */
  ifMatch?: number | boolean;
  signal?: AbortSignal;
}

/**
 * One entry of a session's change log: a hyperparameter edit (one entry per field) or an
 * added group (`field` "params", `new` the added tensor names, `old` null).
 */
export interface Change {
  /** The event that made the change; entries of one edit share it. */
  seq: number;
  /** The session's step when the change was made; it applies from the next step on. */
  step: number;
  group: number;
  field: string;
  old: unknown;
  new: unknown;
  /** RFC 3339, UTC. */
  time: string;
  reason: string | null;
}

/** An applied step's metrics; `param_norm` when params are held or sent, `loss` when sent. */
export interface StepMetrics {
  grad_norm: number;
  update_norm: number;
  param_norm?: number;
  loss?: number;
}

/** One record of the step history (`GET .../steps`): an optimizer step, applied or skipped. */
export interface StepRecord {
  /** The event of the step; pages are keyed by it. */
  seq: number;
  /** The session's step after it. */
  step: number;
  /** RFC 3339, UTC. */
  time: string;
  /** The learning rate per group the step used. */
  lr: number[];
  applied: boolean;
  skipped: string | null;
  metrics: StepMetrics | null;
}

/**
 * The step history as columns, one array per field, index i being the i-th record (for
 * plotting). `lr[g]` is group g's learning rate per record; a metric a record lacks is null.
 */
export interface StepHistory {
  seq: number[];
  step: number[];
  time: string[];
  applied: boolean[];
  skipped: (string | null)[];
  lr: number[][];
  grad_norm: (number | null)[];
  update_norm: (number | null)[];
  param_norm: (number | null)[];
  loss: (number | null)[];
}

export interface ListOptions {
  limit?: number;
  after?: string;
  signal?: AbortSignal;
}

export interface PreviewRequest {
  optimizer: OptimizerConfig;
  schedule?: ScheduleConfig | null;
  steps: number;
  param_groups?: ParamGroupConfig[];
}

/** A catalog entry from `GET /v1/optimizers` or `GET /v1/schedules`. */
export interface CatalogEntry {
  name: string;
  [key: string]: unknown;
}
