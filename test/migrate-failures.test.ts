/**
 * The failure matrix: every way a migration can fail ends with the source guest running in its own QEMU,
 * untouched, and the destination clean (no QEMU, no created image, no open port).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  IMG,
  jobOf,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
} from "./helpers/migration.js";
import { guestXml } from "./helpers/guest-xml.js";
import { waitFor } from "./helpers/wait.js";

const NAME = "victim";
const IMAGES = ["victim.qcow2"];

describe("failed migrations leave the source running and the destination clean", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };
  let pid = 0;

  before(async () => {
    if (!available(MIGRATION_TOOLS, true)) return;
    guest = testGuest();
    // Fast failure detection for the tests: the source gives up on a silent peer after 4 s, a prepared
    // destination on a silent source after 6 s (defaults 10 s and 20 s).
    process.env.NBDMIG_PEER_TIMEOUT_MS = "4000";
    process.env.NBDMIG_WATCHDOG_MS = "6000";
    // 64 Mbit/s: the 64 MiB bulk copy takes about 8 s (more with the guest's writes), long enough to break
    // it on purpose; at 3 MiB/s of writes the mirror still converges in about 15 s, for the RAM-phase cases.
    tb = await Testbed.up({ rate: "64mbit" });
    makeImage(tb, "a", { name: "victim.qcow2", size: "1G", fillMiB: 64 });
    pid = await startGuest(
      tb,
      { name: NAME, rate: 3, span: 256, disks: [{ target: "vda", source: `${IMG}/victim.qcow2` }] },
      guest,
    );
  });
  after(async () => tb?.down());

  /** Starts `nbdmig migrate` on host a in the background. */
  const migrate = (extra: string[] = []) =>
    migrateInBackground(tb!, ["--live", "--copy-storage-all", ...extra, NAME, tb!.b.uri]);

  const job = () => jobOf(tb!, NAME);
  const inMirror = () =>
    waitFor(
      "the bulk copy to be under way",
      async () => {
        const j = await job();
        return j?.phase === "perform:mirror" && j.disks.some((d) => d.copied > 4 * 1024 * 1024);
      },
      60_000,
      100,
    );

  async function expectFailure(
    run: { done: Promise<{ status: number; stderr: string }> },
    re: RegExp,
  ): Promise<void> {
    const r = await run.done;
    assert.equal(r.status, 1, `migrate should fail: ${r.stderr}`);
    assert.match(r.stderr, re);
  }

  it("destination agent killed during the mirror", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const run = migrate();
    await inMirror();
    await tb!.b.killAgent("SIGKILL");
    await expectFailure(run, /error: perform: lost contact with the destination agent/);
    await assertSourceIntact(tb!, NAME, pid);
    // Its QEMU outlived the agent; the restarted agent removes what the interrupted Prepare created.
    assert.equal(tb!.b.qemuPids().length, 1);
    await tb!.b.startAgent();
    await assertDestClean(tb!, NAME, IMAGES);
  });

  it("destination QEMU killed during the mirror", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const run = migrate();
    await inMirror();
    for (const p of tb!.b.qemuPids()) process.kill(p, "SIGKILL");
    await expectFailure(
      run,
      // Either the mirror fails first (and the destination's reason is added) or the heartbeat hears it.
      /error: perform: (mirror of vda failed: .* \(the destination: the destination QEMU exited\)|destination gave up: the destination QEMU exited)/,
    );
    await assertSourceIntact(tb!, NAME, pid);
    await assertDestClean(tb!, NAME, IMAGES);
  });

  const inRamPhase = () =>
    waitFor("the RAM phase", async () => (await job())?.phase === "perform:memory", 120_000, 100);

  // In the RAM phase the mirrors are READY and the guest keeps writing through them: there, QEMU's monitor
  // stopped answering (most likely a drain waiting on their writes to the dead link) until the source cut
  // the connections out of band.
  for (const [phase, reached] of [
    ["the mirror", inMirror],
    ["the RAM phase", inRamPhase],
  ] as const) {
    it(`migration link down during ${phase}`, async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      const run = migrate();
      await reached();
      tb!.setLink(false);
      try {
        await expectFailure(run, /error: perform: lost contact with the destination agent/);
        await assertSourceIntact(tb!, NAME, pid);
        // The destination cannot be told; its watchdog cleans up on its own.
        await assertDestClean(tb!, NAME, IMAGES);
      } finally {
        tb!.setLink(true);
      }
    });
  }

  it("domjobabort during the mirror", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const run = migrate();
    await inMirror();
    ok(tb!, "a", ["domjobabort", NAME]);
    await expectFailure(run, /error: perform: cancelled by domjobabort/);
    await assertSourceIntact(tb!, NAME, pid);
    await assertDestClean(tb!, NAME, IMAGES);
    const info = JSON.parse(ok(tb!, "a", ["domjobinfo", NAME, "--completed", "--json"])) as {
      status: string;
    };
    assert.equal(info.status, "cancelled");
  });

  it("domjobabort during the RAM phase", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const run = migrate();
    await inRamPhase();
    ok(tb!, "a", ["domjobabort", NAME]);
    await expectFailure(run, /error: perform: cancelled by domjobabort/);
    await assertSourceIntact(tb!, NAME, pid);
    await assertDestClean(tb!, NAME, IMAGES);
  });

  it("not enough space on the destination", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const nsMount = (...args: string[]) =>
      execFileSync("nsenter", ["-t", String(tb!.b.agentPid), "-m", "--", ...args]);
    nsMount("mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", "/var/lib/nbdmig/images");
    try {
      const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", NAME, tb!.b.uri]);
      assert.equal(r.status, 1);
      assert.match(
        r.stderr,
        /error: prepare on 198\.18\.0\.2: not enough space in \/var\/lib\/nbdmig\/images: need \d+\.\d MiB, have 32\.0 MiB/,
      );
      const inside = execFileSync(
        "nsenter",
        ["-t", String(tb!.b.agentPid), "-m", "--", "ls", "-A", "/var/lib/nbdmig/images"],
        { encoding: "utf8" },
      );
      assert.equal(inside, "", "nothing was created");
    } finally {
      nsMount("umount", "/var/lib/nbdmig/images");
    }
    await assertSourceIntact(tb!, NAME, pid);
    await assertDestClean(tb!, NAME, IMAGES);
  });

  it("a domain of the same name already defined on the destination", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    fs.writeFileSync(
      `${tb!.b.dir}/other.xml`,
      guestXml({
        name: NAME,
        kernel: guest.kernel,
        initrd: guest.initrd,
        disks: [{ target: "vda", source: `${IMG}/other.qcow2` }],
      }),
    );
    ok(tb!, "b", ["define", "/var/lib/nbdmig/other.xml"]);
    const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", NAME, tb!.b.uri]);
    assert.equal(r.status, 1);
    assert.match(
      r.stderr,
      /error: prepare on 198\.18\.0\.2: domain 'victim' already exists here; undefine it on the destination first/,
    );
    assert.match(
      ok(tb!, "b", ["list", "--all"]),
      /victim\s+shut off/,
      "the destination's own domain is untouched",
    );
    ok(tb!, "b", ["undefine", NAME]);
    await assertSourceIntact(tb!, NAME, pid);
    await assertDestClean(tb!, NAME, IMAGES);
  });

  it("a bad or unreachable destination URI", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const bad = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", NAME, "qemu+ssh://b/system"]);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /'qemu\+ssh:\/\/b\/system' is not an agent URI; use nbdmig:\/\/HOST:PORT/);
    const gone = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      NAME,
      "nbdmig://198.18.0.2:7900",
    ]);
    assert.equal(gone.status, 1);
    assert.match(
      gone.stderr,
      /error: begin on 198\.18\.0\.2: cannot reach the agent at nbdmig:\/\/198\.18\.0\.2:7900: ECONNREFUSED/,
    );
    await assertSourceIntact(tb!, NAME, pid);
  });

  it("after all that, the same guest migrates", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    tb!.setRate(undefined);
    ok(tb!, "a", ["migrate", "--live", "--copy-storage-all", "--suspend", NAME, tb!.b.uri]);
    assert.match(ok(tb!, "b", ["dominfo", NAME]), /State:\s+paused/);
    ok(tb!, "b", ["destroy", NAME]);
  });
});
