import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, afterEach, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { sha256File } from "../src/util/hash.js";
import { imageInfo } from "../src/qemu/img.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  chainFixture,
  compare,
  destroyAll,
  IMG,
  jobOf,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const MiB = 1024 * 1024;

describe("live migration with --copy-storage-inc", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(MIGRATION_TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up();
  });
  after(async () => tb?.down());
  // A failed test must not leave its guest on the destination for the next one.
  afterEach(async () => tb && destroyAll(tb, ["b"]));

  const { inHost, qemuIo, compareAB, base, overlay } = chainFixture(() => tb!);

  it("copies only the overlay of a two-level chain, with writes before and during the migration", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const b0 = base("two-base.qcow2", 384);
    const top = overlay("two-top.qcow2", b0);
    qemuIo(top, "write -P 0x33 100M 8M");
    qemuIo(top, "write -z 80M 4M"); // zeros over non-zero base data, outside the guest writer's 64 MiB
    const baseSha = await sha256File(`${tb!.b.imagesDir}/two-base.qcow2`);
    await startGuest(
      tb!,
      { name: "inc2", rate: 10, span: 64, disks: [{ target: "vda", source: `${IMG}/two-top.qcow2` }] },
      guest,
    );
    const tx0 = tb!.linkTxBytes();
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-inc",
      "--suspend",
      "--verify",
      "--verbose",
      "inc2",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(
      r.stderr,
      /disk vda: copying only the top image; 1 backing file\(s\) must be on the destination/,
    );
    const sent = tb!.linkTxBytes() - tx0;
    const destTop = `${tb!.b.imagesDir}/two-top.qcow2`;
    assert.equal(compareAB("two-top.qcow2"), "Images are identical.");
    assert.match(r.stderr, /disk vda verified: equal on both sides/, "--verify compared the guest's view");
    const out = inHost("b", [
      "qemu-io",
      "-U",
      "-r",
      "-f",
      "qcow2",
      "-c",
      "read -P 0 80M 4M",
      "-c",
      "read -P 0x33 100M 8M",
      `${IMG}/two-top.qcow2`,
    ]);
    assert.doesNotMatch(out, /Pattern verification failed/);
    const info = await imageInfo(destTop);
    assert.equal(info.backingFilename, b0, "the destination overlay has the same backing");
    const topAlloc = (await imageInfo(`${tb!.a.imagesDir}/two-top.qcow2`)).actualSize;
    // The overlay (about 8 MiB + the guest's writes) and the RAM (about 100 MiB), not the 384 MiB base.
    assert.ok(sent < topAlloc + 200 * MiB, `sent ${sent} bytes; overlay allocation ${topAlloc}`);
    t.diagnostic(
      `two-level chain: ${(sent / MiB).toFixed(0)} MiB over the link, overlay ${(topAlloc / MiB).toFixed(0)} MiB, base 384 MiB`,
    );
    ok(tb!, "b", ["destroy", "inc2"]);
    assert.equal(
      await sha256File(`${tb!.b.imagesDir}/two-base.qcow2`),
      baseSha,
      "the destination's base was never written",
    );
  });

  it("handles a three-level chain", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const b0 = base("three-b0.qcow2", 32);
    const b1 = base("three-b1.qcow2", 16, b0);
    const top = overlay("three-top.qcow2", b1);
    qemuIo(top, "write -P 0x44 700M 4M");
    await startGuest(
      tb!,
      { name: "inc3", disks: [{ target: "vda", source: `${IMG}/three-top.qcow2` }] },
      guest,
    );
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-inc",
      "--verify-backing",
      "--suspend",
      "--verbose",
      "inc3",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /disk vda: copying only the top image; 2 backing file\(s\)/);
    assert.equal(compareAB("three-top.qcow2"), "Images are identical.");
    ok(tb!, "b", ["destroy", "inc3"]);
  });

  it("copies a disk without a backing chain whole, and says so", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", `${tb!.a.imagesDir}/flat.qcow2`, "128M"]);
    qemuIo(`${IMG}/flat.qcow2`, "write -P 0x55 0 16M");
    await startGuest(tb!, { name: "flat", disks: [{ target: "vda", source: `${IMG}/flat.qcow2` }] }, guest);
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-inc",
      "--suspend",
      "--verbose",
      "flat",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /disk vda: no backing chain, copied whole/);
    assert.equal(
      compare(`${tb!.a.imagesDir}/flat.qcow2`, `${tb!.b.imagesDir}/flat.qcow2`),
      "Images are identical.",
    );
    ok(tb!, "b", ["destroy", "flat"]);
  });

  it("refuses a missing or different base before creating anything", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const b0 = base("ref-base.qcow2", 8);
    overlay("ref-top.qcow2", b0);
    const pid = await startGuest(
      tb!,
      { name: "ref", disks: [{ target: "vda", source: `${IMG}/ref-top.qcow2` }] },
      guest,
    );
    const destBase = `${tb!.b.imagesDir}/ref-base.qcow2`;
    const saved = `${tb!.dir}/ref-base.saved`;
    fs.renameSync(destBase, saved);
    let r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-inc", "ref", tb!.b.uri]);
    assert.equal(r.status, 1);
    assert.match(
      r.stderr,
      /prepare on 198\.18\.0\.2: disk vda: backing file \/var\/lib\/nbdmig\/images\/ref-base\.qcow2 does not exist here; copy it there first, or use --copy-storage-all/,
    );
    await assertDestClean(tb!, "ref", ["ref-top.qcow2"]);

    // Same size and format, other content: only --verify-backing can tell.
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", destBase, "1G"]);
    qemuIo(destBase, "write -P 0x99 0 8M");
    r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-inc", "--verify-backing", "ref", tb!.b.uri]);
    assert.equal(r.status, 1);
    assert.match(
      r.stderr,
      /disk vda: backing file \/var\/lib\/nbdmig\/images\/ref-base\.qcow2 differs in content from the source's \(sha256\)/,
    );
    await assertDestClean(tb!, "ref", ["ref-top.qcow2"]);

    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", destBase, "2G"]);
    r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-inc", "ref", tb!.b.uri]);
    assert.equal(r.status, 1);
    assert.match(
      r.stderr,
      /backing file \/var\/lib\/nbdmig\/images\/ref-base\.qcow2 has virtual size 2147483648 here but 1073741824 on the source/,
    );
    await assertDestClean(tb!, "ref", ["ref-top.qcow2"]);
    assert.ok(fs.existsSync(destBase), "the destination's own base is left alone");
    fs.renameSync(saved, destBase);
    await assertSourceIntact(tb!, "ref", pid, false);
    ok(tb!, "a", ["destroy", "ref"]);
  });

  it("removes the overlay it created when the copy is aborted, and never writes the base", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const b0 = base("ab-base.qcow2", 8);
    const top = overlay("ab-top.qcow2", b0);
    execFileSync("sh", ["-c", `head -c 96M /dev/urandom > ${tb!.dir}/r.bin`]);
    qemuIo(top, `write -s ${tb!.dir}/r.bin 100M 96M`);
    const baseSha = await sha256File(`${tb!.b.imagesDir}/ab-base.qcow2`);
    const pid = await startGuest(
      tb!,
      { name: "ab", disks: [{ target: "vda", source: `${IMG}/ab-top.qcow2` }] },
      guest,
    );
    tb!.setRate("64mbit");
    t.after(() => tb!.setRate(undefined));
    const run = migrateInBackground(tb!, ["--live", "--copy-storage-inc", "ab", tb!.b.uri]);
    await waitFor(
      "the overlay copy",
      async () => {
        const j = await jobOf(tb!, "ab");
        return j?.phase === "perform:mirror" && j.disks.some((d) => d.copied > 4 * MiB);
      },
      60_000,
      100,
    );
    assert.ok(fs.existsSync(`${tb!.b.imagesDir}/ab-top.qcow2`), "the overlay exists during the copy");
    ok(tb!, "a", ["domjobabort", "ab"]);
    assert.equal((await run.done).status, 1);
    await assertSourceIntact(tb!, "ab", pid, false);
    await assertDestClean(tb!, "ab", ["ab-top.qcow2"]);
    assert.equal(await sha256File(`${tb!.b.imagesDir}/ab-base.qcow2`), baseSha);
    ok(tb!, "a", ["destroy", "ab"]);
  });
});
