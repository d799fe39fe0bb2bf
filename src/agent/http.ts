/** A small JSON-over-HTTP router with bearer-token auth and one place that maps errors to statuses. */
import { timingSafeEqual } from "node:crypto";
import http from "node:http";
import type { Logger } from "pino";
import { DomainStateError, MigrationError, NbdmigError, QmpError, UsageError } from "../errors.js";

export interface Request {
  params: Record<string, string>;
  query: URLSearchParams;
  body: Record<string, unknown>;
}

export type Handler = (req: Request) => Promise<unknown> | unknown;

interface Route {
  method: string;
  pattern: RegExp;
  keys: string[];
  handler: Handler;
}

const MAX_BODY = 8 * 1024 * 1024;

export class Router {
  private readonly routes: Route[] = [];

  /** `path` may hold `:name` segments, e.g. `/v1/domains/:name/start`. */
  add(method: string, path: string, handler: Handler): this {
    const keys: string[] = [];
    const re = path.replace(/:([a-z]+)/g, (_, k: string) => {
      keys.push(k);
      return "([^/]+)";
    });
    this.routes.push({ method, pattern: new RegExp(`^${re}$`), keys, handler });
    return this;
  }

  server(token: string, log: Logger): http.Server {
    const expected = Buffer.from(`Bearer ${token}`);
    return http.createServer((req, res) => {
      const started = Date.now();
      const send = (status: number, body: unknown) => {
        const data = JSON.stringify(body);
        res.writeHead(status, {
          "content-type": "application/json",
          "content-length": Buffer.byteLength(data),
        });
        res.end(data);
        log.debug({ method: req.method, url: req.url, status, ms: Date.now() - started }, "api");
      };
      const auth = Buffer.from(req.headers.authorization ?? "");
      if (auth.length !== expected.length || !timingSafeEqual(auth, expected)) {
        log.warn(
          { method: req.method, url: req.url, from: req.socket.remoteAddress },
          "unauthenticated API call refused",
        );
        send(401, { error: { code: "E_AUTH", message: "missing or wrong bearer token (see --token-file)" } });
        req.resume();
        return;
      }
      const url = new URL(req.url ?? "/", "http://agent");
      let route: Route | undefined;
      let match: RegExpExecArray | null = null;
      for (const r of this.routes) {
        if (r.method !== req.method) continue;
        match = r.pattern.exec(url.pathname);
        if (match) {
          route = r;
          break;
        }
      }
      if (!route || !match) {
        send(404, { error: { code: "E_NO_ROUTE", message: `no API ${req.method} ${url.pathname}` } });
        req.resume();
        return;
      }
      const params: Record<string, string> = {};
      route.keys.forEach((k, i) => (params[k] = decodeURIComponent(match![i + 1]!)));
      const chunks: Buffer[] = [];
      let size = 0;
      req.on("data", (c: Buffer) => {
        size += c.length;
        if (size > MAX_BODY) req.destroy();
        else chunks.push(c);
      });
      req.on("end", () => {
        let body: Record<string, unknown> = {};
        try {
          if (chunks.length)
            body = JSON.parse(Buffer.concat(chunks).toString("utf8")) as Record<string, unknown>;
        } catch {
          send(400, { error: { code: "E_USAGE", message: "request body is not JSON" } });
          return;
        }
        Promise.resolve()
          .then(() => route.handler({ params, query: url.searchParams, body }))
          .then(
            (result) => send(200, result ?? {}),
            (err: unknown) => {
              const [status, payload] = errorToHttp(err);
              if (status >= 500) log.error({ url: req.url, err: (err as Error).stack }, "API call failed");
              send(status, { error: payload });
            },
          );
      });
    });
  }
}

export function errorToHttp(err: unknown): [number, Record<string, unknown>] {
  if (err instanceof NbdmigError) {
    const payload: Record<string, unknown> = { code: err.code, message: err.message, class: err.name };
    if (err instanceof MigrationError) {
      payload.phase = err.phase;
      payload.detail = err.detail;
    }
    if (err instanceof QmpError) payload.qmpClass = err.errorClass;
    if (err instanceof UsageError) return [400, payload];
    if (err instanceof DomainStateError) return [err.code === "E_NO_DOMAIN" ? 404 : 409, payload];
    return [500, payload];
  }
  return [500, { code: "E_INTERNAL", message: (err as Error)?.message ?? String(err) }];
}

/** Reads a string field of a request body, or fails with a usage error naming it. */
export function str(body: Record<string, unknown>, key: string): string {
  const v = body[key];
  if (typeof v !== "string" || v === "") throw new UsageError(`request needs a string '${key}'`);
  return v;
}
