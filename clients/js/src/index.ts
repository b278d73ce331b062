/**
 * optserve client: create optimizer sessions on an optserve server, send gradients, get
 * parameter deltas back as typed arrays. Zero dependencies; Node 18+ and browsers.
 */

export { Client, type ClientOptions, type CreateOptions, type SessionPage } from "./client.js";
export { Session } from "./session.js";
export {
  AuthenticationError,
  BadRequestError,
  ClientError,
  ConflictError,
  ConnectionError,
  NotFoundError,
  OptserveError,
  PayloadTooLargeError,
  PermissionDeniedError,
  PreconditionFailedError,
  RateLimitError,
  ServerError,
  TimeoutError,
  UnsupportedMediaTypeError,
  ValidationError,
  type FieldError,
  type Problem,
} from "./errors.js";
export {
  SafetensorsError,
  decode,
  encode,
  type DType,
  type DecodeOptions,
  type Decoded,
  type DecodedArray,
  type FloatArray,
  type Tensor,
  type TensorInput,
} from "./safetensors.js";
export type { FetchLike, RetryEvent } from "./transport.js";
export type * from "./types.js";
export { applyDeltas } from "./apply.js";
export { randomUUID } from "./uuid.js";
export {
  FederatedClient,
  proximalGradient,
  proximalTerm,
  type FederatedRound,
  type SubmitOptions,
  type Trainer,
} from "./federated.js";
