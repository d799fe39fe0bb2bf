/** How the disks travel: the choice between NBD and the migration stream, and what the link really carries. */
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import type { StorageCapabilities } from "../src/agent/api.js";
import type { RunningDomain } from "../src/agent/domains.js";
import { parseDomainXml } from "../src/domain/xml.js";
import { MigrationError } from "../src/errors.js";
import { probeQemuFeatures, type QemuFeatures } from "../src/qemu/features.js";
import type { CookieDisk } from "../src/migration/cookie.js";
import { chooseStoragePath } from "../src/migration/source.js";
import { parseBytesAcked } from "../src/migration/wire.js";
import { need, repoRoot } from "./helpers/env.js";

const realistic = fs.readFileSync(path.join(repoRoot, "test/fixtures/virsh-dumpxml.xml"), "utf8");

describe("storage path", () => {
  const { def } = parseDomainXml(realistic);
  // The fixture: vda, vdb local; sda shareable and writable; sdb a read-only cdrom.
  const run = (layout: "drive" | "blockdev") => ({ def, layout }) as unknown as RunningDomain;
  const copied = (...t: string[]) => t.map((target) => ({ target }) as CookieDisk);
  const dest = (nbd: boolean, stream = true): StorageCapabilities => ({
    qemu: "7.2.22",
    nbd,
    nbdWhyNot: nbd ? undefined : "its agent runs with --no-nbd",
    stream,
    diskLayout: "drive",
  });
  const src: QemuFeatures = {
    version: "7.2.22",
    nbdServer: true,
    blockMigration: true,
    machines: [],
    devices: [],
    spice: true,
  };
  const refusal = (fn: () => unknown, re: RegExp) =>
    assert.throws(fn, (e: unknown) => {
      assert.ok(e instanceof MigrationError);
      assert.equal(e.code, "E_NO_STORAGE_PATH");
      assert.equal(e.phase, "begin");
      assert.match(e.message, re);
      return true;
    });

  it("takes NBD whenever the destination can serve it", () => {
    assert.equal(chooseStoragePath(run("blockdev"), copied("vda"), dest(true, false), src), "nbd");
  });

  it("falls back to the stream when every writable disk is copied and both QEMUs can", () => {
    const noShared = { ...def, disks: def.disks.filter((d) => d.target !== "sda") };
    const r = { def: noShared, layout: "drive" } as unknown as RunningDomain;
    assert.equal(chooseStoragePath(r, copied("vda", "vdb"), dest(false), src), "stream");
  });

  it("names everything that keeps the stream from working", () => {
    refusal(
      () =>
        chooseStoragePath(run("blockdev"), copied("vda"), dest(false, false), {
          ...src,
          version: "9.2.0",
          blockMigration: false,
        }),
      new RegExp(
        [
          "begin: the disks cannot be copied: the destination cannot serve NBD \\(its agent runs with --no-nbd\\)",
          "and storage cannot travel in the migration stream because the source QEMU 9\\.2\\.0 has no in-stream block migration \\(QEMU removed it in 9\\.1\\)",
          "the destination QEMU 7\\.2\\.22 has no in-stream block migration",
          "domain 'web01' runs with the blockdev disk layout",
          "disk vdb is writable but must not be copied \\(left out by --migrate-disks\\)",
          "disk sda is writable but must not be copied \\(shareable\\)",
        ].join(".*"),
      ),
    );
  });
});

describe("bytes on the NBD connection", () => {
  const out = [
    '0      0      198.18.0.1:40000 198.18.0.2:49184 users:(("qemu-system-x86",pid=4242,fd=31))',
    "\t cubic wscale:7,7 rto:204 bytes_sent:1000 bytes_acked:900 bytes_received:10 segs_out:9",
    '0      0      198.18.0.1:40002 198.18.0.2:49184 users:(("qemu-system-x86",pid=4242,fd=32))',
    "\t cubic bytes_acked:100 segs_out:2",
    '0      0      198.18.0.1:40004 198.18.0.2:49184 users:(("nbdcopy",pid=42421,fd=3))',
    "\t cubic bytes_acked:5000",
  ].join("\n");

  it("sums bytes_acked over one process's connections only", () => {
    assert.equal(parseBytesAcked(out, 4242), 1000);
    assert.equal(parseBytesAcked(out, 42421), 5000);
    assert.equal(parseBytesAcked(out, 7), undefined);
    assert.equal(parseBytesAcked("", 4242), undefined);
  });
});

describe("QEMU features", () => {
  it("asks this host's QEMU what it can do for storage migration", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const f = await probeQemuFeatures();
    assert.equal(f.error, undefined);
    assert.match(f.version, /^\d+\.\d+\.\d+$/);
    assert.equal(f.nbdServer, true);
    // Debian 12's QEMU 7.2 still has block migration; QEMU 9.1 removed it.
    const [major, minor] = f.version.split(".").map(Number) as [number, number];
    assert.equal(f.blockMigration, major < 9 || (major === 9 && minor < 1));
  });
});
