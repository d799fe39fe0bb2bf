/**
 * TLS on the migration channels: certificates from `nbdmig tls-ca` and `tls-host`, refusals before anything
 * is created (no certificates, another CA, a certificate that does not name the destination), and a capture
 * of the migration link: a marker on the guest's disk crosses it in clear with --no-tls, and not with TLS
 * (the default once the host has certificates), after which the disks are compared.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import { after, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { available, cli, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  compare,
  destroyAll,
  IMG,
  makeImage,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
} from "./helpers/migration.js";

const TOOLS = [...MIGRATION_TOOLS, "openssl", "tcpdump"];
const MiB = 1024 * 1024;

describe("TLS on the migration channels", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };
  const markers: Record<string, Buffer> = {};

  /** Runs the CLI in the root namespace (paths under the test bed's directories). */
  const root = (args: string[]) => {
    const r = cli(args);
    assert.equal(r.status, 0, `nbdmig ${args.join(" ")}: ${r.stderr}`);
    return r.stdout;
  };
  const issue = (host: "a" | "b", ca: string, names: string[]) => {
    fs.rmSync(`${tb![host].dir}/pki`, { recursive: true, force: true });
    root(["tls-host", "--ca", ca, "--out", `${tb![host].dir}/pki`, ...names]);
  };

  /** A writing guest on a, with a marker of its own on its disk, beyond what its writer overwrites. */
  async function guestWithMarker(name: string): Promise<void> {
    const file = makeImage(tb!, "a", { name: `${name}.qcow2`, size: "256M", fillMiB: 16 });
    const marker = Buffer.from(`NBDMIG-MARKER-${name}-${randomBytes(8).toString("hex")}`);
    const chunk = `${tb!.dir}/${name}.marker`;
    fs.writeFileSync(
      chunk,
      Buffer.concat(Array(Math.ceil(MiB / marker.length)).fill(marker)).subarray(0, MiB),
    );
    execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -s ${chunk} 200M 1M`, file], { stdio: "ignore" });
    markers[name] = marker;
    await startGuest(
      tb!,
      { name, rate: 1, span: 32, disks: [{ target: "vda", source: `${IMG}/${name}.qcow2` }] },
      guest,
    );
  }

  /** Migrates `name` a -> b with `flags` while capturing the link; whether its marker crossed in clear. */
  async function migrateCaptured(name: string, flags: string[]): Promise<boolean> {
    const pcap = `${tb!.dir}/${name}.pcap`;
    const stop = await tb!.captureLink(pcap);
    try {
      ok(tb!, "a", ["migrate", "--live", "--copy-storage-all", ...flags, name, tb!.b.uri]);
    } finally {
      await stop();
    }
    return fs.readFileSync(pcap).includes(markers[name]!);
  }

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up({});
    await guestWithMarker("clear");
    await guestWithMarker("sealed");
  });
  after(async () => {
    if (tb) await destroyAll(tb, ["a", "b"]).catch(() => undefined);
    await tb?.down();
  });

  it("refuses before anything is created: no certificates, another CA, a name that does not match, expired", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const migrate = () =>
      nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "--tls", "sealed", tb!.b.uri]);
    let r = migrate();
    assert.equal(r.status, 2, r.stderr);
    assert.match(
      r.stderr,
      /--tls needs this host's certificates in \/var\/lib\/nbdmig\/pki .* 'nbdmig tls-host'/,
    );
    const ca = `${tb!.dir}/ca`;
    root(["tls-ca", ca]);
    issue("a", ca, ["198.18.0.1"]);
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /begin: the destination 198\.18\.0\.2 has no TLS certificates/);
    const other = `${tb!.dir}/other-ca`;
    root(["tls-ca", other, "--name", "someone else"]);
    issue("b", other, ["198.18.0.2"]);
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(r.stderr, /trusts another CA .* both hosts need the same ca-cert\.pem/);
    issue("b", ca, ["10.9.9.9", "b.example"]);
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /prepare on 198\.18\.0\.2: TLS: \/var\/lib\/nbdmig\/pki\/server-cert\.pem does not name 198\.18\.0\.2 \(it names IP Address:10\.9\.9\.9, DNS:b\.example\)/,
    );
    // An expired server certificate (OpenSSL 3.0 issues one with -days -1: it ends before it begins).
    issue("b", ca, ["198.18.0.2"]);
    const pki = `${tb!.b.dir}/pki`;
    execFileSync("openssl", [
      "req",
      "-new",
      "-key",
      `${pki}/server-key.pem`,
      "-subj",
      "/CN=198.18.0.2",
      "-out",
      `${pki}/old.csr`,
    ]);
    fs.writeFileSync(`${pki}/old.ext`, "extendedKeyUsage=serverAuth\nsubjectAltName=IP:198.18.0.2\n");
    execFileSync(
      "openssl",
      [
        "x509",
        "-req",
        "-in",
        `${pki}/old.csr`,
        "-CA",
        `${ca}/ca-cert.pem`,
        "-CAkey",
        `${ca}/ca-key.pem`,
        "-CAcreateserial",
        "-days",
        "-1",
        "-extfile",
        `${pki}/old.ext`,
        "-out",
        `${pki}/server-cert.pem`,
      ],
      { stdio: "ignore" },
    );
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /prepare on 198\.18\.0\.2: TLS: \/var\/lib\/nbdmig\/pki\/server-cert\.pem expired on /,
    );
    await assertDestClean(tb!, "sealed", ["sealed.qcow2"]);
    issue("b", ca, ["198.18.0.2"]);
  });

  it("--no-tls: the disk's marker crosses the link in clear", async (t) => {
    if (!need(t, TOOLS, true)) return;
    assert.equal(await migrateCaptured("clear", ["--no-tls"]), true, "the capture holds the marker");
    ok(tb!, "b", ["destroy", "clear"]);
  });

  it("TLS by default once both hosts have certificates: nothing of the disk in clear, disks equal", async (t) => {
    if (!need(t, TOOLS, true)) return;
    assert.equal(await migrateCaptured("sealed", ["--suspend"]), false, "the marker never crossed in clear");
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "sealed", "--completed", "--json"])) as {
      tls: boolean;
      notes: string[];
    };
    assert.equal(job.tls, true);
    assert.ok(job.notes.some((n) => /^TLS: the disk copy and the migration stream are encrypted/.test(n)));
    assert.equal(
      compare(`${tb!.a.imagesDir}/sealed.qcow2`, `${tb!.b.imagesDir}/sealed.qcow2`),
      "Images are identical.",
    );
    ok(tb!, "b", ["destroy", "sealed"]);
  });
});
