/**
 * A real optserve server for the live tests: `python -m service serve` from the repository
 * root, in-memory storage, on a free loopback port, stopped by PID.
 */

import { spawn, type ChildProcess } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";

export const REPO_ROOT = fileURLToPath(new URL("../../../../../", import.meta.url));
export const PYTHON = process.env["OPTSERVE_PYTHON"] ?? "python3";

export interface LiveServer {
  url: string;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = createServer();
    probe.once("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const address = probe.address();
      const port = typeof address === "object" && address !== null ? address.port : 0;
      probe.close(() => resolve(port));
    });
  });
}

export async function startServer(env: Record<string, string> = {}, timeoutMs = 90_000): Promise<LiveServer> {
  const port = await freePort();
  const url = `http://127.0.0.1:${port}`;
  let log = "";
  const child: ChildProcess = spawn(
    PYTHON,
    ["-m", "service", "serve", "--host", "127.0.0.1", "--port", String(port)],
    {
      cwd: REPO_ROOT,
      env: { ...process.env, OPTSERVE_STORAGE: "memory", OPTSERVE_LOG_LEVEL: "warning", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  const keep = (chunk: Buffer): void => {
    log = (log + chunk.toString()).slice(-4000);
  };
  child.stdout?.on("data", keep);
  child.stderr?.on("data", keep);
  let exited = false;
  const exit = new Promise<void>((resolve) =>
    child.once("exit", () => {
      exited = true;
      resolve();
    }),
  );

  const stop = async (): Promise<void> => {
    if (exited || child.pid === undefined) return;
    process.kill(child.pid, "SIGTERM");
    const killer = setTimeout(() => !exited && child.pid !== undefined && process.kill(child.pid, "SIGKILL"), 10_000);
    await exit;
    clearTimeout(killer);
  };

  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (exited) throw new Error(`the server exited before it was up:\n${log}`);
    try {
      const response = await fetch(`${url}/healthz`);
      if (response.ok) return { url, stop };
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  await stop();
  throw new Error(`the server did not answer /healthz within ${timeoutMs} ms:\n${log}`);
}
