/**
 * Database benchmark: the database guest (Debian 12, PostgreSQL 15; scripts/build-db-guest.sh) under pgbench
 * from the client namespace (4 clients, TPC-B-like), migrated live with --copy-storage-all: unshaped with the
 * default convergence, and over a link shaped to 200 Mbit/s with `--storage-converge auto`. A fresh guest
 * per run (the same image, booted). Reported: TPS before, during and after the migration, the longest stall
 * and the slowest second (pgbench's per-second progress), QEMU's downtime, the network gap (the longest time
 * without an answer to the client's pings, one every 50 ms), the total time, and
 * whether no transaction failed and the invariant held.
 */
import fs from "node:fs";
import {
  buildDbGuest,
  checkDb,
  failedTransactions,
  longestStall,
  startDbGuest,
  startPgbench,
  tpsBetween,
} from "../src/testbed/db-guest.js";
import { guestAddress, longestGap, Testbed } from "../src/testbed/testbed.js";
import { median, nbdmigOk } from "./common.js";

export interface DbRow {
  link: string;
  mode: string;
  totalS: number;
  readyS: number;
  downtimeMs: number;
  gapMs: number;
  tpsBefore: number;
  tpsDuring: number;
  tpsAfter: number;
  stallS: number;
  slowestTps: number;
  failed: number;
  /** Runs whose checks all held (no failed or aborted client, same sessions, invariant). */
  clean: string;
}

const WINDOW = 8;

async function once(
  tb: Testbed,
  img: ReturnType<typeof buildDbGuest>,
  link: string,
  mode: string,
  i: number,
): Promise<DbRow & { ok: boolean }> {
  const name = `db${i}`;
  // A fresh address per run: the client's ARP cache still knows the previous guest's MAC.
  const addr = guestAddress(30 + (i % 60));
  await startDbGuest(tb, "a", img, { name, addr });
  const bench = startPgbench(tb, addr, 4);
  await bench.waitSeconds(4, 0);
  const t0 = Date.now();
  await bench.waitSeconds(WINDOW, t0);
  const poll = tb.startPinger(addr, 50);
  const args = [
    "migrate",
    "--live",
    "--copy-storage-all",
    ...(mode === "default" ? [] : ["--storage-converge", mode]),
  ];
  const m0 = Date.now();
  nbdmigOk(tb, "a", [...args, name, tb.b.uri]);
  const m1 = Date.now();
  await bench.waitSeconds(WINDOW, m1);
  const samples = await poll.stop();
  const run = await bench.stop();
  const t1 = Date.now();
  const job = JSON.parse(nbdmigOk(tb, "a", ["domjobinfo", name, "--completed", "--json"])) as {
    elapsedMs: number;
    timeToReadyMs: number;
    downtimeMs: number;
  };
  const check = checkDb(tb, addr);
  nbdmigOk(tb, "b", ["destroy", name]);
  nbdmigOk(tb, "a", ["undefine", name]);
  for (const h of ["a", "b"] as const) fs.rmSync(`${tb[h].imagesDir}/${name}.qcow2`, { force: true });
  const stall = longestStall(run.progress, m0, m1);
  const failed = failedTransactions(run);
  const ok = failed === 0 && run.aborted.length === 0 && run.ranToTheEnd && check.invariantHolds;
  return {
    link,
    mode,
    totalS: job.elapsedMs / 1000,
    readyS: job.timeToReadyMs / 1000,
    downtimeMs: job.downtimeMs,
    gapMs: longestGap(samples, m0, t1).ms,
    tpsBefore: tpsBetween(run.progress, t0, m0),
    tpsDuring: tpsBetween(run.progress, m0, m1),
    tpsAfter: tpsBetween(run.progress, m1, t1),
    stallS: stall.seconds,
    slowestTps: stall.minTps,
    failed,
    clean: ok ? "yes" : "NO",
    ok,
  };
}

export async function dbBench(runs: number): Promise<DbRow[]> {
  const img = buildDbGuest();
  const tb = await Testbed.up();
  const rows: DbRow[] = [];
  let n = 0;
  try {
    for (const [link, rate, mode] of [
      ["veth, unshaped", undefined, "default"],
      ["tbf 200 Mbit/s", "200mbit", "auto"],
    ] as const) {
      // The migration link only: the client reaches the guest over the bridges' own veth.
      tb.setRate(rate);
      const ours: (DbRow & { ok: boolean })[] = [];
      for (let i = 0; i < runs; i++) {
        process.stderr.write(`database bench: ${link}, ${mode}, run ${i + 1}/${runs}\n`);
        const r = await once(tb, img, link, mode, n++);
        process.stderr.write(
          `  total ${r.totalS.toFixed(1)} s, downtime ${r.downtimeMs} ms, gap ${Math.round(r.gapMs)} ms, tps ${r.tpsBefore.toFixed(1)}/${r.tpsDuring.toFixed(1)}/${r.tpsAfter.toFixed(1)}, ${r.failed} failed\n`,
        );
        ours.push(r);
      }
      const med = (f: (r: DbRow) => number) => median(ours.map(f));
      rows.push({
        link,
        mode,
        totalS: med((r) => r.totalS),
        readyS: med((r) => r.readyS),
        downtimeMs: med((r) => r.downtimeMs),
        gapMs: med((r) => r.gapMs),
        tpsBefore: med((r) => r.tpsBefore),
        tpsDuring: med((r) => r.tpsDuring),
        tpsAfter: med((r) => r.tpsAfter),
        stallS: Math.max(...ours.map((r) => r.stallS)),
        slowestTps: Math.min(...ours.map((r) => r.slowestTps)),
        failed: ours.reduce((s, r) => s + r.failed, 0),
        clean: `${ours.filter((r) => r.ok).length}/${runs}`,
      });
    }
  } finally {
    await tb.down();
  }
  return rows;
}
