/**
 * Guests on bridged networks across a live migration: the client keeps reaching the guest, the destination
 * takes over its MAC on its own tap, the source keeps none; refusals before anything is made when the
 * destination lacks a bridge or network; taps removed on rollback and after an agent crash.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, afterEach, before, describe, it } from "node:test";
import { guestAddress, longestGap, Testbed, type TestHost } from "../src/testbed/testbed.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  destroyAll,
  guestWritten,
  IMG,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  ok,
  startGuest,
  startPaused,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = [...MIGRATION_TOOLS, "curl", "bridge"];

/** The guests' taps on a host: br0's ports other than the test bed's own links. */
function guestLinks(h: TestHost): string[] {
  return h
    .bridgePorts()
    .filter((p) => p !== h.bridgeLink && p !== h.tb.clientLink)
    .sort();
}

/** The Interface column of `domiflist` (the tap's name). */
function tapOf(tb: Testbed, host: "a" | "b", name: string): string {
  const row = ok(tb, host, ["domiflist", name]).split("\n")[2]!;
  return row.trim().split(/\s+/)[0]!;
}

describe("guests on bridged networks across a migration", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    // `lan` is a libvirt network name; each host maps it to its br0.
    const args = ["--network", "lan=br0"];
    tb = await Testbed.up({ agentArgs: { a: args, b: args } });
  });
  after(async () => tb?.down());
  // A test that fails half-way leaves nothing running for the next one.
  afterEach(async () => tb && destroyAll(tb, ["a", "b"]));

  it("keeps answering a client while it moves; the destination's bridge learns its MAC on its own tap", async (t) => {
    if (!need(t, TOOLS, true)) return;
    makeImage(tb!, "a", { name: "web.qcow2", size: "512M", fillMiB: 64 });
    const mac = "52:54:00:4e:00:10";
    const addr = guestAddress(10);
    await startGuest(
      tb!,
      {
        name: "web",
        ip: `${addr}/24`,
        rate: 10,
        span: 256,
        graphics: "vnc",
        disks: [{ target: "vda", source: `${IMG}/web.qcow2` }],
        nics: [{ type: "bridge", source: "br0", mac }],
      },
      guest,
    );
    const srcTap = tapOf(tb!, "a", "web");
    assert.match(srcTap, /^vnet\d+$/);
    assert.ok(tb!.a.bridgePorts().includes(srcTap), "the source's tap is a port of a's br0");
    assert.match(
      ok(tb!, "a", ["domiflist", "web"]),
      new RegExp(`${srcTap}\\s+bridge\\s+br0\\s+virtio\\s+${mac}`),
    );
    await waitFor(
      "the guest to answer the client",
      async () => (await tb!.clientGet(`http://${addr}/`)).status === 200,
      30_000,
    );
    const up0 = Number((await tb!.clientGet(`http://${addr}/cgi-bin/uptime`)).body);

    const poll = tb!.startPoller(`http://${addr}/`, 50);
    const started = Date.now();
    const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "--verbose", "web", tb!.b.uri]);
    const ended = Date.now();
    assert.equal(r.status, 0, `migrate failed: ${r.stderr}`);
    // However long the resumed guest takes under load: the poller runs until it has an answer from it.
    await waitFor(
      "the poller to get an answer from the destination",
      () => poll.samples().some((s) => s.ok && s.at > ended),
      30_000,
      50,
    );
    const samples = await poll.stop();

    const gap = longestGap(samples, started, Date.now());
    const answered = samples.filter((s) => s.ok && s.at > ended).length;
    t.diagnostic(
      `client polled every 50 ms: ${samples.length} requests, ${samples.filter((s) => !s.ok).length} unanswered, longest gap ${gap.ms} ms (at +${gap.at - started} ms into the migration, which took ${ended - started} ms)`,
    );
    assert.ok(answered > 0, "the guest answers after the migration");
    // Answered from the destination: no QEMU is left on the source, and it is the same guest, not a reboot.
    assert.deepEqual(tb!.a.qemuPids(), []);
    const up1 = Number((await tb!.clientGet(`http://${addr}/cgi-bin/uptime`)).body);
    assert.ok(up1 > up0, `uptime went on (${up0} -> ${up1})`);

    assert.deepEqual(guestLinks(tb!.a), [], "the source keeps no tap");
    assert.match(
      ok(tb!, "b", ["domdisplay", "web"]),
      /^vnc:\/\/127\.0\.0\.1:\d+\n$/,
      "a display port chosen on b",
    );
    const dstTap = tapOf(tb!, "b", "web");
    assert.ok(tb!.b.bridgePorts().includes(dstTap));
    const learnt = await waitFor(
      "b's bridge to learn the guest's MAC",
      () => tb!.b.bridgeFdb().find((e) => e.mac === mac && e.master === "br0"),
      10_000,
    );
    assert.equal(learnt.dev, dstTap, "b's br0 has the MAC on the destination's tap");
    const onA = tb!.a.bridgeFdb().find((e) => e.mac === mac && e.master === "br0");
    assert.equal(onA?.dev, tb!.a.bridgeLink, "a's br0 now sends the MAC over the link to b");

    // The guest wrote throughout and goes on writing on the destination (the data itself is checked by
    // migrate.test.ts, which compares the disks of a paused destination).
    const w = guestWritten(tb!, "b", "web");
    await waitFor("the guest to write on the destination", () => guestWritten(tb!, "b", "web") > w, 30_000);
    ok(tb!, "b", ["destroy", "web"]);
    assert.deepEqual(guestLinks(tb!.b), [], "destroy removes the destination's tap");
  });

  it("refuses before anything is made when the destination lacks a bridge or a network", async (t) => {
    if (!need(t, TOOLS, true)) return;
    execFileSync("ip", ["-n", tb!.a.netns, "link", "add", "br7", "type", "bridge"]);
    execFileSync("ip", ["-n", tb!.a.netns, "link", "set", "br7", "up"]);
    t.after(() => execFileSync("ip", ["-n", tb!.a.netns, "link", "del", "br7"]));
    makeImage(tb!, "a", { name: "lost.qcow2", size: "64M" });
    const pid = await startPaused(
      tb!,
      {
        name: "lost",
        disks: [{ target: "vda", source: `${IMG}/lost.qcow2` }],
        nics: [
          { type: "bridge", source: "br7" },
          { type: "network", source: "lan" },
        ],
      },
      guest,
    );
    const r = nbdmig(tb!, "a", ["migrate", "--live", "--copy-storage-all", "lost", tb!.b.uri]);
    assert.equal(r.status, 1, r.stderr);
    assert.match(
      r.stderr,
      /error: begin: the destination 198\.18\.0\.2 cannot run 'lost': interface 52:54:00:[0-9a-f:]+: bridge 'br7' does not exist there/,
    );
    await assertDestClean(tb!, "lost", ["lost.qcow2"]);
    assert.deepEqual(guestLinks(tb!.b), []);

    // Prepare checks again on its own (a peer that skipped Begin's check, or a bridge gone since). The disk
    // is on b as shared storage would be, so the interfaces are all that is missing.
    makeImage(tb!, "b", { name: "lost.qcow2", size: "64M" });
    const prep = await tb!.b
      .client()
      .call("POST", "/v1/migrations/prepare", {
        cookie: {
          xml: ok(tb!, "a", ["dumpxml", "lost"]),
          name: "lost",
          uuid: "00000000-0000-4000-8000-000000000001",
          accel: "tcg",
          disks: [],
          storagePath: "none",
        },
        listenHost: tb!.b.addr,
      })
      .then(
        () => "accepted",
        (e: Error) => e.message,
      );
    assert.match(
      prep,
      /prepare on 198\.18\.0\.2: interface 52:54:00:[0-9a-f:]+: bridge 'br7' does not exist on /,
    );
    await assertDestClean(tb!, "lost", []);
    assert.deepEqual(guestLinks(tb!.b), []);
    fs.rmSync(`${tb!.b.imagesDir}/lost.qcow2`);
    assert.equal((await tb!.a.client().call<{ pid: number }>("GET", "/v1/domains/lost")).pid, pid);
    ok(tb!, "a", ["destroy", "lost"]);
    assert.deepEqual(guestLinks(tb!.a), []);
  });

  it("removes the destination's taps and NVRAM when a migration rolls back", async (t) => {
    if (!need(t, TOOLS, true)) return;
    makeImage(tb!, "a", { name: "rb.qcow2", size: "512M", fillMiB: 96 });
    // Paused: the migration does not need a booted guest, and nothing of it depends on boot timing.
    const pid = await startPaused(
      tb!,
      {
        name: "rb",
        uefi: {},
        disks: [{ target: "vda", source: `${IMG}/rb.qcow2` }],
        nics: [{ type: "network", source: "lan" }],
      },
      guest,
    );
    const nvram = "/var/lib/nbdmig/nvram/rb_VARS.fd";
    assert.ok(fs.existsSync(tb!.a.hostPath(nvram)), "the first start made the NVRAM from its template");
    tb!.setRate("64mbit");
    t.after(() => tb!.setRate(undefined));
    const m = migrateInBackground(tb!, ["--live", "--copy-storage-all", "rb", tb!.b.uri]);
    await waitFor(
      "the destination to be prepared, with its tap and NVRAM",
      () =>
        guestLinks(tb!.b).length === 1 &&
        fs.existsSync(tb!.b.hostPath(nvram)) &&
        tb!.b.qemuPids().length === 1,
      60_000,
      50,
    );
    process.kill(tb!.b.qemuPids()[0]!, "SIGKILL");
    const res = await m.done;
    assert.equal(res.status, 1, res.stderr);
    assert.match(res.stderr, /error: (perform|prepare)/);
    await assertDestClean(tb!, "rb", ["rb.qcow2"]);
    assert.deepEqual(guestLinks(tb!.b), [], "no tap left on the destination");
    assert.ok(!fs.existsSync(tb!.b.hostPath(nvram)), "the destination's NVRAM is removed");
    assert.match(ok(tb!, "a", ["dominfo", "rb"]), /State:\s+paused/);
    assert.equal((await tb!.a.client().call<{ pid: number }>("GET", "/v1/domains/rb")).pid, pid);
    assert.equal(guestLinks(tb!.a).length, 1, "the source keeps its tap");
    ok(tb!, "a", ["destroy", "rb"]);
  });

  it("a restarted agent removes the taps of a QEMU that died while it was down", async (t) => {
    if (!need(t, TOOLS, true)) return;
    makeImage(tb!, "a", { name: "orphan.qcow2", size: "64M" });
    const pid = await startPaused(
      tb!,
      {
        name: "orphan",
        disks: [{ target: "vda", source: `${IMG}/orphan.qcow2` }],
        nics: [
          { type: "bridge", source: "br0", targetDev: "orphan-t0" },
          { type: "network", source: "lan" },
        ],
      },
      guest,
    );
    const taps = guestLinks(tb!.a);
    assert.deepEqual(taps, ["orphan-t0", "vnet0"], "a <target dev> of its own is used as given");
    // A restart while the guest runs keeps it and its taps, however often.
    for (let i = 0; i < 2; i++) {
      await tb!.a.killAgent("SIGKILL");
      await tb!.a.startAgent(["--network", "lan=br0"]);
      assert.match(ok(tb!, "a", ["dominfo", "orphan"]), /State:\s+paused/);
      assert.deepEqual(guestLinks(tb!.a), taps, `taps kept across restart ${i + 1}`);
      assert.ok(fs.existsSync(tb!.a.hostPath("/var/lib/nbdmig/run/orphan.json")), "runtime record kept");
    }
    // A link of a generated name that nbdmig did not make (libvirt's, say), named by a stale record.
    execFileSync("ip", ["-n", tb!.a.netns, "tuntap", "add", "dev", "vnet9", "mode", "tap"]);
    fs.writeFileSync(
      tb!.a.hostPath("/var/lib/nbdmig/run/resources/ghost.json"),
      JSON.stringify({ name: "ghost", nics: [{ name: "vnet9", kind: "tap" }] }),
    );
    await tb!.a.killAgent("SIGKILL");
    process.kill(pid, "SIGKILL");
    await waitFor("QEMU to exit", () => !tb!.a.qemuPids().includes(pid), 10_000);
    assert.deepEqual(guestLinks(tb!.a), taps, "the taps outlive QEMU while nobody watches");
    await tb!.a.startAgent(["--network", "lan=br0"]);
    assert.deepEqual(guestLinks(tb!.a), [], "the new agent removed them");
    const links = execFileSync("ip", ["-n", tb!.a.netns, "-o", "link", "show"], { encoding: "utf8" });
    assert.match(links, /: vnet9:/, "a tap nbdmig did not make stays, whatever a record says");
    execFileSync("ip", ["-n", tb!.a.netns, "link", "del", "vnet9"]);
    assert.match(ok(tb!, "a", ["dominfo", "orphan"]), /State:\s+shut off/);
    // And the domain starts again with fresh taps.
    ok(tb!, "a", ["start", "--paused", "orphan"]);
    assert.equal(guestLinks(tb!.a).length, 2);
    ok(tb!, "a", ["destroy", "orphan"]);
    assert.deepEqual(guestLinks(tb!.a), []);
  });
});
