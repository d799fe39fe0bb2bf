/**
 * `nbdmig nbd serve` as a process, with its filters (error injection, delay, rate, request log, read-only),
 * a Unix socket, a loop block device, and a shutdown that lets requests in flight finish.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, describe, it } from "node:test";
import { NbdClient } from "../src/nbd/client/client.js";
import { waitForPort } from "../src/util/net.js";
import { cliPath, need } from "./helpers/env.js";
import { patternImage, run, status, tmpdir } from "./helpers/nbd.js";

const MiB = 1024 * 1024;
let nextPort = 30000 + Math.floor(Math.random() * 20000);

/** Starts `nbdmig nbd serve ARGS` and waits until it listens (on a TCP port, or a socket file). */
async function serve(
  args: string[],
  unix?: string,
): Promise<{ port: number; proc: ChildProcess; log: () => string }> {
  const port = nextPort++;
  const proc = spawn(
    process.execPath,
    [cliPath, "nbd", "serve", ...(unix ? ["-U", unix] : ["-p", String(port)]), ...args],
    {
      stdio: ["ignore", "ignore", "pipe"],
    },
  );
  let log = "";
  proc.stderr!.on("data", (b: Buffer) => (log += b.toString()));
  if (unix) {
    for (let i = 0; i < 200 && !/serving/.test(log); i++) await new Promise((r) => setTimeout(r, 25));
  } else await waitForPort(port, { alive: () => proc.exitCode === null, what: `nbd serve: ${log}` });
  return { port, proc, log: () => log };
}

describe("nbdmig nbd serve", { timeout: 120_000 }, () => {
  const dir = tmpdir("serve");
  const procs: ChildProcess[] = [];
  after(() => {
    for (const p of procs) p.kill("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("injects errors on the operations asked for, and logs requests", async (t) => {
    if (!need(t, ["qemu-io"])) return;
    const s = await serve([
      "--error-rate",
      "1",
      "--error-errno",
      "ENOSPC",
      "--error-ops",
      "write",
      "--log-requests",
      "m=memory:16M",
    ]);
    procs.push(s.proc);
    const c = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/m`);
    await assert.rejects(c.write(Buffer.alloc(512, 1), 0), { code: "E_NBD_ENOSPC" });
    assert.deepEqual(await c.read(0, 4), Buffer.alloc(4), "reads still work");
    await c.disconnect();
    assert.match(s.log(), /nbd: write offset=0 count=512 fua=false error injected error on write/);
    assert.match(s.log(), /nbd: read offset=0 count=4 ok/);
    const bad = await status(process.execPath, [cliPath, "nbd", "serve", "--error-rate", "2", "m=memory:1M"]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /--error-rate takes a number from 0 to 1, not '2'/);
  });

  it("delays and rate-limits, serves read-only, and listens on a Unix socket", async (t) => {
    if (!need(t, ["qemu-img", "qemu-io"])) return;
    const img = path.join(dir, "d.img");
    await patternImage(img, 8, [[0x3c, 0, 4]]);
    const sock = path.join(dir, "nbd.sock");
    const s = await serve(["-r", "--delay-read", "50", "--rate", "8M", `d=${img}`], sock);
    procs.push(s.proc);
    assert.match(s.log(), /serving .*d\.img at nbd\+unix:\/\/\/d\?socket=.*nbd\.sock \(read-only\)/);
    const c = await NbdClient.connect(`nbd+unix:///d?socket=${sock}`);
    assert.equal(c.readOnly, true);
    const t0 = Date.now();
    assert.deepEqual(await c.read(0, 4), Buffer.alloc(4, 0x3c));
    assert.ok(Date.now() - t0 >= 45, "the read was delayed");
    // 8 MiB/s with a bucket of one second: 12 MiB takes at least about half a second more.
    const t1 = Date.now();
    for (let i = 0; i < 3; i++) await c.read(0, 4 * MiB);
    assert.ok(Date.now() - t1 >= 400, `12 MiB at 8 MiB/s took ${Date.now() - t1} ms`);
    await assert.rejects(c.write(Buffer.alloc(1), 0), { code: "E_NBD_EPERM" });
    await c.disconnect();
  });

  it("serves a block device (a loop device over an image)", async (t) => {
    if (!need(t, ["losetup", "qemu-img", "qemu-io"], true)) return;
    const img = path.join(dir, "loop.img");
    await patternImage(img, 16, [[0x61, 2, 1]]);
    const dev = (await run("losetup", ["--find", "--show", img])).trim();
    try {
      const s = await serve([`blk=${dev}`]);
      procs.push(s.proc);
      const c = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/blk`);
      assert.equal(c.size, 16 * MiB, "the size of a block device comes from sysfs");
      assert.deepEqual(await c.read(2 * MiB, 4), Buffer.alloc(4, 0x61));
      await c.write(Buffer.alloc(4096, 0x62), 8 * MiB, { fua: true });
      await c.disconnect();
      s.proc.kill("SIGTERM");
      await new Promise((r) => s.proc.once("exit", r));
      const back = await run("qemu-io", ["-f", "raw", "-c", "read -P 0x62 8M 4k", img]);
      assert.doesNotMatch(back, /fail/);
    } finally {
      await run("losetup", ["-d", dev]);
    }
  });

  it("on SIGTERM finishes the requests in flight before it exits", async () => {
    const s = await serve(["--delay-write", "300", "m=memory:16M"]);
    procs.push(s.proc);
    const c = await NbdClient.connect(`nbd://127.0.0.1:${s.port}/m`);
    const writes = Array.from({ length: 8 }, (_, i) => c.write(Buffer.alloc(4096, i + 1), i * 4096));
    await new Promise((r) => setTimeout(r, 50));
    s.proc.kill("SIGTERM");
    await Promise.all(writes);
    const code = await new Promise((r) => s.proc.once("exit", r));
    assert.equal(code, 0);
    c.destroy();
  });
});
