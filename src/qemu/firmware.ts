/**
 * QEMU's firmware descriptors (docs/interop/firmware.json): the JSON files that firmware packages install
 * (Debian's ovmf: /usr/share/qemu/firmware/*.json) describing each firmware image, the machine types it
 * runs on, its NVRAM template and features (secure-boot, enrolled-keys, requires-smm). `<os firmware='efi'>`
 * is resolved against them the way libvirt does: files under /etc/qemu/firmware override same-named ones
 * under /usr/share, the list is taken in file-name order, and the first descriptor that fits the machine
 * type and the requested features wins.
 */
import fs from "node:fs";
import path from "node:path";

export const FIRMWARE_DIRS = (): string[] =>
  process.env.NBDMIG_FIRMWARE_DIRS?.split(":") ?? ["/usr/share/qemu/firmware", "/etc/qemu/firmware"];

export interface FirmwareDescriptor {
  file: string;
  description: string;
  interfaces: string[];
  /** "flash" (pflash code + NVRAM) or "memory" (a ROM). */
  device: string;
  executable?: string;
  nvramTemplate?: string;
  /** Machine-type globs per architecture, e.g. pc-q35-*. */
  machines: string[];
  features: string[];
}

interface RawDescriptor {
  description?: string;
  "interface-types"?: string[];
  mapping?: {
    device?: string;
    filename?: string;
    executable?: { filename?: string; format?: string };
    "nvram-template"?: { filename?: string; format?: string };
  };
  targets?: { architecture?: string; machines?: string[] }[];
  features?: string[];
}

/** The descriptors on this host, in the order that decides which one `firmware='efi'` gets. */
export function loadFirmwareDescriptors(dirs = FIRMWARE_DIRS()): FirmwareDescriptor[] {
  const byName = new Map<string, string>();
  for (const dir of dirs) {
    let names: string[];
    try {
      names = fs.readdirSync(dir).filter((f) => f.endsWith(".json"));
    } catch {
      continue;
    }
    for (const n of names) byName.set(n, path.join(dir, n));
  }
  const out: FirmwareDescriptor[] = [];
  for (const name of [...byName.keys()].sort()) {
    const file = byName.get(name)!;
    let raw: RawDescriptor;
    try {
      raw = JSON.parse(fs.readFileSync(file, "utf8")) as RawDescriptor;
    } catch {
      continue; // an empty file masks a descriptor of the same name, as QEMU's spec allows
    }
    const m = raw.mapping ?? {};
    out.push({
      file,
      description: raw.description ?? name,
      interfaces: raw["interface-types"] ?? [],
      device: m.device ?? "",
      executable: m.executable?.filename ?? m.filename,
      nvramTemplate: m["nvram-template"]?.filename,
      machines: (raw.targets ?? [])
        .filter((t) => t.architecture === "x86_64")
        .flatMap((t) => t.machines ?? []),
      features: raw.features ?? [],
    });
  }
  return out;
}

export interface FirmwareChoice {
  code: string;
  template: string;
  secureBoot: boolean;
  requiresSmm: boolean;
  description: string;
}

/** Does `machine` (a canonical type such as pc-q35-7.2) match a descriptor glob such as pc-q35-*? */
function globMatch(glob: string, machine: string): boolean {
  const re = new RegExp(
    `^${glob
      .replace(/[.+^${}()|[\]\\]/g, "\\$&")
      .replace(/\*/g, ".*")
      .replace(/\?/g, ".")}$`,
  );
  return re.test(machine);
}

/**
 * The UEFI firmware for `machine` with the wanted features (undefined: either), or a reason why there is
 * none. `smmAllowed` is false when the domain turns SMM off explicitly.
 */
export function chooseUefi(
  descriptors: FirmwareDescriptor[],
  machine: string,
  want: { secureBoot?: boolean; enrolledKeys?: boolean },
  smmAllowed: boolean,
): FirmwareChoice | { none: string } {
  const uefi = descriptors.filter((d) => d.interfaces.includes("uefi") && d.device === "flash");
  if (uefi.length === 0) {
    return { none: "no UEFI firmware is installed (apt-get install ovmf)" };
  }
  for (const d of uefi) {
    if (!d.executable || !d.nvramTemplate) continue;
    if (!d.machines.some((g) => globMatch(g, machine))) continue;
    const sb = d.features.includes("secure-boot");
    const keys = d.features.includes("enrolled-keys");
    if (want.secureBoot !== undefined && want.secureBoot !== sb) continue;
    if (want.enrolledKeys !== undefined && want.enrolledKeys !== keys) continue;
    const smm = d.features.includes("requires-smm");
    if (smm && !smmAllowed) continue;
    if (!fs.existsSync(d.executable) || !fs.existsSync(d.nvramTemplate)) continue;
    return {
      code: d.executable,
      template: d.nvramTemplate,
      secureBoot: sb,
      requiresSmm: smm,
      description: d.description,
    };
  }
  const wanted = [
    want.secureBoot !== undefined ? `secure-boot ${want.secureBoot ? "on" : "off"}` : "",
    want.enrolledKeys !== undefined ? `enrolled-keys ${want.enrolledKeys ? "on" : "off"}` : "",
    smmAllowed ? "" : "without SMM",
  ].filter(Boolean);
  return {
    none: `none of the ${uefi.length} UEFI firmware descriptors (${uefi.map((d) => path.basename(d.file)).join(", ")}) fits machine type ${machine}${wanted.length ? ` with ${wanted.join(", ")}` : ""}`,
  };
}

/** The descriptor whose code file is `code` (to find the NVRAM template of an explicit <loader>). */
export function descriptorForCode(
  descriptors: FirmwareDescriptor[],
  code: string,
): FirmwareDescriptor | undefined {
  return descriptors.find((d) => d.executable === code && d.nvramTemplate);
}
