/**
 * A real Debian 12 guest (systemd, ext4, PostgreSQL 15 with data checksums; scripts/build-db-guest.sh) under
 * pgbench from the client namespace, migrated live with --copy-storage-all: no failed transaction and no
 * reconnect, and afterwards pgbench's invariant, pg_amcheck and e2fsck on the destination's image hold. Also
 * over a 200 Mbit/s link with --storage-converge auto, after an attempt whose destination QEMU was killed
 * mid-copy (rolled back without pgbench noticing).
 */
import assert from "node:assert/strict";
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

/** The database on `addr` is consistent and checksummed; the guest then shuts down cleanly and its disk is clean. */
async function assertDataIntact(
  t: TestContext,
  tb: Testbed,
  host: "a" | "b",
  name: string,
  addr: string,
): Promise<void> {
  const c = checkDb(tb, addr);
  t.diagnostic(`sums of balances: ${JSON.stringify(c.sums)}; pg_amcheck: ${c.amcheck.output || "nothing"}`);
  assert.ok(c.invariantHolds, `pgbench's invariant: ${JSON.stringify(c.sums)}`);
  assert.ok(c.checksums, "data checksums on");
  assert.equal(c.amcheck.status, 0, `pg_amcheck: ${c.amcheck.output}`);
  assert.equal(c.amcheck.output, "", "pg_amcheck reports nothing");
  const ms = await shutdownDbGuest(tb, host, name);
  t.diagnostic(`clean shutdown on host ${host} in ${ms} ms`);
  const fsck = fsckImage(`${tb[host].imagesDir}/${name}.qcow2`, tb.dir);
  assert.equal(fsck.status, 0, `e2fsck -fn on host ${host}'s image:\n${fsck.output}`);
  t.diagnostic(`e2fsck -fn: ${fsck.output.split("\n").at(-1)}`);
}

function downtimeOf(tb: Testbed, host: "a" | "b", name: string): string {
  const job = JSON.parse(ok(tb, host, ["domjobinfo", name, "--completed", "--json"])) as {
    elapsedMs: number;
    timeToReadyMs: number;
    downtimeMs: number;
  };
  return `total ${job.elapsedMs} ms, mirror ready after ${job.timeToReadyMs} ms, downtime ${job.downtimeMs} ms`;
}

describe("a Debian guest running PostgreSQL, migrated under pgbench", { timeout: 1_800_000 }, () => {
  let tb: Testbed | undefined;
  let img: DbGuestImage;

  before(async () => {
    if (!available(TOOLS, true)) return;
    img = buildDbGuest();
    tb = await Testbed.up();
  });
  after(async () => tb?.down());
  afterEach(async () => {
    if (!tb) return;
    tb.setRate(undefined);
    await destroyAll(tb, ["a", "b"]);
  });

  it("moves live with --copy-storage-all: no failed transaction, no reconnect, consistent data and filesystem", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const b = img.build;
    t.diagnostic(
      `guest image: ${img.built ? `built in ${b.totalSeconds} s (mmdebstrap ${b.mmdebstrapSeconds} s)` : "reused from the cache"}; kernel ${b.kernel}, PostgreSQL ${b.postgresql}, ${Math.round(b.allocatedBytes / 2 ** 20)} MiB allocated, pgbench scale ${b.pgbenchScale}`,
    );
    const addr = guestAddress(20);
    const { bootMs } = await startDbGuest(tb!, "a", img, { name: "pg1", addr });
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
    const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "pg1", tb!.b.uri]);
    const m1 = Date.now();
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}`);
    t.diagnostic(`migration: ${downtimeOf(tb!, "a", "pg1")}`);
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
    await assertDataIntact(t, tb!, "b", "pg1", addr);
  });

  it("rolls back unnoticed when the destination QEMU dies mid-copy, then converges with --storage-converge auto over 200 Mbit/s", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const addr = guestAddress(21);
    await startDbGuest(tb!, "a", img, { name: "pg2", addr });
    const pid = (await tb!.a.client().call<{ pid: number }>("GET", "/v1/domains/pg2")).pid;
    tb!.setRate("200mbit");
    const bench = startPgbench(tb!, addr, CLIENTS);
    await bench.waitSeconds(WARMUP, 0);
    const t0 = Date.now();
    await bench.waitSeconds(WINDOW, t0);
    const sessions = pgbenchSessions(tb!, addr);
    const args = ["--live", "--copy-storage-all", "--storage-converge", "auto", "pg2", tb!.b.uri];

    // Attempt 1: the destination's QEMU is killed once a quarter of the disk has crossed.
    const k0 = Date.now();
    const first = migrateInBackground(tb!, args);
    await waitFor(
      "a quarter of the disk to be copied",
      async () => {
        const j = await jobOf<{ disks: { copied: number; total: number }[] }>(tb!, "pg2");
        const d = j?.disks[0];
        return d !== undefined && d.total > 0 && d.copied > d.total / 4;
      },
      120_000,
      100,
    );
    const [victim] = tb!.b.qemuPids();
    assert.ok(victim, "the destination QEMU runs");
    process.kill(victim, "SIGKILL");
    const res = await first.done;
    const k1 = Date.now();
    assert.equal(res.status, 1, `the attempt fails: ${res.stderr}`);
    t.diagnostic(`attempt 1: ${res.stderr.trim().split("\n").at(-1)}`);
    await assertDestClean(tb!, "pg2", ["pg2.qcow2"]);
    await assertSourceIntact(tb!, "pg2", pid, false);
    await bench.waitSeconds(4, k1);

    // Attempt 2, same command: it completes while pgbench writes.
    const m0 = Date.now();
    const r = nbdmig(tb!, "a", ["migrate", ...args]);
    const m1 = Date.now();
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}`);
    t.diagnostic(`attempt 2: ${downtimeOf(tb!, "a", "pg2")}`);
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
    await assertDataIntact(t, tb!, "b", "pg2", addr);
  });
});
