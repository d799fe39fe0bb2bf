/**
 * The NBD server: named exports over TCP or a Unix socket, optional (or required) TLS, bounded work per
 * connection, and a shutdown that lets requests in flight finish.
 */
import fs from "node:fs";
import net from "node:net";
import tls from "node:tls";
import { UsageError } from "../../errors.js";
import { DEFAULT_MAX_PAYLOAD } from "../protocol/constants.js";
import type { Backend } from "./backend.js";
import { BufferPool } from "./buffers.js";
import { ServerConnection } from "./connection.js";

export interface ExportSpec {
  name: string;
  description?: string;
  backend: Backend;
}

export interface TlsOptions {
  cert: string;
  key: string;
  /** CA to verify client certificates with; clients must then present one. */
  ca?: string;
  /** Refuse every option but STARTTLS until TLS is on (nbdkit --tls=require). */
  require: boolean;
}

export interface ServerOptions {
  exports: ExportSpec[];
  /** The export an empty name selects (default: the first). */
  defaultExport?: string;
  tls?: TlsOptions;
  /** Largest READ/WRITE payload accepted, advertised as the maximum block size. */
  maxPayload?: number;
  maxInFlight?: number;
  maxInFlightBytes?: number;
  log?: (line: string) => void;
}

export class NbdServer {
  readonly exports = new Map<string, ExportSpec>();
  readonly maxPayload: number;
  readonly maxInFlight: number;
  readonly maxInFlightBytes: number;
  readonly tls?: tls.SecureContext;
  readonly tlsRequired: boolean;
  private readonly conns = new Set<ServerConnection>();
  private readonly servers: net.Server[] = [];
  private readonly defaultName?: string;
  readonly log: (line: string) => void;
  /** Buffers for reads and write payloads, shared by every connection. */
  readonly buffers = new BufferPool();

  constructor(opts: ServerOptions) {
    if (opts.exports.length === 0) throw new UsageError("an NBD server needs at least one export");
    for (const e of opts.exports) {
      if (this.exports.has(e.name)) throw new UsageError(`export '${e.name}' is defined twice`);
      this.exports.set(e.name, e);
    }
    this.defaultName = opts.defaultExport ?? opts.exports[0]!.name;
    this.maxPayload = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
    this.maxInFlight = opts.maxInFlight ?? 64;
    this.maxInFlightBytes = opts.maxInFlightBytes ?? 64 * 1024 * 1024;
    this.log = opts.log ?? (() => undefined);
    if (opts.tls) {
      const read = (f: string, what: string) => {
        try {
          return fs.readFileSync(f);
        } catch (err) {
          throw new UsageError(`cannot read the TLS ${what} ${f}: ${(err as NodeJS.ErrnoException).code}`);
        }
      };
      this.tls = tls.createSecureContext({
        cert: read(opts.tls.cert, "certificate"),
        key: read(opts.tls.key, "key"),
        ca: opts.tls.ca ? read(opts.tls.ca, "CA") : undefined,
      });
      this.tlsRequired = opts.tls.require;
    } else this.tlsRequired = false;
  }

  findExport(name: string): ExportSpec | undefined {
    return (
      this.exports.get(name) ??
      (name === "" && this.defaultName ? this.exports.get(this.defaultName) : undefined)
    );
  }

  /** Listens on host:port (port 0 picks one) or a Unix socket path; resolves with the address. */
  async listen(
    where: { host?: string; port?: number } | { path: string },
  ): Promise<net.AddressInfo | string> {
    const srv = net.createServer({ noDelay: true }, (s) => this.conns.add(new ServerConnection(s, this)));
    this.servers.push(srv);
    await new Promise<void>((resolve, reject) => {
      srv.once("error", (err: NodeJS.ErrnoException) =>
        reject(new UsageError(`cannot listen: ${err.code ?? err.message}`, "E_LISTEN")),
      );
      if ("path" in where) {
        fs.rmSync(where.path, { force: true });
        srv.listen(where.path, () => resolve());
      } else srv.listen(where.port ?? 10809, where.host ?? "127.0.0.1", () => resolve());
    });
    const a = srv.address();
    return typeof a === "string" ? a : a!;
  }

  get connections(): number {
    return this.conns.size;
  }

  forget(c: ServerConnection): void {
    this.conns.delete(c);
  }

  /** Stops listening, lets requests in flight finish and flushes, then closes the backends. */
  async close(): Promise<void> {
    // net.Server.close() calls back only once every connection has ended, so stop accepting first, then
    // end the connections, then wait for both.
    const closed = Promise.all(this.servers.map((s) => new Promise((r) => s.close(r))));
    await Promise.race([
      Promise.all([...this.conns].map((c) => c.disconnect())),
      new Promise((r) => setTimeout(r, 10_000).unref()),
    ]);
    for (const c of this.conns) c.close();
    await closed;
    await Promise.all([...this.exports.values()].map((e) => e.backend.close().catch(() => undefined)));
  }
}
