/**
 * What this host's QEMU binary can do, asked once from QEMU itself (QMP over stdio on a `-machine none`
 * instance) rather than assumed from its version:
 * - `nbdServer`: it has `nbd-server-start` and `block-export-add`, so it can receive disks over NBD;
 * - `blockMigration`: it still has block migration (the `block` migration capability: storage inside the
 *   migration stream). QEMU deprecated it in 8.2 and removed it in 9.1;
 * - `machines`: the machine types it knows (`-machine help`), with their aliases (q35, pc);
 * - `devices`: the device types it can create (modules such as qxl or usb-redir included);
 * - `spice`: whether it was built with SPICE.
 */
import { askQemu } from "./launcher.js";

export interface MachineType {
  name: string;
  alias?: string;
  isDefault: boolean;
  deprecated: boolean;
}

export interface QemuFeatures {
  version: string;
  nbdServer: boolean;
  blockMigration: boolean;
  machines: MachineType[];
  devices: string[];
  spice: boolean;
  /** Why the probe failed, when it did (then every feature is false). */
  error?: string;
}

let probe: Promise<QemuFeatures> | undefined;

export function probeQemuFeatures(): Promise<QemuFeatures> {
  probe ??= askQemu(
    ["-machine", "none", "-nodefaults", "-display", "none"],
    ["query-version", "query-commands", "query-migrate-capabilities", "query-machines", "qom-list-types"],
    { "qom-list-types": { implements: "device", abstract: false } },
  ).then((r) => {
    const v = r.answers.get("query-version") as
      { qemu: { major: number; minor: number; micro: number } } | undefined;
    const cmds = r.answers.get("query-commands") as { name: string }[] | undefined;
    const migcaps = r.answers.get("query-migrate-capabilities") as { capability: string }[] | undefined;
    const machines = r.answers.get("query-machines") as
      { name: string; alias?: string; "is-default"?: boolean; deprecated?: boolean }[] | undefined;
    const types = r.answers.get("qom-list-types") as { name: string }[] | undefined;
    if (!v || !cmds || !migcaps || !machines || !types) {
      return {
        version: "unknown",
        nbdServer: false,
        blockMigration: false,
        machines: [],
        devices: [],
        spice: false,
        error: r.error ?? `QEMU did not answer QMP: ${r.stderr.trim().split("\n").pop() ?? ""}`,
      };
    }
    const has = (n: string) => cmds.some((c) => c.name === n);
    return {
      version: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`,
      nbdServer: has("nbd-server-start") && has("block-export-add"),
      blockMigration: migcaps.some((c) => c.capability === "block"),
      machines: machines
        .filter((m) => m.name !== "none")
        .map((m) => ({
          name: m.name,
          ...(m.alias ? { alias: m.alias } : {}),
          isDefault: m["is-default"] === true,
          deprecated: m.deprecated === true,
        }))
        .sort((a, b) => a.name.localeCompare(b.name, "en", { numeric: true })),
      devices: types.map((t) => t.name).sort(),
      spice: has("query-spice"),
    };
  });
  return probe;
}
