/** Starts QEMU processes that outlive the agent, and finds out which accelerator really works here. */
import { spawn } from "node:child_process";
import fs from "node:fs";
import { QmpError } from "../errors.js";
import { QmpClient } from "./qmp.js";
import type { Accel } from "../domain/qemu-args.js";

export const qemuBinary = (): string => process.env.NBDMIG_QEMU ?? "qemu-system-x86_64";

export interface Launched {
  pid: number;
  qmp: QmpClient;
}

/**
 * Spawns QEMU in its own session (so an agent restart does not take it down), stdout/stderr appended to
 * `logFile`, and connects to its QMP socket. If QEMU exits first, the error carries QEMU's own message.
 */
export async function launchQemu(args: string[], qmpSocket: string, logFile: string): Promise<Launched> {
  fs.rmSync(qmpSocket, { force: true });
  const fd = fs.openSync(logFile, "a");
  const child = spawn(qemuBinary(), args, { detached: true, stdio: ["ignore", fd, fd] });
  fs.closeSync(fd);
  const exited = new Promise<never>((_, reject) => {
    child.once("error", (err) =>
      reject(new QmpError("LaunchFailed", `cannot run ${qemuBinary()}: ${err.message}`)),
    );
    child.once("exit", (code, signal) => {
      const tail = lastLines(logFile, 5);
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

let kvmProbe: Promise<{ usable: boolean; reason: string }> | undefined;

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
    return new Promise<{ usable: boolean; reason: string }>((resolve) => {
      const child = spawn(
        qemuBinary(),
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
          "-S",
          "-qmp",
          "stdio",
        ],
        { stdio: ["pipe", "pipe", "pipe"] },
      );
      let out = "";
      let err = "";
      const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
      child.stdout.on("data", (b: Buffer) => (out += b.toString()));
      child.stderr.on("data", (b: Buffer) => (err += b.toString()));
      child.stdin.write('{"execute":"qmp_capabilities"}\n{"execute":"query-kvm"}\n{"execute":"quit"}\n');
      child.on("error", (e) => resolve({ usable: false, reason: e.message }));
      child.on("close", () => {
        clearTimeout(timer);
        const ok = /"enabled":\s*true/.test(out);
        resolve({
          usable: ok,
          reason: ok ? "KVM works" : `QEMU with KVM failed: ${err.trim().split("\n").pop() ?? ""}`,
        });
      });
    });
  })();
  return kvmProbe;
}

/** Picks the accelerator: an explicit choice wins; a `type='qemu'` domain gets TCG; else KVM if it works. */
export async function chooseAccel(requested: "auto" | Accel, domainType: "kvm" | "qemu"): Promise<Accel> {
  if (requested !== "auto") return requested;
  if (domainType === "qemu") return "tcg";
  return (await probeKvm()).usable ? "kvm" : "tcg";
}
