/**
 * What the benchmarks share: the CLI and commands inside a test host, the reference image, nbdcopy between
 * the hosts, a median, the reference VM, CPU time of a process.
 */
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { createImage, imageInfo } from "../src/qemu/img.js";
import { qemuNbdArgs, stopQemuNbd, type QemuNbdOptions } from "../src/qemu/nbd-export.js";
import { HOST_ROOT, type Testbed } from "../src/testbed/testbed.js";

export function nbdmig(
  tb: Testbed,
  host: "a" | "b",
  args: string[],
): { status: number; stdout: string; stderr: string } {
  return tb[host].cli(args);
}

/** The CLI's output, or an error when it fails. */
export function nbdmigOk(tb: Testbed, host: "a" | "b", args: string[]): string {
  return tb[host].cliOk(args);
}

/** A 2 GiB qcow2 with 512 MiB of random data at its start, in a host's image directory. */
export function referenceImage(tb: Testbed, host: "a" | "b", name: string): string {
  const file = path.join(tb[host].imagesDir, name);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", file, "2G"]);
  const fill = path.join(tb.dir, "fill.bin");
  if (!fs.existsSync(fill)) execFileSync("sh", ["-c", `head -c 512M /dev/urandom > ${fill}`]);
  execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -s ${fill} 0 512M`, file], { stdio: "ignore" });
  return file;
}

/** The median; of an even count the mean of the middle two (it took the upper one until 2026-12-04). */
export function median(xs: number[]): number {
  if (!xs.length) return 0;
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

/** Runs argv inside a test host (its network and mount namespaces); answers its stdout. */
export function inHost(tb: Testbed, host: "a" | "b", argv: string[]): string {
  const pre = tb[host].execPrefix();
  return execFileSync(pre[0]!, [...pre.slice(1), ...argv], { encoding: "utf8" });
}

/**
 * A qemu-nbd inside a host, started as nbdmig starts the ones of an offline migration
 * (src/qemu/nbd-export.ts: 8 clients, so that it offers multi-conn, writeback cache, discard on a writable
 * export). `file` and the socket are paths inside the host. Answers the export's URI there, and a stop.
 */
function qemuNbdInHost(
  tb: Testbed,
  host: "a" | "b",
  o: { file: string; format: string; readonly: boolean; at: { socket: string } | { port: number } },
): { uri: string; stop: () => Promise<void> } {
  const pidFile = `${HOST_ROOT}/peer-qemu-nbd-${path.basename(o.file)}.pid`;
  const at = "socket" in o.at ? o.at : { host: tb[host].addr, port: o.at.port };
  inHost(tb, host, [
    "qemu-nbd",
    ...qemuNbdArgs(
      // The bench's images are raw or qcow2 (what imageInfo reports is any format's name).
      { file: o.file, format: o.format as QemuNbdOptions["format"], name: "peer", readonly: o.readonly, at },
      pidFile,
    ),
  ]);
  const pid = Number(fs.readFileSync(tb[host].hostPath(pidFile), "utf8"));
  return {
    uri:
      "socket" in o.at
        ? `nbd+unix:///peer?socket=${o.at.socket}`
        : `nbd://${tb[host].addr}:${o.at.port}/peer`,
    // Until it has exited: the next round's qemu-nbd binds the same port.
    stop: () => stopQemuNbd(pid, tb[host].hostPath(pidFile)),
  };
}

/**
 * The peer of an offline copy: nbdcopy on host a, from a read-only qemu-nbd serving `source` there into a
 * qemu-nbd on host b serving a fresh image created as nbdmig's destination creates one (same format and
 * size), both qemu-nbd started as nbdmig starts its own, so that nbdcopy gets its default 4 connections
 * (multi-conn on both ends). Answers the copy's seconds and the bytes host a sent over the migration link.
 * With `tool: "nbdmig"`, `nbdmig nbd copy` (the copy engine an offline migration uses, with the options it
 * uses) runs instead, between the same two qemu-nbd: the engine alone, without the migration around it;
 * `engineSeconds` is then the copy as the engine timed it, without the CLI's start-up.
 */
export async function nbdcopyBetweenHosts(
  tb: Testbed,
  source: string,
  opts: { flush?: boolean; tool?: "nbdcopy" | "nbdmig" } = {},
): Promise<{ seconds: number; wireBytes: number; engineSeconds?: number }> {
  const info = await imageInfo(source);
  const name = `peer-${path.basename(source)}`;
  const dest = path.join(tb.b.imagesDir, name);
  await createImage(dest, info.format, info.virtualSize);
  const inA = (p: string) => path.join(`${HOST_ROOT}/images`, path.relative(tb.a.imagesDir, p));
  const src = qemuNbdInHost(tb, "a", {
    file: inA(source),
    format: info.format,
    readonly: true,
    at: { socket: `${HOST_ROOT}/${name}.sock` },
  });
  const dst = qemuNbdInHost(tb, "b", {
    file: `${HOST_ROOT}/images/${name}`,
    format: info.format,
    readonly: false,
    at: { port: 10810 },
  });
  try {
    execFileSync("sync");
    const flush = opts.flush ? ["--flush"] : [];
    const tx0 = tb.linkTxBytes();
    const t0 = process.hrtime.bigint();
    let engineSeconds: number | undefined;
    if (opts.tool === "nbdmig") {
      const out = nbdmigOk(tb, "a", [
        "nbd",
        "copy",
        ...flush,
        "--destination-is-zero",
        "--json",
        src.uri,
        dst.uri,
      ]);
      engineSeconds = (JSON.parse(out) as { elapsedMs: number }).elapsedMs / 1000;
    } else inHost(tb, "a", ["nbdcopy", ...flush, src.uri, dst.uri]);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    return { seconds, wireBytes: tb.linkTxBytes() - tx0, engineSeconds };
  } finally {
    await Promise.all([src.stop(), dst.stop()]);
    fs.rmSync(dest, { force: true });
  }
}

/** The extents of an image that hold data, as qemu-img map reports them (guest-visible offsets). */
export function dataExtents(file: string): { start: number; length: number }[] {
  const map = JSON.parse(
    execFileSync("qemu-img", ["map", "-U", "--output=json", file], { encoding: "utf8" }),
  ) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  return map.filter((e) => e.data).map(({ start, length }) => ({ start, length }));
}

/** CPU seconds (user + system) a process has used so far; 0 once it has gone. */
export function cpuSeconds(pid: number): number {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    // Fields after the command name, which is in parentheses and may hold spaces: utime, stime are 14, 15.
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / CLK_TCK;
  } catch {
    return 0;
  }
}

/** Linux's USER_HZ, what /proc/PID/stat counts in (100 on every architecture Debian builds). */
const CLK_TCK = Number(execFileSync("getconf", ["CLK_TCK"], { encoding: "utf8" }).trim()) || 100;

/**
 * Samples a process's CPU time every `everyMs` until stopped, so that a process which exits meanwhile (a
 * source QEMU in Confirm) still has its last reading.
 */
export function cpuSampler(pid: number, everyMs = 50): { stop(): number } {
  const first = cpuSeconds(pid);
  let last = first;
  const timer = setInterval(() => {
    const v = cpuSeconds(pid);
    if (v > 0) last = v;
  }, everyMs);
  return {
    stop() {
      clearInterval(timer);
      const v = cpuSeconds(pid);
      return (v > 0 ? v : last) - first;
    },
  };
}

/** The reference VM's images on host a (the shared disk on both) and its definition. */
export function referenceVm(tb: Testbed, name: string, addr: string, guestDir: string): string {
  referenceImage(tb, "a", `${name}.qcow2`);
  for (const h of ["a", "b"] as const)
    execFileSync("qemu-img", [
      "create",
      "-q",
      "-f",
      "raw",
      path.join(tb[h].imagesDir, `${name}-shared.raw`),
      "64M",
    ]);
  return `<domain type='kvm'><name>${name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>${guestDir}/vmlinuz</kernel><initrd>${guestDir}/initrd.img</initrd>
<cmdline>console=ttyS0 quiet nbdmig.rate=20 nbdmig.span=2048 nbdmig.ip=${addr}/24</cmdline></os>
<features><acpi/><apic/></features>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/nbdmig/images/${name}.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/var/lib/nbdmig/images/${name}-shared.raw'/><target dev='vdb' bus='virtio'/><shareable/></disk>
<interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
<serial type='pty'/></devices></domain>`;
}

/** Until the guest writes (its third report on the console) and answers the client. */
export async function guestServes(tb: Testbed, addr: string, console: () => string): Promise<void> {
  for (let k = 0; k < 120 && !/nbdmig-guest: t=3 /.test(console()); k++) await sleep(500);
  for (let k = 0; k < 60 && (await tb.clientGet(`http://${addr}/`)).status !== 200; k++) await sleep(500);
}

/**
 * Runs argv without blocking this process (CPU samplers and pollers keep running meanwhile); answers its
 * wall time and its output (stdout and stderr), or an error with the output's end when it fails.
 */
export function runAsync(argv: string[]): Promise<{ seconds: number; out: string }> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (c: Buffer) => (out += c.toString()));
    child.stderr.on("data", (c: Buffer) => (out += c.toString()));
    child.on("error", reject);
    child.on("exit", (code) => {
      const seconds = (performance.now() - t0) / 1000;
      if (code === 0) resolve({ seconds, out });
      else reject(new Error(`${argv.join(" ")} failed (${code}): ${out.slice(-3000)}`));
    });
  });
}
