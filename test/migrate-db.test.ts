/**
 * A real Debian 12 guest (systemd, ext4, PostgreSQL 15 with data checksums; scripts/build-db-guest.sh) under
 * pgbench from the client namespace, migrated live with --copy-storage-all: no failed transaction and no
 * reconnect, and after each move pgbench's invariant and pg_amcheck hold. The guest moves a -> b, then back
 * over a 200 Mbit/s link with --storage-converge auto, after an attempt whose destination QEMU was killed
 * mid-copy (rolled back without pgbench noticing); at the end it shuts down cleanly and e2fsck finds its
 * image clean.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, afterEach, before, describe, it, type TestContext } from "node:test";
import {
  buildDbGuest,
  checkDb,
  describeRun,
  failedTransactions,
  fsckImage,
  PG_TOOLS,
  pgbenchSessions,
  shutdownDbGuest,
  startDbGuest,
  startPgbench,
  tpsBetween,
  type DbGuestImage,
  type PgbenchOutcome,
  type PgbenchWindow,
} from "../src/testbed/db-guest.js";
import { guestAddress, longestGap, Testbed } from "../src/testbed/testbed.js";
import { available, need } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  destroyAll,
  jobOf,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = [...MIGRATION_TOOLS, "mmdebstrap", "mkfs.ext4", "e2fsck", ...PG_TOOLS];
const CLIENTS = 4;
/** Seconds of pgbench progress before and after a migration. */
const WINDOW = 8;
/** Seconds of pgbench before the first window: a guest that just booted is still warming its caches. */
const WARMUP = 4;

/** pgbench saw nothing: no failed transaction, no aborted client, and it ran until told to stop. */
function assertUnnoticed(t: TestContext, run: PgbenchOutcome, windows: PgbenchWindow[]): void {
  for (const line of describeRun(run, windows)) t.diagnostic(`pgbench ${line}`);
  assert.deepEqual(run.aborted, [], "no pgbench client aborted");
  assert.ok(run.ranToTheEnd, `pgbench ran until stopped:\n${run.stderr.slice(-2000)}`);
  assert.equal(failedTransactions(run), 0, "no failed transaction");
  for (const w of windows)
    assert.ok(tpsBetween(run.progress, w.from, w.to) > 0, `transactions completed ${w.name}`);
}

/** The database on `addr` is consistent and checksummed. */
function assertDbConsistent(t: TestContext, tb: Testbed, addr: string): void {
  const c = checkDb(tb, addr);
  t.diagnostic(`sums of balances: ${JSON.stringify(c.sums)}; pg_amcheck: ${c.amcheck.output || "nothing"}`);
  assert.ok(c.invariantHolds, `pgbench's invariant: ${JSON.stringify(c.sums)}`);
  assert.ok(c.checksums, "data checksums on");
  assert.equal(c.amcheck.status, 0, `pg_amcheck: ${c.amcheck.output}`);
  assert.equal(c.amcheck.output, "", "pg_amcheck reports nothing");
}

function downtimeOf(tb: Testbed, host: "a" | "b", name: string): string {
  const job = JSON.parse(ok(tb, host, ["domjobinfo", name, "--completed", "--json"])) as {
    elapsedMs: number;
    timeToReadyMs: number;
    downtimeMs: number;
  };
  return `total ${job.elapsedMs} ms, mirror ready after ${job.timeToReadyMs} ms, downtime ${job.downtimeMs} ms`;
}

// One guest boots once (40 s under TCG) and serves both cases: the first moves it a -> b, the second back.
describe("a Debian guest running PostgreSQL, migrated under pgbench", { timeout: 1_800_000 }, () => {
  let tb: Testbed | undefined;
  let img: DbGuestImage;
  const name = "pg";
  const addr = guestAddress(20);
  /** Where the guest runs once a case has moved it. */
  let at: "a" | "b" | undefined;

  before(async () => {
    if (!available(TOOLS, true)) return;
    img = buildDbGuest();
    tb = await Testbed.up();
  });
  after(async () => {
    if (tb) await destroyAll(tb, ["a", "b"]).catch(() => undefined);
    await tb?.down();
  });
  afterEach(() => tb?.setRate(undefined));

  it("moves live with --copy-storage-all: no failed transaction, no reconnect, consistent data", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const b = img.build;
    t.diagnostic(
      `guest image: ${img.built ? `built in ${b.totalSeconds} s (mmdebstrap ${b.mmdebstrapSeconds} s)` : "reused from the cache"}; kernel ${b.kernel}, PostgreSQL ${b.postgresql}, ${Math.round(b.allocatedBytes / 2 ** 20)} MiB allocated, pgbench scale ${b.pgbenchScale}`,
    );
    const { bootMs } = await startDbGuest(tb!, "a", img, { name, addr });
    at = "a";
    t.diagnostic(`boot under TCG until PostgreSQL answers: ${bootMs} ms`);

    const bench = startPgbench(tb!, addr, CLIENTS);
    await bench.waitSeconds(WARMUP, 0);
    const t0 = Date.now();
    await bench.waitSeconds(WINDOW, t0);
    const sessions = pgbenchSessions(tb!, addr);
    assert.equal(sessions.length, CLIENTS, "pgbench's sessions are open");
    // Not judged, reported: the longest time the client's pings went unanswered.
    const poll = tb!.startPinger(addr, 50);
    const m0 = Date.now();
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--persistent",
      "--undefinesource",
      name,
      tb!.b.uri,
    ]);
    const m1 = Date.now();
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}`);
    at = "b";
    t.diagnostic(`migration: ${downtimeOf(tb!, "a", name)}`);
    assert.deepEqual(tb!.a.qemuPids(), [], "no QEMU left on the source");
    await bench.waitSeconds(WINDOW, m1);
    t.diagnostic(
      `network gap (a ping every 50 ms): ${Math.round(longestGap(await poll.stop(), m0, Date.now()).ms)} ms`,
    );
    assert.deepEqual(pgbenchSessions(tb!, addr), sessions, "the same sessions, now served by host b");
    const run = await bench.stop();
    assertUnnoticed(t, run, [
      { name: "before", from: t0, to: m0 },
      { name: "during", from: m0, to: m1 },
      { name: "after", from: m1, to: Date.now() },
    ]);
    assertDbConsistent(t, tb!, addr);
  });

  it("moves back unnoticed after an attempt whose destination QEMU dies mid-copy, with --storage-converge auto over 200 Mbit/s; clean shutdown and filesystem", async (t) => {
    if (!need(t, TOOLS, true)) return;
    assert.equal(at, "b", "the first case moved the guest to host b");
    // The source keeps its images after a migration (nbdmig never deletes them): the operator removes the
    // stale copy on a before moving the guest back.
    fs.rmSync(`${tb!.a.imagesDir}/${name}.qcow2`);
    const pid = (await tb!.b.client().call<{ pid: number }>("GET", `/v1/domains/${name}`)).pid;
    tb!.setRate("200mbit");
    const bench = startPgbench(tb!, addr, CLIENTS);
    await bench.waitSeconds(WARMUP, 0);
    const t0 = Date.now();
    await bench.waitSeconds(WINDOW, t0);
    const sessions = pgbenchSessions(tb!, addr);
    const args = ["--live", "--copy-storage-all", "--storage-converge", "auto", name, tb!.a.uri];

    // Attempt 1: the destination's QEMU is killed once a quarter of the disk has crossed.
    const k0 = Date.now();
    const first = migrateInBackground(tb!, args, "b");
    await waitFor(
      "a quarter of the disk to be copied",
      async () => {
        const j = await jobOf<{ disks: { copied: number; total: number }[] }>(tb!, name, "b");
        const d = j?.disks[0];
        return d !== undefined && d.total > 0 && d.copied > d.total / 4;
      },
      120_000,
      100,
    );
    const [victim] = tb!.a.qemuPids();
    assert.ok(victim, "the destination QEMU runs");
    process.kill(victim, "SIGKILL");
    const res = await first.done;
    const k1 = Date.now();
    assert.equal(res.status, 1, `the attempt fails: ${res.stderr}`);
    t.diagnostic(`attempt 1: ${res.stderr.trim().split("\n").at(-1)}`);
    await assertDestClean(tb!, name, [`${name}.qcow2`], 30_000, "a");
    await assertSourceIntact(tb!, name, pid, false, "b");
    await bench.waitSeconds(4, k1);

    // Attempt 2, same command: it completes while pgbench writes.
    const m0 = Date.now();
    const r = nbdmig(tb!, "b", ["migrate", ...args]);
    const m1 = Date.now();
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}`);
    at = "a";
    t.diagnostic(`attempt 2: ${downtimeOf(tb!, "b", name)}`);
    await bench.waitSeconds(WINDOW, m1);
    assert.deepEqual(pgbenchSessions(tb!, addr), sessions, "the same sessions through both attempts");
    const run = await bench.stop();
    const before = tpsBetween(run.progress, t0, k0);
    const during = tpsBetween(run.progress, m0, m1);
    t.diagnostic(
      `TPS during the converging migration: ${during.toFixed(1)} against ${before.toFixed(1)} before (${((100 * during) / before).toFixed(0)} %)`,
    );
    assertUnnoticed(t, run, [
      { name: "before", from: t0, to: k0 },
      { name: "during the failed attempt", from: k0, to: k1 },
      { name: "between", from: k1, to: m0 },
      { name: "during the migration", from: m0, to: m1 },
      { name: "after", from: m1, to: Date.now() },
    ]);
    assertDbConsistent(t, tb!, addr);
    // After two migrations: the guest shuts down cleanly, and its disk on a is a clean filesystem.
    const ms = await shutdownDbGuest(tb!, "a", name);
    t.diagnostic(`clean shutdown on host a in ${ms} ms`);
    const fsck = fsckImage(`${tb!.a.imagesDir}/${name}.qcow2`, tb!.dir);
    assert.equal(fsck.status, 0, `e2fsck -fn on host a's image:\n${fsck.output}`);
    t.diagnostic(`e2fsck -fn: ${fsck.output.split("\n").at(-1)}`);
  });
});
