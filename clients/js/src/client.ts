/** The entry point: one Client per server (and API key). */

import { encode, type TensorInput } from "./safetensors.js";
import { checkUploadDtype, Session } from "./session.js";
import { Transport, type TransportOptions } from "./transport.js";
import type {
  CatalogEntry,
  ListOptions,
  PreviewRequest,
  SessionConfig,
  SessionDocument,
  TensorSpec,
  UploadDtype,
  WireFormat,
} from "./types.js";
import { JSON_TYPE, SAFETENSORS_TYPE, numbersFrom, parseJson, toJson, toTypedArray } from "./wire.js";

/** The transport's options (server, key, retries, timeouts, fetch) and the default format. */
export interface ClientOptions extends TransportOptions {
  /** How tensors travel by default. Default "safetensors". */
  format?: WireFormat;
  /**
   * Round step gradients to this dtype for the upload (half a float32 body). The server
   * widens them to the session's dtype, so a step equals torch's step on
   * `grad.to(dtype).to(float32)`, not on `grad`. Needs the safetensors format.
   */
  uploadDtype?: UploadDtype;
}

export interface CreateOptions {
  /**
   * How initial parameter values travel: "safetensors" (the default when any tensor has
   * `data`) sends them as a safetensors body with the config in its metadata; "json" inline.
   */
  format?: WireFormat;
  signal?: AbortSignal;
}

export interface SessionPage {
  sessions: Session[];
  /** Cursor for the next page (pass as `after`), or null on the last page. */
  next: string | null;
}

export class Client {
  readonly transport: Transport;
  readonly format: WireFormat;
  readonly uploadDtype: UploadDtype | undefined;

  constructor(options: ClientOptions) {
    this.format = options.format ?? "safetensors";
    this.uploadDtype = checkUploadDtype(options.uploadDtype, this.format);
    this.transport = new Transport(options);
  }

  private session(document: SessionDocument): Session {
    const context = { transport: this.transport, format: this.format, uploadDtype: this.uploadDtype };
    return new Session(context, document);
  }

  /** `POST /v1/sessions`: a new session with the optimizer, schedule and tensors given. */
  async createSession(config: SessionConfig, options: CreateOptions = {}): Promise<Session> {
    const specs = Object.entries(config.params ?? {});
    const withData = specs.filter(([, spec]) => spec.data !== undefined);
    const format = options.format ?? (withData.length > 0 ? "safetensors" : "json");
    let body: Uint8Array<ArrayBuffer> | string;
    let contentType: string;
    if (format === "safetensors" && withData.length > 0) {
      const dtype = config.dtype ?? "float32";
      const tensors: Record<string, TensorInput> = {};
      const params: Record<string, TensorSpec> = {};
      for (const [name, spec] of specs) {
        params[name] = { shape: spec.shape };
        if (spec.data !== undefined) {
          tensors[name] = { data: toTypedArray(spec.data, dtype), shape: spec.shape };
        }
      }
      body = encode(tensors, { session: toJson({ ...config, params }) });
      contentType = SAFETENSORS_TYPE;
    } else {
      body = toJson(config);
      contentType = JSON_TYPE;
    }
    return this.session(
      await this.json<SessionDocument>({
        method: "POST",
        path: "/v1/sessions",
        body,
        contentType,
        idempotent: false,
        signal: options.signal,
      }),
    );
  }

  /** Post a checkpoint from `session.state()` back: a new session that continues exactly. */
  async restoreSession(checkpoint: Uint8Array, options: { signal?: AbortSignal } = {}): Promise<Session> {
    return this.session(
      await this.json<SessionDocument>({
        method: "POST",
        path: "/v1/sessions",
        body: new Uint8Array(checkpoint),
        contentType: SAFETENSORS_TYPE,
        idempotent: false,
        signal: options.signal,
      }),
    );
  }

  /** `GET /v1/sessions/{id}`. */
  async getSession(id: string, options: { signal?: AbortSignal } = {}): Promise<Session> {
    return this.session(
      await this.json<SessionDocument>({
        method: "GET",
        path: `/v1/sessions/${encodeURIComponent(id)}`,
        idempotent: true,
        signal: options.signal,
      }),
    );
  }

  /** One page of this tenant's sessions. */
  async listSessions(options: ListOptions = {}): Promise<SessionPage> {
    const page = await this.json<Record<string, unknown> | SessionDocument[]>({
      method: "GET",
      path: "/v1/sessions",
      query: { limit: options.limit, after: options.after },
      idempotent: true,
      signal: options.signal,
    });
    const items = Array.isArray(page) ? page : firstArray(page, ["sessions", "items", "data"]);
    const next = Array.isArray(page) ? null : firstString(page, ["next", "next_cursor", "cursor"]);
    return { sessions: items.map((document) => this.session(document as SessionDocument)), next };
  }

  /** Every session of this tenant, fetching pages as the iteration goes. */
  async *sessions(options: ListOptions = {}): AsyncGenerator<Session, void, undefined> {
    let after = options.after;
    for (;;) {
      const page = await this.listSessions({ ...options, after });
      yield* page.sessions;
      if (page.next === null || page.sessions.length === 0) return;
      after = page.next;
    }
  }

  /** `GET /v1/optimizers`: every optimizer with its arguments, types and defaults. */
  async optimizers(options: { signal?: AbortSignal } = {}): Promise<CatalogEntry[]> {
    return this.catalog("/v1/optimizers", "optimizers", options.signal);
  }

  /** `GET /v1/schedules`: every schedule with its arguments, types and defaults. */
  async schedules(options: { signal?: AbortSignal } = {}): Promise<CatalogEntry[]> {
    return this.catalog("/v1/schedules", "schedules", options.signal);
  }

  /** The learning rate per step (outer) per parameter group (inner) a schedule would give. */
  async preview(request: PreviewRequest, options: { signal?: AbortSignal } = {}): Promise<number[][]> {
    const answer = await this.json<Record<string, unknown> | number[][]>({
      method: "POST",
      path: "/v1/schedules/preview",
      body: toJson(request),
      contentType: JSON_TYPE,
      idempotent: true, // a pure computation: sending it twice changes nothing
      signal: options.signal,
    });
    const lrs = Array.isArray(answer) ? answer : (firstArray(answer, ["lr", "lrs", "preview"]) as unknown[]);
    return lrs.map(numbersFrom);
  }

  /** `GET /healthz`: true when the server answers. */
  async health(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    return this.probe("/healthz", options.signal);
  }

  /** `GET /readyz`: true when the server's store is reachable. */
  async ready(options: { signal?: AbortSignal } = {}): Promise<boolean> {
    return this.probe("/readyz", options.signal);
  }

  private async probe(path: string, signal: AbortSignal | undefined): Promise<boolean> {
    try {
      await this.transport.request({ method: "GET", path, idempotent: true, ...(signal ? { signal } : {}) });
      return true;
    } catch (error) {
      if (signal?.aborted) throw error;
      return false;
    }
  }

  private async catalog(path: string, key: string, signal: AbortSignal | undefined): Promise<CatalogEntry[]> {
    const answer = await this.json<Record<string, unknown> | CatalogEntry[]>({
      method: "GET",
      path,
      idempotent: true,
      signal,
    });
    if (Array.isArray(answer)) return answer;
    const listed = answer[key];
    if (Array.isArray(listed)) return listed as CatalogEntry[];
    // A mapping name -> description.
    const source = typeof listed === "object" && listed !== null ? (listed as Record<string, unknown>) : answer;
    return Object.entries(source).map(([name, entry]) => ({ ...(entry as object), name }));
  }

  private async json<T>(request: {
    method: "GET" | "POST";
    path: string;
    body?: Uint8Array<ArrayBuffer> | string;
    contentType?: string;
    query?: Record<string, string | number | undefined>;
    idempotent: boolean;
    signal: AbortSignal | undefined;
  }): Promise<T> {
    const { signal, ...rest } = request;
    const response = await this.transport.request({
      ...rest,
      accept: JSON_TYPE,
      ...(signal ? { signal } : {}),
    });
    return parseJson(new TextDecoder().decode(response.body)) as T;
  }
}

function firstArray(object: Record<string, unknown>, keys: string[]): unknown[] {
  for (const key of keys) {
    const value = object[key];
    if (Array.isArray(value)) return value;
  }
  return [];
}

function firstString(object: Record<string, unknown>, keys: string[]): string | null {
  for (const key of keys) {
    const value = object[key];
    if (typeof value === "string" && value.length > 0) return value;
  }
  return null;
}
