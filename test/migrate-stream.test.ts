/**
 * The fallback: a destination that cannot serve NBD (`daemon --no-nbd`) still receives the disks, inside the
 * migration stream (QEMU 7.2's block migration), with the same flags, disk selection and rollback.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, afterEach, before, describe, it } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { Testbed } from "../src/testbed/testbed.js";
import { sha256File } from "../src/util/hash.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  compare,
  destroyAll,
  IMG,
  jobOf,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
  startUnwaited,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const MiB = 1024 * 1024;

interface StreamJob {
  phase: string;
  storagePath: string;
  streamDisk?: { transferred: number; remaining: number; total: number; targets: string[] };
}

/** A second look at two images that differed: the compare again 2 s later, and each side's map there. */
async function mismatchDetail(a: string, b: string, first: string): Promise<string> {
  await sleep(2000);
  const off = Number(/offset (\d+)/.exec(first)?.[1] ?? NaN);
  const at = (img: string): string => {
    const map = JSON.parse(
      execFileSync("qemu-img", ["map", "-U", "--output=json", img], { encoding: "utf8" }),
    ) as { start: number; length: number; data: boolean; zero: boolean }[];
    const e = map.find((m) => m.start <= off && off < m.start + m.length);
    return e ? `data=${e.data} zero=${e.zero} [${e.start}+${e.length}]` : "not mapped";
  };
  return `; 2 s later: ${compare(a, b)}; at ${off}: source ${at(a)}, destination ${at(b)}`;
}

describe(
  "storage in the migration stream when the destination cannot serve NBD",
  { timeout: 900_000 },
  () => {
    let tb: Testbed | undefined;
    let guest: { kernel: string; initrd: string };

    before(async () => {
      if (!available(MIGRATION_TOOLS, true)) return;
      guest = testGuest();
      tb = await Testbed.up({ agentArgs: { b: ["--no-nbd"] } });
    });
    after(async () => tb?.down());
    afterEach(async () => tb && destroyAll(tb, ["a", "b"]));

    const inHost = (h: "a" | "b", argv: string[]) =>
      execFileSync(tb![h].execPrefix()[0]!, [...tb![h].execPrefix().slice(1), ...argv], { encoding: "utf8" });

    it("--copy-storage-all: a writing guest arrives whole; read-only shared disks and the cdrom are not sent", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      makeImage(tb!, "a", { name: "s-sys.qcow2", size: "1G", fillMiB: 128 });
      makeImage(tb!, "a", { name: "s-data.raw", format: "raw", size: "256M", fillMiB: 64 });
      for (const h of ["a", "b"] as const) {
        makeImage(tb!, h, { name: "s-shared.raw", format: "raw", size: "64M", fillMiB: 8 });
        makeImage(tb!, h, { name: "s-seed.iso", format: "raw", size: "4M", fillMiB: 4 });
      }
      const sharedBefore = await sha256File(`${tb!.b.imagesDir}/s-shared.raw`);
      await startGuest(
        tb!,
        {
          name: "st1",
          rate: 20,
          span: 512,
          writeDisk: "/dev/vda",
          disks: [
            { target: "vda", source: `${IMG}/s-sys.qcow2` },
            { target: "vdb", source: `${IMG}/s-data.raw`, format: "raw" },
            { target: "sda", source: `${IMG}/s-shared.raw`, format: "raw", shareable: true, readonly: true },
            { target: "sdb", source: `${IMG}/s-seed.iso`, format: "raw", bus: "sata", device: "cdrom" },
          ],
        },
        guest,
      );
      const r = nbdmig(tb!, "a", [
        "migrate",
        "--live",
        "--copy-storage-all",
        "--suspend",
        "--verbose",
        "st1",
        tb!.b.uri,
      ]);
      assert.equal(r.status, 0, `migrate failed: ${r.stderr}\n${r.stdout}`);
      assert.match(
        r.stderr,
        /storage path: in the migration stream \(QEMU block migration\): the destination cannot serve NBD \(its agent runs with --no-nbd\)/,
      );
      assert.match(r.stderr, /disks vda,vdb\s*\|/, "--verbose shows the stream's disk progress");
      assert.match(ok(tb!, "b", ["dominfo", "st1"]), /State:\s+paused/);
      for (const img of ["s-sys.qcow2", "s-data.raw"]) {
        const [a, b] = [`${tb!.a.imagesDir}/${img}`, `${tb!.b.imagesDir}/${img}`];
        const first = compare(a, b);
        // CI once saw vda differ here (one 1 MiB-aligned offset) and 30 local runs did not: say what a
        // recurrence looks like (whether it lasts, and how each side maps the place) to find the cause.
        const detail = first === "Images are identical." ? "" : await mismatchDetail(a, b, first);
        assert.equal(first, "Images are identical.", `${img}${detail}`);
      }
      assert.equal(
        await sha256File(`${tb!.b.imagesDir}/s-shared.raw`),
        sharedBefore,
        "the shared disk is untouched",
      );
      const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "st1", "--completed", "--json"])) as StreamJob;
      assert.equal(job.storagePath, "stream");
      // QEMU's total is the size of every disk its block migration iterates: exactly the two selected ones.
      assert.equal(job.streamDisk?.total, 1024 * MiB + 256 * MiB, "only vda and vdb were in the stream");
      assert.deepEqual(job.streamDisk?.targets, ["vda", "vdb"]);
      assert.match(
        ok(tb!, "a", ["domjobinfo", "st1", "--completed"]),
        /Storage path:\s+in the migration stream \(QEMU block migration\)/,
      );
      // The guest goes on writing on b.
      ok(tb!, "b", ["resume", "st1"]);
      ok(tb!, "b", ["destroy", "st1"]);
    });

    it("--copy-storage-inc: only the overlay travels; the destination's base is never written", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      const base = `${IMG}/s-base.qcow2`;
      inHost("a", ["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"]);
      execFileSync("sh", ["-c", `head -c 256M /dev/urandom > ${tb!.dir}/base.bin`]);
      inHost("a", ["qemu-io", "-f", "qcow2", "-c", `write -s ${tb!.dir}/base.bin 0 256M`, base]);
      fs.copyFileSync(`${tb!.a.imagesDir}/s-base.qcow2`, `${tb!.b.imagesDir}/s-base.qcow2`);
      const top = `${IMG}/s-top.qcow2`;
      inHost("a", ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top]);
      inHost("a", ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 300M 8M", "-c", "write -z 100M 4M", top]);
      const baseSha = await sha256File(`${tb!.b.imagesDir}/s-base.qcow2`);
      await startGuest(
        tb!,
        { name: "st2", rate: 10, span: 64, disks: [{ target: "vda", source: top }] },
        guest,
      );
      const tx0 = tb!.linkTxBytes();
      const r = nbdmig(tb!, "a", [
        "migrate",
        "--live",
        "--copy-storage-inc",
        "--suspend",
        "--verbose",
        "st2",
        tb!.b.uri,
      ]);
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stderr, /storage path: in the migration stream \(QEMU block migration, incremental\)/);
      const sent = tb!.linkTxBytes() - tx0;
      assert.equal(
        inHost("b", ["qemu-img", "compare", "-U", `${tb!.a.imagesDir}/s-top.qcow2`, top]).trim(),
        "Images are identical.",
      );
      const check = inHost("b", [
        "qemu-io",
        "-U",
        "-r",
        "-f",
        "qcow2",
        "-c",
        "read -P 0 100M 4M",
        "-c",
        "read -P 0x5a 300M 8M",
        top,
      ]);
      assert.doesNotMatch(check, /Pattern verification failed/);
      assert.equal(await sha256File(`${tb!.b.imagesDir}/s-base.qcow2`), baseSha, "the base is never written");
      // The overlay (8 MiB + the guest's writes) and the RAM, not the 256 MiB base.
      assert.ok(sent < 200 * MiB, `sent ${(sent / MiB).toFixed(0)} MiB`);
      t.diagnostic(`incremental in the stream: ${(sent / MiB).toFixed(0)} MiB over the link, base 256 MiB`);
      ok(tb!, "b", ["destroy", "st2"]);
    });

    it("refuses in Begin, before anything is created, when a writable disk would be sent that must not be", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      makeImage(tb!, "a", { name: "s-r1.qcow2", size: "256M", fillMiB: 8 });
      for (const h of ["a", "b"] as const)
        makeImage(tb!, h, { name: "s-rw-shared.raw", format: "raw", size: "16M", fillMiB: 1 });
      const pid = await startUnwaited(
        tb!,
        {
          name: "st3",
          rate: 5,
          span: 64,
          writeDisk: "/dev/vda",
          disks: [
            { target: "vda", source: `${IMG}/s-r1.qcow2` },
            { target: "sda", source: `${IMG}/s-rw-shared.raw`, format: "raw", shareable: true },
          ],
        },
        guest,
      );
      const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "st3", tb!.b.uri]);
      assert.equal(r.status, 1);
      assert.match(
        r.stderr,
        /error: begin: the disks cannot be copied: the destination cannot serve NBD \(its agent runs with --no-nbd\), and storage cannot travel in the migration stream because disk sda is writable but must not be copied \(shareable\), and QEMU's in-stream migration sends every writable disk; make it <readonly\/> or detach it for the migration/,
      );
      await assertSourceIntact(tb!, "st3", pid, false);
      await assertDestClean(tb!, "st3", ["s-r1.qcow2"]);
      ok(tb!, "a", ["destroy", "st3"]);
    });

    it("refuses in Begin when the domain runs with the blockdev disk layout", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      await tb!.a.killAgent("SIGTERM");
      await tb!.a.startAgent(["--disk-layout", "blockdev"]);
      try {
        makeImage(tb!, "a", { name: "s-r2.qcow2", size: "256M", fillMiB: 8 });
        const pid = await startUnwaited(
          tb!,
          { name: "st4", rate: 5, span: 64, disks: [{ target: "vda", source: `${IMG}/s-r2.qcow2` }] },
          guest,
        );
        const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-inc", "st4", tb!.b.uri]);
        assert.equal(r.status, 1);
        assert.match(
          r.stderr,
          /because domain 'st4' runs with the blockdev disk layout, whose nameless disks the stream cannot address; restart it under an agent with --disk-layout drive \(or auto\)/,
        );
        await assertSourceIntact(tb!, "st4", pid, false);
        await assertDestClean(tb!, "st4", ["s-r2.qcow2"]);
        ok(tb!, "a", ["destroy", "st4"]);
      } finally {
        await tb!.a.killAgent("SIGTERM");
        await tb!.a.startAgent();
      }
    });

    it("rolls back when the destination QEMU dies during the in-stream copy", async (t) => {
      if (!need(t, MIGRATION_TOOLS, true)) return;
      makeImage(tb!, "a", { name: "s-rb.qcow2", size: "1G", fillMiB: 256 });
      const pid = await startGuest(
        tb!,
        { name: "st5", rate: 10, span: 512, disks: [{ target: "vda", source: `${IMG}/s-rb.qcow2` }] },
        guest,
      );
      tb!.setRate("200mbit");
      try {
        const run = migrateInBackground(tb!, ["--live", "--copy-storage-all", "st5", tb!.b.uri]);
        await waitFor(
          "the in-stream copy to be under way",
          async () => ((await jobOf<StreamJob>(tb!, "st5"))?.streamDisk?.transferred ?? 0) > 16 * MiB,
          60_000,
          100,
        );
        for (const p of tb!.b.qemuPids()) process.kill(p, "SIGKILL");
        const res = await run.done;
        assert.equal(res.status, 1, res.stderr);
        assert.match(
          res.stderr,
          /error: perform: (migration failed|destination gave up: the destination QEMU exited)/,
        );
        await assertSourceIntact(tb!, "st5", pid);
        await assertDestClean(tb!, "st5", ["s-rb.qcow2"]);
        // The source is left as it was: a later migration works (and is not a block migration leftover).
        const caps = JSON.parse(
          ok(tb!, "a", ["qemu-monitor-command", "st5", '{"execute":"query-migrate-capabilities"}']),
        ) as { return: { capability: string; state: boolean }[] };
        assert.equal(
          caps.return.find((c) => c.capability === "block")?.state,
          false,
          "block capability off again",
        );
      } finally {
        tb!.setRate(undefined);
      }
      ok(tb!, "a", ["migrate", "--live", "--copy-storage-all", "--suspend", "st5", tb!.b.uri]);
      assert.equal(
        compare(`${tb!.a.imagesDir}/s-rb.qcow2`, `${tb!.b.imagesDir}/s-rb.qcow2`),
        "Images are identical.",
      );
      ok(tb!, "b", ["destroy", "st5"]);
    });
  },
);
