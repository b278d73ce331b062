/**
 * HTTP with retries. One place decides what may be sent twice:
 *
 * - a request marked `idempotent` (GET, DELETE, a step carrying an Idempotency-Key, a pure
 *   computation like preview, a group edit that sets values) is retried on network errors,
 *   timeouts and 5xx;
 * - any request is retried when the server says it did not act on it: 429, 503, or the
 *   connection was refused before anything was sent;
 * - a request with an Idempotency-Key is retried on the 409 that means "the first attempt
 *   with this key is still in flight", with the same key, so the retry gets its stored
 *   response instead of a second application.
 *
 * Backoff is exponential with jitter, and a server's Retry-After wins when it sends one.
 * Only web-standard APIs are used (fetch, AbortController, Headers), so this runs in Node 18+
 * and browsers alike.
 */

import { ConnectionError, OptserveError, TimeoutError, errorFor, parseProblem } from "./errors.js";

export type FetchLike = (input: string, init: RequestInit) => Promise<Response>;

export interface TransportOptions {
  /** Server root, e.g. "http://127.0.0.1:8000" (the /v1 prefix is added per request). */
  baseUrl: string;
  /** Sent as `Authorization: Bearer <apiKey>`; leave out for a server running open. */
  apiKey?: string;
  /** Extra attempts after the first; 0 disables retrying. Default 3. */
  retries?: number;
  /** Per-attempt limit, covering the response body too. Default 60 000 ms. */
  timeoutMs?: number;
  /** First backoff delay; doubles each retry (with jitter). Default 200 ms. */
  backoffMs?: number;
  /** Upper bound on one backoff delay, Retry-After included. Default 10 000 ms. */
  maxBackoffMs?: number;
  /** A fetch implementation; the global one by default. */
  fetch?: FetchLike;
  /** Headers added to every request. */
  headers?: Record<string, string>;
  /** Called before each retry, e.g. for logging. */
  onRetry?: (event: RetryEvent) => void;
}

export interface RetryEvent {
  method: string;
  url: string;
  /** The attempt that failed, 1 for the first. */
  attempt: number;
  delayMs: number;
  error: OptserveError;
}

export interface HttpRequest {
  method: "GET" | "POST" | "DELETE" | "PUT" | "PATCH";
  path: string;
  query?: Record<string, string | number | undefined>;
  body?: Uint8Array<ArrayBuffer> | string;
  contentType?: string;
  accept?: string;
  headers?: Record<string, string>;
  /** Safe to send more than once (see the module comment). */
  idempotent: boolean;
  /** Return a 404 answer instead of throwing it (the caller decides what it means). */
  accept404?: boolean;
  signal?: AbortSignal;
}

export interface HttpResponse {
  status: number;
  headers: Headers;
  body: Uint8Array;
  contentType: string | null;
  /** How many attempts it took (1 when the first one succeeded). */
  attempts: number;
}

export class Transport {
  readonly baseUrl: string;
  private readonly apiKey: string | undefined;
  private readonly retries: number;
  private readonly timeoutMs: number;
  private readonly backoffMs: number;
  private readonly maxBackoffMs: number;
  private readonly fetchImpl: FetchLike;
  private readonly extraHeaders: Record<string, string>;
  private readonly onRetry: ((event: RetryEvent) => void) | undefined;

  constructor(options: TransportOptions) {
    if (!options.baseUrl) throw new TypeError("baseUrl is required");
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.apiKey = options.apiKey;
    this.retries = nonNegative("retries", options.retries ?? 3);
    this.timeoutMs = nonNegative("timeoutMs", options.timeoutMs ?? 60_000);
    this.backoffMs = nonNegative("backoffMs", options.backoffMs ?? 200);
    this.maxBackoffMs = nonNegative("maxBackoffMs", options.maxBackoffMs ?? 10_000);
    const fetchImpl = options.fetch ?? (globalThis.fetch as FetchLike | undefined);
    if (typeof fetchImpl !== "function") {
      throw new TypeError("no fetch available: pass one as the `fetch` option");
    }
    this.fetchImpl = options.fetch ?? ((input, init) => globalThis.fetch(input, init));
    this.extraHeaders = { ...options.headers };
    this.onRetry = options.onRetry;
  }

  url(path: string, query?: HttpRequest["query"]): string {
    let url = this.baseUrl + path;
    const pairs = Object.entries(query ?? {}).filter(([, value]) => value !== undefined);
    if (pairs.length > 0) {
      url += "?" + pairs.map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`).join("&");
    }
    return url;
  }

  /** Send a request, retrying per the policy above; a non-2xx final answer is thrown. */
  async request(request: HttpRequest): Promise<HttpResponse> {
    const url = this.url(request.path, request.query);
    const headers: Record<string, string> = { ...this.extraHeaders, ...request.headers };
    if (this.apiKey !== undefined) headers["Authorization"] = `Bearer ${this.apiKey}`;
    if (request.contentType !== undefined) headers["Content-Type"] = request.contentType;
    if (request.accept !== undefined) headers["Accept"] = request.accept;
    const hasIdempotencyKey = Object.keys(headers).some((h) => h.toLowerCase() === "idempotency-key");

    for (let attempt = 1; ; attempt++) {
      let failure: OptserveError;
      let retryable: boolean;
      let retryAfterMs: number | undefined;
      try {
        const response = await this.attempt(url, request, headers);
        if (response.status >= 200 && response.status < 300) return { ...response, attempts: attempt };
        if (response.status === 404 && request.accept404) return { ...response, attempts: attempt };
        failure = errorFromResponse(response);
        retryable = this.retryableStatus(failure, request.idempotent, hasIdempotencyKey);
        retryAfterMs = parseRetryAfter(response.headers.get("retry-after"));
      } catch (error) {
        if (request.signal?.aborted) throw request.signal.reason ?? error;
        if (!(error instanceof ConnectionError)) throw error;
        failure = error;
        retryable = request.idempotent || neverSent(error);
      }
      if (!retryable || attempt > this.retries) throw failure;
      const delayMs = this.delay(attempt, retryAfterMs);
      this.onRetry?.({ method: request.method, url, attempt, delayMs, error: failure });
      await sleep(delayMs, request.signal);
    }
  }

  private async attempt(
    url: string,
    request: HttpRequest,
    headers: Record<string, string>,
  ): Promise<Omit<HttpResponse, "attempts">> {
    const controller = new AbortController();
    let timedOut = false;
    const timer = setTimeout(() => {
      timedOut = true;
      controller.abort();
    }, this.timeoutMs);
    const forwardAbort = (): void => controller.abort(request.signal?.reason);
    request.signal?.addEventListener("abort", forwardAbort, { once: true });
    if (request.signal?.aborted) forwardAbort();
    try {
      const init: RequestInit = { method: request.method, headers, signal: controller.signal };
      if (request.body !== undefined) init.body = request.body;
      const response = await this.fetchImpl(url, init);
      const body = new Uint8Array(await response.arrayBuffer());
      return {
        status: response.status,
        headers: response.headers,
        body,
        contentType: response.headers.get("content-type"),
      };
    } catch (error) {
      if (timedOut) {
        throw new TimeoutError({
          status: 0,
          message: `${request.method} ${url}: no response within ${this.timeoutMs} ms`,
          cause: error,
        });
      }
      if (request.signal?.aborted) throw error;
      throw new ConnectionError({
        status: 0,
        message: `${request.method} ${url}: ${describeNetworkError(error)}`,
        cause: error,
      });
    } finally {
      clearTimeout(timer);
      request.signal?.removeEventListener("abort", forwardAbort);
    }
  }

  private retryableStatus(error: OptserveError, idempotent: boolean, keyed: boolean): boolean {
    // A damaged session stays damaged until an operator repairs it: waiting cannot help.
    if (isDamaged(error)) return false;
    if (error.status === 429 || error.status === 503) return true;
    if (error.status >= 500) return idempotent;
    if (error.status === 409) return keyed && isInFlight(error);
    return false;
  }

  private delay(attempt: number, retryAfterMs: number | undefined): number {
    if (retryAfterMs !== undefined) return Math.min(retryAfterMs, this.maxBackoffMs);
    const exponential = Math.min(this.backoffMs * 2 ** (attempt - 1), this.maxBackoffMs);
    return Math.round(exponential * (0.5 + Math.random() * 0.5));
  }
}

/** The typed error for a non-2xx response. */
export function errorFromResponse(response: Omit<HttpResponse, "attempts">): OptserveError {
  return errorFor({
    status: response.status,
    problem: parseProblem(response.body, response.contentType),
    headers: response.headers,
  });
}

/**
 * The 409 that a retry can wait out: the first request with this idempotency key is still
 * being processed. An expired key is also a 409, but retrying that one cannot succeed.
 */
export function isInFlight(error: OptserveError): boolean {
  if (/(^|\/)step-in-flight$/.test(error.type)) return true;
  // A problem with a type of its own is something else (expired key, params not held, ...);
  // an untyped one (a proxy, an older server) is judged by its words.
  if (error.type !== "about:blank") return false;
  return /in[-_ ]?flight|in[-_ ]progress/i.test(`${error.title} ${error.detail}`);
}

/** 503 session-damaged: the session's stored history does not read back (docs/storage.md). */
export function isDamaged(error: OptserveError): boolean {
  return /(^|\/)session-damaged$/.test(error.type);
}

/** A refused connection never reached the server, so even a non-idempotent request is safe. */
function neverSent(error: ConnectionError): boolean {
  return errorCode(error.cause) === "ECONNREFUSED";
}

function errorCode(error: unknown): string | undefined {
  let current: unknown = error;
  for (let depth = 0; depth < 4 && typeof current === "object" && current !== null; depth++) {
    const code = (current as { code?: unknown }).code;
    if (typeof code === "string") return code;
    current = (current as { cause?: unknown }).cause;
  }
  return undefined;
}

function describeNetworkError(error: unknown): string {
  const code = errorCode(error);
  const message = error instanceof Error ? error.message : String(error);
  return code !== undefined ? `${message} (${code})` : message;
}

function parseRetryAfter(value: string | null): number | undefined {
  if (value === null) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(signal.reason);
    const onAbort = (): void => {
      clearTimeout(timer);
      reject(signal?.reason);
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

function nonNegative(name: string, value: number): number {
  if (!Number.isFinite(value) || value < 0) {
    throw new RangeError(`${name} must be a non-negative number, got ${value}`);
  }
  return value;
}
