/**
 * UEFI guests and TPMs across a live migration: the NVRAM moves like a disk (an EFI variable set by the
 * guest is there after a cold boot on the destination), the destination runs the source's firmware file
 * and says when its build differs, and a TPM's state (a PCR the guest extended) moves with the guest.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { after, afterEach, before, describe, it } from "node:test";
import { guestAddress, Testbed } from "../src/testbed/testbed.js";
import { sha256File } from "../src/util/hash.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  defineGuest,
  destroyAll,
  IMG,
  makeImage,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
  startPaused,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = [...MIGRATION_TOOLS, "curl", "bridge", "swtpm", "swtpm_setup"];
const OVMF = "/usr/share/OVMF";

describe("UEFI and TPM guests across a migration", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up();
  });
  after(async () => tb?.down());
  afterEach(async () => tb && destroyAll(tb, ["a", "b"]));

  const get = async (url: string) => {
    const r = await tb!.clientGet(url, 20_000);
    assert.equal(r.status, 200, `${url}: ${r.error ?? r.body}`);
    return r.body.trim();
  };

  it("carries an EFI variable the guest wrote: it is there when the guest boots again on the destination", async (t) => {
    if (!need(t, TOOLS, true)) return;
    if (!fs.existsSync(`${OVMF}/OVMF_CODE_4M.fd`))
      assert.fail("ovmf is not installed (bash .ci/run installs it)");
    makeImage(tb!, "a", { name: "efi.qcow2", size: "256M", fillMiB: 16 });
    const addr = guestAddress(20);
    await startGuest(
      tb!,
      {
        name: "efi",
        uefi: {},
        efivar: "boot1",
        ip: `${addr}/24`,
        disks: [{ target: "vda", source: `${IMG}/efi.qcow2` }],
        nics: [{ type: "bridge", source: "br0" }],
      },
      guest,
    );
    assert.match(tb!.a.consoleLog("efi"), /nbdmig-guest: efivar=none/, "a fresh NVRAM from the template");
    // A value only the NVRAM can hold: not on the kernel command line, set by the guest through efivarfs.
    assert.equal(await get(`http://${addr}/cgi-bin/efivar?moved-${process.pid}`), `moved-${process.pid}`);
    const nvram = "/var/lib/nbdmig/nvram/efi_VARS.fd";

    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--persistent",
      "efi",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "efi", "--completed", "--json"])) as {
      disks: { target: string }[];
      notes: string[];
    };
    assert.deepEqual(
      job.disks.map((d) => d.target),
      ["vda", "nvram"],
      "the NVRAM is copied like a disk",
    );
    assert.ok(
      !job.notes.some((n) => /firmware/.test(n)),
      `same firmware, nothing to say: ${job.notes.join("; ")}`,
    );
    // Paused at the destination: its NVRAM file already equals the source's.
    assert.equal(await sha256File(tb!.b.hostPath(nvram)), await sha256File(tb!.a.hostPath(nvram)));
    const xmlB = ok(tb!, "b", ["dumpxml", "efi"]);
    assert.match(xmlB, new RegExp(`<loader readonly='yes' type='pflash'>${OVMF}/OVMF_CODE_4M.fd</loader>`));
    assert.match(
      xmlB,
      /<nvram template='\/usr\/share\/OVMF\/OVMF_VARS_4M.fd'>\/var\/lib\/nbdmig\/nvram\/efi_VARS.fd<\/nvram>/,
    );

    ok(tb!, "b", ["resume", "efi"]);
    assert.equal(await get(`http://${addr}/cgi-bin/efivar`), `moved-${process.pid}`);
    // A cold boot on the destination reads the variable from the destination's own NVRAM file.
    ok(tb!, "b", ["destroy", "efi"]);
    fs.rmSync(tb!.b.hostPath("/var/lib/nbdmig/log/efi.serial.log"), { force: true });
    ok(tb!, "b", ["start", "efi"]);
    const line = await waitFor(
      "the guest to boot again on the destination",
      () => /nbdmig-guest: efivar=(\S+)/.exec(tb!.b.consoleLog("efi"))?.[1],
      120_000,
    );
    assert.equal(line, `moved-${process.pid}`);
    ok(tb!, "b", ["destroy", "efi"]);
  });

  it("keeps the source's firmware file: a different build of the same size is said, another size refused", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const fw = "/var/lib/nbdmig/fw/OVMF_CODE_4M.fd";
    const place = (host: "a" | "b", file: string) => {
      fs.mkdirSync(path.dirname(tb![host].hostPath(fw)), { recursive: true });
      fs.copyFileSync(`${OVMF}/${file}`, tb![host].hostPath(fw));
    };
    place("a", "OVMF_CODE_4M.fd");
    makeImage(tb!, "a", { name: "fw.qcow2", size: "64M" });
    await startPaused(
      tb!,
      { name: "fw", uefi: { loader: fw }, disks: [{ target: "vda", source: `${IMG}/fw.qcow2` }] },
      guest,
    );

    place("b", "OVMF_CODE.fd"); // the 2 MiB build: its flash cannot take the source's contents
    const refused = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "fw", tb!.b.uri]);
    assert.equal(refused.status, 1);
    assert.match(
      refused.stderr,
      /prepare on 198\.18\.0\.2: firmware \/var\/lib\/nbdmig\/fw\/OVMF_CODE_4M\.fd is 1966080 bytes here but 3653632 on the source; install the same firmware/,
    );
    await assertDestClean(tb!, "fw", ["fw.qcow2"]);
    assert.ok(!fs.existsSync(tb!.b.hostPath("/var/lib/nbdmig/nvram/fw_VARS.fd")));

    place("b", "OVMF_CODE_4M.secboot.fd"); // same size, other build
    ok(tb!, "a", ["migrate", "--live", "--copy-storage-all", "fw", tb!.b.uri]);
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "fw", "--completed", "--json"])) as {
      notes: string[];
    };
    assert.ok(
      job.notes.some((n) =>
        /firmware \/var\/lib\/nbdmig\/fw\/OVMF_CODE_4M\.fd differs here from the source's .*'fw' runs the source's copy until it reboots, then this host's/.test(
          n,
        ),
      ),
      job.notes.join("; "),
    );
    assert.match(ok(tb!, "b", ["dominfo", "fw"]), /State:\s+paused/, "a paused guest stays paused");
    ok(tb!, "b", ["destroy", "fw"]);
  });

  it("moves the TPM's state with the guest: a PCR extended on the source reads the same on the destination", async (t) => {
    if (!need(t, TOOLS, true)) return;
    makeImage(tb!, "a", { name: "tpm.qcow2", size: "64M" });
    const addr = guestAddress(30);
    await startGuest(
      tb!,
      {
        name: "tpm",
        tpm: "tpm-crb",
        // SPICE: its clients are pointed at the destination's display before the switchover.
        graphics: "spice",
        ip: `${addr}/24`,
        disks: [{ target: "vda", source: `${IMG}/tpm.qcow2` }],
        nics: [{ type: "bridge", source: "br0" }],
      },
      guest,
    );
    assert.match(tb!.a.consoleLog("tpm"), /nbdmig-guest: tpm=present/);
    await get(`http://${addr}/cgi-bin/extend`);
    const pcr = await get(`http://${addr}/cgi-bin/extend`);
    assert.match(pcr, /^[0-9a-f]{64}$/);
    const uuid = /<uuid>([^<]+)<\/uuid>/.exec(ok(tb!, "a", ["dumpxml", "tpm"]))![1]!;
    const tpmDir = `/var/lib/nbdmig/swtpm/${uuid}`;
    assert.ok(
      fs.readdirSync(tb!.a.hostPath(tpmDir)).some((f) => f.endsWith(".permall")),
      "swtpm_setup manufactured it",
    );

    ok(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--persistent",
      "--undefinesource",
      "tpm",
      tb!.b.uri,
    ]);
    assert.equal(await get(`http://${addr}/cgi-bin/pcr16`), pcr, "PCR 16 as the source left it");
    assert.match(ok(tb!, "b", ["domdisplay", "tpm"]), /^spice:\/\/127\.0\.0\.1:59\d\d\n$/);
    assert.ok(
      fs.readdirSync(tb!.b.hostPath(tpmDir)).some((f) => f.endsWith(".permall")),
      "the destination's swtpm keeps it",
    );
    assert.ok(!fs.existsSync(tb!.a.hostPath(tpmDir)), "the source's TPM state went with its definition");
    const swtpmOnA = tb!.a.pids().filter((p) => {
      try {
        return fs.readFileSync(`/proc/${p}/cmdline`, "utf8").startsWith("swtpm");
      } catch {
        return false;
      }
    });
    assert.deepEqual(swtpmOnA, [], "no swtpm left on the source");
    // The TPM keeps working on the destination.
    assert.notEqual(await get(`http://${addr}/cgi-bin/extend`), pcr);
    ok(tb!, "b", ["destroy", "tpm"]);
  });
  it("offline: a shut-off domain's TPM state moves as it is (and one that never ran gets its TPM made there)", async (t) => {
    if (!need(t, TOOLS, true)) return;
    makeImage(tb!, "a", { name: "otpm.qcow2", size: "64M" });
    await startGuest(
      tb!,
      { name: "otpm", tpm: "tpm-crb", disks: [{ target: "vda", source: `${IMG}/otpm.qcow2` }] },
      guest,
    );
    assert.match(tb!.a.consoleLog("otpm"), /nbdmig-guest: tpm=present/);
    ok(tb!, "a", ["destroy", "otpm"]);
    const uuid = /<uuid>([^<]+)<\/uuid>/.exec(ok(tb!, "a", ["dumpxml", "otpm"]))![1]!;
    const tpmDir = `/var/lib/nbdmig/swtpm/${uuid}`;
    const files = (host: "a" | "b") => {
      const dir = tb![host].hostPath(tpmDir);
      return Object.fromEntries(
        fs
          .readdirSync(dir)
          .filter((f) => f !== ".lock")
          .map((f) => [
            f,
            createHash("sha256")
              .update(fs.readFileSync(path.join(dir, f)))
              .digest("hex"),
          ]),
      );
    };
    const before = files("a");
    assert.ok(
      Object.keys(before).some((f) => f.endsWith(".permall")),
      "swtpm_setup manufactured it",
    );

    const r = nbdmig(tb!, "a", [
      "migrate",
      "--offline",
      "--copy-storage-all",
      "--undefinesource",
      "--verbose",
      "otpm",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stderr, /TPM state: .*tpm2-00\.permall.* copied/);
    assert.deepEqual(files("b"), before, "the same state files, byte for byte");
    for (const f of Object.keys(before))
      assert.equal(fs.statSync(path.join(tb!.b.hostPath(tpmDir), f)).mode & 0o777, 0o600, f);
    assert.ok(!fs.existsSync(tb!.a.hostPath(tpmDir)), "the source's copy went with its definition");
    ok(tb!, "b", ["start", "otpm"]);
    await waitFor("the guest to boot on the destination", () =>
      /nbdmig-guest: ready/.test(tb!.b.consoleLog("otpm")),
    );
    assert.match(tb!.b.consoleLog("otpm"), /nbdmig-guest: tpm=present/);
    ok(tb!, "b", ["destroy", "otpm"]);

    // A TPM that never ran has no state: nothing moves, and the destination makes one at the first start.
    makeImage(tb!, "a", { name: "ntpm.qcow2", size: "64M" });
    defineGuest(
      tb!,
      { name: "ntpm", tpm: "tpm-crb", disks: [{ target: "vda", source: `${IMG}/ntpm.qcow2` }] },
      guest,
    );
    const fresh = nbdmig(tb!, "a", [
      "migrate",
      "--offline",
      "--copy-storage-all",
      "--verbose",
      "ntpm",
      tb!.b.uri,
    ]);
    assert.equal(fresh.status, 0, fresh.stderr);
    assert.match(fresh.stderr, /TPM state: none yet/);
    ok(tb!, "b", ["start", "ntpm"]);
    await waitFor("the new TPM", () => /nbdmig-guest: tpm=present/.test(tb!.b.consoleLog("ntpm")));
    ok(tb!, "b", ["destroy", "ntpm"]);
  });
});
