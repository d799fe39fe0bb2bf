/** Client of an agent's HTTP API, used by the CLI and by one agent calling its migration peer. */
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import path from "node:path";
import { AgentError, MigrationError, NbdmigError, UsageError, type MigrationPhase } from "../errors.js";
import { DEFAULT_STATE_DIR } from "./state-dir.js";
import { agentClientTls, explainTlsFailure, requestTlsOptions, type AgentTls } from "./tls.js";

export interface AgentAddress {
  host: string;
  port: number;
}

/** Accepts `nbdmig://HOST:PORT`, `HOST:PORT`, or `[IPv6]:PORT`. */
export function parseAgentUri(uri: string, allowPortZero = false): AgentAddress {
  const m = /^(?:nbdmig:\/\/)?(\[[^\]]+\]|[^:/[\]]+):(\d{1,5})\/?$/.exec(uri);
  const port = m ? Number(m[2]) : -1;
  if (!m || port < (allowPortZero ? 0 : 1) || port > 65535) {
    throw new UsageError(
      `'${uri}' is not an agent URI; use nbdmig://HOST:PORT (for example nbdmig://198.18.0.2:7800)`,
      "E_BAD_URI",
    );
  }
  return { host: m[1]!.replace(/^\[|\]$/g, ""), port };
}

export function formatAgentUri(a: AgentAddress): string {
  return `nbdmig://${a.host.includes(":") ? `[${a.host}]` : a.host}:${a.port}`;
}

export interface LocalAgentInfo {
  listen: AgentAddress;
  stateDir: string;
}

export function stateDirFromEnv(): string {
  return process.env.NBDMIG_STATE_DIR ?? DEFAULT_STATE_DIR;
}

/** The local agent's address, as the daemon recorded it in its state dir. */
export function localAgent(stateDir = stateDirFromEnv()): AgentAddress {
  try {
    const j = JSON.parse(fs.readFileSync(path.join(stateDir, "agent.json"), "utf8")) as {
      listen: AgentAddress;
    };
    return j.listen;
  } catch {
    throw new UsageError(
      `no local agent found in ${stateDir} (agent.json missing); start one with 'nbdmig daemon', or pass -c nbdmig://HOST:PORT`,
      "E_NO_AGENT",
    );
  }
}

export function readToken(file: string): string {
  try {
    return fs.readFileSync(file, "utf8").trim();
  } catch (err) {
    throw new UsageError(
      `cannot read the API token from ${file}: ${(err as NodeJS.ErrnoException).code}; pass --token-file FILE`,
      "E_NO_TOKEN",
    );
  }
}

/**
 * An agent's API. With `tls` (this host has certificates) it speaks HTTPS, presenting this host's client
 * certificate; `token` may then be absent (a peer call: the certificate authenticates it).
 */
export class AgentClient {
  constructor(
    readonly address: AgentAddress,
    private readonly token: string | undefined,
    private readonly timeoutMs = 120_000,
    private readonly tls?: AgentTls,
  ) {}

  get uri(): string {
    return formatAgentUri(this.address);
  }

  async call<T = Record<string, unknown>>(
    method: string,
    path: string,
    body?: unknown,
    timeoutMs = this.timeoutMs,
  ): Promise<T> {
    let res: { status: number; text: string };
    try {
      res = await httpJson(this.address, method, path, this.token, body, timeoutMs, this.tls);
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      const tlsWhy = this.tls && explainTlsFailure(e, this.uri, this.tls);
      if (tlsWhy) throw new AgentError("E_TLS", tlsWhy);
      throw new AgentError(
        "E_AGENT_UNREACHABLE",
        `cannot reach the agent at ${this.uri}: ${e.code ?? e.message}; is 'nbdmig daemon' running there?`,
      );
    }
    const text = res.text;
    let json: Record<string, unknown>;
    try {
      json = text ? (JSON.parse(text) as Record<string, unknown>) : {};
    } catch {
      throw new AgentError(
        "E_AGENT_PROTOCOL",
        `agent at ${this.uri} answered ${res.status} with non-JSON`,
        res.status,
      );
    }
    const ok = res.status >= 200 && res.status < 300;
    if (!ok) {
      const e = (json.error ?? {}) as {
        code?: string;
        message?: string;
        phase?: MigrationPhase;
        detail?: string;
      };
      const message = e.message ?? `HTTP ${res.status}`;
      if (e.phase) throw new MigrationError(e.phase, e.detail ?? message, e.code);
      if (res.status === 400) throw new UsageError(message, e.code ?? "E_USAGE");
      throw new AgentError(e.code ?? "E_AGENT", message, res.status);
    }
    return json as T;
  }
}

/**
 * A client for the migration peer at `address`. With certificates here the call goes over HTTPS and the
 * client certificate authenticates it: this host's own token is never sent (only a token given for the
 * peer); without them, the peer's token or, in a cluster that shares one, this host's.
 */
export function peerClient(
  address: AgentAddress,
  pkiDir: string,
  peerToken: string | undefined,
  ownToken: string,
  timeoutMs: number,
): AgentClient {
  const tls = agentClientTls(pkiDir);
  return new AgentClient(address, tls ? peerToken : (peerToken ?? ownToken), timeoutMs, tls);
}

export function isNbdmigError(err: unknown): err is NbdmigError {
  return err instanceof NbdmigError;
}

/** One HTTP request with a JSON body; node:http rather than fetch, which refuses some ports (6000, 2049...). */
function httpJson(
  address: AgentAddress,
  method: string,
  path: string,
  token: string | undefined,
  body: unknown,
  timeoutMs: number,
  tls: AgentTls | undefined,
): Promise<{ status: number; text: string }> {
  const data = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = (tls ? https : http).request(
      {
        host: address.host,
        port: address.port,
        method,
        path,
        ...(tls ? requestTlsOptions(tls) : {}),
        headers: {
          ...(token !== undefined ? { authorization: `Bearer ${token}` } : {}),
          "content-type": "application/json",
          ...(data !== undefined ? { "content-length": Buffer.byteLength(data) } : {}),
        },
        timeout: timeoutMs,
        // A connection per call: a kept-alive socket that the agent closes after its idle timeout fails the
        // next call that picks it up with ECONNRESET (seen here: a test's call 5 s after the previous one).
        agent: false,
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString("utf8") }),
        );
        res.on("error", reject);
      },
    );
    req.on("timeout", () =>
      req.destroy(Object.assign(new Error(`no answer within ${timeoutMs} ms`), { code: "ETIMEDOUT" })),
    );
    req.on("error", reject);
    req.end(data);
  });
}
