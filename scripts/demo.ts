/**
 * The demo: two hosts (network + mount namespaces joined by a veth, and a bridged VM network with a client),
 * a real Debian 12 VM running PostgreSQL 15 on host a, pgbench from the client, and a live migration to host
 * b with --copy-storage-all while pgbench keeps running: nbdmig's progress bars beside pgbench's progress,
 * then the checks in one result line (no failed transaction, no reconnect, pgbench's invariant, pg_amcheck,
 * e2fsck on the destination's image after a clean shutdown). Run with `sudo npm run demo`.
 */
import { spawn, spawnSync } from "node:child_process";
import {
  buildDbGuest,
  checkDb,
  describeRun,
  failedTransactions,
  fsckImage,
  longestStall,
  pgbenchSessions,
  shutdownDbGuest,
  startDbGuest,
  startPgbench,
  tpsBetween,
  type Pgbench,
} from "../src/testbed/db-guest.js";
import { guestAddress, longestGap, Testbed } from "../src/testbed/testbed.js";

const step = (s: string) => console.log(`\n\x1b[1m==> ${s}\x1b[0m`);
const CLIENTS = 4;

function nbdmig(tb: Testbed, host: "a" | "b", args: string[], show = true): string {
  const argv = tb[host].cliArgv(args);
  if (show) console.log(`[host ${host}]$ nbdmig ${args.join(" ")}`);
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (show) process.stdout.write(r.stdout);
  if (r.status !== 0) throw new Error(`nbdmig ${args.join(" ")} failed (exit ${r.status})`);
  return r.stdout;
}

/** A progress line of pgbench (the latest, or `back` before it), with the time since `t0`. */
function lastProgress(bench: Pgbench, t0: number, back = 0): string {
  const p = bench.progress().at(-1 - back);
  return p
    ? `pgbench ${((p.at - t0) / 1000).toFixed(0).padStart(3)} s: ${p.tps.toFixed(1).padStart(5)} tps, lat ${p.latMs.toFixed(0)} ms, ${p.failed} failed`
    : "pgbench: (no progress yet)";
}

/**
 * Runs `nbdmig migrate --verbose` on host a and shows its progress bars (printed once a second when its
 * output is not a terminal) with pgbench's latest progress beside the first bar of each frame.
 */
function migrateBeside(tb: Testbed, args: string[], bench: Pgbench, t0: number): Promise<number> {
  console.log(`[host a]$ nbdmig ${args.join(" ")}`);
  const argv = tb.a.cliArgv(args);
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
  let pending = "";
  const onData = (b: Buffer) => {
    pending += b.toString();
    const lines = pending.split("\n");
    pending = lines.pop()!;
    for (const line of lines) {
      if (!line.trim()) continue;
      if (line.startsWith(" Migration")) console.log(`${line.padEnd(100)} │ ${lastProgress(bench, t0)}`);
      else console.log(line);
    }
  };
  child.stdout.on("data", onData);
  child.stderr.on("data", onData);
  return new Promise((resolve) =>
    child.on("close", (code) => {
      if (pending.trim()) console.log(pending);
      resolve(code ?? -1);
    }),
  );
}

step("building (or reusing) the database guest from Debian packages: Debian 12, systemd, PostgreSQL 15");
const img = buildDbGuest();
const b = img.build;
console.log(
  `${img.built ? "built" : "reused from .cache/db-guest (built"} in ${b.totalSeconds} s${img.built ? "" : ")"}: kernel ${b.kernel}, PostgreSQL ${b.postgresql} (data checksums, pgbench scale ${b.pgbenchScale}), ${Math.round(b.allocatedBytes / 2 ** 20)} MiB of a 4 GiB qcow2`,
);

step("creating two hosts: network namespaces joined by a veth pair, private /var/lib/nbdmig each");
const tb = await Testbed.up();
const addr = guestAddress(20);
try {
  for (const h of tb.hosts)
    console.log(`host ${h.name}: ${h.addr} (agent ${h.uri}); /var/lib/nbdmig there is ${h.dir}`);
  console.log(`VM network: bridge br0 on each host, joined; a client at 10.77.0.100 on host a's side`);

  step(`starting the VM on host a (TCG: no KVM needed); PostgreSQL answers on ${addr}:5432`);
  const { bootMs } = await startDbGuest(tb, "a", img, { name: "pg", addr });
  console.log(`booted to PostgreSQL in ${(bootMs / 1000).toFixed(1)} s`);
  nbdmig(tb, "a", ["domblklist", "pg"]);
  nbdmig(tb, "a", ["domiflist", "pg"]);

  step(`pgbench from the client: TPC-B-like, ${CLIENTS} connections held open, progress every second`);
  const bench = startPgbench(tb, addr, CLIENTS);
  const t0 = Date.now();
  await bench.waitSeconds(8, t0);
  for (let i = 2; i >= 0; i--) console.log(lastProgress(bench, t0, i));
  const sessions = pgbenchSessions(tb, addr);
  console.log(`pgbench's sessions on the server (pid@start): ${sessions.join(", ")}`);
  // The network gap: the longest time the client's pings (every 50 ms) went unanswered.
  const poll = tb.startPinger(addr, 50);

  step("live migration to host b with --copy-storage-all while pgbench runs (nbdmig │ pgbench)");
  const m0 = Date.now();
  const code = await migrateBeside(
    tb,
    ["migrate", "--live", "--copy-storage-all", "--verbose", "pg", tb.b.uri],
    bench,
    t0,
  );
  const m1 = Date.now();
  if (code !== 0) throw new Error(`the migration failed (exit ${code})`);
  nbdmig(tb, "a", ["domjobinfo", "pg", "--completed"]);
  const job = JSON.parse(nbdmig(tb, "a", ["domjobinfo", "pg", "--completed", "--json"], false)) as {
    downtimeMs: number;
  };
  await bench.waitSeconds(8, m1);
  console.log(lastProgress(bench, t0));
  const gap = longestGap(await poll.stop(), m0, Date.now());
  const kept = JSON.stringify(pgbenchSessions(tb, addr)) === JSON.stringify(sessions);
  const run = await bench.stop();
  const windows = [
    { name: "before", from: t0, to: m0 },
    { name: "during", from: m0, to: m1 },
    { name: "after", from: m1, to: Date.now() },
  ];
  for (const line of describeRun(run, windows)) console.log(`pgbench ${line}`);
  nbdmig(tb, "a", ["list", "--all"]);
  nbdmig(tb, "b", ["list", "--all"]);

  step("checking on host b: pgbench's invariant, pg_amcheck; then a clean shutdown and e2fsck of its image");
  const c = checkDb(tb, addr);
  console.log(`sums of balances (accounts, tellers, branches, history): ${Object.values(c.sums).join(", ")}`);
  console.log(
    `pg_amcheck --all --heapallindexed: ${c.amcheck.status === 0 && !c.amcheck.output ? "nothing found" : c.amcheck.output}`,
  );
  console.log(`[host b]$ nbdmig shutdown pg`);
  console.log(`shut down cleanly in ${((await shutdownDbGuest(tb, "b", "pg")) / 1000).toFixed(1)} s`);
  const fsck = fsckImage(`${tb.b.imagesDir}/pg.qcow2`, tb.dir);
  console.log(`e2fsck -fn on host b's image: ${fsck.output.split("\n").at(-1)}`);

  const failed = failedTransactions(run);
  const stall = longestStall(run.progress, m0, m1);
  const amcheckClean = c.amcheck.status === 0 && c.amcheck.output === "";
  const passed =
    failed === 0 &&
    run.aborted.length === 0 &&
    run.ranToTheEnd &&
    kept &&
    c.invariantHolds &&
    amcheckClean &&
    fsck.status === 0;
  const tps = windows.map((w) => tpsBetween(run.progress, w.from, w.to).toFixed(1)).join("/");
  console.log(
    `\nresult: ${passed ? "PASS" : "FAIL"}: ${failed} failed transactions, ${run.aborted.length} aborted clients, ${kept ? "no reconnect" : "SESSIONS CHANGED"}; TPS before/during/after ${tps}, longest stall ${stall.seconds} s (slowest second ${stall.minTps.toFixed(1)} tps); downtime ${job.downtimeMs} ms, network gap ${Math.round(gap.ms)} ms; migration ${((m1 - m0) / 1000).toFixed(1)} s; invariant ${c.invariantHolds ? "holds" : "BROKEN"}, pg_amcheck ${amcheckClean ? "clean" : "FOUND PROBLEMS"}, e2fsck ${fsck.status === 0 ? "clean" : "FOUND PROBLEMS"}`,
  );
  if (!passed) process.exitCode = 1;
} finally {
  step("tearing the hosts down");
  await tb.down();
}
