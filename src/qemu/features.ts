/**
 * What this host's QEMU binary can do for storage migration, asked once from QEMU itself (QMP over stdio on
 * a `-machine none` instance) rather than assumed from its version:
 * - `nbdServer`: it has `nbd-server-start` and `block-export-add`, so it can receive disks over NBD;
 * - `blockMigration`: it still has block migration (the `block` migration capability: storage inside the
 *   migration stream). QEMU deprecated it in 8.2 and removed it in 9.1.
 */
import { askQemu } from "./launcher.js";

export interface QemuFeatures {
  version: string;
  nbdServer: boolean;
  blockMigration: boolean;
  /** Why the probe failed, when it did (then every feature is false). */
  error?: string;
}

let probe: Promise<QemuFeatures> | undefined;

export function probeQemuFeatures(): Promise<QemuFeatures> {
  probe ??= askQemu(
    ["-machine", "none", "-nodefaults", "-display", "none"],
    ["query-version", "query-commands", "query-migrate-capabilities"],
  ).then((r) => {
    const v = r.answers.get("query-version") as
      { qemu: { major: number; minor: number; micro: number } } | undefined;
    const cmds = r.answers.get("query-commands") as { name: string }[] | undefined;
    const migcaps = r.answers.get("query-migrate-capabilities") as { capability: string }[] | undefined;
    if (!v || !cmds || !migcaps) {
      return {
        version: "unknown",
        nbdServer: false,
        blockMigration: false,
        error: r.error ?? `QEMU did not answer QMP: ${r.stderr.trim().split("\n").pop() ?? ""}`,
      };
    }
    const has = (n: string) => cmds.some((c) => c.name === n);
    return {
      version: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`,
      nbdServer: has("nbd-server-start") && has("block-export-add"),
      blockMigration: migcaps.some((c) => c.capability === "block"),
    };
  });
  return probe;
}
