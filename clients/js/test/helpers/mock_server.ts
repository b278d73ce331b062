/** A scripted HTTP server for the client's offline tests: each request takes the next handler. */

import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface Recorded {
  method: string;
  url: string;
  headers: IncomingMessage["headers"];
  body: Buffer;
}

export type Handler = (request: Recorded, response: ServerResponse) => void;

export class MockServer {
  readonly requests: Recorded[] = [];
  private readonly handlers: Handler[] = [];
  private server: Server | undefined;
  url = "";

  /** Queue handlers, one per expected request, in order. */
  queue(...handlers: Handler[]): this {
    this.handlers.push(...handlers);
    return this;
  }

  async start(): Promise<this> {
    this.server = createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (chunk: Buffer) => chunks.push(chunk));
      req.on("end", () => {
        const recorded = { method: req.method ?? "", url: req.url ?? "", headers: req.headers, body: Buffer.concat(chunks) };
        this.requests.push(recorded);
        const handler = this.handlers.shift();
        if (handler === undefined) {
          res.writeHead(599, { "content-type": "text/plain" }).end("no handler queued");
          return;
        }
        handler(recorded, res);
      });
    });
    await new Promise<void>((resolve) => this.server?.listen(0, "127.0.0.1", resolve));
    this.url = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server?.closeAllConnections();
    await new Promise<void>((resolve) => this.server?.close(() => resolve()));
  }
}

export function json(status: number, body: unknown, headers: Record<string, string> = {}): Handler {
  return (_request, response) => {
    response.writeHead(status, { "content-type": "application/json", ...headers }).end(JSON.stringify(body));
  };
}

export function problem(status: number, fields: Record<string, unknown>, headers: Record<string, string> = {}): Handler {
  return (_request, response) => {
    response
      .writeHead(status, { "content-type": "application/problem+json", ...headers })
      .end(JSON.stringify({ status, ...fields }));
  };
}

export function binary(status: number, body: Uint8Array, headers: Record<string, string> = {}): Handler {
  return (_request, response) => {
    response
      .writeHead(status, { "content-type": "application/vnd.optserve.safetensors", ...headers })
      .end(Buffer.from(body));
  };
}

/** Drop the connection without an answer, as a crash or a network fault would. */
export const hangUp: Handler = (_request, response) => {
  response.socket?.destroy();
};

/** Never answer (until the server stops). */
export const silence: Handler = () => {};

export function sessionDocument(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    id: "s-1",
    step: 0,
    lr: [0.01],
    optimizer: { name: "SGD", lr: 0.01 },
    schedule: null,
    param_groups: [],
    tensors: { w: { shape: [2, 2] }, b: { shape: [2] } },
    holds_params: false,
    dtype: "float32",
    ...overrides,
  };
}
