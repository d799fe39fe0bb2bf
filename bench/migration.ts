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
import { inHost, median, nbdcopyBetweenHosts, nbdmigOk, referenceImage } from "./common.js";

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
}

async function migrateOnce(
  tb: Testbed,
  link: string,
  i: number,
  guestDir: string,
  tls: boolean,
): Promise<MigrationRow> {
  const name = `ref${i}`;
  // A fresh address per run: the client's ARP cache still knows the previous guest's MAC.
  const addr = guestAddress(10 + (i % 90));
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
  fs.writeFileSync(
    path.join(tb.a.dir, `${name}.xml`),
    `<domain type='kvm'><name>${name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>${guestDir}/vmlinuz</kernel><initrd>${guestDir}/initrd.img</initrd>
<cmdline>console=ttyS0 quiet nbdmig.rate=20 nbdmig.span=2048 nbdmig.ip=${addr}/24</cmdline></os>
<features><acpi/><apic/></features>
<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/nbdmig/images/${name}.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='raw' cache='none'/><source file='/var/lib/nbdmig/images/${name}-shared.raw'/><target dev='vdb' bus='virtio'/><shareable/></disk>
<interface type='bridge'><source bridge='br0'/><model type='virtio'/></interface>
<serial type='pty'/></devices></domain>`,
  );
  nbdmigOk(tb, "a", ["define", `/var/lib/nbdmig/${name}.xml`]);
  nbdmigOk(tb, "a", ["start", name]);
  for (let k = 0; k < 120 && !/nbdmig-guest: t=3 /.test(nbdmigOk(tb, "a", ["console", name])); k++)
    await sleep(500);
  for (let k = 0; k < 60 && (await tb.clientGet(`http://${addr}/`)).status !== 200; k++) await sleep(500);
  execFileSync("sync");
  const poll = tb.startPoller(`http://${addr}/`, 50);
  await sleep(500);
  const t0 = Date.now();
  const tx0 = tb.linkTxBytes();
  nbdmigOk(tb, "a", ["migrate", "--live", "--copy-storage-all", tls ? "--tls" : "--no-tls", name, tb.b.uri]);
  const wire = tb.linkTxBytes() - tx0;
  const t1 = Date.now();
  // Until the client has an answer from the destination (or 30 s without one: no gap is reported then).
  for (let k = 0; k < 600 && !poll.samples().some((x) => x.ok && x.at > t1); k++) await sleep(50);
  const samples = await poll.stop();
  const gap = samples.some((x) => x.ok && x.at > t1) ? longestGap(samples, t0, Date.now()).ms : undefined;
  const job = JSON.parse(nbdmigOk(tb, "a", ["domjobinfo", name, "--completed", "--json"])) as {
    elapsedMs: number;
    timeToReadyMs: number;
    downtimeMs: number;
    disk: { total: number };
    memory: { processed: number };
  };
  nbdmigOk(tb, "b", ["destroy", name]);
  nbdmigOk(tb, "a", ["undefine", name]);
  for (const h of ["a", "b"] as const)
    for (const f of [`${name}.qcow2`, `${name}-shared.raw`])
      fs.rmSync(path.join(tb[h].imagesDir, f), { force: true });
  return {
    link,
    what: tls ? "nbdmig migrate --tls" : "nbdmig migrate",
    totalS: job.elapsedMs / 1000,
    readyS: job.timeToReadyMs / 1000,
    downtimeMs: job.downtimeMs,
    gapMs: gap,
    diskMiB: job.disk.total / MiB,
    ramMiB: job.memory.processed / MiB,
    wireMiB: wire / MiB,
    rateMiBs: job.disk.total / MiB / (job.timeToReadyMs / 1000),
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
  try {
    for (const [link, rate] of [
      ["veth, unshaped", undefined],
      ["tbf 1 Gbit/s", "1gbit"],
    ] as const) {
      tb.setRate(rate);
      const tcp = tcpRate(tb);
      const peer = await nbdcopyRate(tb);
      // Plain and TLS interleaved round by round, so that both see the same machine.
      const ours: Record<"plain" | "tls", MigrationRow[]> = { plain: [], tls: [] };
      for (let i = 0; i < runs; i++) {
        for (const variant of ["plain", "tls"] as const) {
          process.stderr.write(`migration bench: ${link}, ${variant}, run ${i + 1}/${runs}\n`);
          const n = rows.length * 10 + i * 2 + (variant === "tls" ? 1 : 0);
          const r = await migrateOnce(tb, link, n, guestDir, variant === "tls");
          process.stderr.write(
            `  total ${r.totalS.toFixed(2)} s, downtime ${r.downtimeMs} ms, client gap ${r.gapMs ?? "no answer after the move"} ms\n`,
          );
          ours[variant].push(r);
        }
      }
      const summary = (rs: MigrationRow[], what: string): MigrationRow => {
        const med = (f: (r: MigrationRow) => number | undefined) => median(rs.map((r) => f(r) ?? 0));
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
        };
      };
      const plain = summary(ours.plain, "nbdmig migrate");
      const tls = summary(ours.tls, "nbdmig migrate --tls");
      tls.note = `copy rate ${(tls.rateMiBs / plain.rateMiBs).toFixed(2)}x plain, total ${(plain.totalS / tls.totalS).toFixed(2)}x (target 0.8x)`;
      rows.push(plain, tls);
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
    await tb.down();
  }
  return rows;
}
