import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { completedMigrationInfo } from "../src/qemu/qmp-util.js";
import { QmpError } from "../src/errors.js";
import { launchQemu } from "../src/qemu/launcher.js";
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
