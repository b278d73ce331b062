/**
 * Every failure the client reports is an OptserveError. HTTP failures carry the server's
 * RFC 9457 problem document (type, title, status, detail, errors); the subclass says which
 * status family it belongs to, so callers can `catch` by class instead of comparing numbers.
 * Transport failures (no HTTP response at all) are ConnectionError, with status 0.
 *
 *   OptserveError
 *   ├── ConnectionError (status 0) ── TimeoutError
 *   ├── ClientError (4xx)
 *   │   ├── BadRequestError (400)          ├── PreconditionFailedError (412)
 *   │   ├── AuthenticationError (401)      ├── PayloadTooLargeError (413)
 *   │   ├── PermissionDeniedError (403)    ├── UnsupportedMediaTypeError (415)
 *   │   ├── NotFoundError (404)            ├── ValidationError (422)
 *   │   └── ConflictError (409)            └── RateLimitError (429)
 *   └── ServerError (5xx)
 */

/** One entry of a validation problem's `errors` list; `field` is a dotted path. */
export interface FieldError {
  field?: string;
  message?: string;
  [key: string]: unknown;
}

/** An RFC 9457 problem document as the server sends it. */
export interface Problem {
  type?: string;
  title?: string;
  status?: number;
  detail?: string;
  instance?: string;
  errors?: FieldError[];
  [key: string]: unknown;
}

export interface ErrorInit {
  status: number;
  problem?: Problem;
  headers?: Headers;
  cause?: unknown;
  message?: string;
}

export class OptserveError extends Error {
  /** The HTTP status, or 0 when no response arrived. */
  readonly status: number;
  /** A URI naming the kind of problem ("about:blank" when the server gave none). */
  readonly type: string;
  readonly title: string;
  readonly detail: string;
  /** Field-level validation errors, empty when the problem has none. */
  readonly errors: FieldError[];
  /** The whole problem document, including any extension members. */
  readonly problem: Problem;
  /** The response headers, when there was a response. */
  readonly headers: Headers | undefined;

  constructor(init: ErrorInit) {
    const problem = init.problem ?? {};
    const title = problem.title ?? defaultTitle(init.status);
    const detail = problem.detail ?? "";
    super(init.message ?? describe(init.status, title, detail, problem.errors), {
      cause: init.cause,
    });
    this.name = new.target.name;
    this.status = init.status;
    this.type = problem.type ?? "about:blank";
    this.title = title;
    this.detail = detail;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
    this.problem = problem;
    this.headers = init.headers;
  }
}

/** The request never got an HTTP response: refused, reset, DNS, aborted. */
export class ConnectionError extends OptserveError {}
/** No response within `timeoutMs`. */
export class TimeoutError extends ConnectionError {}

export class ClientError extends OptserveError {}
export class BadRequestError extends ClientError {}
export class AuthenticationError extends ClientError {}
export class PermissionDeniedError extends ClientError {}
export class NotFoundError extends ClientError {}
/** 409: a step with this session is in flight, or an idempotency key has expired. */
export class ConflictError extends ClientError {}
/** 412: `If-Match` named a step the session has moved past; `etag` is where it is now. */
export class PreconditionFailedError extends ClientError {
  get etag(): string | undefined {
    return this.headers?.get("etag") ?? undefined;
  }
  /** The session's current step, read from the ETag. */
  get currentStep(): number | undefined {
    const match = /^(?:W\/)?"?(\d+)"?$/.exec(this.etag ?? "");
    return match ? Number(match[1]) : undefined;
  }
}
export class PayloadTooLargeError extends ClientError {}
export class UnsupportedMediaTypeError extends ClientError {}
/** 422: a bad hyperparameter, shape, tensor name, non-finite value, reused key, ... */
export class ValidationError extends ClientError {}
export class RateLimitError extends ClientError {}
export class ServerError extends OptserveError {}

const BY_STATUS: Record<number, new (init: ErrorInit) => OptserveError> = {
  400: BadRequestError,
  401: AuthenticationError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  412: PreconditionFailedError,
  413: PayloadTooLargeError,
  415: UnsupportedMediaTypeError,
  422: ValidationError,
  429: RateLimitError,
};

/** The error class for an HTTP status. */
export function errorFor(init: ErrorInit): OptserveError {
  const specific = BY_STATUS[init.status];
  if (specific) return new specific(init);
  if (init.status >= 500) return new ServerError(init);
  if (init.status >= 400) return new ClientError(init);
  return new OptserveError(init);
}

/** Read a problem document out of a response body; anything else becomes its `detail`. */
export function parseProblem(body: Uint8Array, contentType: string | null): Problem {
  const text = new TextDecoder().decode(body);
  if (contentType !== null && /json/i.test(contentType)) {
    try {
      const parsed: unknown = JSON.parse(text);
      if (typeof parsed === "object" && parsed !== null && !Array.isArray(parsed)) {
        return parsed as Problem;
      }
    } catch {
      // fall through: a proxy's HTML or text error page is still worth showing
    }
  }
  return text.length > 0 ? { detail: text.slice(0, 2000) } : {};
}

function defaultTitle(status: number): string {
  if (status === 0) return "No response";
  return `HTTP ${status}`;
}

function describe(status: number, title: string, detail: string, errors?: FieldError[]): string {
  let message = status > 0 ? `${status} ${title}` : title;
  if (detail) message += `: ${detail}`;
  if (Array.isArray(errors) && errors.length > 0) {
    const fields = errors
      .map((e) => (e.field ? `${e.field}: ${e.message ?? ""}` : (e.message ?? "")))
      .filter((text) => text.length > 0);
    if (fields.length > 0) message += ` [${fields.join("; ")}]`;
  }
  return message;
}
