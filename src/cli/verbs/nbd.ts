/**
 * `nbdmig nbd serve|info|copy`: our NBD server, client and copy engine, with the flags users of nbdkit,
 * nbdinfo and nbdcopy expect.
 */
import fs from "node:fs";
import path from "node:path";
import type { Command } from "commander";
import { UsageError } from "../../errors.js";
import { NbdClient } from "../../nbd/client/client.js";
import { copy } from "../../nbd/client/copy.js";
import { parseNbdUri } from "../../nbd/client/uri.js";
import { BASE_ALLOCATION, NbdErrno, STATE_HOLE, STATE_ZERO, TF } from "../../nbd/protocol/constants.js";
import type { Backend, Filter } from "../../nbd/server/backend.js";
import { FileBackend } from "../../nbd/server/backends/file.js";
import { MemoryBackend } from "../../nbd/server/backends/memory.js";
import {
  delay,
  errorInjection,
  rateLimit,
  readOnly,
  requestLog,
  type Operation,
} from "../../nbd/server/filters.js";
import { NbdServer, type ExportSpec } from "../../nbd/server/server.js";
import { formatBytes } from "../../util/format.js";
import { out } from "../context.js";

/** "64M", "1G", "512" -> bytes. */
export function parseSize(s: string, what: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGTP]?)(i?B)?$/i.exec(s.trim());
  if (!m) throw new UsageError(`${what}: '${s}' is not a size (e.g. 512, 64K, 1G)`);
  const mult = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40, P: 2 ** 50 }[m[2]!.toUpperCase()]!;
  return Math.round(Number(m[1]) * mult);
}

const CAN: Record<string, number> = {
  flush: TF.SEND_FLUSH,
  fua: TF.SEND_FUA,
  trim: TF.SEND_TRIM,
  zero: TF.SEND_WRITE_ZEROES,
  "fast-zero": TF.SEND_FAST_ZERO,
  df: TF.SEND_DF,
  "multi-conn": TF.CAN_MULTI_CONN,
  cache: TF.SEND_CACHE,
};
const IS: Record<string, number> = { "read-only": TF.READ_ONLY, rotational: TF.ROTATIONAL };
const ERRNOS = Object.keys(NbdErrno).join(", ");

function flagsInfo(c: NbdClient): Record<string, boolean> {
  const o: Record<string, boolean> = {};
  for (const [k, v] of Object.entries(IS)) o[`is_${k.replace("-", "_")}`] = c.can(v);
  for (const [k, v] of Object.entries(CAN)) o[`can_${k.replace("-", "_")}`] = c.can(v);
  return o;
}

async function describeExport(uri: string): Promise<Record<string, unknown>> {
  const c = await NbdClient.connect(uri);
  try {
    return {
      export: c.exportName,
      description: c.description,
      size: c.size,
      tls: c.tlsActive,
      structured_replies: c.structured,
      contexts: [...c.contexts.keys()],
      ...flagsInfo(c),
      block_size_minimum: c.blockSize?.minimum,
      block_size_preferred: c.blockSize?.preferred,
      block_size_maximum: c.blockSize?.maximum,
    };
  } finally {
    await c.disconnect();
  }
}

function exportUri(base: string, name: string): string {
  const u = parseNbdUri(base);
  const scheme = `nbd${u.tls ? "s" : ""}${"path" in u.transport ? "+unix" : ""}`;
  const tail = "path" in u.transport ? `?socket=${encodeURIComponent(u.transport.path)}` : "";
  const host =
    "host" in u.transport
      ? `${u.transport.host.includes(":") ? `[${u.transport.host}]` : u.transport.host}:${u.transport.port}`
      : "";
  return `${scheme}://${host}/${encodeURIComponent(name)}${tail}`;
}

export function register(program: Command): void {
  const nbd = program
    .command("nbd")
    .description("NBD server, client and copy (nbdkit / nbdinfo / nbdcopy style)");

  nbd
    .command("serve")
    .description("serve files, block devices or RAM disks over NBD until interrupted")
    .argument(
      "<export...>",
      "[NAME=]FILE, or [NAME=]memory:SIZE (a sparse RAM disk); the first is the default export",
    )
    .option("-i, --ipaddr <addr>", "listen address", "127.0.0.1")
    .option("-p, --port <port>", "TCP port", "10809")
    .option("-U, --unix <path>", "listen on a Unix socket instead of TCP")
    .option("-r, --readonly", "serve every export read-only")
    .option("-D, --description <text>", "description of the exports (NBD_INFO_DESCRIPTION)")
    .option("--tls <off|on|require>", "TLS: off, offered (on), or required for every option", "off")
    .option(
      "--tls-certificates <dir>",
      "directory with server-cert.pem, server-key.pem and optionally ca-cert.pem",
    )
    .option("--max-payload <size>", "largest read or write accepted", "32M")
    .option("--rate <bytes-per-sec>", "filter: limit data read plus written, e.g. 100M")
    .option("--delay-read <ms>", "filter: delay every read")
    .option("--delay-write <ms>", "filter: delay every write")
    .option("--error-rate <p>", "filter: fail this fraction (0-1) of operations")
    .option("--error-errno <name>", `filter: the error injected (${ERRNOS})`, "EIO")
    .option("--error-ops <list>", "filter: which operations fail (read,write,trim,zero,flush,extents)")
    .option("--log-requests", "filter: log every operation to stderr")
    .action(async (specs: string[], o: Record<string, string | boolean | undefined>) => {
      const filters: Filter[] = [];
      if (o.readonly) filters.push(readOnly);
      if (o.delayRead || o.delayWrite)
        filters.push(delay({ readMs: Number(o.delayRead ?? 0), writeMs: Number(o.delayWrite ?? 0) }));
      if (o.rate) filters.push(rateLimit(parseSize(String(o.rate), "--rate")));
      if (o.errorRate !== undefined) {
        const rate = Number(o.errorRate);
        if (!(rate >= 0 && rate <= 1))
          throw new UsageError(`--error-rate takes a number from 0 to 1, not '${o.errorRate}'`);
        const errno = NbdErrno[String(o.errorErrno).toUpperCase() as keyof typeof NbdErrno];
        if (!errno) throw new UsageError(`--error-errno takes one of ${ERRNOS}, not '${o.errorErrno}'`);
        const ops = o.errorOps ? (String(o.errorOps).split(",") as Operation[]) : undefined;
        filters.push(errorInjection({ rate, errno, ops }));
      }
      if (o.logRequests) filters.push(requestLog((l) => process.stderr.write(`nbd: ${l}\n`)));
      const exports: ExportSpec[] = [];
      for (const spec of specs) {
        const eq = spec.indexOf("=");
        const name = eq > 0 && !spec.startsWith("/") ? spec.slice(0, eq) : "";
        const what = eq > 0 && !spec.startsWith("/") ? spec.slice(eq + 1) : spec;
        let backend: Backend = what.startsWith("memory:")
          ? new MemoryBackend(parseSize(what.slice(7), `export ${spec}`))
          : await FileBackend.open(what, { readonly: o.readonly === true });
        for (const f of filters) backend = f(backend);
        exports.push({
          name: name || (exports.length ? path.basename(what) : ""),
          description: o.description as string | undefined,
          backend,
        });
      }
      let tls;
      if (o.tls !== "off") {
        if (o.tls !== "on" && o.tls !== "require")
          throw new UsageError(`--tls takes off, on or require, not '${o.tls}'`);
        const dir = o.tlsCertificates as string | undefined;
        if (!dir)
          throw new UsageError("--tls needs --tls-certificates DIR (server-cert.pem, server-key.pem)");
        const ca = path.join(dir, "ca-cert.pem");
        tls = {
          cert: path.join(dir, "server-cert.pem"),
          key: path.join(dir, "server-key.pem"),
          ca: fs.existsSync(ca) ? ca : undefined,
          require: o.tls === "require",
        };
      }
      const server = new NbdServer({
        exports,
        tls,
        maxPayload: parseSize(String(o.maxPayload), "--max-payload"),
        log: (l) => {
          if (o.logRequests) process.stderr.write(`nbd: ${l}\n`);
        },
      });
      const addr = await server.listen(
        o.unix ? { path: String(o.unix) } : { host: String(o.ipaddr), port: Number(o.port) },
      );
      const scheme = `nbd${tls ? "s" : ""}`;
      for (const e of exports) {
        const where =
          typeof addr === "string"
            ? `${scheme}+unix:///${encodeURIComponent(e.name)}?socket=${addr}`
            : `${scheme}://${addr.address.includes(":") ? `[${addr.address}]` : addr.address}:${addr.port}/${encodeURIComponent(e.name)}`;
        process.stderr.write(
          `nbdmig nbd: serving ${e.backend.description} at ${where}${e.backend.canWrite() ? "" : " (read-only)"}\n`,
        );
      }
      await new Promise<void>((resolve) => {
        const stop = () => void server.close().then(resolve);
        process.once("SIGINT", stop);
        process.once("SIGTERM", stop);
      });
    });

  nbd
    .command("info")
    .description("show an NBD export: size, flags, block sizes, meta contexts (nbdinfo)")
    .argument("<uri>", "nbd://HOST[:PORT]/EXPORT, nbds://..., nbd+unix:///EXPORT?socket=PATH")
    .option("--list", "every export of the server")
    .option("--map", "the base:allocation map")
    .option("--size", "only the size in bytes")
    .option("--can <feature>", `exit 0 if the export can: ${Object.keys(CAN).join(", ")}, connect (else 2)`)
    .option("--is <property>", "exit 0 if the export is: read-only, rotational (else 2)")
    .option("--json", "JSON output")
    .action(
      async (
        uri: string,
        o: { list?: boolean; map?: boolean; size?: boolean; can?: string; is?: string; json?: boolean },
      ) => {
        if (o.can || o.is) {
          const name = (o.can ?? o.is)!;
          const table = o.can ? CAN : IS;
          if (o.can === "connect") {
            const c = await NbdClient.connect(uri).catch(() => undefined);
            await c?.disconnect();
            process.exitCode = c ? 0 : 2;
            return;
          }
          if (!(name in table))
            throw new UsageError(
              `--${o.can ? "can" : "is"} takes one of ${Object.keys(table).join(", ")}, not '${name}'`,
            );
          const c = await NbdClient.connect(uri);
          process.exitCode = c.can(table[name]!) ? 0 : 2;
          await c.disconnect();
          return;
        }
        if (o.list) {
          const exports = await NbdClient.list(uri);
          const infos = [];
          for (const e of exports)
            infos.push({
              ...(await describeExport(exportUri(uri, e.name))),
              description: e.description || undefined,
            });
          if (o.json) out(JSON.stringify({ exports: infos }, null, 2) + "\n");
          else out(infos.map((i) => render(i)).join(""));
          return;
        }
        if (o.map) {
          const c = await NbdClient.connect(uri, { metaContexts: [BASE_ALLOCATION] });
          try {
            if (!c.canBlockStatus) throw new UsageError(`${uri} offers no base:allocation map`);
            const rows: { offset: number; length: number; type: number; description: string }[] = [];
            for (let at = 0; at < c.size;) {
              const ext = await c.blockStatus(at, Math.min(c.size - at, 2 ** 31));
              for (const e of ext) {
                const description = [
                  e.flags & STATE_HOLE ? "hole" : "data",
                  ...(e.flags & STATE_ZERO ? ["zero"] : []),
                ].join(",");
                const last = rows.at(-1);
                if (last && last.type === e.flags) last.length += e.length;
                else rows.push({ offset: at, length: e.length, type: e.flags, description });
                at += e.length;
              }
            }
            if (o.json) out(JSON.stringify(rows, null, 2) + "\n");
            else
              out(
                rows
                  .map(
                    (r) =>
                      `${String(r.offset).padStart(12)} ${String(r.length).padStart(12)} ${r.type}  ${r.description}\n`,
                  )
                  .join(""),
              );
          } finally {
            await c.disconnect();
          }
          return;
        }
        const info = await describeExport(uri);
        if (o.size) out(`${info.size}\n`);
        else if (o.json) out(JSON.stringify(info, null, 2) + "\n");
        else out(render(info));
      },
    );

  nbd
    .command("copy")
    .description("copy between NBD URIs, local files and null: (nbdcopy): holes become zero requests")
    .argument("<source>", "NBD URI or file")
    .argument("<destination>", "NBD URI, file (created at the source's size if missing) or null:")
    .option("-p, --progress", "draw a progress bar on stderr")
    .option("-C, --connections <n>", "NBD connections per side (when the server allows multi-conn)", "4")
    .option("-R, --requests <n>", "requests in flight per connection", "16")
    .option("--request-size <size>", "bytes per read/write request", "256K")
    .option("--destination-is-zero", "the destination already reads as zeros: skip zeroing holes")
    .option("--flush", "flush the destination at the end (else the data may still be in its cache)")
    .option("--verify", "compare sha256 of both sides afterwards")
    .option("--json", "print the result as JSON")
    .action(async (src: string, dst: string, o: Record<string, string | boolean | undefined>) => {
      const int = (v: unknown, flag: string) => {
        const n = Number(v);
        if (!Number.isInteger(n) || n < 1)
          throw new UsageError(`${flag} takes a positive whole number, not '${v}'`);
        return n;
      };
      // Loaded only for a bar: every millisecond of start-up counts against short copies.
      const cliProgress = o.progress ? (await import("cli-progress")).default : undefined;
      const bar = cliProgress
        ? new cliProgress.SingleBar(
            {
              format: " copy |{bar}| {percentage}% {value}/{total} MiB",
              hideCursor: true,
              noTTYOutput: true,
              notTTYSchedule: 1000,
            },
            cliProgress.Presets.shades_classic,
          )
        : undefined;
      let started = false;
      const r = await copy(src, dst, {
        connections: int(o.connections, "--connections"),
        requests: int(o.requests, "--requests"),
        requestSize: parseSize(String(o.requestSize), "--request-size"),
        destinationIsZero: o.destinationIsZero === true,
        flush: o.flush === true,
        verify: o.verify === true,
        progress: bar
          ? (done, total) => {
              if (!started) {
                bar.start(Math.ceil(total / 2 ** 20), 0);
                started = true;
              }
              bar.update(Math.floor(done / 2 ** 20));
            }
          : undefined,
      }).finally(() => bar?.stop());
      if (o.json) out(JSON.stringify(r) + "\n");
      else if (o.progress || o.verify)
        process.stderr.write(
          `copied ${formatBytes(r.size)} in ${(r.elapsedMs / 1000).toFixed(2)} s: ${formatBytes(r.dataBytes)} of data, ${formatBytes(r.zeroBytes)} as zeros${r.sha256 ? `, verified sha256 ${r.sha256}` : ""}\n`,
        );
    });
}

function render(info: Record<string, unknown>): string {
  const lines = [`export="${String(info.export)}":`];
  for (const [k, v] of Object.entries(info)) {
    if (k === "export" || v === undefined) continue;
    if (k === "contexts") lines.push("\tcontexts:", ...(v as string[]).map((c) => `\t\t${c}`));
    else lines.push(`\t${k.replace(/_/g, "_")}: ${String(v)}`);
  }
  return lines.join("\n") + "\n";
}
