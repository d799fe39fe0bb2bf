/**
 * Offline migration (`migrate --offline --copy-storage-all`): a shut-off domain's disks, qcow2 and raw, are
 * copied by nbdmig's copy engine into images the destination serves over NBD (nbdmig's own server for
 * raw, qemu-nbd for qcow2), and the domain is defined there. The copies are identical and sparse, the
 * domain boots on the destination; refusals create nothing; an aborted copy leaves the destination clean
 * and the source as it was.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import { after, afterEach, before, describe, it } from "node:test";
import { NbdmigError } from "../src/errors.js";
import { Testbed } from "../src/testbed/testbed.js";
import { imageInfo } from "../src/qemu/img.js";
import { sha256File } from "../src/util/hash.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  chainFixture,
  compare,
  defineGuest,
  destroyAll,
  IMG,
  jobOf,
  makeImage,
  cliInBackground,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startUnwaited,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const MiB = 1024 * 1024;

/** The events `migrate --json` and `domjobinfo --follow --json` write, one JSON object per line. */
type JobEvent = { event: string; phase?: string; status?: string };
const jobEvents = (stdout: string): JobEvent[] =>
  stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as JobEvent);
const phasesOf = (events: JobEvent[]) => events.filter((e) => e.event === "phase").map((e) => e.phase);

describe("offline migration of a shut-off domain with its disks", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(MIGRATION_TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up({});
  });
  afterEach(async () => {
    if (!tb) return;
    tb.setRate(undefined);
    await destroyAll(tb, ["a", "b"]);
  });
  after(async () => tb?.down());

  /** Defines (never starts) a domain on a with a sparse qcow2 and a sparse raw disk holding data. */
  function defineCold(name: string, fillMiB: number): string[] {
    makeImage(tb!, "a", { name: `${name}-sys.qcow2`, size: "1G", fillMiB });
    makeImage(tb!, "a", { name: `${name}-data.raw`, format: "raw", size: "256M", fillMiB: 16 });
    defineGuest(
      tb!,
      {
        name,
        disks: [
          { target: "vda", source: `${IMG}/${name}-sys.qcow2` },
          { target: "vdb", source: `${IMG}/${name}-data.raw`, format: "raw" },
        ],
      },
      guest,
    );
    return [`${name}-sys.qcow2`, `${name}-data.raw`];
  }

  const allocated = (file: string) => fs.statSync(file).blocks * 512;

  it("moves it: identical and sparse disks, defined on the destination, gone from the source; it boots there", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const images = defineCold("cold", 48);
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--offline",
      "--copy-storage-all",
      "--undefinesource",
      "--verify",
      "--verbose",
      "cold",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /Migration of 'cold' to .* completed/);
    for (const img of images) {
      const [src, dst] = [`${tb!.a.imagesDir}/${img}`, `${tb!.b.imagesDir}/${img}`];
      assert.equal(compare(src, dst), "Images are identical.", img);
      t.diagnostic(`${img}: ${allocated(src) / MiB} MiB allocated on a, ${allocated(dst) / MiB} MiB on b`);
      assert.ok(allocated(dst) <= allocated(src) * 1.1 + 2 * MiB, `${img} stays sparse on the destination`);
    }
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "cold", "--completed", "--json"])) as {
      status: string;
      phase: string;
      notes: string[];
      disks: { target: string; total: number; dataBytes: number; verified?: { comparedBytes: number } }[];
    };
    assert.equal(job.status, "completed");
    for (const d of job.disks) {
      assert.ok(d.verified, `disk ${d.target} verified`);
      // Only what holds data on either side is read back: the rest is zero on both.
      assert.ok(
        d.verified.comparedBytes < d.total / 4,
        `${d.target}: ${d.verified.comparedBytes} bytes compared`,
      );
    }
    for (const n of job.notes.filter((x) => x.includes("verified"))) t.diagnostic(n);
    const sent = job.disks.reduce((s, d) => s + d.dataBytes, 0);
    t.diagnostic(`sent as data: ${(sent / MiB).toFixed(1)} MiB for 64 MiB written into 1.25 GiB of disks`);
    assert.ok(sent <= 70 * MiB, `only the data crossed: ${sent} bytes`);
    assert.match(ok(tb!, "b", ["dominfo", "cold"]), /State:\s+shut off[\s\S]*Persistent:\s+yes/);
    assert.match(nbdmig(tb!, "a", ["dominfo", "cold"]).stderr, /not found on this host/);
    for (const img of images) assert.ok(fs.existsSync(`${tb!.a.imagesDir}/${img}`), "source images stay");
    ok(tb!, "b", ["start", "cold"]);
    await waitFor("the guest to boot on the destination", () =>
      /nbdmig-guest: ready disk=\/dev\/vda/.test(tb!.b.consoleLog("cold")),
    );
    await assertDestClean(tb!, "cold", [], 30_000, "a");
  });

  it("refuses a running domain, a shut-off one without --offline, and a name the destination has, creating nothing", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    makeImage(tb!, "a", { name: "warm.qcow2", size: "64M" });
    await startUnwaited(
      tb!,
      { name: "warm", disks: [{ target: "vda", source: `${IMG}/warm.qcow2` }] },
      guest,
    );
    let r = nbdmig(tb!, "a", ["migrate", "--offline", "--copy-storage-all", "warm", tb!.b.uri]);
    assert.equal(r.status, 2, r.stderr);
    assert.match(
      r.stderr,
      /domain 'warm' is running: migrate it live \(without --offline\), or shut it down first/,
    );

    const images = defineCold("taken", 8);
    r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "taken", tb!.b.uri]);
    assert.notEqual(r.status, 0);
    assert.match(r.stderr, /domain 'taken' is shut off: add --offline to move it/);
    r = nbdmig(tb!, "a", ["migrate", "--offline", "--live", "--copy-storage-all", "taken", tb!.b.uri]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--offline moves a shut-off domain: --live/);

    fs.copyFileSync(`${tb!.a.dir}/taken.xml`, `${tb!.b.dir}/taken.xml`);
    ok(tb!, "b", ["define", "/var/lib/nbdmig/taken.xml"]);
    r = nbdmig(tb!, "a", ["migrate", "--offline", "--copy-storage-all", "taken", tb!.b.uri]);
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /domain 'taken' already exists here; undefine it on the destination first/);
    for (const img of images) assert.ok(!fs.existsSync(`${tb!.b.imagesDir}/${img}`), `${img} not created`);
    ok(tb!, "b", ["undefine", "taken"]);
    assert.match(ok(tb!, "a", ["dominfo", "taken"]), /State:\s+shut off/);
  });

  it("--verify finds a block changed on the destination after the copy: the migration fails, the destination is clean", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const images = defineCold("bad", 8);
    // The source holds 3 s after each disk's copy, before comparing: the test changes the raw disk then.
    await tb!.a.killAgent("SIGTERM");
    await tb!.a.startAgent([], { NBDMIG_FAILPOINTS: "source:before-verify=sleep:3000" });
    try {
      const run = migrateInBackground(tb!, ["--offline", "--copy-storage-all", "--verify", "bad", tb!.b.uri]);
      await waitFor(
        "the raw disk to be copied",
        async () => {
          const j = await jobOf<{ disks: { target: string; dataBytes?: number }[] }>(tb!, "bad");
          return j?.disks.find((d) => d.target === "vdb")?.dataBytes !== undefined;
        },
        60_000,
        50,
      );
      // 4 KiB of garbage at 100 MiB, a hole on the source (nbdmig's NBD server serves the file as it is).
      const fd = fs.openSync(`${tb!.b.imagesDir}/bad-data.raw`, "r+");
      fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 100 * MiB);
      fs.closeSync(fd);
      const res = await run.done;
      assert.equal(res.status, 1);
      assert.match(
        res.stderr,
        /verify: disk vdb differs on the destination from the source at offset 104857600/,
      );
      await assertDestClean(tb!, "bad", images);
      assert.match(ok(tb!, "a", ["dominfo", "bad"]), /State:\s+shut off/);
    } finally {
      await tb!.a.killAgent("SIGTERM");
      await tb!.a.startAgent();
    }
  });

  it("an aborted copy leaves the destination clean and the source as it was; the same command then completes", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const images = defineCold("slow", 64);
    // 64 Mbit/s: the 80 MiB of data take about 10 s.
    tb!.setRate("64mbit");
    const args = ["--offline", "--copy-storage-all", "slow", tb!.b.uri];
    const run = migrateInBackground(tb!, args);
    await waitFor(
      "the copy to be under way",
      async () => {
        const j = await jobOf<{ phase: string; disk: { processed: number } }>(tb!, "slow");
        return j?.phase === "perform:copy" && j.disk.processed > 8 * MiB;
      },
      60_000,
      100,
    );
    // Meanwhile neither side can start it.
    assert.match(nbdmig(tb!, "a", ["start", "slow"]).stderr, /has an offline migration job in progress/);
    assert.match(nbdmig(tb!, "b", ["start", "slow"]).stderr, /has an incoming migration job in progress/);
    // Scripts follow the job as events: here until the abort ends it.
    const follow = cliInBackground(tb!, "a", ["domjobinfo", "slow", "--follow", "--json"]);
    await waitFor(
      "the follower's first answer",
      () => follow.stdout().includes('"event":"progress"'),
      30_000,
    );
    // Given the phase the caller last saw, the long poll answers at once when the job is in another one,
    // and else at its next phase.
    const since = (phase: string) => {
      const at = Date.now();
      return tb!.a
        .client()
        .call<{ active: boolean; job: { phase: string } }>(
          "GET",
          `/v1/domains/slow/job?waitMs=10000&phase=${encodeURIComponent(phase)}`,
          undefined,
          30_000,
        )
        .then((r) => ({ phase: r.job.phase, afterMs: Date.now() - at }));
    };
    const moved = await since("prepare");
    assert.equal(moved.phase, "perform:copy");
    assert.ok(moved.afterMs < 9_500, `answered after ${moved.afterMs} ms, at once`);
    const next = since("perform:copy");
    // A long poll of the job is answered when the job ends, not when its wait is up.
    const asked = Date.now();
    const ended = tb!.a
      .client()
      .call<{ active: boolean; job: { status: string } }>(
        "GET",
        "/v1/domains/slow/job?waitMs=10000",
        undefined,
        30_000,
      )
      .then((r) => ({ ...r, afterMs: Date.now() - asked }));
    ok(tb!, "a", ["domjobabort", "slow"]);
    const answer = await ended;
    assert.equal(answer.active, false);
    assert.equal(answer.job.status, "cancelled");
    assert.ok(answer.afterMs < 9_500, `answered after ${answer.afterMs} ms, at the job's end`);
    const after = await next;
    assert.match(after.phase, /^(rollback|cancelled)$/);
    assert.ok(after.afterMs < 9_500, `answered after ${after.afterMs} ms, at the next phase`);
    const followed = await follow.done;
    assert.equal(followed.status, 1, followed.stderr);
    assert.match(followed.stderr, /cancelled by domjobabort/);
    const events = jobEvents(followed.stdout);
    assert.deepEqual(phasesOf(events), ["begin", "prepare", "perform:copy", "rollback", "cancelled"]);
    assert.deepEqual(events.at(-1), { ...events.at(-1), event: "end", status: "cancelled" });
    await assert.rejects(
      tb!.a.client().call("GET", "/v1/domains/slow/job?waitMs=soon"),
      (e: unknown) => e instanceof NbdmigError && e.code === "E_BAD_QUERY" && /0 to 10000/.test(e.message),
    );
    const res = await run.done;
    assert.equal(res.status, 1);
    assert.match(res.stderr, /cancelled by domjobabort/);
    await assertDestClean(tb!, "slow", images);
    assert.match(ok(tb!, "a", ["dominfo", "slow"]), /State:\s+shut off/);
    tb!.setRate(undefined);
    // migrate --json: the same events instead of the closing line.
    const again = nbdmig(tb!, "a", ["migrate", "--json", ...args]);
    assert.equal(again.status, 0, again.stderr);
    const run2 = jobEvents(again.stdout);
    assert.deepEqual(phasesOf(run2), ["begin", "prepare", "perform:copy", "finish", "confirm", "completed"]);
    assert.deepEqual(run2.at(-1), { ...run2.at(-1), event: "end", status: "completed" });
    for (const img of images)
      assert.equal(
        compare(`${tb!.a.imagesDir}/${img}`, `${tb!.b.imagesDir}/${img}`),
        "Images are identical.",
      );
  });

  const { inHost, qemuIo, compareAB, base, overlay } = chainFixture(() => tb!);

  it("--copy-storage-inc: only the top image travels (zeros over the base's data too), over a base on both hosts that is never written; a missing base is refused", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const b0 = base("oinc-base.qcow2", 128);
    const top = overlay("oinc-top.qcow2", b0);
    qemuIo(top, "write -P 0x33 200M 8M");
    qemuIo(top, "write -z 16M 4M"); // a zero cluster over the base's data
    qemuIo(top, "write -P 0 40M 1M"); // zeros written as data, over the base's data
    defineGuest(tb!, { name: "oinc", disks: [{ target: "vda", source: top }] }, guest);
    const destBase = `${tb!.b.imagesDir}/oinc-base.qcow2`;
    const baseSha = await sha256File(destBase);

    fs.renameSync(destBase, `${destBase}.saved`);
    const args = ["--offline", "--copy-storage-inc", "--verify", "--verbose", "oinc", tb!.b.uri];
    let r = nbdmig(tb!, "a", ["migrate", ...args]);
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /disk vda: backing file \/var\/lib\/nbdmig\/images\/oinc-base\.qcow2 does not exist here; copy it there first, or use --copy-storage-all/,
    );
    await assertDestClean(tb!, "oinc", ["oinc-top.qcow2"]);
    fs.renameSync(`${destBase}.saved`, destBase);

    r = nbdmig(tb!, "a", ["migrate", ...args]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(
      r.stderr,
      /disk vda: copying only the top image; 1 backing file\(s\) must be on the destination/,
    );
    assert.equal(compareAB("oinc-top.qcow2"), "Images are identical.");
    const out = inHost("b", [
      "qemu-io",
      "-r",
      "-f",
      "qcow2",
      "-c",
      "read -P 0 16M 4M",
      "-c",
      "read -P 0 40M 1M",
      "-c",
      "read -P 0x33 200M 8M",
      `${IMG}/oinc-top.qcow2`,
    ]);
    assert.doesNotMatch(out, /Pattern verification failed/);
    assert.equal((await imageInfo(`${tb!.b.imagesDir}/oinc-top.qcow2`)).backingFilename, b0);
    assert.equal(await sha256File(destBase), baseSha, "the destination's base was never written");
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "oinc", "--completed", "--json"])) as {
      disks: { target: string; mode: string; dataBytes: number; belowTop: number; verified?: object }[];
    };
    const vda = job.disks[0]!;
    t.diagnostic(
      `vda: ${(vda.dataBytes / MiB).toFixed(1)} MiB sent as data, ${(vda.belowTop / MiB).toFixed(0)} MiB left to the base`,
    );
    assert.equal(vda.mode, "top");
    assert.ok(vda.verified, "verified");
    // The overlay's 8 MiB of data, not the base's 128: its zeros travel as zero requests.
    assert.ok(vda.dataBytes >= 8 * MiB && vda.dataBytes <= 9 * MiB, `sent ${vda.dataBytes} bytes`);
    assert.ok(vda.belowTop >= 1024 * MiB - 16 * MiB, `left to the base: ${vda.belowTop} bytes`);
    assert.match(ok(tb!, "b", ["dominfo", "oinc"]), /State:\s+shut off[\s\S]*Persistent:\s+yes/);
  });

  type PartialJob = {
    status: string;
    disks: { target: string; copied: number; dataBytes?: number; resumedFrom?: number }[];
  };
  const partialsOn = (host: "a" | "b") =>
    JSON.parse(ok(tb!, host, ["partial", "list", "--json"])) as {
      name: string;
      disks: { target: string; doneTo: number }[];
    }[];

  it("a copy cut at about half (the destination's agent killed) resumes with the same command: only the rest travels", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const images = defineCold("cut", 64);
    tb!.setRate("64mbit");
    const args = ["--offline", "--copy-storage-all", "--keep-partial", "--verify", "cut", tb!.b.uri];
    const run = migrateInBackground(tb!, args);
    await waitFor(
      "the destination to record a quarter of the qcow2 disk's 64 MiB as copied",
      async () => {
        const j = await jobOf<{ disks: { doneTo?: number }[] }>(tb!, "cut", "b");
        return (j?.disks[0]?.doneTo ?? 0) >= 16 * MiB;
      },
      60_000,
      50,
    );
    await tb!.b.killAgent("SIGKILL");
    const res = await run.done;
    assert.equal(res.status, 1, res.stderr);
    // The restarted agent stops the qemu-nbd its predecessor left and keeps what the checkpoints recorded.
    await tb!.b.startAgent();
    const kept = partialsOn("b");
    assert.equal(kept.length, 1, JSON.stringify(kept));
    const doneTo = kept[0]!.disks.find((d) => d.target === "vda")!.doneTo;
    t.diagnostic(`kept on the destination: vda up to ${(doneTo / MiB).toFixed(1)} MiB`);
    // At least what the test waited for; a slow kill may let the checkpoints reach the end of vda's data.
    assert.ok(doneTo >= 16 * MiB && doneTo <= 1024 * MiB, `vda kept up to ${doneTo}`);
    assert.match(nbdmig(tb!, "b", ["dominfo", "cut"]).stderr, /not found on this host/);

    tb!.setRate(undefined);
    const again = nbdmig(tb!, "a", ["migrate", ...args]);
    assert.equal(again.status, 0, again.stderr);
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "cut", "--completed", "--json"])) as PartialJob;
    const vda = job.disks.find((d) => d.target === "vda")!;
    t.diagnostic(`second attempt: vda resumed at ${vda.resumedFrom}, sent ${vda.dataBytes} bytes as data`);
    assert.equal(vda.resumedFrom, doneTo);
    // The 64 MiB of data lie at the start of vda: what lies past the checkpoint is what travels again.
    assert.ok(vda.dataBytes! <= Math.max(0, 64 * MiB - doneTo) + MiB, `vda sent ${vda.dataBytes} bytes`);
    for (const img of images)
      assert.equal(
        compare(`${tb!.a.imagesDir}/${img}`, `${tb!.b.imagesDir}/${img}`),
        "Images are identical.",
      );
    assert.deepEqual(partialsOn("b"), [], "the partial copy is gone once taken over");
    assert.match(ok(tb!, "b", ["dominfo", "cut"]), /State:\s+shut off/);
  });

  it("a partial copy left alone is removed when its time is up; discard removes one at once", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const images = defineCold("gone", 64);
    tb!.setRate("64mbit");
    const cut = async (keep: string) => {
      const run = migrateInBackground(tb!, [
        "--offline",
        "--copy-storage-all",
        "--keep-partial-for",
        keep,
        "gone",
        tb!.b.uri,
      ]);
      await waitFor(
        "a checkpoint on the destination",
        async () => {
          const j = await jobOf<{ phase: string; disks: { doneTo?: number }[] }>(tb!, "gone", "b");
          return j?.phase === "prepared" && (j.disks[0]?.doneTo ?? 0) > 0;
        },
        60_000,
        50,
      );
      ok(tb!, "a", ["domjobabort", "gone"]);
      const res = await run.done;
      assert.equal(res.status, 1);
      assert.match(
        res.stderr,
        /cancelled by domjobabort; the destination keeps the .* copied until .*: the same command resumes the copy/,
      );
      assert.ok(fs.existsSync(`${tb!.b.imagesDir}/${images[0]}`), "the partial image is kept");
    };
    await cut("3s");
    await waitFor(
      "the partial copy to expire",
      () => !fs.existsSync(`${tb!.b.imagesDir}/${images[0]}`),
      20_000,
    );
    assert.deepEqual(partialsOn("b"), []);
    await assertDestClean(tb!, "gone", images);

    await cut("1h");
    assert.match(ok(tb!, "b", ["partial", "list"]), /gone: vda .*; kept until/);
    assert.match(ok(tb!, "b", ["partial", "discard", "gone"]), /removed the partial copy of 'gone'/);
    assert.match(
      nbdmig(tb!, "b", ["partial", "discard", "gone"]).stderr,
      /no partial copy of 'gone' is kept on this host/,
    );
    await assertDestClean(tb!, "gone", images);
    assert.match(ok(tb!, "a", ["dominfo", "gone"]), /State:\s+shut off/);
  });
});
