/**
 * An image served over NBD by qemu-nbd, for the offline copy: a qcow2 image's guest-visible content read
 * on the source, or written into the precreated image on the destination. (Raw images need no qemu-nbd: the
 * copy engine reads them as files, and the destination serves them with nbdmig's own NBD server; qcow2
 * needs QEMU's block layer.) qemu-nbd runs with `--fork`, which returns once it listens.
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { UsageError } from "../errors.js";
import { pollPause } from "../util/poll.js";

const run = promisify(execFile);

export const qemuNbdBinary = (): string => process.env.NBDMIG_QEMU_NBD ?? "qemu-nbd";

export interface QemuNbdExport {
  /** The NBD URI of the export (nbd:// or nbd+unix://; nbds:// with TLS). */
  uri: string;
  close(): Promise<void>;
}

export interface QemuNbdOptions {
  file: string;
  format: "raw" | "qcow2";
  name: string;
  /** Where it listens: a Unix socket, or a TCP address. */
  at: { socket: string } | { host: string; port: number };
  readonly: boolean;
  /** Only the image itself, without its backing chain (what `--copy-storage-inc` copies). */
  topOnly?: boolean;
  /** Offer qemu:allocation-depth (which layer of the backing chain holds each block). */
  allocationDepth?: boolean;
  /** TLS with this host's certificates (a tls-creds-x509 directory); clients must present one. */
  tlsDir?: string;
  /** A directory for the pid file. */
  runDir: string;
}

/**
 * qemu-nbd's arguments for one image: forked with a pid file, 8 clients (so that it offers multi-conn),
 * writeback cache, discard on a writable export.
 */
export function qemuNbdArgs(o: Omit<QemuNbdOptions, "runDir">, pidFile: string): string[] {
  const image = o.topOnly
    ? `json:${JSON.stringify({ driver: o.format, backing: null, file: { driver: "file", filename: o.file } })}`
    : o.file;
  return [
    "--fork",
    "--pid-file",
    pidFile,
    "--persistent",
    "--shared",
    "8",
    "--export-name",
    o.name,
    "--cache",
    "writeback",
    ...(o.topOnly ? [] : ["--format", o.format]),
    ...(o.readonly ? ["--read-only"] : ["--discard", "unmap"]),
    ...(o.allocationDepth ? ["--allocation-depth"] : []),
    ...("socket" in o.at ? ["--socket", o.at.socket] : ["--bind", o.at.host, "--port", String(o.at.port)]),
    ...(o.tlsDir
      ? [
          "--object",
          `tls-creds-x509,id=nbdmig-tls,endpoint=server,dir=${o.tlsDir},verify-peer=on`,
          "--tls-creds",
          "nbdmig-tls",
        ]
      : []),
    image,
  ];
}

/** Starts qemu-nbd for one image; throws with its stderr when it cannot start (e.g. the port is taken). */
export async function serveWithQemuNbd(o: QemuNbdOptions): Promise<QemuNbdExport> {
  fs.mkdirSync(o.runDir, { recursive: true });
  const pidFile = path.join(o.runDir, `qemu-nbd-${o.name}-${process.pid}-${Date.now()}.pid`);
  const args = qemuNbdArgs(o, pidFile);
  try {
    await run(qemuNbdBinary(), args);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { stderr?: string };
    if (e.code === "ENOENT")
      throw new UsageError(`qemu-nbd is missing (apt-get install qemu-utils)`, "E_NO_QEMU_NBD");
    throw new Error(`qemu-nbd ${o.file}: ${(e.stderr ?? e.message).trim()}`, { cause: err });
  }
  const pid = Number(fs.readFileSync(pidFile, "utf8").trim());
  const scheme = o.tlsDir ? "nbds" : "nbd";
  const uri =
    "socket" in o.at
      ? `${scheme}+unix:///${encodeURIComponent(o.name)}?socket=${o.at.socket}`
      : `${scheme}://${o.at.host.includes(":") ? `[${o.at.host}]` : o.at.host}:${o.at.port}/${encodeURIComponent(o.name)}`;
  return {
    uri,
    close: () => stopQemuNbd(pid, pidFile),
  };
}

/**
 * A qemu-nbd of ours still running. Forked, it is not our child: once it has exited it stays a zombie until
 * init reaps it, which some inits do only every second or two, so a zombie counts as gone.
 */
export function isQemuNbdRunning(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    if (stat.slice(stat.lastIndexOf(")") + 2).startsWith("Z")) return false;
    return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").startsWith("qemu-nbd");
  } catch {
    return false;
  }
}

/**
 * SIGTERM (qemu-nbd flushes the image and removes its pid file as it exits), SIGKILL after 5 s. It is
 * usually gone within a few ms: looked for every 5 ms during the first second (every 50 ms, Finish and
 * each qcow2 disk's copy waited 50 ms here), then every 50 ms.
 */
export async function stopQemuNbd(pid: number, pidFile: string): Promise<void> {
  if (isQemuNbdRunning(pid)) {
    process.kill(pid, "SIGTERM");
    const begun = Date.now();
    while (isQemuNbdRunning(pid) && Date.now() - begun < 5000) await pollPause(begun);
    if (isQemuNbdRunning(pid)) process.kill(pid, "SIGKILL");
  }
  fs.rmSync(pidFile, { force: true });
}
