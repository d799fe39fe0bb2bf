/**
 * The floor: libvirt's NBD storage migration sequence (shared/notes, "The NBD storage migration sequence that
 * works") driven over QMP by this process, with nothing around it: no agents, no CLI, no cookie, no state
 * files. The same reference VM and image as nbdmig's runs, QEMU started with the command line nbdmig's
 * `blockdev` layout builds (libvirt's layout), the same link. What nbdmig takes beyond this is orchestration
 * or a difference in the QEMU work it asks for, and the phase and CPU columns say which.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { buildQemuArgs, formatNode } from "../src/domain/qemu-args.js";
import type { DomainDef } from "../src/domain/model.js";
import { parseDomainXml } from "../src/domain/xml.js";
import { compareImages, createImage, imageInfo } from "../src/qemu/img.js";
import { waitGone } from "../src/qemu/launcher.js";
import { QmpClient } from "../src/qemu/qmp.js";
import { completedMigrationInfo } from "../src/qemu/qmp-util.js";
import { HOST_ROOT, BRIDGE, type Testbed } from "../src/testbed/testbed.js";
import { cpuSeconds } from "./common.js";

/** Seconds: Begin + Prepare, mirror to READY, RAM to completed, Finish, Confirm. */
export interface Phases {
  prepare: number;
  mirror: number;
  memory: number;
  finish: number;
  confirm: number;
}

export interface FloorRun {
  totalS: number;
  readyS: number;
  downtimeMs?: number;
  /** Phase durations in seconds. */
  phases: Phases;
  /** CPU seconds of the source QEMU during the migration, and of the destination QEMU from its start. */
  srcCpuS: number;
  dstCpuS: number;
  /** The destination's disk equals the source's at the switchover (both QEMUs paused). */
  identical: boolean;
  /** What host a sent over the link from Prepare to the end of the stream. */
  wireBytes: number;
}

interface FloorQemu {
  pid: number;
  qmp: QmpClient;
  tap: string;
}

const NBD_PORT = 10850;
const MIGRATION_PORT = 10851;

/** Starts QEMU for `def` inside a test host with a tap on its bridge, as the agent would but by hand. */
async function startQemu(
  tb: Testbed,
  host: "a" | "b",
  def: DomainDef,
  tag: string,
  incoming: boolean,
): Promise<FloorQemu> {
  const h = tb[host];
  const tap = `fl${tag}${host}`.slice(0, 15);
  execFileSync("ip", ["-n", h.netns, "tuntap", "add", "dev", tap, "mode", "tap"]);
  execFileSync("ip", ["-n", h.netns, "link", "set", tap, "master", BRIDGE, "up"]);
  const qmpSocket = `${HOST_ROOT}/floor-${def.name}.qmp`;
  const args = buildQemuArgs(def, {
    accel: "tcg",
    layout: "blockdev",
    qmpSocket,
    serialLog: `${HOST_ROOT}/log/${def.name}.serial.log`,
    incoming,
    host: {
      nics: [{ kind: "tap", ifname: tap, vhost: false }],
      channelSocket: (n) => `${HOST_ROOT}/floor-${def.name}-${n}.sock`,
      consoleLog: (p) => `${HOST_ROOT}/log/${def.name}.console${p}.log`,
    },
  });
  fs.mkdirSync(path.join(h.dir, "log"), { recursive: true });
  fs.rmSync(h.hostPath(qmpSocket), { force: true });
  const log = fs.openSync(path.join(h.dir, "log", `${def.name}.floor.log`), "a");
  const pre = h.execPrefix();
  // nsenter without a PID namespace execs QEMU in its own process: the child's PID is QEMU's.
  const child = spawn(pre[0]!, [...pre.slice(1), "qemu-system-x86_64", ...args], {
    detached: true,
    stdio: ["ignore", log, log],
  });
  fs.closeSync(log);
  child.unref();
  const qmp = await QmpClient.connect(h.hostPath(qmpSocket), { waitMs: 20_000 });
  return { pid: child.pid!, qmp, tap };
}

async function stopQemu(tb: Testbed, host: "a" | "b", q: FloorQemu): Promise<void> {
  await q.qmp.execute("quit").catch(() => undefined);
  if (!(await waitGone(q.pid, 5000))) {
    process.kill(q.pid, "SIGKILL");
    await waitGone(q.pid, 5000);
  }
  q.qmp.close();
  // The tap goes once nothing holds it; a busy machine may take a moment to let go of it.
  for (let i = 0; ; i++) {
    const r = spawnSync("ip", ["-n", tb[host].netns, "link", "del", q.tap], { encoding: "utf8" });
    if (r.status === 0 || /Cannot find device/.test(r.stderr)) return;
    if (i === 50) throw new Error(`cannot remove the floor's tap ${q.tap} on ${host}: ${r.stderr.trim()}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

/**
 * One migration by the bare sequence of a domain whose images are in place on host a (the shared disk on
 * both). `domainXml` is what nbdmig's runs define; `ready` waits until the guest on host a serves; `sync: false`
 * leaves the page cache as the guest left it.
 */
export async function floorOnce(
  tb: Testbed,
  domainXml: string,
  tag: string,
  ready: (serialLog: () => string) => Promise<void>,
  opts: { sync?: boolean } = {},
): Promise<FloorRun> {
  const { def } = parseDomainXml(domainXml);
  const disk = def.disks.find((d) => !d.shareable && d.source !== undefined)!;
  const src = await startQemu(tb, "a", def, tag, false);
  let dst: FloorQemu | undefined;
  try {
    await src.qmp.execute("cont");
    await ready(() => tb.a.consoleLog(def.name));
    // Unless asked not to (the write-back benchmark): the page cache starts clean, as nbdmig's runs do.
    if (opts.sync !== false) execFileSync("sync");
    const srcCpu0 = cpuSeconds(src.pid);
    const t0 = performance.now();
    const tx0 = tb.linkTxBytes();
    // Prepare (destination): the image precreated at the source's size, QEMU waiting, NBD export, incoming.
    const { virtualSize } = await imageInfo(tb.a.hostPath(disk.source!), disk.format);
    await createImage(tb.b.hostPath(disk.source!), disk.format, virtualSize);
    dst = await startQemu(tb, "b", def, tag, true);
    await dst.qmp.execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "events", state: true },
        { capability: "late-block-activate", state: true },
      ],
    });
    await dst.qmp.execute("nbd-server-start", {
      addr: { type: "inet", data: { host: tb.b.addr, port: String(NBD_PORT) } },
    });
    await dst.qmp.execute("block-export-add", {
      type: "nbd",
      id: "export-0",
      "node-name": formatNode(disk.target),
      name: disk.target,
      writable: true,
    });
    await dst.qmp.execute("migrate-incoming", { uri: `tcp:${tb.b.addr}:${MIGRATION_PORT}` });
    const t1 = performance.now();
    // Perform (source): mirror to READY.
    await src.qmp.execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "events", state: true },
        { capability: "pause-before-switchover", state: true },
      ],
    });
    await src.qmp.raw("migrate-set-parameters", { "max-bandwidth": 8796093022207 });
    const ready0 = src.qmp.waitEvent("BLOCK_JOB_READY", (d) => d.device === "floor-mirror", 600_000);
    await src.qmp.execute("blockdev-add", {
      driver: "nbd",
      "node-name": "floor-nbd",
      server: { type: "inet", host: tb.b.addr, port: String(NBD_PORT) },
      export: disk.target,
    });
    await src.qmp.execute("blockdev-mirror", {
      "job-id": "floor-mirror",
      device: formatNode(disk.target),
      target: "floor-nbd",
      sync: "full",
      "auto-dismiss": false,
    });
    await ready0;
    const t2 = performance.now();
    // RAM and devices; at pre-switchover the mirror is cancelled (completes without pivoting).
    const pre = src.qmp.waitEvent("MIGRATION", (d) => d.status === "pre-switchover", 600_000);
    const done = src.qmp.waitEvent(
      "MIGRATION",
      (d) => d.status === "completed" || d.status === "failed",
      600_000,
    );
    const dstDone = dst.qmp.waitEvent("MIGRATION", (d) => d.status === "completed", 600_000);
    await src.qmp.execute("migrate", { uri: `tcp:${tb.b.addr}:${MIGRATION_PORT}` });
    await pre;
    const cancelled = src.qmp.waitEvent("BLOCK_JOB_COMPLETED", (d) => d.device === "floor-mirror", 30_000);
    await src.qmp.execute("block-job-cancel", { device: "floor-mirror" });
    await cancelled;
    await src.qmp.execute("job-dismiss", { id: "floor-mirror" });
    await src.qmp.execute("blockdev-del", { "node-name": "floor-nbd" });
    await src.qmp.execute("migrate-continue", { state: "pre-switchover" });
    const end = await done;
    if (end.data.status !== "completed") throw new Error("floor: the migration failed");
    const info = await completedMigrationInfo(() => src.qmp.execute("query-migrate"));
    await dstDone;
    const t3 = performance.now();
    const wireBytes = tb.linkTxBytes() - tx0;
    // Both sides paused, the disks final: compare them (not timed; the destination then resumes).
    const identical =
      (await compareImages(
        tb.a.hostPath(disk.source!),
        tb.b.hostPath(disk.source!),
        disk.format,
        disk.format,
      )) === null;
    const t3b = performance.now();
    // Finish (destination) and Confirm (source).
    await dst.qmp.execute("nbd-server-stop");
    await dst.qmp.execute("cont");
    const t4 = performance.now();
    const srcCpu = cpuSeconds(src.pid) - srcCpu0;
    await stopQemu(tb, "a", src);
    const t5 = performance.now();
    const dstCpu = cpuSeconds(dst.pid);
    const s = (a: number, b: number) => (b - a) / 1000;
    return {
      totalS: s(t0, t5) - s(t3, t3b),
      readyS: s(t0, t2),
      downtimeMs: info.downtime,
      phases: {
        prepare: s(t0, t1),
        mirror: s(t1, t2),
        memory: s(t2, t3),
        finish: s(t3b, t4),
        confirm: s(t4, t5),
      },
      srcCpuS: srcCpu,
      dstCpuS: dstCpu,
      identical,
      wireBytes,
    };
  } finally {
    if (!src.qmp.isClosed) await stopQemu(tb, "a", src);
    if (dst) await stopQemu(tb, "b", dst);
  }
}
