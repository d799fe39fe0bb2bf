/**
 * `npm run bench`: benchmarks that compare nbdmig with real peers measured in the same run. Needs root (the
 * namespace test bed). `--only migration|db|converge|nbd|offline|writeback`, `--runs N` (default 3), `--bound S` (default 180),
 * `--modes auto,throttle,...` (converge only).
 */
import { convergeBench } from "./converge.js";
import { dbBench } from "./db.js";
import { migrationBench, type MigrationRow } from "./migration.js";
import { nbdBench } from "./nbd.js";
import { offlineBench } from "./offline.js";
import { writebackBench } from "./writeback.js";

const args = process.argv.slice(2);
const opt = (name: string) => (args.includes(name) ? args[args.indexOf(name) + 1] : undefined);
const runs = Number(opt("--runs") ?? 3) || 3;
const bound = Number(opt("--bound") ?? 180) || 180;
const only = opt("--only");

function table(headers: string[], rows: string[][]): string {
  const w = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (c: string[]) => "| " + c.map((x, i) => x.padEnd(w[i]!)).join(" | ") + " |";
  return [line(headers), "|" + w.map((n) => "-".repeat(n + 2)).join("|") + "|", ...rows.map(line)].join("\n");
}

const f = (n: number | undefined, d = 1) => (n === undefined ? "-" : n.toFixed(d));

if (!only || only === "migration") {
  const rows: MigrationRow[] = await migrationBench(runs);
  console.log(
    "\nMigration: reference VM (256 MiB RAM, 2 GiB qcow2 with 512 MiB random data, guest writing 20 MiB/s, one shareable disk not copied, a bridged NIC polled by a client every 50 ms)\n",
  );
  console.log(
    table(
      [
        "link",
        "what",
        "total s",
        "to READY s",
        "downtime ms",
        "client gap ms",
        "disk MiB",
        "RAM MiB",
        "on the wire MiB",
        "copy MiB/s",
        "note",
      ],
      rows.map((r) => [
        r.link,
        r.what,
        f(r.totalS, 2),
        f(r.readyS, 2),
        f(r.downtimeMs, 0),
        f(r.gapMs, 0),
        f(r.diskMiB, 0),
        f(r.ramMiB, 0),
        f(r.wireMiB, 0),
        f(r.rateMiBs, 0),
        r.note ?? "",
      ]),
    ),
  );
  console.log(
    "\nWhere the time goes (medians, seconds; QEMU CPU in CPU-seconds: the source's during the migration, the destination's from its start)\n",
  );
  console.log(
    table(
      [
        "link",
        "what",
        "Begin+Prepare",
        "mirror to READY",
        "RAM",
        "Finish",
        "Confirm",
        "source QEMU CPU",
        "destination QEMU CPU",
      ],
      rows
        .filter((r) => r.phases)
        .map((r) => [
          r.link,
          r.what,
          f(r.phases!.prepare, 2),
          f(r.phases!.mirror, 2),
          f(r.phases!.memory, 2),
          f(r.phases!.finish, 2),
          f(r.phases!.confirm, 2),
          f(r.srcCpuS, 2),
          f(r.dstCpuS, 2),
        ]),
    ),
  );
  console.log(`
  The floor is libvirt's NBD sequence (shared/notes) driven over QMP by the benchmark itself: QEMU started
  with nbdmig's blockdev command line, image precreated, NBD export, mirror to READY, migrate with
  pause-before-switchover, cancel the mirror, continue, nbd-server-stop, cont, quit the source; its total
  leaves out the disk comparison it makes while both sides are paused. nbdmig's totals are the CLI's wall
  time (as libvirt's are virsh's); its phases come from its job's phase times, "Begin+Prepare" counted from
  the CLI's start (its start-up and Begin included) and "Confirm" up to the CLI's exit.
  "copy MiB/s" is the disks' virtual size over the time to READY for nbdmig (zero regions travel as NBD
  WRITE_ZEROES, so it can exceed the link), the image size over the copy time for nbdcopy, bytes over time for
  TCP. "client gap ms" is the longest time between two answers a client on the VM network got while the
  guest moved (goal: at most QEMU's downtime + 300 ms, and under 1 s). libvirt runs with --suspend (the
  destination stays paused, so that the disks can be compared), so it has no client gap; its total is the
  destination image's precreation (libvirt 9.0 precreates only volumes of storage pools) plus virsh's wall
  time, its phases come from the QMP traffic in its daemons' logs.`);
}

if (!only || only === "db") {
  const rows = await dbBench(runs);
  console.log(
    `\nDatabase: Debian 12 guest (512 MiB RAM, PostgreSQL 15, ~600 MiB on a 4 GiB qcow2) under pgbench (4 clients, TPC-B-like) from the client, migrated live with --copy-storage-all; medians of ${runs}, a fresh guest per run\n`,
  );
  console.log(
    table(
      [
        "link",
        "--storage-converge",
        "total s",
        "to READY s",
        "downtime ms",
        "network gap ms",
        "TPS before",
        "TPS during",
        "TPS after",
        "longest stall s",
        "slowest second tps",
        "failed tx",
        "checks held",
      ],
      rows.map((r) => [
        r.link,
        r.mode,
        f(r.totalS, 1),
        f(r.readyS, 1),
        f(r.downtimeMs, 0),
        f(r.gapMs, 0),
        f(r.tpsBefore, 1),
        f(r.tpsDuring, 1),
        f(r.tpsAfter, 1),
        f(r.stallS, 0),
        f(r.slowestTps, 1),
        String(r.failed),
        r.clean,
      ]),
    ),
  );
  console.log(`
  "longest stall" is the longest run of seconds in which pgbench completed no transaction, "slowest second"
  the lowest per-second TPS during the migration (worst of all runs); "network gap" the longest time
  without an answer to the client's pings (one every 50 ms; the guest's kernel answers them, so they cost
  the guest nothing, unlike a connection to PostgreSQL). "checks held": runs with no
  failed transaction, no aborted client and pgbench's invariant intact.`);
}

if (!only || only === "converge") {
  const rows = await convergeBench(bound, opt("--modes")?.split(","));
  console.log(
    `\nHeavy writes: guest writing as fast as it can (random 1 MiB blocks), link tbf 200 Mbit/s, 2 GiB qcow2 with 512 MiB of data\n`,
  );
  console.log(
    table(
      [
        "--storage-converge",
        "result",
        "data at start MiB",
        "total s",
        "downtime ms",
        "guest MiB/s before",
        "guest MiB/s during (median)",
      ],
      rows.map((r) => [
        r.mode,
        r.result,
        f(r.dataAtStartMiB, 0),
        f(r.totalS, 1),
        f(r.downtimeMs, 0),
        f(r.guestBeforeMiBs, 0),
        f(r.guestDuringMiBs, 0),
      ]),
    ),
  );
  console.log(`
  libvirt's rows: the same guest and image, virsh migrate --live --copy-storage-all --suspend (bench/libvirt.ts),
  its total the destination image's precreation plus virsh's wall time; nbdmig's, the job's elapsed time.`);
}

if (!only || only === "nbd") {
  const { servers, copies, where } = await nbdBench(runs);
  console.log(
    `\nNBD servers on loopback, same 1 GiB file of random data on ${where} (medians of ${runs}); throughput by nbdcopy with 4 connections x 16 requests, latency by libnbd (nbdsh), serial 4 KiB random reads\n`,
  );
  console.log(
    table(
      ["server", "sequential read MiB/s", "sequential write MiB/s", "4 KiB random read latency us"],
      servers.map((r) => [r.server, f(r.readMiBs, 0), f(r.writeMiBs, 0), f(r.latencyUs, 0)]),
    ),
  );
  console.log(
    `\nCopy engines between the same two qemu-nbd servers, images on ${where} (4 connections x 16 requests, medians of ${runs})\n`,
  );
  console.log(
    table(
      ["copy", "tool", "seconds", "loopback traffic MiB"],
      copies.map((r) => [r.what, r.tool, f(r.seconds, 2), f(r.loopbackMiB, 0)]),
    ),
  );
}

if (!only || only === "offline") {
  const { rows, resume, resumeNotRun } = await offlineBench(runs);
  console.log(
    `\nOffline migration of a shut-off domain (migrate --offline --copy-storage-all) beside nbdcopy between the same two qemu-nbd-served images, same run, same link; medians of ${runs}\n`,
  );
  console.log(
    table(
      ["disk", "link", "tool", "seconds", "data MiB/s", "wire MiB", "wire / data", "note"],
      rows.map((r) => [
        r.disk,
        r.link,
        r.tool,
        f(r.seconds, 2),
        f(r.dataMiBs, 0),
        f(r.wireMiB, 1),
        f(r.wireRatio, 3),
        r.note ?? "",
      ]),
    ),
  );
  console.log(`
  "data" is what block status reports as allocated on the source (512 MiB, 100 MiB), so "data MiB/s" is the
  allocated data over the whole command's time (nbdmig: the CLI from start to exit, Begin, Prepare and
  Finish included; the copy phase alone in the note). "wire" is what host a sent over the link. nbdcopy
  runs with its defaults (4 connections, both qemu-nbd offering multi-conn) and --flush, from a read-only
  qemu-nbd on host a into a qemu-nbd on host b serving an image created as nbdmig's destination creates one.`);
  if (resumeNotRun) console.log(`\nResumed copy (--keep-partial): not run, ${resumeNotRun}.`);
  else {
    console.log(
      `\nResumed copy: migrate --offline --copy-storage-all --keep-partial aborted once half of the data had crossed, then the same command again (the second attempt measured); medians of ${runs}\n`,
    );
    console.log(
      table(
        [
          "disk",
          "link",
          "cut at MiB sent",
          "resumed from MiB",
          "missing MiB",
          "seconds",
          "wire MiB",
          "wire / missing",
          "note",
        ],
        resume.map((r) => [
          r.disk,
          r.link,
          f(r.cutMiB, 0),
          f(r.resumedFromMiB, 0),
          f(r.missingMiB, 1),
          f(r.seconds, 2),
          f(r.wireMiB, 1),
          f(r.ratio, 3),
          r.note,
        ]),
      ),
    );
    console.log(`
  "missing" is the source's allocated data at or beyond the offset the second attempt resumed at.`);
  }
}

if (!only || only === "writeback") {
  const rows = await writebackBench(runs);
  console.log(
    "\nWrite-back: the reference VM after 15 s of writing (20 MiB/s), nothing synced before the migration, so that its writes are still in the source host's page cache when QEMU flushes the disks at the switchover; medians of " +
      runs +
      "\n",
  );
  console.log(
    table(
      ["what", "dirty page cache at start MiB", "downtime ms", "total s", "downtime samples ms"],
      rows.map((r) => [r.what, f(r.dirtyMiB, 0), f(r.downtimeMs, 0), f(r.totalS, 2), r.samples.join(", ")]),
    ),
  );
}
