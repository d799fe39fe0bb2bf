import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import { after, before, describe, it } from "node:test";
import { AgentClient } from "../src/agent/client.js";
import { AgentError } from "../src/errors.js";
import { Testbed } from "../src/testbed/testbed.js";
import { available, need, testGuest } from "./helpers/env.js";
import { guestXml } from "./helpers/guest-xml.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = ["qemu-system-x86_64", "qemu-img", "ip", "nsenter", "busybox"];

describe("host agent on two namespace hosts", { timeout: 300_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up();
  });
  after(async () => tb?.down());

  const image = (host: "a" | "b", name: string, size = "256M") => {
    const h = tb![host];
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", `${h.imagesDir}/${name}.qcow2`, size]);
    return `/var/lib/nbdmig/images/${name}.qcow2`;
  };
  const xml = (name: string, source: string, rate?: number) =>
    guestXml({ name, kernel: guest.kernel, initrd: guest.initrd, rate, disks: [{ target: "vda", source }] });

  it("starts the test guest, shows it running with serial output, destroys it", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const a = tb!.a.client();
    await a.call("POST", "/v1/domains", { xml: xml("g1", image("a", "g1"), 5) });
    const started = await a.call<{ pid: number; accel: string }>("POST", "/v1/domains/g1/start");
    assert.equal(started.accel, "tcg");
    const info = await a.call<{ state: string; pid: number }>("GET", "/v1/domains/g1");
    assert.equal(info.state, "running");
    assert.deepEqual(tb!.a.qemuPids(), [started.pid]);
    const text = await waitFor("the guest writing", async () => {
      const r = await a.call<{ text: string }>("GET", "/v1/domains/g1/console");
      return /nbdmig-guest: t=\d+ mib=\d+/.test(r.text) ? r.text : "";
    });
    assert.match(text, /nbdmig-guest: ready disk=\/dev\/vda rate=5/);
    await a.call("POST", "/v1/domains/g1/destroy");
    assert.equal((await a.call<{ state: string }>("GET", "/v1/domains/g1")).state, "shut off");
    assert.deepEqual(tb!.a.qemuPids(), []);
    await a.call("DELETE", "/v1/domains/g1");
    await assert.rejects(
      a.call("GET", "/v1/domains/g1"),
      (e: unknown) => e instanceof AgentError && e.status === 404,
    );
  });

  it("keeps managing a running guest across an agent restart", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const a = tb!.a.client();
    await a.call("POST", "/v1/domains", { xml: xml("g2", image("a", "g2")) });
    const started = await a.call<{ pid: number; id: number }>("POST", "/v1/domains/g2/start");
    await tb!.a.killAgent("SIGKILL");
    assert.deepEqual(tb!.a.qemuPids(), [started.pid], "QEMU outlives its agent");
    await tb!.a.startAgent();
    const info = await a.call<{ state: string; pid: number; id: number }>("GET", "/v1/domains/g2");
    assert.equal(info.state, "running");
    assert.equal(info.pid, started.pid);
    assert.equal(info.id, started.id);
    await a.call("POST", "/v1/domains/g2/suspend");
    assert.equal((await a.call<{ state: string }>("GET", "/v1/domains/g2")).state, "paused");
    await a.call("POST", "/v1/domains/g2/resume");
    await a.call("POST", "/v1/domains/g2/destroy");
    assert.deepEqual(tb!.a.qemuPids(), []);
  });

  it("notices QEMU crashing", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const a = tb!.a.client();
    await a.call("POST", "/v1/domains", { xml: xml("g3", image("a", "g3")) });
    const { pid } = await a.call<{ pid: number }>("POST", "/v1/domains/g3/start");
    process.kill(pid, "SIGKILL");
    await waitFor(
      "the agent to notice",
      async () => (await a.call<{ state: string }>("GET", "/v1/domains/g3")).state === "shut off",
      10_000,
    );
    // And the domain can start again.
    await a.call("POST", "/v1/domains/g3/start");
    await a.call("POST", "/v1/domains/g3/destroy");
  });

  it("refuses calls without the right bearer token", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const url = `http://${tb!.a.mgmtAddr}:7800/v1/domains`;
    const none = await fetch(url);
    assert.equal(none.status, 401);
    assert.equal(((await none.json()) as { error: { code: string } }).error.code, "E_AUTH");
    const wrong = new AgentClient({ host: tb!.a.mgmtAddr, port: 7800 }, "0".repeat(64));
    await assert.rejects(
      wrong.call("GET", "/v1/domains"),
      (e: unknown) => e instanceof AgentError && e.status === 401,
    );
    const mode = fs.statSync(tb!.tokenFile).mode & 0o777;
    assert.equal(mode, 0o600);
  });

  it("runs two agents whose hosts have separate filesystems", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const src = image("a", "same");
    fs.writeFileSync(`${tb!.a.imagesDir}/marker`, "a");
    assert.equal(image("b", "same"), src, "the same path on both hosts");
    for (const h of tb!.hosts) {
      const c = h.client();
      await c.call("POST", "/v1/domains", { xml: xml(`on-${h.name}`, src) });
      await c.call("POST", `/v1/domains/on-${h.name}/start`);
    }
    const listA = await tb!.a
      .client()
      .call<{ domains: { name: string; state: string }[] }>("GET", "/v1/domains");
    const listB = await tb!.b
      .client()
      .call<{ domains: { name: string; state: string }[] }>("GET", "/v1/domains");
    assert.ok(listA.domains.some((d) => d.name === "on-a" && d.state === "running"));
    assert.ok(!listA.domains.some((d) => d.name === "on-b"));
    assert.ok(listB.domains.some((d) => d.name === "on-b" && d.state === "running"));
    // Both QEMUs hold a write lock on "the same" path: only possible because they are different files.
    assert.equal(tb!.a.qemuPids().length, 1);
    assert.equal(tb!.b.qemuPids().length, 1);
    assert.ok(!fs.existsSync(`${tb!.b.imagesDir}/marker`));
    for (const h of tb!.hosts) await h.client().call("POST", `/v1/domains/on-${h.name}/destroy`);
  });
});
