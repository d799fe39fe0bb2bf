/**
 * What this host's QEMU binary can do for storage migration, asked once from QEMU itself (QMP over stdio on
 * a `-machine none` instance) rather than assumed from its version:
 * - `nbdServer`: it has `nbd-server-start` and `block-export-add`, so it can receive disks over NBD;
 * - `blockMigration`: it still has block migration (the `block` migration capability: storage inside the
 *   migration stream). QEMU deprecated it in 8.2 and removed it in 9.1.
 */
import { spawn } from "node:child_process";
import { qemuBinary } from "./launcher.js";

export interface QemuFeatures {
  version: string;
  nbdServer: boolean;
  blockMigration: boolean;
  /** Why the probe failed, when it did (then every feature is false). */
  error?: string;
}

let probe: Promise<QemuFeatures> | undefined;

export function probeQemuFeatures(): Promise<QemuFeatures> {
  probe ??= new Promise<QemuFeatures>((resolve) => {
    const child = spawn(
      qemuBinary(),
      ["-machine", "none", "-nodefaults", "-display", "none", "-S", "-qmp", "stdio"],
      { stdio: ["pipe", "pipe", "pipe"] },
    );
    let out = "";
    let err = "";
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    child.stdout.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr.on("data", (b: Buffer) => (err += b.toString()));
    child.stdin.on("error", () => undefined);
    const ask = (id: string, execute: string) => JSON.stringify({ execute, id }) + "\n";
    child.stdin.write(
      ask("caps", "qmp_capabilities") +
        ask("version", "query-version") +
        ask("commands", "query-commands") +
        ask("migcaps", "query-migrate-capabilities") +
        ask("quit", "quit"),
    );
    const failed = (why: string): QemuFeatures => ({
      version: "unknown",
      nbdServer: false,
      blockMigration: false,
      error: why,
    });
    child.on("error", (e) => resolve(failed(`cannot run ${qemuBinary()}: ${e.message}`)));
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
      const v = answers.get("version") as
        { qemu: { major: number; minor: number; micro: number } } | undefined;
      const cmds = answers.get("commands") as { name: string }[] | undefined;
      const migcaps = answers.get("migcaps") as { capability: string }[] | undefined;
      if (!v || !cmds || !migcaps)
        return resolve(failed(`QEMU did not answer QMP: ${err.trim().split("\n").pop() ?? ""}`));
      const has = (n: string) => cmds.some((c) => c.name === n);
      resolve({
        version: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`,
        nbdServer: has("nbd-server-start") && has("block-export-add"),
        blockMigration: migcaps.some((c) => c.capability === "block"),
      });
    });
  });
  return probe;
}
