/**
 * libvirt domain XML <-> DomainDef. Accepts what `virsh dumpxml` prints for an ordinary guest. What the
 * guest can see is honoured; host-side tuning (CPU pinning, NUMA placement, security labels...) is ignored
 * with a warning; what nbdmig cannot honour (passthrough, shared filesystems...) is an error naming the
 * element and saying what to do. Like libvirt, parsing adds the devices libvirt adds itself (a USB
 * controller, a memory balloon, a virtio-serial controller for channels, a MAC address), so that the
 * definition written back says exactly what the guest gets.
 *
 * This module is pure: what depends on the host (is the machine type known to this QEMU, which firmware
 * file `firmware='efi'` means) is decided by `resolveForHost` in resolve.ts.
 */
import { randomUUID } from "node:crypto";
import { DomainXmlError } from "../errors.js";
import type { DomainDef, FirmwareDef, HypervFeature, LifecycleAction } from "./model.js";
import { HV_FLAGS } from "./qemu-args.js";
import { parseDevices } from "./xml-devices.js";
import {
  attr,
  child,
  children,
  oneOf,
  parseInteger,
  parseSwitch,
  parseXml,
  requireChild,
  type XmlElement,
} from "./xml-tree.js";

export { domainToXml } from "./xml-out.js";

export interface ParsedDomain {
  def: DomainDef;
  warnings: string[];
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/;
export const UUID_RE = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;

/** libvirt's memory units, as factors to bytes. */
const UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  KB: 1e3,
  k: 1024,
  KiB: 1024,
  MB: 1e6,
  M: 1024 ** 2,
  MiB: 1024 ** 2,
  GB: 1e9,
  G: 1024 ** 3,
  GiB: 1024 ** 3,
  TB: 1e12,
  T: 1024 ** 4,
  TiB: 1024 ** 4,
};

/** Top-level elements ignored with a warning: host-side tuning that the guest does not see. */
const IGNORED_TOP = new Set([
  "resource",
  "iothreads",
  "blkiotune",
  "memtune",
  "memoryBacking",
  "numatune",
  "cputune",
  "seclabel",
  "keywrap",
  "perf",
  "idmap",
  "maxMemory",
  "vcpus",
  "iothreadids",
  "throttlegroups",
  "defaultiothread",
]);
/** Top-level elements the guest sees that nbdmig cannot give it. */
const REJECTED_TOP: Record<string, string> = {
  launchSecurity: "memory encryption (SEV/TDX) guests cannot be migrated by nbdmig; remove <launchSecurity>",
  sysinfo:
    "custom SMBIOS tables (<sysinfo>) are not supported; remove <sysinfo> (and <smbios> in <os>) to use QEMU's defaults",
  genid: "the VM generation ID (<genid>) is not supported; remove the <genid> element",
};
const KNOWN_TOP = new Set([
  "name",
  "uuid",
  "title",
  "description",
  "metadata",
  "memory",
  "currentMemory",
  "vcpu",
  "cpu",
  "os",
  "features",
  "clock",
  "pm",
  "on_poweroff",
  "on_reboot",
  "on_crash",
  "on_lockfailure",
  "devices",
]);

export function parseDomainXml(xml: string): ParsedDomain {
  const root = parseXml(xml, "domain");
  const warnings: string[] = [];
  const type = oneOf(root, "type", ["kvm", "qemu"] as const);

  const name = requireChild(root, "name").text;
  if (!NAME_RE.test(name)) {
    throw new DomainXmlError(
      "domain/name",
      `'${name}' is not a valid name; use 1-64 letters, digits, '_', '.', '+' or '-', starting with a letter or digit`,
    );
  }
  const uuidEl = child(root, "uuid");
  let uuid = uuidEl?.text ?? randomUUID();
  if (!UUID_RE.test(uuid)) throw new DomainXmlError("domain/uuid", `'${uuid}' is not a UUID`);
  uuid = normaliseUuid(uuid);

  const memoryKiB = parseMemory(requireChild(root, "memory"));
  const curEl = child(root, "currentMemory");
  const currentMemoryKiB = curEl ? parseMemory(curEl) : memoryKiB;
  if (currentMemoryKiB > memoryKiB) {
    throw new DomainXmlError("domain/currentMemory", "must not exceed <memory>");
  }

  const vcpuEl = child(root, "vcpu");
  const vcpus = vcpuEl ? parseInteger(vcpuEl.text, vcpuEl.path, 1, 255) : 1;
  if (vcpuEl && attr(vcpuEl, "current") !== undefined && attr(vcpuEl, "current") !== String(vcpus)) {
    warnings.push("domain/vcpu/@current: vCPU hotplug is not supported; all vCPUs are online");
  }
  if (vcpuEl && attr(vcpuEl, "cpuset") !== undefined)
    warnings.push("domain/vcpu/@cpuset: host CPU pinning is ignored");

  for (const el of root.children) {
    if (REJECTED_TOP[el.name]) throw new DomainXmlError(`domain/${el.name}`, REJECTED_TOP[el.name]!);
    if (IGNORED_TOP.has(el.name)) warnings.push(`domain/${el.name}: ignored (host-side tuning)`);
    else if (!KNOWN_TOP.has(el.name)) warnings.push(`domain/${el.name}: unknown element ignored`);
  }

  const lifecycle = (el: string, dflt: LifecycleAction): LifecycleAction => {
    const e = child(root, el);
    if (!e) return dflt;
    const allowed = [
      "destroy",
      "restart",
      "preserve",
      "rename-restart",
      "coredump-destroy",
      "coredump-restart",
    ] as const;
    if (!(allowed as readonly string[]).includes(e.text)) {
      throw new DomainXmlError(`domain/${el}`, `'${e.text}' is not valid; allowed: ${allowed.join(", ")}`);
    }
    return e.text as LifecycleAction;
  };

  const os = parseOs(requireChild(root, "os"), warnings);
  const onCrash = lifecycle("on_crash", "destroy");
  const onPoweroff = lifecycle("on_poweroff", "destroy");
  const onReboot = lifecycle("on_reboot", "restart");
  if (onCrash.startsWith("coredump"))
    warnings.push(
      `domain/on_crash: '${onCrash}' ${onCrash === "coredump-destroy" ? "pauses" : "restarts"} the guest; nbdmig takes no core dumps`,
    );
  if (onCrash === "rename-restart") warnings.push("domain/on_crash: 'rename-restart' is served as restart");
  if (!["destroy", "preserve"].includes(onPoweroff))
    warnings.push(`domain/on_poweroff: '${onPoweroff}' is served as destroy`);
  if (!["restart", "destroy"].includes(onReboot))
    warnings.push(`domain/on_reboot: '${onReboot}' is served as restart`);
  const partial = {
    type,
    name,
    uuid,
    title: child(root, "title")?.text,
    description: child(root, "description")?.text,
    memoryKiB,
    currentMemoryKiB,
    vcpus,
    cpu: parseCpu(child(root, "cpu"), vcpus, warnings),
    os,
    features: parseFeatures(child(root, "features"), warnings),
    clock: parseClock(child(root, "clock"), warnings),
    pm: parsePm(child(root, "pm")),
    onPoweroff,
    onReboot,
    onCrash,
  };
  const devices = parseDevices(child(root, "devices"), partial, warnings);
  const def = dropUndefined({ ...partial, ...devices } as DomainDef);
  return { def, warnings };
}

/** Removes keys whose value is undefined, so that equal definitions compare equal however they were made. */
function dropUndefined<T>(v: T): T {
  if (Array.isArray(v)) return v.map(dropUndefined) as T;
  if (v !== null && typeof v === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, x] of Object.entries(v)) if (x !== undefined) out[k] = dropUndefined(x);
    return out as T;
  }
  return v;
}

function normaliseUuid(u: string): string {
  const h = u.replace(/-/g, "").toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function parseMemory(el: XmlElement): number {
  const unit = attr(el, "unit") ?? "KiB";
  const factor = UNITS[unit];
  if (factor === undefined) {
    throw new DomainXmlError(
      `${el.path}/@unit`,
      `'${unit}' is not a unit; allowed: ${Object.keys(UNITS).join(", ")}`,
    );
  }
  if (!/^\d+$/.test(el.text)) throw new DomainXmlError(el.path, `'${el.text}' is not a whole number`);
  const kib = Math.ceil((Number(el.text) * factor) / 1024);
  if (kib < 16 * 1024) throw new DomainXmlError(el.path, `${kib} KiB is too small; give at least 16 MiB`);
  if (kib > 16 * 1024 ** 3) throw new DomainXmlError(el.path, `${kib} KiB is too large`);
  return kib;
}

function parseCpu(el: XmlElement | undefined, vcpus: number, warnings: string[]): DomainDef["cpu"] {
  if (!el) return undefined;
  if (child(el, "numa")) {
    throw new DomainXmlError(
      `${el.path}/numa`,
      "guest NUMA topology is not supported; remove the <numa> element",
    );
  }
  const mode = attr(el, "mode");
  if (mode !== undefined || child(el, "model") || child(el, "feature")) {
    warnings.push(
      `${el.path}: the CPU model is chosen by nbdmig so that every host can run the guest (KVM: host, TCG: qemu64); mode/model/features ignored`,
    );
  }
  const topo = child(el, "topology");
  if (!topo) return {};
  const n = (a: string, d: number) => {
    const v = attr(topo, a);
    return v === undefined ? d : parseInteger(v, `${topo.path}/@${a}`, 1, 255);
  };
  const t = { sockets: n("sockets", 1), dies: n("dies", 1), cores: n("cores", 1), threads: n("threads", 1) };
  if (t.sockets * t.dies * t.cores * t.threads !== vcpus) {
    throw new DomainXmlError(
      topo.path,
      `sockets × dies × cores × threads = ${t.sockets * t.dies * t.cores * t.threads}, but <vcpu> is ${vcpus}; make them agree`,
    );
  }
  return { topology: t };
}

const MACHINE_RE = /^[a-z0-9][a-z0-9._-]*$/i;

function parseOs(el: XmlElement, warnings: string[]): DomainDef["os"] {
  const typeEl = requireChild(el, "type");
  if (typeEl.text !== "hvm") {
    throw new DomainXmlError(
      typeEl.path,
      `'${typeEl.text}' is not supported; only 'hvm' guests run under QEMU/KVM`,
    );
  }
  const arch = attr(typeEl, "arch") ?? "x86_64";
  if (arch !== "x86_64")
    throw new DomainXmlError(`${typeEl.path}/@arch`, `'${arch}' is not supported; allowed: x86_64`);
  const machine = attr(typeEl, "machine");
  if (machine !== undefined && !MACHINE_RE.test(machine)) {
    throw new DomainXmlError(`${typeEl.path}/@machine`, `'${machine}' is not a machine type name`);
  }
  const boot: DomainDef["os"]["boot"] = [];
  for (const b of children(el, "boot")) boot.push(oneOf(b, "dev", ["hd", "cdrom", "network"] as const));
  if (children(el, "boot").some((b) => attr(b, "dev") === "fd"))
    throw new DomainXmlError(`${el.path}/boot`, "floppy boot is not supported");
  let bootmenu: DomainDef["os"]["bootmenu"];
  const bm = child(el, "bootmenu");
  if (bm) {
    const timeout = attr(bm, "timeout");
    bootmenu = {
      enable: parseSwitch(bm, "enable", false)!,
      timeoutMs: timeout !== undefined ? parseInteger(timeout, `${bm.path}/@timeout`, 0, 65535) : undefined,
    };
  }
  for (const c of el.children) {
    if (c.name === "smbios")
      throw new DomainXmlError(c.path, "custom SMBIOS modes are not supported; remove <smbios>");
    if (c.name === "bios" || c.name === "acpi" || c.name === "initarg" || c.name === "init")
      warnings.push(`${c.path}: ignored`);
    if (c.name === "dtb")
      throw new DomainXmlError(c.path, "a device tree is not used on x86_64; remove <dtb>");
  }
  const kernel = child(el, "kernel")?.text || undefined;
  const initrd = child(el, "initrd")?.text || undefined;
  const cmdline = child(el, "cmdline")?.text || undefined;
  if ((initrd || cmdline) && !kernel) {
    throw new DomainXmlError(`${el.path}/kernel`, "<initrd> and <cmdline> need a <kernel>");
  }
  return {
    arch,
    machine,
    kernel,
    initrd,
    cmdline,
    boot,
    bootmenu,
    firmware: parseFirmware(el),
  };
}

function parseFirmware(os: XmlElement): FirmwareDef {
  const fw: FirmwareDef = {};
  const auto = attr(os, "firmware");
  if (auto !== undefined) fw.auto = oneOf(os, "firmware", ["efi", "bios"] as const);
  const feats = child(os, "firmware");
  if (feats) {
    if (fw.auto !== "efi") {
      throw new DomainXmlError(
        feats.path,
        "<firmware> features are for <os firmware='efi'>; add it or remove them",
      );
    }
    fw.features = {};
    for (const f of children(feats, "feature")) {
      const name = attr(f, "name");
      const on = parseSwitch(f, "enabled");
      if (on === undefined) throw new DomainXmlError(`${f.path}/@enabled`, "missing; use yes or no");
      if (name === "secure-boot") fw.features.secureBoot = on;
      else if (name === "enrolled-keys") fw.features.enrolledKeys = on;
      else
        throw new DomainXmlError(
          `${f.path}/@name`,
          `firmware feature '${name ?? ""}' is not supported; allowed: secure-boot, enrolled-keys`,
        );
    }
  }
  const loader = child(os, "loader");
  if (loader) {
    const type = oneOf(loader, "type", ["pflash", "rom"] as const, "pflash");
    const secure = parseSwitch(loader, "secure", false)!;
    if (loader.text) {
      if (!loader.text.startsWith("/"))
        throw new DomainXmlError(loader.path, `'${loader.text}' must be an absolute path`);
      const format = oneOf(loader, "format", ["raw", "qcow2"] as const, "raw");
      fw.loader = {
        path: loader.text,
        readonly: parseSwitch(loader, "readonly", type === "rom")!,
        type,
        secure,
        ...(format === "qcow2" ? { format } : {}),
      };
      if (format === "qcow2" && type === "rom")
        throw new DomainXmlError(`${loader.path}/@format`, "a ROM firmware is a raw image");
      if (fw.loader.type === "pflash" && !fw.loader.readonly) {
        throw new DomainXmlError(
          `${loader.path}/@readonly`,
          "a writable firmware image is not supported; use readonly='yes' with a separate <nvram>",
        );
      }
    } else if (fw.auto === "efi") {
      // `<loader secure='yes'/>` without a path: a hint for the automatic choice, as libvirt takes it.
      if (secure) fw.features = { ...fw.features, secureBoot: fw.features?.secureBoot ?? true };
    } else {
      throw new DomainXmlError(
        loader.path,
        "<loader> needs the firmware's path (or use <os firmware='efi'>)",
      );
    }
    if (parseSwitch(loader, "stateless", false))
      throw new DomainXmlError(`${loader.path}/@stateless`, "stateless firmware is not supported");
  }
  const nvram = child(os, "nvram");
  if (nvram) {
    if (!fw.loader && fw.auto !== "efi") {
      throw new DomainXmlError(nvram.path, "<nvram> needs a <loader> (or <os firmware='efi'>)");
    }
    if (nvram.children.length > 0 || attr(nvram, "type") !== undefined) {
      throw new DomainXmlError(nvram.path, "only a local NVRAM file is supported; give its path as the text");
    }
    const template = attr(nvram, "template");
    if (nvram.text && !nvram.text.startsWith("/"))
      throw new DomainXmlError(nvram.path, `'${nvram.text}' must be an absolute path`);
    if (template !== undefined && !template.startsWith("/"))
      throw new DomainXmlError(`${nvram.path}/@template`, `'${template}' must be an absolute path`);
    const format = oneOf(nvram, "format", ["raw", "qcow2"] as const, "raw");
    const tformat = oneOf(nvram, "templateFormat", ["raw", "qcow2"] as const, format);
    if (tformat !== format)
      throw new DomainXmlError(
        `${nvram.path}/@templateFormat`,
        "the NVRAM and its template must have the same format",
      );
    if (nvram.text || template)
      fw.nvram = { path: nvram.text, template, ...(format === "qcow2" ? { format } : {}) };
  }
  if (fw.loader?.type === "rom" && fw.nvram)
    throw new DomainXmlError(nvram!.path, "a ROM firmware (<loader type='rom'>) has no NVRAM");
  return fw;
}

function parseFeatures(el: XmlElement | undefined, warnings: string[]): DomainDef["features"] {
  const f: DomainDef["features"] = { acpi: false, apic: false, pae: false };
  if (!el) return f;
  for (const c of el.children) {
    switch (c.name) {
      case "acpi":
      case "apic":
      case "pae":
        f[c.name] = true;
        break;
      case "vmport":
      case "smm": {
        const on = parseSwitch(c, "state", true)!;
        f[c.name] = on ? "on" : "off";
        break;
      }
      case "hyperv":
        f.hyperv = parseHyperv(c, warnings);
        break;
      case "kvm":
        for (const k of c.children) {
          if (k.name === "hidden") f.kvmHidden = parseSwitch(k, "state", true);
          else warnings.push(`${k.path}: ignored`);
        }
        break;
      case "vmcoreinfo":
      case "ioapic":
      case "msrs":
      case "pmu":
      case "pvspinlock":
      case "privnet":
      case "hap":
      case "viridian":
        warnings.push(`${c.path}: ignored (a host-side or hypervisor tuning)`);
        break;
      default:
        warnings.push(`${c.path}: unknown feature ignored`);
    }
  }
  return f;
}

function parseHyperv(el: XmlElement, warnings: string[]): HypervFeature[] {
  const mode = attr(el, "mode") ?? "custom";
  if (mode !== "custom") {
    throw new DomainXmlError(
      `${el.path}/@mode`,
      `hyperv mode '${mode}' is not supported (the features must be the same on every host); list them with mode='custom'`,
    );
  }
  const out: HypervFeature[] = [];
  for (const c of el.children) {
    const state = parseSwitch(c, "state", true)! ? "on" : "off";
    const value =
      c.name === "spinlocks" ? attr(c, "retries") : c.name === "vendor_id" ? attr(c, "value") : undefined;
    if (!HV_FLAGS[c.name])
      warnings.push(`${c.path}: Hyper-V feature '${c.name}' ignored (unknown to nbdmig)`);
    out.push({ name: c.name, state, ...(value !== undefined ? { value } : {}) });
    if (c.name === "stimer" && child(c, "direct"))
      out.push({
        name: "stimer-direct",
        state: parseSwitch(child(c, "direct")!, "state", true) ? "on" : "off",
      });
  }
  return out;
}

function parseClock(el: XmlElement | undefined, warnings: string[]): DomainDef["clock"] {
  if (!el) return { offset: "utc", timers: [] };
  const offset = attr(el, "offset") ?? "utc";
  if (offset !== "utc" && offset !== "localtime") {
    throw new DomainXmlError(
      `${el.path}/@offset`,
      `clock offset '${offset}' is not supported; use utc or localtime`,
    );
  }
  const timers: DomainDef["clock"]["timers"] = [];
  for (const t of children(el, "timer")) {
    const name = attr(t, "name");
    if (!name) throw new DomainXmlError(`${t.path}/@name`, "missing required attribute 'name'");
    const present = parseSwitch(t, "present");
    const tickpolicy = attr(t, "tickpolicy");
    const policies: Record<string, string[]> = { rtc: ["catchup", "delay"], pit: ["delay", "discard"] };
    if (tickpolicy !== undefined && !(policies[name] ?? []).includes(tickpolicy)) {
      throw new DomainXmlError(
        `${t.path}/@tickpolicy`,
        `tickpolicy '${tickpolicy}' is not supported for the ${name} timer${policies[name] ? `; use ${policies[name]!.join(" or ")}` : ""}`,
      );
    }
    timers.push({
      name,
      ...(present !== undefined ? { present } : {}),
      ...(tickpolicy !== undefined ? { tickpolicy } : {}),
    });
    if (!["rtc", "pit", "hpet", "kvmclock", "hypervclock"].includes(name))
      warnings.push(`${t.path}: timer '${name}' ignored`);
    if (present === false && !["hpet", "kvmclock", "hypervclock"].includes(name))
      warnings.push(`${t.path}: the ${name} timer cannot be removed; it stays`);
  }
  return { offset, timers };
}

function parsePm(el: XmlElement | undefined): DomainDef["pm"] {
  const pm: DomainDef["pm"] = {};
  if (!el) return pm;
  const mem = child(el, "suspend-to-mem");
  const disk = child(el, "suspend-to-disk");
  if (mem) pm.suspendToMem = parseSwitch(mem, "enabled");
  if (disk) pm.suspendToDisk = parseSwitch(disk, "enabled");
  return pm;
}
