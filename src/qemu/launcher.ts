/** Starts QEMU processes that outlive the agent, and finds out which accelerator really works here. */
import { spawn } from "node:child_process";
import fs from "node:fs";
import { QmpError } from "../errors.js";
import { QmpClient } from "./qmp.js";
import { pollPause } from "../util/poll.js";
import type { Accel } from "../domain/qemu-args.js";

export const qemuBinary = (): string => process.env.NBDMIG_QEMU ?? "qemu-system-x86_64";

export interface Launched {
  pid: number;
  qmp: QmpClient;
}

/**
 * Spawns QEMU in its own session (so an agent restart does not take it down), stdout/stderr appended to
 * `logFile`, and connects to its QMP socket. If QEMU exits first, the error carries QEMU's own message.
 * `passFds` are inherited by QEMU as descriptors 3, 4, ... (macvtap queues), in that order.
 */
export async function launchQemu(
  args: string[],
  qmpSocket: string,
  logFile: string,
  passFds: number[] = [],
): Promise<Launched> {
  fs.rmSync(qmpSocket, { force: true });
  const fd = fs.openSync(logFile, "a");
  const child = spawn(qemuBinary(), args, { detached: true, stdio: ["ignore", fd, fd, ...passFds] });
  fs.closeSync(fd);
  const exited = new Promise<never>((_, reject) => {
    child.once("error", (err) =>
      reject(new QmpError("LaunchFailed", `cannot run ${qemuBinary()}: ${err.message}`)),
    );
    child.once("exit", (code, signal) => {
      const tail = startupOutput(logFile);
      reject(
        new QmpError("LaunchFailed", `QEMU exited during start-up (${signal ?? `code ${code}`}): ${tail}`),
      );
    });
  });
  child.unref();
  try {
    const qmp = await Promise.race([QmpClient.connect(qmpSocket, { waitMs: 20_000 }), exited]);
    return { pid: child.pid!, qmp };
  } catch (err) {
    if (child.exitCode === null) child.kill("SIGKILL");
    throw err;
  }
}

/** What QEMU printed since the agent's last "starting:" line in the log (its own error, not our command line). */
function startupOutput(file: string): string {
  try {
    const lines = fs.readFileSync(file, "utf8").trimEnd().split("\n");
    let i = lines.length;
    while (i > 0 && !/^\S+ starting: /.test(lines[i - 1]!)) i--;
    const own = lines.slice(i).filter(Boolean);
    return (own.length ? own : lines).slice(-5).join(" | ") || "(no output)";
  } catch {
    return "(no log)";
  }
}

export function lastLines(file: string, n: number): string {
  try {
    const lines = fs.readFileSync(file, "utf8").trimEnd().split("\n");
    return lines.slice(-n).join(" | ");
  } catch {
    return "(no log)";
  }
}

export function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie still answers kill(0); it is gone for our purposes.
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.slice(stat.lastIndexOf(")") + 2, stat.lastIndexOf(")") + 3) !== "Z";
  } catch {
    return false;
  }
}

/**
 * Waits until `pid` is gone, for up to `ms`; answers whether it is. Looks every 2 ms for the first 200 ms
 * and every 10 ms after: a QEMU told to quit is gone within some 10 ms here (Confirm's kill, traced: 10-13
 * ms with 10 ms looks), and Confirm waits for exactly that.
 */
export async function waitGone(pid: number, ms: number): Promise<boolean> {
  const begun = Date.now();
  while (pidAlive(pid)) {
    if (Date.now() - begun >= ms) return false;
    await pollPause(begun, { fastFor: 200, fast: 2, slow: 10 });
  }
  return true;
}

/** Whether process `pid` runs a program whose command line starts with (or contains) `name`. */
export function processRuns(pid: number, name: string, anywhere = false): boolean {
  try {
    const cmd = fs.readFileSync(`/proc/${pid}/cmdline`, "utf8");
    return anywhere ? cmd.includes(name) : cmd.startsWith(name);
  } catch {
    return false;
  }
}

let kvmProbe: Promise<{ usable: boolean; reason: string }> | undefined;

/**
 * Starts a throwaway QEMU (`args` plus `-S -qmp stdio`), runs each QMP command once and quits. Answers are
 * keyed by command; a command QEMU refused is missing from them.
 */
export function askQemu(
  args: string[],
  commands: string[],
  commandArgs: Record<string, Record<string, unknown>> = {},
): Promise<{ answers: Map<string, unknown>; stderr: string; error?: string }> {
  return new Promise((resolve) => {
    const child = spawn(qemuBinary(), [...args, "-S", "-qmp", "stdio"], { stdio: ["pipe", "pipe", "pipe"] });
    let out = "";
    let err = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    child.stdin.on("error", () => undefined);
    child.stdin.write(
      ["qmp_capabilities", ...commands, "quit"]
        .map(
          (c) =>
            JSON.stringify({ execute: c, id: c, ...(commandArgs[c] ? { arguments: commandArgs[c] } : {}) }) +
            "\n",
        )
        .join(""),
    );
    child.on("error", (e) => {
      clearTimeout(timer);
      resolve({ answers: new Map(), stderr: "", error: `cannot run ${qemuBinary()}: ${e.message}` });
    });
    child.on("close", () => {
      clearTimeout(timer);
      const answers = new Map<string, unknown>();
      for (const line of out.split("\n")) {
        try {
          const msg = JSON.parse(line) as { id?: string; return?: unknown };
          if (msg.id !== undefined && "return" in msg) answers.set(msg.id, msg.return);
        } catch {
          /* the greeting's partial lines, events */
        }
      }
      resolve({ answers, stderr: err });
    });
  });
}

/**
 * Whether KVM works here: /dev/kvm opens and a QEMU with `-accel kvm -cpu host,arch-capabilities=off`
 * starts and reports KVM enabled. (On nested hosts `-cpu host` alone aborts; see the README.)
 */
export function probeKvm(): Promise<{ usable: boolean; reason: string }> {
  kvmProbe ??= (async (): Promise<{ usable: boolean; reason: string }> => {
    try {
      fs.accessSync("/dev/kvm", fs.constants.R_OK | fs.constants.W_OK);
    } catch {
      return { usable: false, reason: "/dev/kvm is not accessible" };
    }
    const r = await askQemu(
      [
        "-accel",
        "kvm",
        "-cpu",
        "host,arch-capabilities=off",
        "-machine",
        "q35",
        "-nodefaults",
        "-display",
        "none",
      ],
      ["query-kvm"],
    );
    const ok = (r.answers.get("query-kvm") as { enabled?: boolean } | undefined)?.enabled === true;
    return {
      usable: ok,
      reason: ok
        ? "KVM works"
        : `QEMU with KVM failed: ${r.error ?? r.stderr.trim().split("\n").pop() ?? ""}`,
    };
  })();
  return kvmProbe;
}

/** Picks the accelerator: an explicit choice wins; a `type='qemu'` domain gets TCG; else KVM if it works. */
export async function chooseAccel(requested: "auto" | Accel, domainType: "kvm" | "qemu"): Promise<Accel> {
  if (requested !== "auto") return requested;
  if (domainType === "qemu") return "tcg";
  return (await probeKvm()).usable ? "kvm" : "tcg";
}
