/**
 * libvirt 9.0 as the reference, measured in the same run as nbdmig: the same guest, image and link. One
 * libvirtd per test host, started inside that host's network namespace and a private mount and UTS namespace
 * of its own (a mount namespace nested in the host's), where tmpfs mounts over /run, /var/lib, /var/cache and
 * /var/log hide the root's and bind mounts put the host's own directories at libvirt's fixed system paths
 * (/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt), all under
 * /var/lib/nbdmig/libvirt in the host. Each daemon has its own host_uuid and hostname, so libvirt takes the
 * two for different hosts. QEMU runs as root without security driver, cgroups or namespaces of libvirt's.
 * Above each libvirtd a small subreaper reaps the QEMU processes it daemonizes as soon as they exit (this
 * machine's PID 1 takes ~1.5 s, which libvirt would otherwise spend waiting in Confirm; see REAPER).
 * Nothing is created outside the test bed's directories; tb.down() kills what a crashed run leaves.
 *
 * A migration is what a libvirt user types, client-driven (virsh in the root namespace talks to both
 * daemons through their sockets): the destination images are precreated with qemu-img (libvirt 9.0 only
 * precreates volumes of storage pools, and these files are in none), then
 * `virsh migrate --live --copy-storage-all --suspend --unsafe --verbose NAME DEST_URI tcp://DEST_ADDR`.
 * `--unsafe` because the shareable disk lives on a local file system on each host (it is not copied, as
 * with nbdmig); `--suspend` leaves the destination paused, so that the disks are compared while nothing
 * writes to them. The total is the precreation plus virsh's wall time (both reported too); libvirt's own
 * job statistics (`virsh domjobinfo --completed`) give its elapsed time and the downtime, and the QMP
 * traffic in each daemon's log (log_filters 1:qemu.qemu_monitor, with timestamps) gives the phases in the
 * columns bench/floor.ts uses.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { parseDomainXml } from "../src/domain/xml.js";
import { compareImages, createImage, imageInfo } from "../src/qemu/img.js";
import { pidAlive, waitGone } from "../src/qemu/launcher.js";
import { HOST_ROOT, type Testbed } from "../src/testbed/testbed.js";
import { cpuSampler, cpuSeconds, guestServes, runAsync } from "./common.js";
import type { Phases } from "./floor.js";

const APT =
  "apt-get install -y --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients";
const LIBVIRTD = "/usr/sbin/libvirtd";
const QEMU_DRIVER = "/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so";
const EMULATOR = "/usr/bin/qemu-system-x86_64";
/**
 * The process above libvirtd: a child subreaper (prctl PR_SET_CHILD_SUBREAPER, syscall 157 on x86_64) that
 * reaps at once. libvirt daemonizes QEMU, so an exited QEMU is reaped by the nearest subreaper, by default
 * PID 1; this machine's PID 1 reaps orphans only every ~1.5 s, and libvirt, which polls kill(pid, 0) until a
 * stopped QEMU is gone, would wait that long in Confirm (a real host's systemd reaps at once). Perl because
 * perl-base is essential on Debian. Writes libvirtd's PID to $ARGV[0], forwards SIGTERM to it, and exits when
 * it has no children left.
 */
const REAPER = String.raw`
syscall(157, 36, 1, 0, 0, 0) == 0 or die "prctl(PR_SET_CHILD_SUBREAPER): $!\n";
my $pidfile = shift @ARGV;
my $pid = fork() // die "fork: $!\n";
if ($pid == 0) { exec { $ARGV[0] } @ARGV or die "exec $ARGV[0]: $!\n"; }
open(my $f, ">", $pidfile) or die "$pidfile: $!\n"; print $f "$pid\n"; close($f);
$SIG{TERM} = sub { kill "TERM", $pid };
my $status = 0;
for (;;) {
  my $p = waitpid(-1, 0);
  if ($p > 0) { $status = $? >> 8 if $p == $pid; next; }
  last if $!{ECHILD};
}
exit $status;
`;

/** libvirt's directories in a host (its system paths are bind mounts of these). */
const LV_DIR = `${HOST_ROOT}/libvirt`;
const LV_PATHS = {
  etc: "/etc/libvirt",
  run: "/run/libvirt",
  lib: "/var/lib/libvirt",
  cache: "/var/cache/libvirt",
  log: "/var/log/libvirt",
} as const;

/** How `migrate` runs (defaults: the migration benchmark's). */
export interface LibvirtMigrateOptions {
  /** Resolves once the guest may be migrated (default: it serves HTTP at the address). */
  ready?: () => Promise<void>;
  /** More `virsh migrate` flags (`--copy-storage-synchronous-writes`, say). */
  flags?: string[];
  /** Aborts the job (`virsh domjobabort`) after this many seconds; the run then reports completed: false. */
  boundS?: number;
  /** Called once virsh has exited, before the domain and its files are removed. */
  after?: () => void;
}

export interface LibvirtRun {
  /** False when the bound aborted the job (the guest still runs on the source). */
  completed: boolean;
  /** Precreating the destination images plus `virsh migrate`'s wall time, seconds. */
  totalS: number;
  /** `virsh migrate` alone, wall time. */
  virshS: number;
  /** qemu-img create of the destination images on host b. */
  precreateS: number;
  /** libvirt's own "Time elapsed" of the completed job (source). */
  jobElapsedS?: number;
  /** libvirt's "Total downtime" of the completed job. */
  downtimeMs?: number;
  /** From the start to the last BLOCK_JOB_READY the source daemon saw. */
  readyS?: number;
  /**
   * Seconds, from the daemons' QMP logs: prepare = start (precreation, Begin, Prepare) to the source's first
   * NBD blockdev-add; mirror = to the last BLOCK_JOB_READY; memory = to MIGRATION completed on the source;
   * finish = to the source's Confirm (the source's end of Perform, the destination's Finish); confirm = to
   * virsh's exit.
   */
  phases?: Phases;
  /** The destination's disks equal the source's (the destination paused, the source gone). */
  identical: boolean;
  /** qemu-img compare's message for the first disk that differed. */
  difference?: string;
  /** CPU seconds of the source QEMU during the migration, and of the destination QEMU from its start. */
  srcCpuS?: number;
  dstCpuS?: number;
  /** What host a sent over the migration link during the migration. */
  wireBytes: number;
  /** domjobinfo --completed on the source, verbatim ("Time elapsed" → "4567 ms"). */
  jobInfo: Record<string, string>;
  /** The QMP commands each daemon sent from the start to the end, in order, repeats counted ("qom-get x300"). */
  qmp: { source: string[]; destination: string[] };
}

export interface Libvirt {
  /** virsh connection URIs from the root namespace. */
  readonly uri: { a: string; b: string };
  /**
   * Migrates the domain `xml` (nbdmig's definition; its images in place on host a, shareable disks on both)
   * from a to b with libvirt, as described above, then destroys and undefines it on both and removes its
   * images on both hosts. `addr` is the guest's address, for guestServes.
   */
  migrate(xml: string, name: string, addr: string, opts?: LibvirtMigrateOptions): Promise<LibvirtRun>;
  /** Stops both daemons (and any QEMU they still run) and removes their directories. */
  down(): Promise<void>;
}

/** nbdmig's domain XML as libvirt needs it for the same guest: TCG, the emulator, the serial log a file. */
export function libvirtXml(xml: string, name: string): string {
  const serial =
    `<serial type='file'><source path='${HOST_ROOT}/log/${name}.serial.log' append='on'/>` +
    `<target port='0'/></serial>`;
  let out = xml.replace(/<domain\s+type=(['"])kvm\1/, "<domain type='qemu'");
  out = out.replace(/<serial\b[^>]*\/>|<serial\b[^>]*>[\s\S]*?<\/serial>/g, "");
  out = out.replace(/<devices>/, `<devices>\n<emulator>${EMULATOR}</emulator>`);
  return out.replace(/<\/devices>/, `${serial}</devices>`);
}

function requireLibvirt(): void {
  const missing = [LIBVIRTD, QEMU_DRIVER].filter((f) => !fs.existsSync(f));
  if (spawnSync("sh", ["-c", "command -v virsh"], { stdio: "ignore" }).status !== 0) missing.push("virsh");
  if (missing.length)
    throw new Error(`libvirt is not installed (${missing.join(", ")} missing); install it with: ${APT}`);
}

/** One libvirtd inside a test host. */
class Daemon {
  /** The reaper above libvirtd (the spawned process), and libvirtd. */
  pid = 0;
  libvirtdPid = 0;
  constructor(
    readonly tb: Testbed,
    readonly host: "a" | "b",
  ) {}

  /** The root namespace's path of a libvirt directory in this host. */
  dir(sub = ""): string {
    return path.join(this.tb[this.host].hostPath(LV_DIR), sub);
  }
  /** libvirt refuses a migration to a daemon with its own hostname (or host UUID). */
  get hostname(): string {
    return `${this.tb.id}-${this.host}`;
  }
  get uri(): string {
    return `qemu+unix:///system?socket=${this.dir("run")}/libvirt-sock`;
  }
  get logFile(): string {
    return this.dir("libvirtd.log");
  }

  virsh(args: string[], timeoutMs = 120_000): { status: number; stdout: string; stderr: string } {
    const r = spawnSync("virsh", ["-q", "-c", this.uri, ...args], { encoding: "utf8", timeout: timeoutMs });
    return { status: r.status ?? -1, stdout: r.stdout ?? "", stderr: r.stderr ?? String(r.error ?? "") };
  }
  virshOk(args: string[], timeoutMs?: number): string {
    const r = this.virsh(args, timeoutMs);
    if (r.status !== 0)
      throw new Error(`[libvirt ${this.host}] virsh ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
    return r.stdout;
  }

  async start(): Promise<void> {
    const h = this.tb[this.host];
    fs.rmSync(this.dir(), { recursive: true, force: true });
    for (const sub of Object.keys(LV_PATHS) as (keyof typeof LV_PATHS)[])
      fs.mkdirSync(this.dir(sub), { recursive: true });
    fs.mkdirSync(path.join(h.dir, "log"), { recursive: true });
    fs.writeFileSync(
      path.join(this.dir("etc"), "libvirtd.conf"),
      [
        `host_uuid = "${randomUUID()}"`,
        `listen_tls = 0`,
        `listen_tcp = 0`,
        `auth_unix_ro = "none"`,
        `auth_unix_rw = "none"`,
        `unix_sock_rw_perms = "0700"`,
        // The QMP traffic with timestamps (the phases), migration's own debug lines, warnings of the rest.
        // NBDMIG_LIBVIRT_LOG_FILTERS replaces them when debugging (e.g. add "1:qemu.qemu_process 1:util.process").
        `log_filters = "${process.env.NBDMIG_LIBVIRT_LOG_FILTERS ?? "1:qemu.qemu_monitor 1:qemu.qemu_migration"}"`,
        `log_outputs = "1:file:${LV_DIR}/libvirtd.log"`,
        "",
      ].join("\n"),
    );
    fs.writeFileSync(
      path.join(this.dir("etc"), "qemu.conf"),
      [
        `user = "root"`,
        `group = "root"`,
        `dynamic_ownership = 0`,
        `remember_owner = 0`,
        `security_driver = "none"`,
        `cgroup_controllers = [ ]`,
        `namespaces = [ ]`,
        // No virtlogd: QEMU's stdout/stderr go to a file.
        `stdio_handler = "file"`,
        // Incoming migrations and NBD listen on the migration link only.
        `migration_address = "${h.addr}"`,
        `migration_host = "${h.addr}"`,
        "",
      ].join("\n"),
    );
    // libvirtd wants its built-in QEMU user and group (Debian: libvirt-qemu) to exist even when qemu.conf
    // says root; they get into its own namespace's /etc/passwd and /etc/group, not the machine's.
    for (const [f, line] of [
      ["passwd", "libvirt-qemu:x:64055:64055:libvirt QEMU:/var/lib/libvirt:/usr/sbin/nologin"],
      ["group", "libvirt-qemu:x:64055:"],
    ] as const) {
      const cur = fs.readFileSync(`/etc/${f}`, "utf8");
      const withNl = cur.endsWith("\n") ? cur : `${cur}\n`;
      fs.writeFileSync(this.dir(f), /^libvirt-qemu:/m.test(cur) ? cur : `${withNl}${line}\n`);
    }
    // Its hostname resolves locally (libvirt looks it up for every migration cookie).
    fs.writeFileSync(
      this.dir("hosts"),
      `127.0.0.1 localhost\n127.0.1.1 ${this.hostname}\n::1 localhost ip6-localhost ip6-loopback\n`,
    );
    const tbHostDir = h.dir;
    const binds = Object.entries(LV_PATHS)
      .map(([sub, p]) => `mkdir -p ${p} && mount --bind ${tbHostDir}/libvirt/${sub} ${p}`)
      .join(" && ");
    // /run, /var/lib, /var/cache, /var/log become empty tmpfs in libvirtd's own mount namespace (the root's
    // hold no libvirt directories, and must get none); /var/lib/nbdmig is the host's directory again.
    const script = [
      "set -e",
      `hostname ${this.hostname}`,
      "for d in /run /var/lib /var/cache /var/log; do mount -t tmpfs -o mode=0755 nbdmig-libvirt $d; done",
      `mkdir -p ${HOST_ROOT} && mount --bind ${tbHostDir} ${HOST_ROOT}`,
      binds,
      `mount --bind ${tbHostDir}/libvirt/passwd /etc/passwd && mount --bind ${tbHostDir}/libvirt/group /etc/group`,
      `mount --bind ${tbHostDir}/libvirt/hosts /etc/hosts`,
      `exec perl -e "$1" ${LV_DIR}/libvirtd.pid ${LIBVIRTD} -f ${LV_PATHS.etc}/libvirtd.conf`,
    ].join("\n");
    const out = fs.openSync(path.join(this.dir(), "libvirtd.out"), "a");
    const pre = h.execPrefix();
    // nsenter and unshare (no --fork) exec, and sh execs the reaper: the child's PID is the reaper's.
    const child = spawn(
      pre[0]!,
      [...pre.slice(1), "unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script, "sh", REAPER],
      { detached: true, stdio: ["ignore", out, out] },
    );
    fs.closeSync(out);
    child.unref();
    this.pid = child.pid!;
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (child.exitCode !== null || Date.now() > deadline)
        throw new Error(
          `libvirtd on host ${this.host} did not start: ${this.readOut()}${this.readLog().slice(-2000)}`,
        );
      if (fs.existsSync(`${this.dir("run")}/libvirt-sock`) && this.virsh(["uri"], 10_000).status === 0) break;
      await sleep(100);
    }
    this.libvirtdPid = Number(fs.readFileSync(path.join(this.dir(), "libvirtd.pid"), "utf8").trim());
    // The QEMU capabilities are probed on first use; do it now, not inside a migration.
    this.virshOk(["domcapabilities", "--virttype", "qemu", "--emulatorbin", EMULATOR], 120_000);
  }

  readOut(): string {
    try {
      return fs.readFileSync(path.join(this.dir(), "libvirtd.out"), "utf8");
    } catch {
      return "";
    }
  }
  readLog(from = 0): string {
    try {
      const fd = fs.openSync(this.logFile, "r");
      try {
        const size = fs.fstatSync(fd).size;
        const buf = Buffer.alloc(Math.max(0, size - from));
        fs.readSync(fd, buf, 0, buf.length, from);
        return buf.toString("utf8");
      } finally {
        fs.closeSync(fd);
      }
    } catch {
      return "";
    }
  }
  logSize(): number {
    try {
      return fs.statSync(this.logFile).size;
    } catch {
      return 0;
    }
  }

  /** The PID of this daemon's QEMU for `name`, from libvirt's PID file. */
  qemuPid(name: string): number | undefined {
    try {
      return (
        Number(fs.readFileSync(path.join(this.dir("run"), "qemu", `${name}.pid`), "utf8").trim()) || undefined
      );
    } catch {
      return undefined;
    }
  }

  /** Destroys and undefines every domain (best effort). */
  clear(): void {
    const r = this.virsh(["list", "--all", "--name"], 30_000);
    for (const dom of r.stdout.split("\n").filter(Boolean)) {
      this.virsh(["destroy", dom], 30_000);
      this.virsh(["undefine", dom, "--nvram"], 30_000);
    }
  }

  async stop(): Promise<void> {
    if (this.pid && pidAlive(this.pid)) {
      this.clear();
      const qemus = fs.existsSync(path.join(this.dir("run"), "qemu"))
        ? fs
            .readdirSync(path.join(this.dir("run"), "qemu"))
            .filter((f) => f.endsWith(".pid"))
            .map((f) => Number(fs.readFileSync(path.join(this.dir("run"), "qemu", f), "utf8").trim()) || 0)
        : [];
      for (const [pids, signal] of [
        [[this.pid], "SIGTERM"],
        [[this.pid, this.libvirtdPid, ...qemus], "SIGKILL"],
      ] as const) {
        // Never 0 (process.kill(0) signals this process's own group).
        for (const p of pids.filter((x) => x > 0)) {
          try {
            process.kill(p, signal);
          } catch {
            /* gone */
          }
        }
        await Promise.all(pids.filter((x) => x > 0).map((x) => waitGone(x, 5000)));
      }
    }
    fs.rmSync(this.dir(), { recursive: true, force: true });
  }
}

/** A libvirtd log line's time (UTC, ms) and text. */
interface LogLine {
  t: number;
  text: string;
}
function logLines(log: string): LogLine[] {
  const out: LogLine[] = [];
  for (const l of log.split(/\r?\n/)) {
    const m = /^(\d{4}-\d\d-\d\d) (\d\d:\d\d:\d\d\.\d{3})\+0000: (.*)$/.exec(l);
    if (m) out.push({ t: Date.parse(`${m[1]}T${m[2]}Z`), text: m[3]! });
  }
  return out;
}
/** The QMP commands a daemon sent, with their times. */
function qmpSent(lines: LogLine[]): { t: number; cmd: string; text: string }[] {
  return lines
    .filter((l) => l.text.includes("QEMU_MONITOR_SEND_MSG"))
    .map((l) => ({ t: l.t, cmd: /"execute":"([^"]+)"/.exec(l.text)?.[1] ?? "?", text: l.text }));
}

/** Repeats collapsed: ["qom-get", "qom-get", "cont"] → ["qom-get x2", "cont"]. */
function runs(cmds: string[]): string[] {
  const out: { cmd: string; n: number }[] = [];
  for (const cmd of cmds) {
    const last = out.at(-1);
    if (last?.cmd === cmd) last.n++;
    else out.push({ cmd, n: 1 });
  }
  return out.map((r) => (r.n > 1 ? `${r.cmd} x${r.n}` : r.cmd));
}

/** `virsh domjobinfo` output as key → value. */
function parseJobInfo(out: string): Record<string, string> {
  const r: Record<string, string> = {};
  for (const l of out.split("\n")) {
    const m = /^([^:]+):\s+(.*)$/.exec(l.trim());
    if (m) r[m[1]!.trim()] = m[2]!.trim().replace(/\s+/g, " ");
  }
  return r;
}
const num = (v: string | undefined): number | undefined =>
  v === undefined || !Number.isFinite(Number.parseFloat(v)) ? undefined : Number.parseFloat(v);

/** Starts a libvirtd in each host of `tb` (the test bed must be up; libvirt installed). */
export async function libvirtUp(tb: Testbed): Promise<Libvirt> {
  requireLibvirt();
  const a = new Daemon(tb, "a");
  const b = new Daemon(tb, "b");
  try {
    // One after the other: each probes QEMU's capabilities on 2 shared cores.
    await a.start();
    await b.start();
  } catch (err) {
    await a.stop();
    await b.stop();
    throw err;
  }

  const migrate = async (
    xml: string,
    name: string,
    addr: string,
    opts: LibvirtMigrateOptions = {},
  ): Promise<LibvirtRun> => {
    const { def } = parseDomainXml(xml);
    const copied = def.disks.filter(
      (d) => d.device === "disk" && d.type === "file" && d.source && !d.shareable && !d.readonly,
    );
    const xmlFile = path.join(a.dir(), `${name}.xml`);
    fs.writeFileSync(xmlFile, libvirtXml(xml, name));
    const serialLog = path.join(tb.a.dir, "log", `${name}.serial.log`);
    fs.rmSync(serialLog, { force: true });
    fs.rmSync(path.join(tb.b.dir, "log", `${name}.serial.log`), { force: true });
    try {
      a.virshOk(["define", xmlFile]);
      a.virshOk(["start", name]);
      await (opts.ready ? opts.ready() : guestServes(tb, addr, () => tb.a.consoleLog(name)));
      execFileSync("sync");
      const sizes = await Promise.all(copied.map((d) => imageInfo(tb.a.hostPath(d.source!), d.format)));
      const srcPid = a.qemuPid(name);
      const srcCpu = srcPid ? cpuSampler(srcPid) : undefined;
      const logA = a.logSize();
      const logB = b.logSize();
      const tx0 = tb.linkTxBytes();
      const t0 = Date.now();
      // What a libvirt user does first for files outside any storage pool: the destination images, at the
      // source's format and virtual size.
      const p0 = performance.now();
      for (const [i, d] of copied.entries())
        await createImage(tb.b.hostPath(d.source!), d.format, sizes[i]!.virtualSize);
      const precreateS = (performance.now() - p0) / 1000;
      let bounded = false;
      const bound =
        opts.boundS === undefined
          ? undefined
          : setTimeout(() => {
              bounded = true;
              a.virsh(["domjobabort", name]);
            }, opts.boundS * 1000);
      const run = await runAsync([
        "virsh",
        "-c",
        a.uri,
        "migrate",
        "--live",
        "--copy-storage-all",
        "--suspend",
        "--unsafe",
        "--verbose",
        ...(opts.flags ?? []),
        name,
        b.uri,
        `tcp://${tb.b.addr}`,
      ]).catch((err: unknown) => {
        if (bounded) return undefined;
        throw err;
      });
      clearTimeout(bound);
      const t1 = Date.now();
      const srcCpuS = srcCpu?.stop();
      const wireBytes = tb.linkTxBytes() - tx0;
      opts.after?.();
      if (!run) {
        return {
          completed: false,
          totalS: (t1 - t0) / 1000,
          virshS: 0,
          precreateS,
          identical: true,
          wireBytes,
          jobInfo: {},
          qmp: { source: [], destination: [] },
        };
      }
      const dstPid = b.qemuPid(name);
      const dstCpuS = dstPid ? cpuSeconds(dstPid) : undefined;
      // The destination is paused (--suspend) and the source gone: the disks are final.
      let difference: string | undefined;
      for (const d of copied) {
        const diff = await compareImages(
          tb.a.hostPath(d.source!),
          tb.b.hostPath(d.source!),
          d.format,
          d.format,
        );
        if (diff !== null) {
          difference = `${d.target}: ${diff}`;
          break;
        }
      }
      let jobInfo = parseJobInfo(a.virsh(["domjobinfo", name, "--completed"]).stdout);
      if (!jobInfo["Time elapsed"])
        jobInfo = parseJobInfo(b.virsh(["domjobinfo", name, "--completed"]).stdout);
      const src = logLines(a.readLog(logA));
      const dst = logLines(b.readLog(logB));
      const qa = qmpSent(src);
      const qb = qmpSent(dst);
      const nbdAdd = qa.find((q) => q.cmd === "blockdev-add" && q.text.includes('"driver":"nbd"'));
      const readies = src.filter(
        (l) => l.text.includes("QEMU_MONITOR_RECV_EVENT") && l.text.includes("BLOCK_JOB_READY"),
      );
      const ready = readies.at(-1);
      const completed = src.find(
        (l) =>
          l.text.includes("QEMU_MONITOR_RECV_EVENT") &&
          /"event": ?"MIGRATION".*"status": ?"completed"/.test(l.text),
      );
      const confirm = src.find((l) => /qemuMigrationSrcConfirm/.test(l.text));
      const s = (x: number, y: number) => (y - x) / 1000;
      const phases =
        nbdAdd && ready && completed && confirm
          ? {
              prepare: s(t0, nbdAdd.t),
              mirror: s(nbdAdd.t, ready.t),
              memory: s(ready.t, completed.t),
              finish: s(completed.t, confirm.t),
              confirm: s(confirm.t, t1),
            }
          : undefined;
      const elapsed = num(jobInfo["Time elapsed"]);
      return {
        completed: true,
        totalS: precreateS + run.seconds,
        virshS: run.seconds,
        precreateS,
        jobElapsedS: elapsed === undefined ? undefined : elapsed / 1000,
        downtimeMs: num(jobInfo["Total downtime"]),
        readyS: ready ? s(t0, ready.t) : undefined,
        phases,
        identical: difference === undefined,
        ...(difference ? { difference } : {}),
        srcCpuS,
        dstCpuS,
        wireBytes,
        jobInfo,
        qmp: { source: runs(qa.map((q) => q.cmd)), destination: runs(qb.map((q) => q.cmd)) },
      };
    } finally {
      b.virsh(["destroy", name], 60_000);
      b.virsh(["undefine", name], 30_000);
      a.virsh(["destroy", name], 60_000);
      a.virsh(["undefine", name], 30_000);
      for (const h of [tb.a, tb.b]) {
        for (const d of def.disks)
          if (d.source?.startsWith(HOST_ROOT)) fs.rmSync(h.hostPath(d.source), { force: true });
        fs.rmSync(path.join(h.dir, "log", `${name}.serial.log`), { force: true });
      }
      for (const d of [a, b]) fs.rmSync(path.join(d.dir("log"), "qemu", `${name}.log`), { force: true });
      fs.rmSync(xmlFile, { force: true });
    }
  };

  return {
    uri: { a: a.uri, b: b.uri },
    migrate,
    down: async () => {
      await a.stop();
      await b.stop();
    },
  };
}
