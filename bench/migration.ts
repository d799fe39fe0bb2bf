/**
 * Migration benchmark: the reference VM (256 MiB RAM, 2 GiB qcow2 with 512 MiB of random data, guest writing
 * ~20 MiB/s, a shareable disk that is not copied, a virtio NIC on the VM network serving HTTP) migrated with
 * --copy-storage-all across the namespace link, unshaped and shaped with tbf, and resumed on the destination.
 * A client polls the guest every 50 ms throughout: the longest gap in its answers stands beside QEMU's own
 * downtime. Also measured in the same run on the same link: raw TCP throughput, and nbdcopy moving the same
 * image into a qemu-nbd on the destination.
 */
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { guestAddress, longestGap, Testbed } from "../src/testbed/testbed.js";
import {
  cpuSampler,
  cpuSeconds,
  guestServes,
  inHost,
  median,
  nbdcopyBetweenHosts,
  nbdmigOk,
  referenceImage,
  referenceVm,
  runAsync,
} from "./common.js";
import { floorOnce, type Phases } from "./floor.js";
import { libvirtUp, type Libvirt } from "./libvirt.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const MiB = 1024 * 1024;

export interface MigrationRow {
  link: string;
  what: string;
  totalS: number;
  readyS?: number;
  downtimeMs?: number;
  /** The longest pause in answers seen by a client polling the guest every 50 ms. */
  gapMs?: number;
  diskMiB?: number;
  ramMiB?: number;
  wireMiB: number;
  rateMiBs: number;
  note?: string;
  /** Seconds: Begin + Prepare, mirror to READY, RAM to completed, Finish, Confirm. */
  phases?: Phases;
  /** CPU seconds of the source QEMU during the migration and of the destination QEMU up to its end. */
  srcCpuS?: number;
  dstCpuS?: number;
  /** The floor compares the two disks at the switchover. */
  identical?: boolean;
}

type Variant = "plain" | "tls" | "floor" | "libvirt";

async function migrateOnce(
  tb: Testbed,
  link: string,
  i: number,
  guestDir: string,
  variant: Variant,
  lv: Libvirt,
): Promise<MigrationRow> {
  const name = `ref${i}`;
  // A fresh address per run: the client's ARP cache still knows the previous guest's MAC.
  const addr = guestAddress(10 + (i % 90));
  const xml = referenceVm(tb, name, addr, guestDir);
  const cleanUp = () => {
    for (const h of ["a", "b"] as const)
      for (const f of [`${name}.qcow2`, `${name}-shared.raw`])
        fs.rmSync(path.join(tb[h].imagesDir, f), { force: true });
  };
  if (variant === "floor" || variant === "libvirt") {
    try {
      const r =
        variant === "floor"
          ? await floorOnce(tb, xml, String(i), (console) => guestServes(tb, addr, console))
          : await lv.migrate(xml, name, addr);
      if (!r.identical) process.stderr.write(`  ${variant}: the disks differ\n`);
      return {
        link,
        what:
          variant === "floor"
            ? "floor: the bare QMP sequence"
            : "libvirt 9.0: virsh migrate --live --copy-storage-all --suspend",
        totalS: r.totalS,
        readyS: r.readyS,
        downtimeMs: r.downtimeMs,
        wireMiB: r.wireBytes / MiB,
        rateMiBs: r.readyS ? 2048 / r.readyS : 0,
        phases: r.phases,
        srcCpuS: r.srcCpuS,
        dstCpuS: r.dstCpuS,
        identical: r.identical,
      };
    } finally {
      cleanUp();
    }
  }
  const tls = variant === "tls";
  fs.writeFileSync(path.join(tb.a.dir, `${name}.xml`), xml);
  nbdmigOk(tb, "a", ["define", `/var/lib/nbdmig/${name}.xml`]);
  nbdmigOk(tb, "a", ["start", name]);
  await guestServes(tb, addr, () => tb.a.consoleLog(name));
  execFileSync("sync");
  const [srcPid] = tb.a.qemuPids();
  const poll = tb.startPoller(`http://${addr}/`, 50);
  await sleep(500);
  const srcCpu = cpuSampler(srcPid!);
  const t0 = Date.now();
  const tx0 = tb.linkTxBytes();
  await runAsync(
    tb.a.cliArgv(["migrate", "--live", "--copy-storage-all", tls ? "--tls" : "--no-tls", name, tb.b.uri]),
  );
  const t1 = Date.now();
  const srcCpuS = srcCpu.stop();
  const dstCpuS = cpuSeconds(tb.b.qemuPids()[0]!);
  const wire = tb.linkTxBytes() - tx0;
  // Until the client has an answer from the destination (or 30 s without one: no gap is reported then).
  for (let k = 0; k < 600 && !poll.samples().some((x) => x.ok && x.at > t1); k++) await sleep(50);
  const samples = await poll.stop();
  const gap = samples.some((x) => x.ok && x.at > t1) ? longestGap(samples, t0, Date.now()).ms : undefined;
  const job = JSON.parse(nbdmigOk(tb, "a", ["domjobinfo", name, "--completed", "--json"])) as {
    startedAt: number;
    elapsedMs: number;
    timeToReadyMs: number;
    downtimeMs: number;
    phaseTimes: Record<string, number>;
    disk: { total: number };
    memory: { processed: number };
  };
  nbdmigOk(tb, "b", ["destroy", name]);
  nbdmigOk(tb, "a", ["undefine", name]);
  cleanUp();
  // Times from the CLI's start, as virsh's wall time is libvirt's: the job starts after the CLI has started
  // and Begin has asked the destination, and the CLI returns after the job has ended.
  const begin = (job.startedAt - t0) / 1000;
  const at = (p: string) => begin + (job.phaseTimes[p] ?? job.elapsedMs) / 1000;
  const totalS = (t1 - t0) / 1000;
  return {
    link,
    what: tls ? "nbdmig migrate --tls" : "nbdmig migrate",
    totalS,
    readyS: begin + job.timeToReadyMs / 1000,
    downtimeMs: job.downtimeMs,
    gapMs: gap,
    diskMiB: job.disk.total / MiB,
    ramMiB: job.memory.processed / MiB,
    wireMiB: wire / MiB,
    rateMiBs: job.disk.total / MiB / (begin + job.timeToReadyMs / 1000),
    phases: {
      prepare: at("perform:mirror"),
      mirror: at("perform:memory") - at("perform:mirror"),
      memory: at("finish") - at("perform:memory"),
      finish: at("confirm") - at("finish"),
      confirm: totalS - at("confirm"),
    },
    srcCpuS,
    dstCpuS,
  };
}

/** Raw TCP: host a sends 1 GiB to host b over the link (a node one-liner on each side). */
function tcpRate(tb: Testbed): number {
  const size = 1024 * MiB;
  const server = spawn(tb.b.execPrefix()[0]!, [
    ...tb.b.execPrefix().slice(1),
    process.execPath,
    "-e",
    `const s=require("net").createServer(c=>{let n=0;c.on("data",d=>n+=d.length);c.on("end",()=>{console.log(n);process.exit(0)})});s.listen(5999,"${tb.b.addr}",()=>console.log("up"))`,
  ]);
  execFileSync("sleep", ["0.5"]);
  const t0 = process.hrtime.bigint();
  inHost(tb, "a", [
    process.execPath,
    "-e",
    `const c=require("net").connect(5999,"${tb.b.addr}");const b=Buffer.alloc(1<<20,7);let left=${size / MiB};const w=()=>{while(left>0){left--;if(!c.write(b))return c.once("drain",w)}c.end()};c.on("connect",w)`,
  ]);
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  server.kill();
  return size / MiB / s;
}

/** nbdcopy streams the same 2 GiB image (512 MiB of data) into a qemu-nbd serving a fresh image on host b. */
async function nbdcopyRate(tb: Testbed): Promise<{ s: number; rate: number; wire: number }> {
  const src = referenceImage(tb, "a", "peer.qcow2");
  try {
    const { seconds, wireBytes } = await nbdcopyBetweenHosts(tb, src);
    return { s: seconds, rate: 2048 / seconds, wire: wireBytes / MiB };
  } finally {
    fs.rmSync(src, { force: true });
  }
}

export async function migrationBench(runs: number): Promise<MigrationRow[]> {
  execFileSync("bash", [path.join(repo, "scripts/build-test-guest.sh")], { stdio: "inherit" });
  const guestDir = path.join(repo, ".cache/test-guest");
  const tb = await Testbed.up();
  const rows: MigrationRow[] = [];
  /** Each migration's number, for the names it gives its domain and images. */
  let seq = 0;
  // Certificates on both hosts, so that the same run measures the migration with and without TLS.
  const ca = path.join(tb.dir, "ca");
  execFileSync(process.execPath, [path.join(repo, "dist/src/cli/main.js"), "tls-ca", ca]);
  for (const h of ["a", "b"] as const)
    execFileSync(process.execPath, [
      path.join(repo, "dist/src/cli/main.js"),
      "tls-host",
      "--ca",
      ca,
      "--out",
      path.join(tb[h].dir, "pki"),
      tb[h].addr,
    ]);
  let lv: Libvirt | undefined;
  try {
    // Two libvirtd, one in each test host, for libvirt's own migration of the same guest.
    lv = await libvirtUp(tb);
    for (const [link, rate] of [
      ["veth, unshaped", undefined],
      ["tbf 1 Gbit/s", "1gbit"],
    ] as const) {
      tb.setRate(rate);
      const tcp = tcpRate(tb);
      const peer = await nbdcopyRate(tb);
      // nbdmig plain, with TLS, the floor and libvirt interleaved round by round (the order rotating), so
      // that all four see the same machine.
      const variants: Variant[] = ["plain", "tls", "floor", "libvirt"];
      const ours: Record<Variant, MigrationRow[]> = { plain: [], tls: [], floor: [], libvirt: [] };
      // Round 0 warms up and is not counted: the first migration after the test bed (or the link) changed
      // would otherwise always be nbdmig's.
      for (let i = 0; i <= runs; i++) {
        for (let k = 0; k < variants.length; k++) {
          const variant = variants[(i + k) % variants.length]!;
          const which = i === 0 ? "warm-up, not counted" : `run ${i}/${runs}`;
          process.stderr.write(`migration bench: ${link}, ${variant}, ${which}\n`);
          const r = await migrateOnce(tb, link, seq++, guestDir, variant, lv);
          process.stderr.write(
            `  total ${r.totalS.toFixed(2)} s, READY ${r.readyS?.toFixed(2)} s, downtime ${r.downtimeMs} ms, ` +
              `client gap ${r.gapMs ?? "-"} ms, QEMU CPU s source ${r.srcCpuS?.toFixed(2)} destination ${r.dstCpuS?.toFixed(2)}` +
              `${r.identical === false ? ", DISKS DIFFER" : ""}\n`,
          );
          if (i > 0) ours[variant].push(r);
        }
      }
      const summary = (rs: MigrationRow[], what: string): MigrationRow => {
        const med = (f: (r: MigrationRow) => number | undefined) => median(rs.map((r) => f(r) ?? 0));
        const phase = (k: keyof Phases) => med((r) => r.phases?.[k]);
        return {
          link,
          what: `${what} (median of ${runs})`,
          totalS: med((r) => r.totalS),
          readyS: med((r) => r.readyS),
          downtimeMs: med((r) => r.downtimeMs),
          gapMs: rs.every((r) => r.gapMs !== undefined) ? med((r) => r.gapMs) : undefined,
          diskMiB: med((r) => r.diskMiB),
          ramMiB: med((r) => r.ramMiB),
          wireMiB: med((r) => r.wireMiB),
          rateMiBs: med((r) => r.rateMiBs),
          phases: {
            prepare: phase("prepare"),
            mirror: phase("mirror"),
            memory: phase("memory"),
            finish: phase("finish"),
            confirm: phase("confirm"),
          },
          srcCpuS: med((r) => r.srcCpuS),
          dstCpuS: med((r) => r.dstCpuS),
          identical: rs.every((r) => r.identical !== false),
        };
      };
      const plain = summary(ours.plain, "nbdmig migrate");
      const tls = summary(ours.tls, "nbdmig migrate --tls");
      const floor = summary(ours.floor, "floor: the bare QMP sequence");
      const libvirt = summary(ours.libvirt, "libvirt 9.0 (--suspend)");
      tls.note = `copy rate ${(tls.rateMiBs / plain.rateMiBs).toFixed(2)}x plain, total ${(plain.totalS / tls.totalS).toFixed(2)}x (target 0.8x)`;
      plain.note = `total ${(plain.totalS / floor.totalS).toFixed(2)}x the floor's, ${(plain.totalS / libvirt.totalS).toFixed(2)}x libvirt's`;
      libvirt.note = `${libvirt.identical ? "disks compared identical" : "DISKS DIFFERED in a run"}; total ${(libvirt.totalS / floor.totalS).toFixed(2)}x the floor's`;
      floor.note = floor.identical ? "disks compared identical" : "DISKS DIFFERED in a run";
      rows.push(plain, tls, floor, libvirt);
      rows.push({
        link,
        what: "nbdcopy -> qemu-nbd, same image",
        totalS: peer.s,
        wireMiB: peer.wire,
        rateMiBs: peer.rate,
        note: "no guest, no RAM",
      });
      rows.push({
        link,
        what: "raw TCP, 1 GiB",
        totalS: 1024 / tcp,
        wireMiB: 1024,
        rateMiBs: tcp,
        note: "the link's ceiling",
      });
    }
  } finally {
    await lv?.down();
    await tb.down();
  }
  return rows;
}
