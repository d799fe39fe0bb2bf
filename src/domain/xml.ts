/**
 * libvirt domain XML <-> DomainDef. Accepts what `virsh dumpxml` prints for an ordinary guest: what a
 * headless QEMU can honour is honoured, what does not change the guest or the migration is ignored with a
 * warning, and what would change either is rejected with an error naming the element.
 */
import { randomUUID } from "node:crypto";
import { DomainXmlError } from "../errors.js";
import type {
  BackingStore,
  CacheMode,
  DiskBus,
  DiskDef,
  DiskFormat,
  DomainDef,
  InterfaceDef,
  IoTune,
  LifecycleAction,
  SerialDef,
} from "./model.js";
import {
  attr,
  child,
  children,
  escapeXml,
  oneOf,
  parseXml,
  requireAttr,
  requireChild,
  type XmlElement,
} from "./xml-tree.js";

export interface ParsedDomain {
  def: DomainDef;
  warnings: string[];
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$/;
const UUID_RE = /^[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}$/i;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

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

/** Top-level elements ignored with a warning: they do not change what the guest sees or what moves. */
const IGNORED_TOP = new Set([
  "cpu",
  "clock",
  "pm",
  "seclabel",
  "resource",
  "iothreads",
  "blkiotune",
  "memtune",
  "memoryBacking",
  "numatune",
  "cputune",
  "sysinfo",
  "keywrap",
  "launchSecurity",
  "perf",
  "idmap",
  "genid",
]);
const SILENT_TOP = new Set(["metadata"]);
const IGNORED_DEVICES = new Set([
  "emulator",
  "controller",
  "memballoon",
  "input",
  "graphics",
  "video",
  "channel",
  "sound",
  "audio",
  "rng",
  "redirdev",
  "watchdog",
  "panic",
  "hub",
  "parallel",
]);
/** Devices that would change what the guest sees or what migration must move. */
const REJECTED_DEVICES: Record<string, string> = {
  hostdev: "host device passthrough cannot be live-migrated; remove the <hostdev> element",
  filesystem: "shared filesystems (virtiofs/9p) are not supported; remove the <filesystem> element",
  tpm: "TPM state is not migrated by nbdmig; remove the <tpm> element",
  shmem: "shared memory devices cannot be migrated; remove the <shmem> element",
  smartcard: "smartcard passthrough is not supported; remove the <smartcard> element",
  memory: "memory hotplug modules are not supported; remove the <memory> device",
  iommu: "a virtual IOMMU is not supported; remove the <iommu> element",
  vsock: "vsock devices are not supported; remove the <vsock> element",
  lease: "disk leases are not supported; remove the <lease> element",
};

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
  if (currentMemoryKiB !== memoryKiB) {
    warnings.push("domain/currentMemory: the balloon is not used; the guest gets the full <memory>");
  }

  const vcpuEl = child(root, "vcpu");
  const vcpus = vcpuEl ? parsePositiveInt(vcpuEl.text, vcpuEl.path, 1, 255) : 1;
  if (vcpuEl && attr(vcpuEl, "current") !== undefined) {
    warnings.push("domain/vcpu/@current: vCPU hotplug is not supported; all vCPUs are online");
  }

  const os = parseOs(requireChild(root, "os"), warnings);
  const features = child(root, "features")?.children.map((c) => c.name) ?? [];

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

  const disks: DiskDef[] = [];
  const interfaces: InterfaceDef[] = [];
  const serials: SerialDef[] = [];
  let console = false;
  const devices = child(root, "devices");
  for (const dev of devices?.children ?? []) {
    if (dev.name === "disk") disks.push(parseDisk(dev, warnings));
    else if (dev.name === "interface") interfaces.push(parseInterface(dev));
    else if (dev.name === "serial") serials.push(parseSerial(dev, warnings));
    else if (dev.name === "console") console = true;
    else if (REJECTED_DEVICES[dev.name]) throw new DomainXmlError(dev.path, REJECTED_DEVICES[dev.name]!);
    else if (IGNORED_DEVICES.has(dev.name))
      warnings.push(`${dev.path}: ignored (not needed by a headless QEMU)`);
    else warnings.push(`${dev.path}: unknown device ignored`);
  }
  checkDisks(disks);
  if (serials.length > 1) warnings.push("domain/devices/serial: only the first serial port is connected");

  for (const el of root.children) {
    if (IGNORED_TOP.has(el.name)) warnings.push(`domain/${el.name}: ignored`);
    else if (
      !SILENT_TOP.has(el.name) &&
      ![
        "name",
        "uuid",
        "title",
        "description",
        "memory",
        "currentMemory",
        "vcpu",
        "os",
        "features",
        "on_poweroff",
        "on_reboot",
        "on_crash",
        "devices",
      ].includes(el.name)
    ) {
      warnings.push(`domain/${el.name}: unknown element ignored`);
    }
  }

  const def: DomainDef = {
    type,
    name,
    uuid,
    title: child(root, "title")?.text,
    description: child(root, "description")?.text,
    memoryKiB,
    currentMemoryKiB,
    vcpus,
    os,
    features,
    onPoweroff: lifecycle("on_poweroff", "destroy"),
    onReboot: lifecycle("on_reboot", "restart"),
    onCrash: lifecycle("on_crash", "destroy"),
    disks,
    interfaces,
    serials,
    console,
  };
  return { def, warnings };
}

function normaliseUuid(u: string): string {
  const h = u.replace(/-/g, "").toLowerCase();
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

function parsePositiveInt(text: string, where: string, min: number, max: number): number {
  if (!/^\d+$/.test(text)) throw new DomainXmlError(where, `'${text}' is not a whole number`);
  const n = Number(text);
  if (n < min || n > max) throw new DomainXmlError(where, `${n} is out of range (${min}..${max})`);
  return n;
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
  if (machine !== undefined && !/^(pc|q35|pc-(q35|i440fx)-[0-9.]+)$/.test(machine)) {
    throw new DomainXmlError(
      `${typeEl.path}/@machine`,
      `'${machine}' is not supported; use pc, q35, or a versioned pc-q35-X.Y / pc-i440fx-X.Y`,
    );
  }
  const loader = child(el, "loader");
  if (loader) {
    throw new DomainXmlError(
      loader.path,
      "UEFI firmware (<loader>/<nvram>) is not supported; remove them to boot with the default BIOS",
    );
  }
  const boot: DomainDef["os"]["boot"] = [];
  for (const b of children(el, "boot")) boot.push(oneOf(b, "dev", ["hd", "cdrom", "network"] as const));
  for (const c of el.children) {
    if (["bootmenu", "smbios", "bios", "acpi"].includes(c.name)) warnings.push(`${c.path}: ignored`);
  }
  const kernel = child(el, "kernel")?.text || undefined;
  const initrd = child(el, "initrd")?.text || undefined;
  const cmdline = child(el, "cmdline")?.text || undefined;
  if ((initrd || cmdline) && !kernel) {
    throw new DomainXmlError(`${el.path}/kernel`, "<initrd> and <cmdline> need a <kernel>");
  }
  return { arch, machine, kernel, initrd, cmdline, boot };
}

function parseDisk(el: XmlElement, warnings: string[]): DiskDef {
  const type = attr(el, "type");
  if (type !== "file" && type !== "block") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `disk type '${type ?? ""}' is not supported; allowed: file, block (network and volume disks cannot be copied by nbdmig)`,
    );
  }
  const device = oneOf(el, "device", ["disk", "cdrom"] as const, "disk");
  const targetEl = requireChild(el, "target");
  const target = requireAttr(targetEl, "dev");
  const where = `${el.path}[target=${target}]`;
  rebase(el, el.path, where);
  const driver = child(el, "driver");
  let format: DiskFormat = "raw";
  let cache: CacheMode | undefined;
  let discard: DiskDef["discard"];
  let detectZeroes: DiskDef["detectZeroes"];
  if (driver) {
    const name = attr(driver, "name") ?? "qemu";
    if (name !== "qemu")
      throw new DomainXmlError(`${where}/driver/@name`, `'${name}' is not supported; allowed: qemu`);
    format = oneOf(driver, "type", ["raw", "qcow2"] as const, "raw");
    cache =
      attr(driver, "cache") !== undefined
        ? oneOf(driver, "cache", [
            "default",
            "none",
            "writethrough",
            "writeback",
            "directsync",
            "unsafe",
          ] as const)
        : undefined;
    discard =
      attr(driver, "discard") !== undefined
        ? oneOf(driver, "discard", ["unmap", "ignore"] as const)
        : undefined;
    detectZeroes =
      attr(driver, "detect_zeroes") !== undefined
        ? oneOf(driver, "detect_zeroes", ["off", "on", "unmap"] as const)
        : undefined;
    for (const a of Object.keys(driver.attrs)) {
      if (!["name", "type", "cache", "discard", "detect_zeroes"].includes(a))
        warnings.push(`${where}/driver/@${a}: ignored`);
    }
  }
  const sourceEl = child(el, "source");
  const source = sourceEl ? (type === "file" ? attr(sourceEl, "file") : attr(sourceEl, "dev")) : undefined;
  if (sourceEl && source === undefined) {
    throw new DomainXmlError(
      `${where}/source/@${type === "file" ? "file" : "dev"}`,
      `a ${type} disk names its source in '${type === "file" ? "file" : "dev"}'`,
    );
  }
  if (source !== undefined && !source.startsWith("/")) {
    throw new DomainXmlError(`${where}/source`, `'${source}' must be an absolute path`);
  }
  if (source === undefined && device === "disk") {
    throw new DomainXmlError(`${where}/source`, "a disk (not a cdrom) needs a <source>");
  }
  const bus = oneOf(
    targetEl,
    "bus",
    ["virtio", "scsi", "sata"] as const,
    target.startsWith("vd") ? "virtio" : undefined,
  );
  const prefix = bus === "virtio" ? "vd" : "sd";
  if (!new RegExp(`^${prefix}[a-z]{1,2}$`).test(target)) {
    throw new DomainXmlError(
      `${where}/target/@dev`,
      `'${target}' does not fit bus '${bus}'; use ${prefix}a, ${prefix}b, ...`,
    );
  }
  if (bus === "virtio" && device === "cdrom") {
    throw new DomainXmlError(
      `${where}/target/@bus`,
      "a cdrom cannot be on the virtio bus; use bus='sata' or 'scsi'",
    );
  }
  const bootEl = child(el, "boot");
  const disk: DiskDef = {
    type,
    device,
    format,
    cache,
    discard,
    detectZeroes,
    source,
    backingChain: parseBackingChain(el, where),
    target,
    bus: bus as DiskBus,
    readonly: child(el, "readonly") !== undefined || device === "cdrom",
    shareable: child(el, "shareable") !== undefined,
    serial: child(el, "serial")?.text || undefined,
    bootOrder: bootEl
      ? parsePositiveInt(requireAttr(bootEl, "order"), `${where}/boot/@order`, 1, 999)
      : undefined,
    iotune: parseIoTune(child(el, "iotune"), where),
  };
  for (const c of el.children) {
    if (["address", "alias"].includes(c.name)) continue;
    if (
      ![
        "driver",
        "source",
        "target",
        "readonly",
        "shareable",
        "serial",
        "boot",
        "iotune",
        "backingStore",
      ].includes(c.name)
    ) {
      warnings.push(`${where}/${c.name}: ignored`);
    }
  }
  return disk;
}

/** Renames an element's path (and its children's) so errors say which disk, e.g. disk[target=vdb]. */
function rebase(el: XmlElement, from: string, to: string): void {
  el.path = to + el.path.slice(from.length);
  for (const c of el.children) rebase(c, from, to);
}

function parseBackingChain(disk: XmlElement, where: string): BackingStore[] {
  const chain: BackingStore[] = [];
  let cur = child(disk, "backingStore");
  let path = `${where}/backingStore`;
  while (cur && cur.children.length > 0) {
    const type = oneOf(cur, "type", ["file", "block"] as const);
    const fmt = child(cur, "format");
    const format = fmt ? oneOf(fmt, "type", ["raw", "qcow2"] as const) : "raw";
    const src = requireChild(cur, "source");
    const source = type === "file" ? attr(src, "file") : attr(src, "dev");
    if (!source) throw new DomainXmlError(`${path}/source`, "missing the backing file's path");
    chain.push({ type, format, source });
    cur = child(cur, "backingStore");
    path += "/backingStore";
  }
  return chain;
}

const IOTUNE_KEYS = [
  "total_bytes_sec",
  "read_bytes_sec",
  "write_bytes_sec",
  "total_iops_sec",
  "read_iops_sec",
  "write_iops_sec",
] as const;

function parseIoTune(el: XmlElement | undefined, where: string): IoTune | undefined {
  if (!el) return undefined;
  const t: IoTune = {};
  for (const c of el.children) {
    if (!(IOTUNE_KEYS as readonly string[]).includes(c.name)) {
      throw new DomainXmlError(
        `${where}/iotune/${c.name}`,
        `not supported; allowed: ${IOTUNE_KEYS.join(", ")}`,
      );
    }
    t[c.name as keyof IoTune] = parsePositiveInt(
      c.text,
      `${where}/iotune/${c.name}`,
      0,
      Number.MAX_SAFE_INTEGER,
    );
  }
  if (t.total_bytes_sec && (t.read_bytes_sec || t.write_bytes_sec)) {
    throw new DomainXmlError(
      `${where}/iotune`,
      "total_bytes_sec cannot be combined with read_bytes_sec or write_bytes_sec",
    );
  }
  if (t.total_iops_sec && (t.read_iops_sec || t.write_iops_sec)) {
    throw new DomainXmlError(
      `${where}/iotune`,
      "total_iops_sec cannot be combined with read_iops_sec or write_iops_sec",
    );
  }
  return t;
}

function checkDisks(disks: DiskDef[]): void {
  const seen = new Set<string>();
  for (const d of disks) {
    if (seen.has(d.target)) {
      throw new DomainXmlError(
        `domain/devices/disk[target=${d.target}]`,
        `target '${d.target}' is used twice`,
      );
    }
    seen.add(d.target);
  }
  const sata = disks.filter((d) => d.bus === "sata");
  for (const d of sata) {
    if (diskIndex(d.target) > 5) {
      throw new DomainXmlError(
        `domain/devices/disk[target=${d.target}]/target`,
        "SATA has 6 ports (sda..sdf)",
      );
    }
  }
}

/** sda -> 0, sdb -> 1, ..., sdz -> 25, sdaa -> 26. */
export function diskIndex(target: string): number {
  const letters = target.slice(2);
  let n = 0;
  for (const ch of letters) n = n * 26 + (ch.charCodeAt(0) - 96);
  return n - 1;
}

function parseInterface(el: XmlElement): InterfaceDef {
  const type = attr(el, "type");
  if (type !== "user") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `interface type '${type ?? ""}' is not supported; use type='user' (QEMU's user-mode network) or remove the interface`,
    );
  }
  const macEl = child(el, "mac");
  const mac = macEl ? requireAttr(macEl, "address") : undefined;
  if (mac !== undefined && !MAC_RE.test(mac))
    throw new DomainXmlError(`${el.path}/mac/@address`, `'${mac}' is not a MAC address`);
  const modelEl = child(el, "model");
  const model = modelEl
    ? oneOf(modelEl, "type", ["virtio", "e1000", "e1000e", "rtl8139"] as const)
    : "virtio";
  return { type: "user", mac: mac?.toLowerCase(), model };
}

function parseSerial(el: XmlElement, warnings: string[]): SerialDef {
  const type = attr(el, "type") ?? "pty";
  const target = child(el, "target");
  const port =
    target && attr(target, "port") !== undefined
      ? parsePositiveInt(attr(target, "port")!, `${el.path}/target/@port`, 0, 3)
      : 0;
  if (type !== "pty" && type !== "file") {
    warnings.push(`${el.path}: serial type '${type}' is served as a log file (see 'nbdmig console')`);
  }
  return { type, port };
}

// ---------------------------------------------------------------------------------------------------------

/** The domain as libvirt-style XML. */
export function domainToXml(def: DomainDef): string {
  const e = escapeXml;
  const out: string[] = [];
  out.push(`<domain type='${def.type}'>`);
  out.push(`  <name>${e(def.name)}</name>`);
  out.push(`  <uuid>${def.uuid}</uuid>`);
  if (def.title) out.push(`  <title>${e(def.title)}</title>`);
  if (def.description) out.push(`  <description>${e(def.description)}</description>`);
  out.push(`  <memory unit='KiB'>${def.memoryKiB}</memory>`);
  out.push(`  <currentMemory unit='KiB'>${def.currentMemoryKiB}</currentMemory>`);
  out.push(`  <vcpu placement='static'>${def.vcpus}</vcpu>`);
  out.push("  <os>");
  out.push(
    `    <type arch='${def.os.arch}'${def.os.machine ? ` machine='${e(def.os.machine)}'` : ""}>hvm</type>`,
  );
  if (def.os.kernel) out.push(`    <kernel>${e(def.os.kernel)}</kernel>`);
  if (def.os.initrd) out.push(`    <initrd>${e(def.os.initrd)}</initrd>`);
  if (def.os.cmdline) out.push(`    <cmdline>${e(def.os.cmdline)}</cmdline>`);
  for (const b of def.os.boot) out.push(`    <boot dev='${b}'/>`);
  out.push("  </os>");
  if (def.features.length) {
    out.push("  <features>");
    for (const f of def.features) out.push(`    <${f}/>`);
    out.push("  </features>");
  }
  out.push(`  <on_poweroff>${def.onPoweroff}</on_poweroff>`);
  out.push(`  <on_reboot>${def.onReboot}</on_reboot>`);
  out.push(`  <on_crash>${def.onCrash}</on_crash>`);
  out.push("  <devices>");
  for (const d of def.disks) out.push(...diskXml(d));
  for (const i of def.interfaces) {
    out.push("    <interface type='user'>");
    if (i.mac) out.push(`      <mac address='${i.mac}'/>`);
    out.push(`      <model type='${i.model}'/>`);
    out.push("    </interface>");
  }
  for (const s of def.serials) {
    out.push(`    <serial type='${e(s.type)}'>`);
    out.push(`      <target port='${s.port}'/>`);
    out.push("    </serial>");
  }
  if (def.console) {
    out.push(`    <console type='${e(def.serials[0]?.type ?? "pty")}'>`);
    out.push("      <target type='serial' port='0'/>");
    out.push("    </console>");
  }
  out.push("  </devices>");
  out.push("</domain>");
  return out.join("\n") + "\n";
}

function diskXml(d: DiskDef): string[] {
  const e = escapeXml;
  const out: string[] = [];
  out.push(`    <disk type='${d.type}' device='${d.device}'>`);
  let drv = `      <driver name='qemu' type='${d.format}'`;
  if (d.cache) drv += ` cache='${d.cache}'`;
  if (d.discard) drv += ` discard='${d.discard}'`;
  if (d.detectZeroes) drv += ` detect_zeroes='${d.detectZeroes}'`;
  out.push(drv + "/>");
  if (d.source !== undefined)
    out.push(`      <source ${d.type === "file" ? "file" : "dev"}='${e(d.source)}'/>`);
  let indent = "      ";
  for (const b of d.backingChain) {
    out.push(`${indent}<backingStore type='${b.type}'>`);
    out.push(`${indent}  <format type='${b.format}'/>`);
    out.push(`${indent}  <source ${b.type === "file" ? "file" : "dev"}='${e(b.source)}'/>`);
    indent += "  ";
  }
  for (let i = d.backingChain.length; i > 0; i--) {
    indent = indent.slice(2);
    out.push(`${indent}</backingStore>`);
  }
  out.push(`      <target dev='${d.target}' bus='${d.bus}'/>`);
  if (d.iotune) {
    out.push("      <iotune>");
    for (const k of IOTUNE_KEYS)
      if (d.iotune[k] !== undefined) out.push(`        <${k}>${d.iotune[k]}</${k}>`);
    out.push("      </iotune>");
  }
  if (d.bootOrder !== undefined) out.push(`      <boot order='${d.bootOrder}'/>`);
  if (d.readonly && d.device !== "cdrom") out.push("      <readonly/>");
  if (d.device === "cdrom") out.push("      <readonly/>");
  if (d.shareable) out.push("      <shareable/>");
  if (d.serial) out.push(`      <serial>${e(d.serial)}</serial>`);
  out.push("    </disk>");
  return out;
}
