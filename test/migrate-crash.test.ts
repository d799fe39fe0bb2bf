/**
 * Agents killed in the middle of a migration (SIGKILL at a named point: NBDMIG_FAILPOINTS) and restarted:
 * each side continues from the phase it had written down, and exactly one copy of the guest runs at the
 * end: the source's when the destination had not resumed it, the destination's when it had or could (a
 * destination restarted in Finish holds the guest until the source says resume). QEMU's own
 * state is checked on both sides, and the side that lost the guest holds nothing of it.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, afterEach, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  destroyAll,
  guestWritten,
  IMG,
  jobOf,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  ok,
  qemuStatus,
  startGuest,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const NAME = "crashy";
const IMAGES = [`${NAME}.qcow2`];

describe(
  "an agent killed during a migration: its successor continues, one copy runs",
  { timeout: 900_000 },
  () => {
    let tb: Testbed | undefined;
    let guest: { kernel: string; initrd: string };
    let pid = 0;

    before(async () => {
      if (!available(MIGRATION_TOOLS, true)) return;
      guest = testGuest();
      // The source concludes "Finish unanswered" after 15 s, not 60 (the agents inherit this): the link-cut
      // case waits that long, and it is the same path either way.
      process.env.NBDMIG_FINISH_TIMEOUT_MS = "15000";
      tb = await Testbed.up({});
      makeImage(tb, "a", { name: `${NAME}.qcow2`, size: "256M", fillMiB: 32 });
      pid = await startGuest(
        tb,
        { name: NAME, rate: 2, span: 64, disks: [{ target: "vda", source: `${IMG}/${NAME}.qcow2` }] },
        guest,
      );
    });
    // Whatever a case left, the next starts with both agents up without failpoints.
    afterEach(async () => {
      for (const h of ["a", "b"] as const) {
        if (!tb) break;
        if (!tb[h].alive()) await tb[h].startAgent();
      }
    });
    after(async () => {
      if (tb) await destroyAll(tb, ["a", "b"]).catch(() => undefined);
      await tb?.down();
    });

    /** Restarts `host`'s agent so that it SIGKILLs itself at `point`; then migrates the guest a -> b. */
    async function migrateCrashingAt(host: "a" | "b", point: string) {
      await tb![host].killAgent("SIGTERM");
      await tb![host].startAgent([], { NBDMIG_FAILPOINTS: point });
      const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", NAME, tb!.b.uri]);
      await waitFor(`the ${host} agent to reach ${point}`, () => !tb![host].alive(), 120_000, 50);
      return m;
    }

    /** After a case that moved the guest: gone from b, booted again on a from the image it left there. */
    async function startAgainOnA(): Promise<void> {
      if (tb!.b.qemuPids().length) ok(tb!, "b", ["destroy", NAME]);
      fs.rmSync(`${tb!.b.imagesDir}/${NAME}.qcow2`);
      // The console log is appended to: count the writer's lines of this boot.
      const lines = () =>
        fs
          .readFileSync(`${tb!.a.dir}/log/${NAME}.serial.log`, "utf8")
          .split("\n")
          .filter((l) => l.startsWith("nbdmig-guest: t=")).length;
      const before = lines();
      ok(tb!, "a", ["start", NAME]);
      await waitFor("the guest to write on a again", () => lines() > before + 1, 90_000);
      pid = (await tb!.a.client().call<{ pid: number }>("GET", `/v1/domains/${NAME}`)).pid;
    }

    const outgoingRecord = () => `${tb!.a.dir}/migrations/outgoing/${NAME}.json`;

    for (const point of ["source:mirror", "source:pre-switchover", "source:finish"]) {
      it(`source agent killed at ${point}: the restarted agent resumes the source and cleans the destination`, async (t) => {
        if (!need(t, MIGRATION_TOOLS, true)) return;
        const m = await migrateCrashingAt("a", point);
        const r = await m.done;
        assert.notEqual(r.status, 0, "the CLI loses its agent");
        assert.ok(fs.existsSync(outgoingRecord()), "the source wrote its phase down");
        assert.notEqual(await qemuStatus(tb!, "b", NAME), "running", "the destination never resumed");
        await tb!.a.startAgent();
        await waitFor(
          "the source to resume",
          async () => (await qemuStatus(tb!, "a", NAME)) === "running",
          60_000,
        );
        await assertSourceIntact(tb!, NAME, pid);
        await assertDestClean(tb!, NAME, IMAGES);
        assert.ok(!fs.existsSync(outgoingRecord()), "the record is gone once settled");
      });
    }

    it("destination agent killed in Finish before the resume: the restarted agent holds the guest, the source says resume", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      const m = await migrateCrashingAt("b", "dest:finish");
      // The destination's QEMU holds the whole guest, paused; the source's copy stays paused meanwhile.
      assert.equal(tb!.b.qemuPids().length, 1);
      await waitFor(
        "the source to hold its copy",
        async () => (await qemuStatus(tb!, "a", NAME)) === "postmigrate",
        30_000,
      );
      await new Promise((r) => setTimeout(r, 2000));
      assert.equal(
        await qemuStatus(tb!, "a", NAME),
        "postmigrate",
        "not resumed while the destination is silent",
      );
      await tb!.b.startAgent();
      const r = await m.done;
      assert.equal(r.status, 0, `the migration completes once the destination is back: ${r.stderr}`);
      assert.deepEqual(tb!.a.qemuPids(), [], "the source stopped its copy");
      assert.equal(await qemuStatus(tb!, "b", NAME), "running");
      const w = guestWritten(tb!, "b", NAME);
      await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", NAME) > w, 30_000);
      await startAgainOnA();
    });

    it("destination agent killed right after the resume: kept there, stopped here", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      const m = await migrateCrashingAt("b", "dest:resumed");
      // The guest already runs on the destination; the source's copy stays paused.
      assert.equal(await qemuStatus(tb!, "a", NAME), "postmigrate");
      await tb!.b.startAgent();
      const r = await m.done;
      assert.equal(r.status, 0, `the migration completes once the destination answers: ${r.stderr}`);
      assert.deepEqual(tb!.a.qemuPids(), [], "the source stopped its copy");
      assert.equal(await qemuStatus(tb!, "b", NAME), "running");
      const w = guestWritten(tb!, "b", NAME);
      await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", NAME) > w, 30_000);
      await startAgainOnA();
    });

    it("destination QEMU killed right after the resume: the source stops its copy all the same, never resumes it", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      // The destination holds 3 s after its `cont`: its QEMU is killed then, before Finish has answered.
      await tb!.b.killAgent("SIGTERM");
      await tb!.b.startAgent([], { NBDMIG_FAILPOINTS: "dest:after-resume=sleep:3000" });
      const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", NAME, tb!.b.uri]);
      await waitFor(
        "the guest to run on the destination",
        async () => (await qemuStatus(tb!, "b", NAME)) === "running",
        120_000,
        50,
      );
      const [victim] = tb!.b.qemuPids();
      assert.ok(victim);
      process.kill(victim, "SIGKILL");
      const r = await m.done;
      // The guest ran there: the destination's disks are its only ones now, and the source's copy is stale.
      assert.equal(r.status, 0, `Finish reports the hand-over: ${r.stderr}`);
      assert.deepEqual(tb!.a.qemuPids(), [], "the source's copy is stopped, not resumed");
      assert.deepEqual(tb!.b.qemuPids(), []);
      assert.ok(fs.existsSync(`${tb!.b.imagesDir}/${NAME}.qcow2`), "the destination keeps the guest's disk");
      await tb!.b.killAgent("SIGTERM");
      await tb!.b.startAgent();
      await startAgainOnA();
    });

    it("link cut while the destination handles Finish: it resumes, the source waits paused, then completes", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      // The destination holds 3 s once the stream has completed there, before it resumes the guest: the link
      // goes down then, so its answer is lost. (Cut earlier, the stream's last bytes might never arrive.)
      await tb!.b.killAgent("SIGTERM");
      await tb!.b.startAgent([], { NBDMIG_FAILPOINTS: "dest:before-resume=sleep:3000" });
      const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", NAME, tb!.b.uri]);
      await waitFor(
        "the destination to hold in Finish with the stream complete",
        async () => {
          const b = tb!.b.client();
          const job = (await b.call<{ job: { phase: string } | null }>("GET", `/v1/domains/${NAME}/job`)).job;
          if (job?.phase !== "finish") return false;
          const mig = await b.call<{ result: { status?: string } }>("POST", `/v1/domains/${NAME}/monitor`, {
            command: '{"execute":"query-migrate"}',
          });
          return mig.result.status === "completed";
        },
        120_000,
        20,
      );
      tb!.setLink(false);
      try {
        await waitFor(
          "the source to find Finish's outcome unknown",
          async () => (await jobOf(tb!, NAME))?.phase === "finish:unknown",
          60_000,
        );
        await waitFor(
          "the destination to resume",
          async () => (await qemuStatus(tb!, "b", NAME)) === "running",
          30_000,
        );
        assert.equal(await qemuStatus(tb!, "a", NAME), "postmigrate", "the source's copy stays paused");
      } finally {
        tb!.setLink(true);
      }
      const r = await m.done;
      assert.equal(r.status, 0, `the migration completes once the link is back: ${r.stderr}`);
      assert.deepEqual(tb!.a.qemuPids(), [], "the source stopped its copy");
      assert.equal(await qemuStatus(tb!, "b", NAME), "running");
      await startAgainOnA();
    });

    it("source agent killed after Finish answered: the restarted agent stops the source", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      const m = await migrateCrashingAt("a", "source:finished");
      assert.notEqual((await m.done).status, 0);
      assert.equal(await qemuStatus(tb!, "b", NAME), "running", "the destination runs the guest");
      await tb!.a.startAgent();
      await waitFor(
        "the source's copy to stop and its record to go",
        () => tb!.a.qemuPids().length === 0 && !fs.existsSync(outgoingRecord()),
        60_000,
      );
      assert.equal(await qemuStatus(tb!, "b", NAME), "running");
      const w = guestWritten(tb!, "b", NAME);
      await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", NAME) > w, 30_000);
      ok(tb!, "b", ["destroy", NAME]);
    });
  },
);
