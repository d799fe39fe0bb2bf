import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import { after, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { sha256File } from "../src/util/hash.js";
import { imageInfo } from "../src/qemu/img.js";
import { available, cliPath, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  compare,
  guestWritten,
  IMG,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  qemuStatus,
  startGuest,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

describe("live migration with --copy-storage-all", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(MIGRATION_TOOLS, true)) return;
    guest = testGuest();
    // The source runs the -blockdev layout and the destination the default (-drive where QEMU has block
    // migration), so the NBD path is tested with both layouts and across them; other suites use the default.
    tb = await Testbed.up({ agentArgs: { a: ["--disk-layout", "blockdev"] } });
  });
  after(async () => tb?.down());

  it("moves a writing guest with every local disk, leaving shared and read-only disks alone", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    makeImage(tb!, "a", { name: "sys.qcow2", size: "1G", fillMiB: 128 });
    makeImage(tb!, "a", { name: "data.raw", format: "raw", size: "256M", fillMiB: 64 });
    // The shared disk and the cdrom exist on both hosts, as shared storage would.
    for (const h of ["a", "b"] as const) {
      makeImage(tb!, h, { name: "shared.raw", format: "raw", size: "64M", fillMiB: 8 });
      makeImage(tb!, h, { name: "seed.iso", format: "raw", size: "4M", fillMiB: 4 });
    }
    const before = {
      shared: await sha256File(`${tb!.b.imagesDir}/shared.raw`),
      iso: await sha256File(`${tb!.b.imagesDir}/seed.iso`),
    };
    await startGuest(
      tb!,
      {
        name: "mig1",
        rate: 20,
        span: 512,
        writeDisk: "/dev/vda",
        disks: [
          { target: "vda", source: `${IMG}/sys.qcow2` },
          { target: "vdb", source: `${IMG}/data.raw`, format: "raw" },
          {
            target: "sda",
            source: `${IMG}/shared.raw`,
            format: "raw",
            bus: "scsi",
            shareable: true,
            cache: "none",
          },
          { target: "sdb", source: `${IMG}/seed.iso`, format: "raw", bus: "sata", device: "cdrom" },
        ],
      },
      guest,
    );
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--verify",
      "--verbose",
      "mig1",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}\n${r.stdout}`);
    assert.match(
      r.stdout,
      /Migration of 'mig1' to nbdmig:\/\/198\.18\.0\.2:7800 completed in [\d.]+ (ms|s), downtime \d+ ms/,
    );
    // Like virsh, progress goes to stderr, so stdout stays the result.
    assert.match(r.stderr, /Migration\s+\|.*phase perform:/, "--verbose draws progress");
    assert.match(r.stderr, /disk vda\s+\|/);
    // At READY the source had the kernel write back its copied images, from inside its host.
    await waitFor(
      "the source agent to write back the copied disks",
      () => /"copied disks written back at READY"/.test(fs.readFileSync(`${tb!.dir}/agent-a.log`, "utf8")),
      30_000,
    );

    // The destination is paused (--suspend): compare while nothing writes.
    assert.match(ok(tb!, "b", ["dominfo", "mig1"]), /State:\s+paused/);
    assert.match(ok(tb!, "a", ["list", "--all"]), /mig1\s+shut off/);
    assert.equal(tb!.a.qemuPids().length, 0, "the source QEMU is stopped after Confirm");
    assert.equal(
      compare(`${tb!.a.imagesDir}/sys.qcow2`, `${tb!.b.imagesDir}/sys.qcow2`),
      "Images are identical.",
    );
    assert.equal(
      compare(`${tb!.a.imagesDir}/data.raw`, `${tb!.b.imagesDir}/data.raw`),
      "Images are identical.",
    );
    assert.equal((await imageInfo(`${tb!.b.imagesDir}/sys.qcow2`)).format, "qcow2");
    assert.equal(
      await sha256File(`${tb!.b.imagesDir}/shared.raw`),
      before.shared,
      "the shareable disk was not copied",
    );
    assert.equal(await sha256File(`${tb!.b.imagesDir}/seed.iso`), before.iso, "the cdrom was not copied");
    assert.deepEqual(fs.readdirSync(tb!.b.imagesDir).sort(), [
      "data.raw",
      "seed.iso",
      "shared.raw",
      "sys.qcow2",
    ]);

    const jobA = ok(tb!, "a", ["domjobinfo", "mig1", "--completed"]);
    assert.match(jobA, /Job type:\s+Completed/);
    assert.match(jobA, /Total downtime:\s+\d+ ms/);
    assert.match(jobA, /Disk vda:\s+1\.0 GiB \/ 1\.0 GiB \(ready\)/);
    const jobJson = JSON.parse(ok(tb!, "a", ["domjobinfo", "mig1", "--completed", "--json"])) as {
      status: string;
      notes: string[];
      disks: { target: string; verified?: { comparedBytes: number } }[];
    };
    assert.equal(jobJson.status, "completed");
    // --verify compared both paused copies after the stream, the guest's last writes included.
    for (const d of jobJson.disks) assert.ok(d.verified, `disk ${d.target} verified`);
    for (const n of jobJson.notes.filter((x) => x.includes("verified"))) t.diagnostic(n);
    assert.deepEqual(
      jobJson.disks.map((d) => d.target),
      ["vda", "vdb"],
    );
    assert.match(ok(tb!, "b", ["domjobinfo", "mig1", "--completed"]), /Operation:\s+Incoming migration/);

    // Resumed, the guest keeps writing on the destination.
    ok(tb!, "b", ["resume", "mig1"]);
    await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", "mig1") > 0, 30_000);
    const w = guestWritten(tb!, "b", "mig1");
    await waitFor("more writes on the destination", () => guestWritten(tb!, "b", "mig1") > w, 30_000);
    assert.match(ok(tb!, "b", ["dominfo", "mig1"]), /Persistent:\s+no/);
    ok(tb!, "b", ["destroy", "mig1"]);
  });

  it("carries writes made during the bulk copy, after READY and during the RAM phase", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    makeImage(tb!, "a", { name: "x-sys.qcow2", size: "64M" });
    makeImage(tb!, "a", { name: "x-data.qcow2", size: "512M", fillMiB: 48 });
    await startGuest(
      tb!,
      {
        name: "exact",
        disks: [
          { target: "vda", source: `${IMG}/x-sys.qcow2` },
          { target: "sda", source: `${IMG}/x-data.qcow2`, bus: "scsi" },
        ],
      },
      guest,
    );
    const a = tb!.a.client();
    const hmpWrite = (pattern: number, offMiB: number) =>
      a.call("POST", "/v1/domains/exact/monitor", {
        hmp: true,
        command: `qemu-io -d disk-sda "write -P 0x${pattern.toString(16)} ${offMiB}M 1M"`,
      });
    const phase = async () =>
      (
        await a.call<{ job: { phase: string; disks: { copied: number }[] } | null }>(
          "GET",
          "/v1/domains/exact/job",
        )
      ).job;

    // A 64 Mbit/s link makes both the bulk copy (48 MiB) and the RAM phase last seconds. (--bandwidth
    // would too, but QEMU's mirror speed also counts the zero regions of the 512 MiB disk.)
    tb!.setRate("64mbit");
    t.after(() => tb!.setRate(undefined));
    const child = spawn(
      tb!.a.execPrefix()[0]!,
      [
        ...tb!.a.execPrefix().slice(1),
        process.execPath,
        cliPath,
        "migrate",
        "--live",
        "--copy-storage-all",
        "--suspend",
        "exact",
        tb!.b.uri,
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let stderr = "";
    child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
    const exited = new Promise<number>((resolve) => child.on("close", (code) => resolve(code ?? -1)));

    await waitFor(
      "the bulk copy",
      async () => {
        const j = await phase();
        return j?.phase === "perform:mirror" && j.disks.some((d) => d.copied > 0);
      },
      60_000,
      50,
    );
    await hmpWrite(0xa1, 300);
    assert.equal((await phase())?.phase, "perform:mirror", "write A landed during the bulk copy");
    await waitFor(
      "the RAM phase (all mirrors READY)",
      async () => (await phase())?.phase === "perform:memory",
      120_000,
      50,
    );
    await hmpWrite(0xb2, 400);
    await new Promise((r) => setTimeout(r, 1000));
    assert.equal((await phase())?.phase, "perform:memory", "still in the RAM phase");
    await hmpWrite(0xc3, 500);
    assert.equal((await phase())?.phase, "perform:memory", "write C landed during the RAM phase");

    assert.equal(await exited, 0, `migrate failed: ${stderr}`);
    const dest = `${tb!.b.imagesDir}/x-data.qcow2`;
    for (const [p, off] of [
      [0xa1, 300],
      [0xb2, 400],
      [0xc3, 500],
    ] as const) {
      const out = execFileSync(
        "qemu-io",
        ["-U", "-r", "-f", "qcow2", "-c", `read -P 0x${p.toString(16)} ${off}M 1M`, dest],
        { encoding: "utf8" },
      );
      assert.doesNotMatch(out, /Pattern verification failed/, `pattern 0x${p.toString(16)} at ${off} MiB`);
      assert.match(out, /read 1048576\/1048576 bytes/);
    }
    assert.equal(compare(`${tb!.a.imagesDir}/x-data.qcow2`, dest), "Images are identical.");
    ok(tb!, "b", ["destroy", "exact"]);
  });

  it("keeps a sparse 8 GiB disk sparse and sends about its allocation", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    makeImage(tb!, "a", { name: "s-sys.qcow2", size: "64M" });
    makeImage(tb!, "a", { name: "sparse.qcow2", size: "8G", fillMiB: 100 });
    await startGuest(
      tb!,
      {
        name: "sparse",
        disks: [
          { target: "vda", source: `${IMG}/s-sys.qcow2` },
          { target: "vdb", source: `${IMG}/sparse.qcow2` },
        ],
      },
      guest,
    );
    const tx0 = tb!.linkTxBytes();
    ok(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--disks-port",
      "49300",
      "sparse",
      tb!.b.uri,
    ]);
    assert.match(
      ok(tb!, "a", ["domjobinfo", "sparse", "--completed"]),
      /NBD endpoint:\s+198\.18\.0\.2:49300/,
      "--disks-port",
    );
    const sent = tb!.linkTxBytes() - tx0;
    const dest = await imageInfo(`${tb!.b.imagesDir}/sparse.qcow2`);
    assert.equal(dest.virtualSize, 8 * 1024 ** 3);
    assert.ok(
      dest.actualSize < 160 * 1024 ** 2,
      `destination allocation ${dest.actualSize} stays near 100 MiB`,
    );
    // 100 MiB of disk data plus the guest's RAM (about 100 MiB for this guest), far from 8 GiB.
    assert.ok(sent < 400 * 1024 ** 2, `sent ${sent} bytes over the link`);
    t.diagnostic(
      `sparse 8 GiB/100 MiB: ${(sent / 1024 ** 2).toFixed(0)} MiB over the link, destination allocation ${(dest.actualSize / 1024 ** 2).toFixed(0)} MiB`,
    );
    assert.equal(
      compare(`${tb!.a.imagesDir}/sparse.qcow2`, `${tb!.b.imagesDir}/sparse.qcow2`),
      "Images are identical.",
    );
    ok(tb!, "b", ["destroy", "sparse"]);
  });

  it("copies exactly the disks --migrate-disks names, and explains bad selections", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    makeImage(tb!, "a", { name: "sel-a.qcow2", size: "64M", fillMiB: 8 });
    makeImage(tb!, "a", { name: "sel-b.qcow2", size: "64M", fillMiB: 8 });
    makeImage(tb!, "a", { name: "sel-shared.raw", format: "raw", size: "16M" });
    const pid = await startGuest(
      tb!,
      {
        name: "sel",
        disks: [
          { target: "vda", source: `${IMG}/sel-a.qcow2` },
          { target: "vdb", source: `${IMG}/sel-b.qcow2` },
          { target: "sdc", source: `${IMG}/sel-shared.raw`, format: "raw", bus: "scsi", shareable: true },
        ],
      },
      guest,
    );
    const usage: [string[], RegExp][] = [
      [
        ["--copy-storage-all", "--migrate-disks", "vdz"],
        /--migrate-disks: domain 'sel' has no disk 'vdz'; its disks are: vda, vdb, sdc/,
      ],
      [
        ["--copy-storage-all", "--migrate-disks", "vdb,sdc"],
        /--migrate-disks: disk 'sdc' is shareable; such disks are never copied/,
      ],
      [["--migrate-disks", "vdb"], /--migrate-disks needs --copy-storage-all or --copy-storage-inc/],
      [
        ["--copy-storage-all", "--bandwidth", "fast"],
        /--bandwidth takes a positive whole number, not 'fast'/,
      ],
    ];
    for (const [flags, re] of usage) {
      const r = nbdmig(tb!, "a", ["migrate", "--live", ...flags, "sel", tb!.b.uri]);
      assert.equal(r.status, 2, `${flags.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, re);
    }
    // vda is not copied, and the destination does not have it: refused in Prepare, nothing left behind.
    const missing = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--migrate-disks",
      "vdb",
      "sel",
      tb!.b.uri,
    ]);
    assert.equal(missing.status, 1);
    assert.match(
      missing.stderr,
      /prepare on 198\.18\.0\.2: disk vda is not copied .* but \/var\/lib\/nbdmig\/images\/sel-a\.qcow2 does not exist here/,
    );
    await assertDestClean(tb!, "sel", ["sel-b.qcow2"]);
    assert.match(ok(tb!, "a", ["dominfo", "sel"]), /State:\s+running/);
    assert.equal((await tb!.a.client().call<{ pid: number }>("GET", "/v1/domains/sel")).pid, pid);

    // With vda and the shared disk present on the destination, only vdb moves.
    fs.copyFileSync(`${tb!.a.imagesDir}/sel-a.qcow2`, `${tb!.b.imagesDir}/sel-a.qcow2`);
    fs.copyFileSync(`${tb!.a.imagesDir}/sel-shared.raw`, `${tb!.b.imagesDir}/sel-shared.raw`);
    const mtimeA = fs.statSync(`${tb!.b.imagesDir}/sel-a.qcow2`).mtimeMs;
    ok(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--migrate-disks",
      "vdb",
      "--suspend",
      "--persistent",
      "--undefinesource",
      "sel",
      tb!.b.uri,
    ]);
    assert.equal(
      compare(`${tb!.a.imagesDir}/sel-b.qcow2`, `${tb!.b.imagesDir}/sel-b.qcow2`),
      "Images are identical.",
    );
    assert.equal(fs.statSync(`${tb!.b.imagesDir}/sel-a.qcow2`).mtimeMs, mtimeA, "vda was not copied");
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "sel", "--completed", "--json"])) as {
      disks: { target: string }[];
    };
    assert.deepEqual(
      job.disks.map((d) => d.target),
      ["vdb"],
    );
    // --persistent / --undefinesource
    assert.match(ok(tb!, "b", ["dominfo", "sel"]), /Persistent:\s+yes/);
    assert.doesNotMatch(ok(tb!, "a", ["list", "--all"]), /sel/);
    ok(tb!, "b", ["destroy", "sel"]);
  });

  it("--verify with --suspend: a block changed on the destination after the switchover fails the migration; the guest runs on in the source, the copy stays paused for inspection until discarded", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    // The source's agent waits before comparing until the test has changed the destination's disk.
    const hold = "source:before-verify";
    const layout = ["--disk-layout", "blockdev"];
    await tb!.a.killAgent("SIGTERM");
    // It also waits at the switchover, the guest paused, where a follower is not answered.
    const switchover = "source:pre-switchover";
    await tb!.a.startAgent(layout, {
      NBDMIG_FAILPOINTS: `${hold}=wait:/var/lib/nbdmig,${switchover}=wait:/var/lib/nbdmig`,
    });
    try {
      makeImage(tb!, "a", { name: "vfy.raw", format: "raw", size: "256M", fillMiB: 8 });
      const pid = await startGuest(
        tb!,
        { name: "vfy", disks: [{ target: "vda", source: `${IMG}/vfy.raw`, format: "raw" }] },
        guest,
      );
      const run = migrateInBackground(tb!, [
        "--live",
        "--copy-storage-all",
        "--suspend",
        "--verify",
        "vfy",
        tb!.b.uri,
      ]);
      // A long poll that would be answered at the switchover (a phase other than the one last seen, and
      // its wait up) is held there, so that the CLI does not wake while the guest is paused, and is
      // answered once the stream has ended.
      await waitFor(
        "the source to reach the switchover",
        () => fs.existsSync(`${tb!.a.dir}/${switchover}.reached`),
        120_000,
      );
      let answered = false;
      const poll = tb!.a
        .client()
        .call<{ job: { phase: string; phaseTimes: Record<string, number> } }>(
          "GET",
          "/v1/domains/vfy/job?waitMs=200&phase=perform%3Amemory",
          undefined,
          60_000,
        )
        .finally(() => (answered = true));
      await new Promise((resolve) => setTimeout(resolve, 1500));
      assert.equal(answered, false, "a follower was answered during the switchover");
      fs.writeFileSync(`${tb!.a.dir}/${switchover}.go`, "");
      const { phaseTimes } = (await poll).job;
      assert.ok("perform:switchover" in phaseTimes, JSON.stringify(phaseTimes));
      await waitFor(
        "the source to reach --verify",
        () => fs.existsSync(`${tb!.a.dir}/${hold}.reached`),
        120_000,
      );
      // 4 KiB of garbage at 100 MiB, a hole on the source, straight into the destination's raw image.
      const fd = fs.openSync(`${tb!.b.imagesDir}/vfy.raw`, "r+");
      fs.writeSync(fd, Buffer.alloc(4096, 0x5a), 0, 4096, 100 * 1024 * 1024);
      fs.closeSync(fd);
      fs.writeFileSync(`${tb!.a.dir}/${hold}.go`, "");
      const res = await run.done;
      assert.equal(res.status, 1, res.stderr);
      assert.match(
        res.stderr,
        /verify: disk vda differs on the destination from the source at offset 104857600 \(the 1 MiB block there\); the guest stays here; the destination keeps its copy paused for inspection until \S+ \(it never runs there\): 'nbdmig -c \S+ partial discard vfy' removes it sooner/,
      );
      await assertSourceIntact(tb!, "vfy", pid, false);
      // The destination's copy: paused, its image as the test left it, refused whatever would run it, also
      // by an agent restarted meanwhile.
      const refused =
        /domain 'vfy' is a copy whose --verify failed, kept paused for inspection until \S+; it never runs here \(the guest runs on the source\): remove it with 'nbdmig partial discard vfy'/;
      for (const restart of [false, true]) {
        if (restart) {
          await tb!.b.killAgent("SIGKILL");
          await tb!.b.startAgent();
        }
        assert.match(ok(tb!, "b", ["list", "--all"]), /vfy\s+paused/);
        assert.equal(await qemuStatus(tb!, "b", "vfy"), "paused");
        for (const verb of ["resume", "destroy"]) {
          const r = nbdmig(tb!, "b", [verb, "vfy"]);
          assert.notEqual(r.status, 0, `${verb} vfy on b: ${r.stdout}`);
          assert.match(r.stderr, refused);
        }
        const followed = nbdmig(tb!, "b", ["domjobinfo", "vfy", "--follow"]);
        assert.equal(followed.status, 1, followed.stdout);
        assert.match(followed.stdout, /\bkept\s+failed\b/);
        assert.match(followed.stderr, /its --verify failed on the source: this copy is kept paused/);
        assert.match(
          ok(tb!, "b", ["partial", "list"]),
          /^vfy: vda 256(\.0)? MiB\/256(\.0)? MiB; kept until \S+ \(migration \S+: its --verify failed; the copy is paused here, never resumed\)$/m,
        );
        const fd = fs.openSync(`${tb!.b.imagesDir}/vfy.raw`, "r");
        const word = Buffer.alloc(4);
        fs.readSync(fd, word, 0, 4, 100 * 1024 * 1024);
        fs.closeSync(fd);
        assert.equal(word.readUInt32LE(0), 0x5a5a5a5a, "the image stays as it was");
      }
      // A new migration of the domain is refused there with the same reason; the guest runs on here.
      const again = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "vfy", tb!.b.uri]);
      assert.equal(again.status, 1, again.stdout);
      assert.match(
        again.stderr,
        /domain 'vfy' here is a copy whose --verify failed, kept paused for inspection/,
      );
      await assertSourceIntact(tb!, "vfy", pid, false);
      assert.match(
        ok(tb!, "b", ["partial", "discard", "vfy"]),
        /removed the partial copy of 'vfy': .*vfy\.raw/,
      );
      await assertDestClean(tb!, "vfy", ["vfy.raw"]);
      assert.match(ok(tb!, "b", ["partial", "list"]), /^no partial copy is kept on this host$/m);
      ok(tb!, "a", ["destroy", "vfy"]);
    } finally {
      await tb!.a.killAgent("SIGTERM");
      await tb!.a.startAgent(layout);
    }
  });
});
