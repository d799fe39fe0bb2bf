/**
 * TLS on every channel: certificates from `nbdmig tls-ca` and `tls-host`, refusals before anything is
 * created (no certificates, another CA, a certificate that does not name the destination, an expired one),
 * and a capture of the migration link: a marker on the guest's disk and one in its RAM (its kernel command
 * line) cross it in clear with --no-tls, and not with TLS (the default once the host has certificates),
 * after which the disks are compared. The agents' API on that link is HTTPS in both: nothing of it in clear.
 * The offline copy too: a shut-off domain's qcow2 and raw disks (qemu-nbd's TLS and nbdmig's own server's).
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
  defineGuest,
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

describe("TLS on every channel", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };
  const markers: Record<string, { disk: Buffer; ram: Buffer }> = {};

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
    const ram = Buffer.from(`NBDMIG-RAM-${name}-${randomBytes(8).toString("hex")}`);
    markers[name] = { disk: marker, ram };
    await startGuest(
      tb!,
      {
        name,
        rate: 1,
        span: 32,
        disks: [{ target: "vda", source: `${IMG}/${name}.qcow2` }],
        cmdline: [`nbdmig.marker=${ram.toString()}`],
      },
      guest,
    );
  }

  /** Runs `fn` while capturing the link into `pcap`; a capture that lost packets fails the test. */
  async function captured(pcap: string, fn: () => void): Promise<void> {
    const stop = await tb!.captureLink(pcap);
    try {
      fn();
    } catch (err) {
      await stop().catch(() => undefined); // the migration's failure is what the test reports
      throw err;
    }
    const counts = await stop();
    assert.equal(counts.dropped, 0, `the capture lost packets, so it proves nothing: ${counts.log}`);
  }

  /** Migrates `name` a -> b with `flags` while capturing the link; what of it crossed in clear. */
  async function migrateCaptured(name: string, flags: string[]) {
    const pcap = `${tb!.dir}/${name}.pcap`;
    await captured(pcap, () =>
      ok(tb!, "a", ["migrate", "--live", "--copy-storage-all", ...flags, name, tb!.b.uri]),
    );
    const capture = fs.readFileSync(pcap);
    return {
      disk: capture.includes(markers[name]!.disk),
      ram: capture.includes(markers[name]!.ram),
      // What the agents send each other: request lines of the peer routes, the token. (Long enough not to
      // turn up by chance in the megabytes of random disk data that cross in clear: "/v1/" alone did, once.)
      api: [
        "GET /v1/host",
        "POST /v1/migrations/",
        "GET /v1/migrations/",
        "Bearer ",
        fs.readFileSync(tb!.tokenFile, "utf8").trim(),
      ]
        .filter((s) => capture.includes(s))
        .map((s) => {
          const at = capture.indexOf(s);
          return `${s} at ${at}: ${JSON.stringify(capture.subarray(Math.max(0, at - 40), at + 80).toString("latin1"))}`;
        }),
    };
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
    // The hosts' API is HTTPS once a host has certificates: a has, b not yet.
    assert.match(
      r.stderr,
      /begin on 198\.18\.0\.2: the agent at nbdmig:\/\/198\.18\.0\.2:7800 did not take a TLS connection .* give that host certificates of the same CA with 'nbdmig tls-host'/,
    );
    const other = `${tb!.dir}/other-ca`;
    root(["tls-ca", other, "--name", "someone else"]);
    issue("b", other, ["198.18.0.2"]);
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /did not sign .* that host trusts another CA; both hosts need the same ca-cert\.pem/,
    );
    issue("b", ca, ["10.9.9.9", "b.example"]);
    r = migrate();
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /begin on 198\.18\.0\.2: the agent at nbdmig:\/\/198\.18\.0\.2:7800 presents a certificate that does not name the address used \(.*10\.9\.9\.9.*\)/,
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
    assert.match(r.stderr, /presents a certificate that is not valid now \(CERT_HAS_EXPIRED\)/);
    issue("b", ca, ["198.18.0.2"]);
    await assertDestClean(tb!, "sealed", ["sealed.qcow2"]);
  });

  it("--no-tls: the disk's and the RAM's markers cross the link in clear, the API does not", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const seen = await migrateCaptured("clear", ["--no-tls"]);
    assert.equal(seen.disk, true, "the capture holds the disk's marker");
    assert.equal(seen.ram, true, "the capture holds the RAM's marker");
    assert.deepEqual(seen.api, [], "the agents' API is HTTPS");
    ok(tb!, "b", ["destroy", "clear"]);
  });

  it("TLS by default once both hosts have certificates: nothing of the disk in clear, disks equal", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const seen = await migrateCaptured("sealed", ["--suspend"]);
    assert.deepEqual(seen, { disk: false, ram: false, api: [] }, "nothing crossed in clear");
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

  it("offline, with TLS: a shut-off domain's qcow2 and raw disks cross encrypted and arrive identical", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const marker = Buffer.from(`NBDMIG-MARKER-cold-${randomBytes(8).toString("hex")}`);
    const chunk = `${tb!.dir}/cold.marker`;
    fs.writeFileSync(
      chunk,
      Buffer.concat(Array(Math.ceil(MiB / marker.length)).fill(marker)).subarray(0, MiB),
    );
    const images = ["cold.qcow2", "cold.raw"];
    for (const img of images) {
      const format = img.endsWith(".raw") ? "raw" : "qcow2";
      const file = makeImage(tb!, "a", { name: img, format, size: "64M" });
      execFileSync("qemu-io", ["-f", format, "-c", `write -s ${chunk} 8M 1M`, file], { stdio: "ignore" });
    }
    defineGuest(
      tb!,
      {
        name: "cold",
        disks: [
          { target: "vda", source: `${IMG}/cold.qcow2` },
          { target: "vdb", source: `${IMG}/cold.raw`, format: "raw" },
        ],
      },
      guest,
    );
    const pcap = `${tb!.dir}/cold.pcap`;
    await captured(pcap, () =>
      ok(tb!, "a", ["migrate", "--offline", "--copy-storage-all", "cold", tb!.b.uri]),
    );
    assert.ok(!fs.readFileSync(pcap).includes(marker), "nothing of the disks in clear");
    const job = JSON.parse(ok(tb!, "a", ["domjobinfo", "cold", "--completed", "--json"])) as { tls: boolean };
    assert.equal(job.tls, true);
    for (const img of images)
      assert.equal(
        compare(`${tb!.a.imagesDir}/${img}`, `${tb!.b.imagesDir}/${img}`),
        "Images are identical.",
      );
  });
});
