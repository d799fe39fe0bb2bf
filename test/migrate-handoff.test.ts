/**
 * The handoff: once Finish has gone out, the source resumes its guest only when it knows the destination
 * does not run it. Here the destination's agent answers the source into the void from the start of the
 * mirror (nftables in the destination's namespace drops all it sends back but the SYN-ACK, so the source's
 * calls still arrive and are carried out): Finish's reply is lost, the destination resumes the guest, and
 * the source keeps its own copy paused and asks until it knows, or gives up, paused. And the Finish request
 * itself lost (all the source sends to the destination's agent dropped, SYNs included, once the stream has
 * completed): the destination never resumes, and the source resumes its copy once it learns so.
 * QEMU's own state is checked on both sides, not only the agents' view.
 */
import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";
import { AGENT_PORT, Testbed } from "../src/testbed/testbed.js";
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
  nbdmig,
  ok,
  qemuStatus,
  startGuest,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = [...MIGRATION_TOOLS, "nft"];

describe("a lost Finish request or reply never leaves two running copies", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    // The agents inherit these: a source that hears nothing from its peer keeps migrating for 120 s (the
    // drop starts with the mirror), and asks about an unanswered Finish for 12 s before it gives up.
    process.env.NBDMIG_PEER_TIMEOUT_MS = "120000";
    process.env.NBDMIG_FINISH_SETTLE_MS = "12000";
    // Finish's answer is waited for 6 s (60 s by default) before it counts as lost.
    process.env.NBDMIG_FINISH_TIMEOUT_MS = "6000";
    tb = await Testbed.up({ rate: "100mbit" });
  });
  // A test that fails half-way leaves neither a drop nor a guest for the next one.
  const lifts: (() => void)[] = [];
  afterEach(async () => {
    for (const lift of lifts.splice(0)) {
      try {
        lift();
      } catch {
        /* lifted already */
      }
    }
    if (tb) await destroyAll(tb, ["a", "b"]);
  });
  after(async () => {
    delete process.env.NBDMIG_PEER_TIMEOUT_MS;
    delete process.env.NBDMIG_FINISH_SETTLE_MS;
    delete process.env.NBDMIG_FINISH_TIMEOUT_MS;
    await tb?.down();
  });

  /** Starts a writing guest, migrates it with the destination's agent answers dropped from the mirror on. */
  async function migrateWithRepliesDropped(name: string) {
    makeImage(tb!, "a", { name: `${name}.qcow2`, size: "256M", fillMiB: 32 });
    await startGuest(
      tb!,
      { name, rate: 2, span: 64, disks: [{ target: "vda", source: `${IMG}/${name}.qcow2` }] },
      guest,
    );
    const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", name, tb!.b.uri]);
    // Any time before Finish will do, and at 100 Mbit/s the copy of disk and RAM takes seconds.
    await waitFor(
      "the copy to be under way",
      async () => /^perform:(mirror|memory)$/.test((await jobOf(tb!, name))?.phase ?? ""),
      60_000,
      50,
    );
    const lift = tb!.b.dropAnswers(tb!.a.addr, AGENT_PORT);
    lifts.push(lift);
    // Finish times out after 6 s here; then the source settles.
    await waitFor(
      "the source to find Finish's outcome unknown",
      async () => (await jobOf(tb!, name))?.phase === "finish:unknown",
      150_000,
      200,
    );
    // One copy runs, on the destination; the source's QEMU holds its copy paused after the stream.
    assert.equal(await qemuStatus(tb!, "b", name), "running", "the destination resumed the guest");
    assert.equal(await qemuStatus(tb!, "a", name), "postmigrate", "the source's copy is paused");
    return { m, lift };
  }

  it("keeps the source paused while it cannot know, and completes once the destination answers", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const { m, lift } = await migrateWithRepliesDropped("lost");
    // Still unknown a few seconds later: nothing resumed the source meanwhile.
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal(await qemuStatus(tb!, "a", "lost"), "postmigrate");
    lift();
    const res = await m.done;
    assert.equal(res.status, 0, `the migration completes once the destination answers: ${res.stderr}`);
    assert.deepEqual(tb!.a.qemuPids(), [], "the source stopped its copy");
    assert.equal(await qemuStatus(tb!, "b", "lost"), "running");
    const info = JSON.parse(ok(tb!, "a", ["domjobinfo", "lost", "--completed", "--json"])) as {
      notes?: string[];
    };
    assert.ok(
      info.notes?.some((n) => /confirmed that it runs the guest/.test(n)),
      `the job says how it ended: ${JSON.stringify(info.notes)}`,
    );
    const w = guestWritten(tb!, "b", "lost");
    await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", "lost") > w, 30_000);
    ok(tb!, "b", ["destroy", "lost"]);
  });

  it("gives up with the source still paused; the operator's --recover is checked against the destination", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const { m, lift } = await migrateWithRepliesDropped("unsure");
    const res = await m.done;
    assert.equal(res.status, 1);
    assert.match(res.stderr, /the guest is paused here so that two copies never run/);
    assert.match(res.stderr, /'nbdmig migrate --recover destination unsure' here if it does/);
    assert.equal(await qemuStatus(tb!, "a", "unsure"), "postmigrate", "never resumed on the source");
    assert.equal(await qemuStatus(tb!, "b", "unsure"), "running");
    // A plain resume would run a second copy: refused while the outcome is open.
    const resume = nbdmig(tb!, "a", ["resume", "unsure"]);
    assert.equal(resume.status, 1);
    assert.match(resume.stderr, /cannot be resumed: the outcome of its migration to .* is unknown/);
    // Still no answer: --recover cannot check the choice, and says how to force it.
    const blind = nbdmig(tb!, "a", ["migrate", "--recover", "source", "unsure"]);
    assert.equal(blind.status, 1);
    assert.match(
      blind.stderr,
      /cannot learn from nbdmig:\/\/198\.18\.0\.2:7800 whether it runs 'unsure'.*add --force/,
    );
    lift();
    // The destination answers again: keeping the source would run two copies.
    const wrong = nbdmig(tb!, "a", ["migrate", "--recover", "source", "unsure"]);
    assert.equal(wrong.status, 1);
    assert.match(wrong.stderr, /runs 'unsure': resuming the copy here would run two; keep the destination's/);
    assert.equal(await qemuStatus(tb!, "a", "unsure"), "postmigrate");
    assert.match(
      ok(tb!, "a", ["migrate", "--recover", "destination", "unsure"]),
      /'unsure' runs on nbdmig:\/\/198\.18\.0\.2:7800; the copy here is stopped/,
    );
    assert.deepEqual(tb!.a.qemuPids(), []);
    assert.equal(await qemuStatus(tb!, "b", "unsure"), "running");
    ok(tb!, "b", ["destroy", "unsure"]);
  });

  it("a lost Finish request: the destination never resumes, the source resumes once it learns so", async (t) => {
    if (!need(t, TOOLS, true)) return;
    // The source holds 3 s once the stream has completed, before it sends Finish: the drop starts then.
    await tb!.a.killAgent("SIGTERM");
    await tb!.a.startAgent([], { NBDMIG_FAILPOINTS: "source:before-finish=sleep:3000" });
    try {
      makeImage(tb!, "a", { name: "unsent.qcow2", size: "256M", fillMiB: 32 });
      const pid = await startGuest(
        tb!,
        { name: "unsent", rate: 2, span: 64, disks: [{ target: "vda", source: `${IMG}/unsent.qcow2` }] },
        guest,
      );
      const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", "unsent", tb!.b.uri]);
      await waitFor(
        "the source to hold before it sends Finish",
        async () => (await jobOf(tb!, "unsent"))?.phase === "finish",
        120_000,
        50,
      );
      const lift = tb!.b.dropRequests(tb!.a.addr, AGENT_PORT);
      lifts.push(lift);
      await waitFor(
        "the source to find Finish's outcome unknown",
        async () => (await jobOf(tb!, "unsent"))?.phase === "finish:unknown",
        60_000,
        200,
      );
      assert.equal(await qemuStatus(tb!, "a", "unsent"), "postmigrate", "the source's copy is paused");
      assert.notEqual(await qemuStatus(tb!, "b", "unsent"), "running", "Finish never arrived there");
      lift();
      const res = await m.done;
      assert.equal(res.status, 1, `the migration fails: ${res.stderr}`);
      assert.match(res.stderr, /the destination confirmed that it does not run the guest/);
      await assertSourceIntact(tb!, "unsent", pid);
      await assertDestClean(tb!, "unsent", ["unsent.qcow2"]);
    } finally {
      await tb!.a.killAgent("SIGTERM");
      await tb!.a.startAgent();
    }
  });
});
