/**
 * What a definition means on this host, decided once when it is defined (as libvirt does) and kept in the
 * definition, so that it never changes behind the guest's back and a migration carries the same choice:
 * - the machine type becomes a versioned one (q35 -> pc-q35-7.2; none -> QEMU's default), and must be one
 *   this QEMU lists;
 * - `<os firmware='efi'>` becomes a concrete `<loader>` and `<nvram template>` from QEMU's firmware
 *   descriptors; an explicit loader without a template gets the template of its descriptor (and needs
 *   none when its NVRAM file exists); the NVRAM path defaults to the agent's state directory;
 * - what this host cannot give the guest (SPICE, a device model, swtpm, the firmware files) is an error
 *   naming the element and the fix.
 * `checkForHost` re-checks an already resolved definition (a migration's destination, an agent restart)
 * without choosing anything again.
 */
import fs from "node:fs";
import path from "node:path";
import { DomainXmlError } from "../errors.js";
import type { MachineType, QemuFeatures } from "../qemu/features.js";
import { chooseUefi, descriptorForCode, type FirmwareDescriptor } from "../qemu/firmware.js";
import { isQ35, type DomainDef } from "./model.js";

export interface HostCaps {
  qemu: QemuFeatures;
  firmware: FirmwareDescriptor[];
  /** Where per-VM NVRAM files go by default (`<state>/nvram`). */
  nvramDir: string;
  /** swtpm is installed. */
  swtpm: boolean;
  /** libvirt storage pool name -> directory (`daemon --pool`). */
  pools?: Record<string, string>;
}

export function resolveForHost(input: DomainDef, host: HostCaps): { def: DomainDef; warnings: string[] } {
  const def = structuredClone(input);
  const warnings: string[] = [];
  def.os.machine = canonicalMachine(def.os.machine, host.qemu, warnings);
  for (const d of def.disks) {
    if (!d.volume) continue;
    const dir = host.pools?.[d.volume.pool];
    if (!dir) {
      const known = Object.keys(host.pools ?? {});
      throw new DomainXmlError(
        `domain/devices/disk[target=${d.target}]/source/@pool`,
        `storage pool '${d.volume.pool}' is not known on this host (${known.length ? `it has ${known.join(", ")}` : "it has none"}); start its agent with --pool ${d.volume.pool}=DIR (a directory pool)`,
      );
    }
    d.source = path.join(dir, d.volume.name);
    warnings.push(
      `domain/devices/disk[target=${d.target}]: volume ${d.volume.pool}/${d.volume.name} is the file ${d.source} here; the definition keeps the file`,
    );
    delete d.volume;
  }
  resolveFirmware(def, host);
  checkForHost(def, host);
  return { def, warnings };
}

/** The versioned machine type QEMU runs for `name` (an alias, a version, or nothing for the default). */
export function canonicalMachine(
  name: string | undefined,
  qemu: QemuFeatures,
  warnings: string[] = [],
): string {
  const all = qemu.machines;
  if (all.length === 0)
    throw new DomainXmlError(
      "domain/os/type/@machine",
      `cannot ask QEMU for its machine types: ${qemu.error ?? "no answer"}`,
    );
  const m =
    name === undefined ? all.find((x) => x.isDefault) : all.find((x) => x.name === name || x.alias === name);
  if (!m) throw new DomainXmlError("domain/os/type/@machine", unknownMachine(name ?? "", qemu));
  if (m.deprecated) warnings.push(`domain/os/type/@machine: ${m.name} is deprecated in QEMU ${qemu.version}`);
  return m.name;
}

/** "not known here" with what is, grouped by family: pc-q35-2.4 .. 7.2 (q35 = pc-q35-7.2), ... */
function unknownMachine(name: string, qemu: QemuFeatures): string {
  const families = new Map<string, MachineType[]>();
  for (const m of qemu.machines) {
    const fam = /^(pc-q35|pc-i440fx)-/.exec(m.name)?.[1] ?? m.name;
    families.set(fam, [...(families.get(fam) ?? []), m]);
  }
  const parts: string[] = [];
  for (const [fam, list] of families) {
    if (list.length === 1) parts.push(list[0]!.name);
    else {
      const vers = list.map((m) => m.name.slice(fam.length + 1));
      const alias = list.find((m) => m.alias);
      parts.push(`${fam}-{${vers.join(",")}}${alias ? ` (${alias.alias} = ${alias.name})` : ""}`);
    }
  }
  const newest = qemu.machines.find((m) => m.alias === (name.includes("i440fx") ? "pc" : "q35"));
  return `machine type '${name}' is not supported by this host's QEMU ${qemu.version}; it supports ${parts.join("; ")}. A guest cannot keep a machine type its host's QEMU lacks, nor migrate to such a host: change the machine attribute${newest ? ` (e.g. to ${newest.name}, the newest ${newest.alias} type here)` : ""} while the guest is shut off`;
}

function resolveFirmware(def: DomainDef, host: HostCaps): void {
  const fw = def.os.firmware;
  if (fw.auto === "efi" && !fw.loader) {
    const smmAllowed = def.features.smm !== "off";
    const c = chooseUefi(host.firmware, def.os.machine!, fw.features ?? {}, smmAllowed);
    if ("none" in c)
      throw new DomainXmlError("domain/os/@firmware", `cannot choose a UEFI firmware: ${c.none}`);
    fw.loader = { path: c.code, readonly: true, type: "pflash", secure: c.requiresSmm && c.secureBoot };
    fw.nvram = { path: fw.nvram?.path || "", template: fw.nvram?.template ?? c.template };
    if (c.requiresSmm) def.features.smm = "on";
  }
  if (fw.loader?.type === "pflash") {
    fw.nvram ??= { path: "" };
    // The template of the loader's descriptor, unless one is given; an existing NVRAM file needs none.
    if (!fw.nvram.template)
      fw.nvram.template = descriptorForCode(host.firmware, fw.loader.path)?.nvramTemplate;
    if (!fw.nvram.template && !(fw.nvram.path && fs.existsSync(fw.nvram.path))) {
      throw new DomainXmlError(
        "domain/os/nvram",
        `no NVRAM template is known for ${fw.loader.path} (no firmware descriptor names it); add <nvram template='...'> with the matching OVMF_VARS file`,
      );
    }
    if (!fw.nvram.template) delete fw.nvram.template;
    if (!fw.nvram.path) fw.nvram.path = path.join(host.nvramDir, `${def.name}_VARS.fd`);
  }
}

/** Everything this host must have for the (resolved) definition; throws naming the element and the fix. */
export function checkForHost(def: DomainDef, host: HostCaps): void {
  for (const d of def.disks)
    if (d.volume)
      throw new DomainXmlError(
        `domain/devices/disk[target=${d.target}]`,
        "a pool volume that was never resolved",
      );
  const machine = def.os.machine;
  if (!machine || !host.qemu.machines.some((m) => m.name === machine))
    throw new DomainXmlError("domain/os/type/@machine", unknownMachine(machine ?? "", host.qemu));
  const fw = def.os.firmware;
  if (fw.loader && !fs.existsSync(fw.loader.path)) {
    throw new DomainXmlError(
      "domain/os/loader",
      `firmware ${fw.loader.path} does not exist on this host; install it (Debian: apt-get install ovmf, whose images are in /usr/share/OVMF) or change the path`,
    );
  }
  if (fw.loader?.secure && def.features.smm === "off")
    throw new DomainXmlError(
      "domain/features/smm",
      "secure boot firmware (loader secure='yes') needs SMM; remove <smm state='off'/>",
    );
  if (fw.loader?.secure && !isQ35(def))
    throw new DomainXmlError("domain/os/loader/@secure", "secure boot needs a q35 machine type");
  if (
    fw.nvram?.template &&
    !fs.existsSync(fw.nvram.template) &&
    !(fw.nvram.path && fs.existsSync(fw.nvram.path))
  ) {
    throw new DomainXmlError(
      "domain/os/nvram/@template",
      `NVRAM template ${fw.nvram.template} does not exist on this host; install it or change the template`,
    );
  }
  const spiceUsers = [
    def.graphics.some((g) => g.type === "spice") ? "<graphics type='spice'>" : "",
    def.channels.some((c) => c.type === "spicevmc") ? "<channel type='spicevmc'>" : "",
    def.redirdevs.length ? "<redirdev>" : "",
  ].filter(Boolean);
  if (spiceUsers.length && !host.qemu.spice)
    throw new DomainXmlError(
      "domain/devices",
      `${spiceUsers.join(", ")} need SPICE, which this host's QEMU lacks; use VNC`,
    );
  if (spiceUsers.length > 1 && !def.graphics.some((g) => g.type === "spice"))
    throw new DomainXmlError(
      "domain/devices",
      `${spiceUsers.join(", ")} need a <graphics type='spice'> display`,
    );
  if (
    (def.channels.some((c) => c.type === "spicevmc") || def.redirdevs.length) &&
    !def.graphics.some((g) => g.type === "spice")
  )
    throw new DomainXmlError(
      "domain/devices",
      "spicevmc channels and USB redirection need a <graphics type='spice'> display",
    );
  const needDevice = (qemuName: string, what: string) => {
    if (!host.qemu.devices.includes(qemuName))
      throw new DomainXmlError(
        `domain/devices/${what}`,
        `this host's QEMU ${host.qemu.version} has no '${qemuName}' device (a Debian package may be missing: qemu-system-modules-spice for qxl and usb-redir)`,
      );
  };
  for (const v of def.videos) if (v.model === "qxl") needDevice(v.primary ? "qxl-vga" : "qxl", "video");
  if (def.redirdevs.length) needDevice("usb-redir", "redirdev");
  if (def.tpm) {
    needDevice(def.tpm.model, "tpm");
    if (!host.swtpm)
      throw new DomainXmlError(
        "domain/devices/tpm",
        "the TPM emulator swtpm is not installed on this host; apt-get install swtpm swtpm-tools",
      );
  }
  if (def.features.hyperv && def.type === "qemu")
    throw new DomainXmlError("domain/features/hyperv", "Hyper-V enlightenments need KVM (domain type='kvm')");
}
