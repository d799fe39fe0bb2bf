/** A small JSON-over-HTTP router: bearer-token or client-certificate auth, and one place that maps errors to statuses. */
import { timingSafeEqual } from "node:crypto";
import http from "node:http";
import { TLSSocket } from "node:tls";
import type { Logger } from "pino";
import { hasPki } from "../qemu/pki.js";
import { peerCertificate } from "./tls.js";
import { z } from "zod";
import { DomainStateError, MigrationError, NbdmigError, QmpError, UsageError } from "../errors.js";

export interface Request<B = Record<string, never>> {
  params: Record<string, string>;
  query: URLSearchParams;
  /** The body as its route's schema parsed it (defaults applied); `{}` for a route that takes none. */
  body: B;
}

export type Handler<B = Record<string, never>> = (req: Request<B>) => Promise<unknown> | unknown;

interface Route {
  method: string;
  pattern: RegExp;
  keys: string[];
  schema: z.ZodType;
  handler: Handler<unknown>;
}

/** A route without a body schema takes none: `{}` or nothing. */
const NO_BODY = z.strictObject({});

/** `cookie.disks[0].virtualSize: Invalid input: expected number, received string`, for a 400. */
export function describeIssues(err: z.ZodError): string {
  return err.issues
    .slice(0, 3)
    .map((i) => {
      const where = i.path.reduce<string>(
        (acc, k) => (typeof k === "number" ? `${acc}[${k}]` : acc ? `${acc}.${String(k)}` : String(k)),
        "",
      );
      return `${where || "body"}: ${i.message}`;
    })
    .join("; ");
}

const MAX_BODY = 8 * 1024 * 1024;

export class Router {
  private readonly routes: Route[] = [];

  /**
   * `path` may hold `:name` segments, e.g. `/v1/domains/:name/start`. The body is checked against `schema`
   * (none: the call takes no body) before the handler runs; a body that fails is a 400 naming the field.
   */
  add(method: string, path: string, handler: Handler): this;
  add<S extends z.ZodType>(method: string, path: string, schema: S, handler: Handler<z.output<S>>): this;
  add(method: string, path: string, a: z.ZodType | Handler, b?: Handler<never>): this {
    const [schema, handler] = typeof a === "function" ? [NO_BODY, a] : [a, b!];
    const keys: string[] = [];
    const re = path.replace(/:([a-z]+)/g, (_, k: string) => {
      keys.push(k);
      return "([^/]+)";
    });
    this.routes.push({
      method,
      pattern: new RegExp(`^${re}$`),
      keys,
      schema,
      handler: handler as Handler<unknown>,
    });
    return this;
  }

  /**
   * The API's request handling (the socket comes from agentListener). A call is authenticated by a client
   * certificate the CA signed or by the bearer token; while the host has certificates (`pkiDir`), a plain
   * call is refused with 426, before its token is looked at.
   */
  server(token: string, log: Logger, pkiDir: string): http.Server {
    const expected = Buffer.from(`Bearer ${token}`);
    return http.createServer((req, res) => {
      const started = Date.now();
      // A client certificate the CA signed (an agent calling as a migration peer) names the caller in the log.
      const peer = peerCertificate(req.socket);
      const send = (status: number, body: unknown) => {
        const data = JSON.stringify(body);
        res.writeHead(status, {
          "content-type": "application/json",
          "content-length": Buffer.byteLength(data),
        });
        res.end(data);
        log.debug(
          { method: req.method, url: req.url, status, caller: peer.caller, ms: Date.now() - started },
          "api",
        );
      };
      if (!(req.socket instanceof TLSSocket) && hasPki(pkiDir)) {
        log.warn(
          { method: req.method, url: req.url, from: req.socket.remoteAddress },
          "plain API call refused",
        );
        send(426, {
          error: {
            code: "E_TLS_REQUIRED",
            message: `this agent has certificates (${pkiDir}) and takes HTTPS only: call it from a host with certificates of the same CA (its STATE/pki, made with 'nbdmig tls-host')`,
          },
        });
        req.resume();
        return;
      }
      const auth = Buffer.from(req.headers.authorization ?? "");
      const tokenOk = auth.length === expected.length && timingSafeEqual(auth, expected);
      if (peer.caller === undefined && !tokenOk) {
        const refused = peer.refused ? `; its client certificate was refused: ${peer.refused}` : "";
        log.warn(
          { method: req.method, url: req.url, from: req.socket.remoteAddress, refused },
          "unauthenticated API call refused",
        );
        send(401, {
          error: {
            code: "E_AUTH",
            message: `missing or wrong bearer token (see --token-file)${refused}`,
          },
        });
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
      try {
        route.keys.forEach((k, i) => (params[k] = decodeURIComponent(match![i + 1]!)));
      } catch {
        send(400, { error: { code: "E_USAGE", message: `malformed %-escape in ${url.pathname}` } });
        req.resume();
        return;
      }
      const chunks: Buffer[] = [];
      let size = 0;
      req.on("data", (c: Buffer) => {
        size += c.length;
        if (size <= MAX_BODY) chunks.push(c);
        else chunks.length = 0; // the rest is read and dropped, so that the client gets its 413
      });
      req.on("end", () => {
        if (size > MAX_BODY) {
          const message = `request body of ${size} bytes is over the limit of ${MAX_BODY}`;
          send(413, { error: { code: "E_TOO_LARGE", message } });
          return;
        }
        let raw: unknown = {};
        try {
          if (chunks.length) raw = JSON.parse(Buffer.concat(chunks).toString("utf8"));
        } catch {
          send(400, { error: { code: "E_USAGE", message: "request body is not JSON" } });
          return;
        }
        const parsed = route.schema.safeParse(raw);
        if (!parsed.success) {
          const message = `${req.method} ${url.pathname}: ${describeIssues(parsed.error)}`;
          send(400, { error: { code: "E_BAD_BODY", message } });
          return;
        }
        const body = parsed.data;
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

/** Codes that say the thing named in the path does not exist here. */
const NOT_FOUND = new Set(["E_NO_DOMAIN", "E_NO_MIGRATION", "E_NO_PARTIAL"]);

export function errorToHttp(err: unknown): [number, Record<string, unknown>] {
  if (err instanceof NbdmigError) {
    const payload: Record<string, unknown> = { code: err.code, message: err.message, class: err.name };
    if (err instanceof MigrationError) {
      payload.phase = err.phase;
      payload.detail = err.detail;
    }
    if (err instanceof QmpError) payload.qmpClass = err.errorClass;
    if (NOT_FOUND.has(err.code)) return [404, payload];
    if (err instanceof UsageError) return [400, payload];
    if (err instanceof DomainStateError) return [409, payload];
    return [500, payload];
  }
  return [500, { code: "E_INTERNAL", message: (err as Error)?.message ?? String(err) }];
}
