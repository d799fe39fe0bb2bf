import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { EventEmitter } from "node:events";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { completedMigrationInfo } from "../src/qemu/qmp-util.js";
import { QmpError } from "../src/errors.js";
import { launchQemu, waitGone } from "../src/qemu/launcher.js";
import type { QmpClient } from "../src/qemu/qmp.js";
import { Mirrors } from "../src/migration/mirror.js";
import { pino } from "pino";
import { need } from "./helpers/env.js";

async function startQemu() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-qmp-"));
  const sock = path.join(dir, "qmp.sock");
  const args = [
    "-machine",
    "q35",
    "-accel",
    "tcg",
    "-nodefaults",
    "-display",
    "none",
    "-S",
    "-chardev",
    `socket,id=qmp,path=${sock},server=on,wait=off`,
    "-mon",
    "chardev=qmp,mode=control",
  ];
  const q = await launchQemu(args, sock, path.join(dir, "qemu.log"));
  return { ...q, dir };
}

describe("QMP client against real QEMU", () => {
  it("negotiates, runs typed commands and receives events", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const { qmp, pid, dir } = await startQemu();
    try {
      assert.ok(qmp.version.major >= 7, `QEMU version from greeting: ${JSON.stringify(qmp.version)}`);
      assert.equal((await qmp.execute("query-status")).status, "prelaunch");
      const resumed = qmp.waitEvent("RESUME", () => true, 5000);
      await qmp.execute("cont");
      await resumed;
      assert.equal((await qmp.execute("query-status")).status, "running");
      const stopped = qmp.waitEvent("STOP", () => true, 5000);
      await qmp.execute("stop");
      const ev = await stopped;
      assert.equal(ev.event, "STOP");
      assert.ok(ev.timestamp.seconds > 0);
      const hmp = await qmp.execute("human-monitor-command", { "command-line": "info status" });
      assert.match(hmp, /VM status: paused/);
    } finally {
      process.kill(pid, "SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("reports QEMU's errors with their class and description", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const { qmp, pid, dir } = await startQemu();
    try {
      await assert.rejects(qmp.raw("no-such-command"), (err: unknown) => {
        assert.ok(err instanceof QmpError);
        assert.equal(err.errorClass, "CommandNotFound");
        assert.match(err.message, /no-such-command: The command no-such-command has not been found/);
        return true;
      });
      await assert.rejects(qmp.execute("blockdev-del", { "node-name": "nope" }), (err: unknown) => {
        assert.ok(err instanceof QmpError);
        assert.equal(err.errorClass, "GenericError");
        assert.match(err.desc, /nope/);
        return true;
      });
      // The connection is still usable after errors.
      assert.equal((await qmp.execute("query-status")).status, "prelaunch");
    } finally {
      process.kill(pid, "SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("turns out-of-band execution on and sends yank out of band", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const { qmp, pid, dir } = await startQemu();
    try {
      assert.equal(qmp.oob, true, "a socket monitor offers oob");
      // No migration runs, so QEMU has no such yank instance: its answer comes through the oob path.
      await assert.rejects(
        qmp.execute("yank", { instances: [{ type: "migration" }] }, { oob: true }),
        /yank: Instance not found/,
      );
      assert.equal((await qmp.execute("query-status")).status, "prelaunch", "in-band commands still work");
    } finally {
      process.kill(pid, "SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("times out a command QEMU does not answer", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const { qmp, pid, dir } = await startQemu();
    try {
      process.kill(pid, "SIGSTOP");
      await assert.rejects(qmp.execute("query-status", undefined, { timeoutMs: 300 }), (err: unknown) => {
        assert.ok(err instanceof QmpError);
        assert.equal(err.errorClass, "Timeout");
        return true;
      });
      process.kill(pid, "SIGCONT");
      assert.equal((await qmp.execute("query-status")).status, "prelaunch");
    } finally {
      process.kill(pid, "SIGKILL");
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("rejects pending calls and waiters when QEMU is killed mid-call", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const { qmp, pid, dir } = await startQemu();
    try {
      // Freeze QEMU so the call is certainly in flight, then kill it.
      process.kill(pid, "SIGSTOP");
      const call = qmp.execute("query-status");
      const waiter = qmp.waitEvent("BLOCK_JOB_READY");
      await new Promise((r) => setTimeout(r, 100));
      process.kill(pid, "SIGKILL");
      await assert.rejects(
        call,
        (err: unknown) => err instanceof QmpError && err.errorClass === "ConnectionLost",
      );
      await assert.rejects(
        waiter,
        (err: unknown) => err instanceof QmpError && err.errorClass === "ConnectionLost",
      );
      await assert.rejects(
        qmp.execute("query-status"),
        (err: unknown) => err instanceof QmpError && err.errorClass === "ConnectionLost",
      );
    } finally {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        /* already dead */
      }
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("fails a launch with QEMU's own message", async (t) => {
    if (!need(t, ["qemu-system-x86_64"])) return;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-qmp-"));
    const sock = path.join(dir, "qmp.sock");
    try {
      await assert.rejects(
        launchQemu(
          [
            "-machine",
            "no-such-machine",
            "-chardev",
            `socket,id=qmp,path=${sock},server=on,wait=off`,
            "-mon",
            "chardev=qmp,mode=control",
          ],
          sock,
          path.join(dir, "log"),
        ),
        (err: unknown) =>
          err instanceof QmpError &&
          err.errorClass === "LaunchFailed" &&
          /unsupported machine type/i.test(err.message),
      );
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("query-migrate after completion (no QEMU needed)", () => {
  it("asks again while QEMU 7.2 still reads 0 for the times, and never reports a false 0 downtime", async () => {
    const answers = [
      { status: "completed", "total-time": 0, downtime: 0 },
      { status: "completed", "total-time": 0, downtime: 0 },
      { status: "completed", "total-time": 2140, downtime: 118 },
    ];
    let asked = 0;
    const info = await completedMigrationInfo(async () => answers[Math.min(asked++, answers.length - 1)]!);
    assert.equal(asked, 3);
    assert.equal(info.downtime, 118);
    const never = await completedMigrationInfo(
      async () => ({ status: "completed", "total-time": 0, downtime: 0 }),
      30,
    );
    assert.equal(never.downtime, undefined, "unknown, not 0");
    assert.equal(never.status, "completed");
  });
});

describe("waiting on QEMU and its jobs (no QEMU needed)", () => {
  it("waitGone answers false while the process runs and true once it has exited", async () => {
    const child = spawn("sleep", ["30"], { stdio: "ignore" });
    const exited = new Promise((r) => child.once("exit", r));
    assert.equal(await waitGone(child.pid!, 50), false);
    child.kill("SIGTERM");
    await exited;
    assert.equal(await waitGone(child.pid!, 5000), true);
  });

  it("a mirror's READY or failure ends the wait between polls at once; other events do not", async () => {
    const qmp = new EventEmitter();
    const log = pino({ level: "silent" });
    const m = new Mirrors(qmp as unknown as QmpClient, ["vda", "vdb"], log);
    const t0 = Date.now();
    const waited = m.settle(60_000);
    qmp.emit("event", { event: "BLOCK_JOB_READY", data: { device: "someone-else" } });
    qmp.emit("event", { event: "RESUME", data: {} });
    let woke = false;
    void waited.then(() => (woke = true));
    await new Promise((r) => setImmediate(r));
    assert.equal(woke, false, "an unrelated event must not wake the wait");
    qmp.emit("event", { event: "BLOCK_JOB_READY", data: { device: "nbdmig-mirror-vdb" } });
    await waited;
    assert.ok(Date.now() - t0 < 30_000, "woken by READY, not by the timer");
    assert.deepEqual(
      m.jobs.map((j) => j.ready),
      [false, true],
    );
    const failed = m.settle(60_000);
    qmp.emit("event", {
      event: "BLOCK_JOB_ERROR",
      data: { device: "nbdmig-mirror-vda", operation: "write" },
    });
    await failed;
    assert.match(m.failure ?? "", /vda failed: I\/O error during write/);
    // Without events, the wait is the poll interval.
    await m.settle(5);
    m.detach();
  });
});
