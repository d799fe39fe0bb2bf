/**
 * `<devices>` of a libvirt domain XML -> the device lists of DomainDef. Every device the guest can see is
 * either honoured or refused with an error naming the element and the fix; host-side settings of a device
 * (bandwidth limits, packet filters, log files) are ignored with a warning.
 */
import { DomainXmlError } from "../errors.js";
import {
  isQ35,
  type BackingStore,
  type CacheMode,
  type ChannelDef,
  type ConsoleDef,
  type ControllerDef,
  type DeviceAddress,
  type DiskBus,
  type DiskDef,
  type DiskFormat,
  type DomainDef,
  type GraphicsDef,
  type InputDef,
  type InterfaceDef,
  type IoTune,
  type MemballoonDef,
  type RngDef,
  type SerialDef,
  type SoundDef,
  type TpmDef,
  type VideoDef,
  type WatchdogDef,
} from "./model.js";
import {
  attr,
  child,
  children,
  generateMac,
  oneOf,
  parseInteger,
  parseSwitch,
  requireAttr,
  requireChild,
  type XmlElement,
} from "./xml-tree.js";

type Devices = Pick<
  DomainDef,
  | "disks"
  | "controllers"
  | "interfaces"
  | "serials"
  | "consoles"
  | "channels"
  | "inputs"
  | "graphics"
  | "videos"
  | "sounds"
  | "rngs"
  | "memballoon"
  | "tpm"
  | "watchdogs"
  | "panics"
  | "redirdevs"
  | "hubs"
>;

const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

/** Devices the guest sees that nbdmig cannot give it (or that cannot be migrated). */
const REJECTED_DEVICES: Record<string, string> = {
  hostdev: "host device passthrough cannot be live-migrated; remove the <hostdev> element",
  filesystem:
    "shared filesystems (virtiofs/9p) are not supported: their files are not migrated; remove the <filesystem> element",
  shmem: "shared memory devices cannot be migrated; remove the <shmem> element",
  smartcard: "smartcard passthrough is not supported; remove the <smartcard> element",
  memory: "memory hotplug modules are not supported; remove the <memory> device",
  iommu: "a virtual IOMMU is not supported; remove the <iommu> element",
  vsock: "vsock devices are not supported; remove the <vsock> element",
  lease: "disk leases are not supported; remove the <lease> element",
  parallel: "parallel ports are not supported; remove the <parallel> element",
  nvram: "<nvram> devices are for other architectures; remove it from <devices>",
  crypto: "virtio-crypto devices are not supported; remove the <crypto> element",
  pstore: "pstore devices are not supported; remove the <pstore> element",
};
/** Host-side elements in <devices>: nothing the guest sees. */
const IGNORED_DEVICES = new Set(["emulator", "audio", "redirfilter"]);

/** The devices, plus what libvirt adds on its own (USB controller, balloon, virtio-serial controller). */
export function parseDevices(
  el: XmlElement | undefined,
  dom: Pick<DomainDef, "os" | "name">,
  warnings: string[],
): Devices {
  const d: Devices = {
    disks: [],
    controllers: [],
    interfaces: [],
    serials: [],
    consoles: [],
    channels: [],
    inputs: [],
    graphics: [],
    videos: [],
    sounds: [],
    rngs: [],
    watchdogs: [],
    panics: [],
    redirdevs: [],
    hubs: [],
  };
  const q35 = isQ35({ os: dom.os } as DomainDef);
  let balloonSeen = false;
  for (const dev of el?.children ?? []) {
    switch (dev.name) {
      case "disk":
        d.disks.push(parseDisk(dev, warnings));
        break;
      case "controller":
        d.controllers.push(parseController(dev, warnings));
        break;
      case "interface":
        d.interfaces.push(parseInterface(dev, warnings));
        break;
      case "serial":
        d.serials.push(parseSerial(dev));
        break;
      case "console":
        d.consoles.push(parseConsole(dev));
        break;
      case "channel":
        d.channels.push(parseChannel(dev));
        break;
      case "input":
        d.inputs.push(parseInput(dev));
        break;
      case "graphics":
        d.graphics.push(parseGraphics(dev, warnings));
        break;
      case "video":
        d.videos.push(parseVideo(dev, d.videos.length === 0));
        break;
      case "sound":
        d.sounds.push(parseSound(dev));
        break;
      case "rng":
        d.rngs.push(parseRng(dev));
        break;
      case "memballoon":
        if (balloonSeen) throw new DomainXmlError(dev.path, "only one <memballoon> is allowed");
        balloonSeen = true;
        d.memballoon = parseBalloon(dev);
        break;
      case "tpm":
        if (d.tpm) throw new DomainXmlError(dev.path, "only one <tpm> is allowed");
        d.tpm = parseTpm(dev);
        break;
      case "watchdog": {
        const w = parseWatchdog(dev);
        if (w.model === "itco" && !q35)
          throw new DomainXmlError(
            `${dev.path}/@model`,
            "the iTCO watchdog is part of q35's chipset; use i6300esb on i440fx",
          );
        if (w.action === "dump")
          warnings.push(`${dev.path}/@action: 'dump' pauses the guest; nbdmig takes no core dumps`);
        d.watchdogs.push(w);
        break;
      }
      case "panic": {
        const model = oneOf(dev, "model", ["isa", "hyperv"] as const, "isa");
        d.panics.push({ model });
        break;
      }
      case "redirdev": {
        oneOf(dev, "bus", ["usb"] as const, "usb");
        const type = attr(dev, "type");
        if (type !== "spicevmc") {
          throw new DomainXmlError(
            `${dev.path}/@type`,
            `USB redirection over '${type ?? ""}' is not supported; only type='spicevmc' (through SPICE) is`,
          );
        }
        d.redirdevs.push({ address: parseAddress(dev) });
        break;
      }
      case "hub":
        oneOf(dev, "type", ["usb"] as const);
        d.hubs.push({ address: parseAddress(dev) });
        break;
      default:
        if (REJECTED_DEVICES[dev.name]) throw new DomainXmlError(dev.path, REJECTED_DEVICES[dev.name]!);
        // <emulator> names libvirt's QEMU binary; nbdmig runs its own host's, so it says nothing here.
        if (IGNORED_DEVICES.has(dev.name)) continue;
        throw new DomainXmlError(
          dev.path,
          `device <${dev.name}> is not supported; remove it (the guest would otherwise lose it silently)`,
        );
    }
  }
  numberControllers(d.controllers);
  // What libvirt adds to a definition itself, so the definition written back is what the guest gets.
  if (!balloonSeen) d.memballoon = {};
  if (!d.controllers.some((c) => c.type === "usb")) {
    d.controllers.push({ type: "usb", index: 0, model: q35 ? "qemu-xhci" : "piix3-uhci" });
  }
  const virtioSerialUsers = d.channels.length + d.consoles.filter((c) => c.target === "virtio").length;
  if (virtioSerialUsers > 0 && !d.controllers.some((c) => c.type === "virtio-serial")) {
    d.controllers.push({ type: "virtio-serial", index: 0 });
  }
  if (d.disks.some((x) => x.bus === "scsi") && !d.controllers.some((c) => c.type === "scsi")) {
    d.controllers.push({ type: "scsi", index: 0, model: "lsilogic" });
  }
  if (d.graphics.length > 0 && d.videos.length === 0) d.videos.push({ model: "vga", primary: true });
  checkVideos(d.videos);
  // <console target='serial'> is the serial port itself; without a <serial>, libvirt adds one.
  for (const c of d.consoles) {
    if (c.target === "serial" && !d.serials.some((s) => s.port === c.port))
      d.serials.push({ type: c.type, port: c.port });
  }
  checkDevices(d, q35, dom.name);
  return d;
}

// --------------------------------------------------------------------------------------------- addresses

/** `<address>`, when the device has one. PCI domains other than 0 are refused. */
export function parseAddress(dev: XmlElement): DeviceAddress | undefined {
  const a = child(dev, "address");
  if (!a) return undefined;
  const n = (name: string, max: number, dflt?: number) => {
    const v = attr(a, name);
    if (v === undefined) {
      if (dflt !== undefined) return dflt;
      throw new DomainXmlError(`${a.path}/@${name}`, `missing required attribute '${name}'`);
    }
    return parseInteger(v, `${a.path}/@${name}`, 0, max);
  };
  switch (attr(a, "type")) {
    case "pci": {
      if (n("domain", 0xffff, 0) !== 0)
        throw new DomainXmlError(`${a.path}/@domain`, "only PCI domain 0 is supported");
      const multi = parseSwitch(a, "multifunction");
      return {
        type: "pci",
        bus: n("bus", 255),
        slot: n("slot", 31),
        function: n("function", 7, 0),
        ...(multi ? { multifunction: true } : {}),
      };
    }
    case "drive":
      return {
        type: "drive",
        controller: n("controller", 31, 0),
        bus: n("bus", 31, 0),
        target: n("target", 255, 0),
        unit: n("unit", 16383, 0),
      };
    case "virtio-serial":
      return {
        type: "virtio-serial",
        controller: n("controller", 31, 0),
        bus: n("bus", 0, 0),
        port: n("port", 31),
      };
    case "usb": {
      const port = attr(a, "port");
      if (port === undefined || !/^\d+(\.\d+)*$/.test(port))
        throw new DomainXmlError(`${a.path}/@port`, `'${port ?? ""}' is not a USB port (e.g. 1 or 1.2)`);
      return { type: "usb", bus: n("bus", 31, 0), port };
    }
    case "isa":
    case "ccid":
    case undefined:
      return undefined;
    default:
      throw new DomainXmlError(`${a.path}/@type`, `address type '${attr(a, "type")}' is not supported`);
  }
}

// ------------------------------------------------------------------------------------------------ disks

function parseDisk(el: XmlElement, warnings: string[]): DiskDef {
  const declared = attr(el, "type");
  if (declared !== "file" && declared !== "block" && declared !== "volume") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `disk type '${declared ?? ""}' is not supported; allowed: file, block, volume (a directory pool's); network disks are not local storage that nbdmig can copy`,
    );
  }
  // A pool volume is a file once the host has said where the pool lives (resolve.ts).
  const type = declared === "volume" ? "file" : declared;
  if (attr(el, "device") === "floppy" || attr(el, "device") === "lun") {
    throw new DomainXmlError(
      `${el.path}/@device`,
      `device '${attr(el, "device")}' is not supported; allowed: disk, cdrom`,
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
    if (attr(driver, "queues") !== undefined)
      throw new DomainXmlError(
        `${where}/driver/@queues`,
        "multi-queue disks are not supported; remove 'queues'",
      );
    for (const a of Object.keys(driver.attrs)) {
      if (!["name", "type", "cache", "discard", "detect_zeroes"].includes(a))
        warnings.push(`${where}/driver/@${a}: ignored (host-side)`);
    }
  }
  const sourceEl = child(el, "source");
  let volume: DiskDef["volume"];
  if (declared === "volume") {
    if (!sourceEl)
      throw new DomainXmlError(`${where}/source`, "a volume disk needs <source pool='...' volume='...'/>");
    volume = { pool: requireAttr(sourceEl, "pool"), name: requireAttr(sourceEl, "volume") };
    if (volume.name.includes("/"))
      throw new DomainXmlError(`${where}/source/@volume`, `'${volume.name}' is not a volume name`);
  }
  const source =
    sourceEl && !volume ? (type === "file" ? attr(sourceEl, "file") : attr(sourceEl, "dev")) : undefined;
  if (
    !volume &&
    sourceEl &&
    source === undefined &&
    (sourceEl.children.length > 0 || Object.keys(sourceEl.attrs).length)
  )
    throw new DomainXmlError(
      `${where}/source/@${type === "file" ? "file" : "dev"}`,
      `a ${type} disk names its source in '${type === "file" ? "file" : "dev"}'`,
    );
  if (source !== undefined && !source.startsWith("/")) {
    throw new DomainXmlError(`${where}/source`, `'${source}' must be an absolute path`);
  }
  if (source === undefined && !volume && device === "disk") {
    throw new DomainXmlError(`${where}/source`, "a disk (not a cdrom) needs a <source>");
  }
  if (child(el, "encryption") || child(sourceEl ?? el, "encryption"))
    throw new DomainXmlError(`${where}/encryption`, "encrypted disks are not supported");
  if (child(el, "transient"))
    throw new DomainXmlError(`${where}/transient`, "transient disks are not supported; remove <transient/>");
  const bus = oneOf(
    targetEl,
    "bus",
    ["virtio", "scsi", "sata", "ide"] as const,
    target.startsWith("vd") ? "virtio" : target.startsWith("hd") ? "ide" : undefined,
  );
  const prefix = bus === "virtio" ? "vd" : bus === "ide" ? "hd" : "sd";
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
    volume,
    backingChain: parseBackingChain(el, where),
    target,
    bus: bus as DiskBus,
    readonly: child(el, "readonly") !== undefined || device === "cdrom",
    shareable: child(el, "shareable") !== undefined,
    serial: child(el, "serial")?.text || undefined,
    bootOrder: bootEl
      ? parseInteger(requireAttr(bootEl, "order"), `${where}/boot/@order`, 1, 999)
      : undefined,
    iotune: parseIoTune(child(el, "iotune"), where),
    address: parseAddress(el),
  };
  if (disk.address && (disk.bus === "virtio") !== (disk.address.type === "pci"))
    throw new DomainXmlError(
      `${where}/address`,
      `a ${disk.bus} disk takes ${disk.bus === "virtio" ? "a pci" : "a drive"} address`,
    );
  for (const c of el.children) {
    if (
      ["address", "alias", "driver", "source", "target", "readonly", "shareable", "serial", "boot"].includes(
        c.name,
      )
    )
      continue;
    if (["iotune", "backingStore"].includes(c.name)) continue;
    if (["blockio", "geometry", "wwn", "vendor", "product"].includes(c.name)) {
      throw new DomainXmlError(
        `${where}/${c.name}`,
        `<${c.name}> is not supported (the guest would see a different disk); remove it`,
      );
    }
    warnings.push(`${where}/${c.name}: ignored`);
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

export const IOTUNE_KEYS = [
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
    t[c.name as keyof IoTune] = parseInteger(c.text, `${where}/iotune/${c.name}`, 0, Number.MAX_SAFE_INTEGER);
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

/** sda -> 0, sdb -> 1, ..., sdz -> 25, sdaa -> 26. */
export function diskIndex(target: string): number {
  const letters = target.slice(2);
  let n = 0;
  for (const ch of letters) n = n * 26 + (ch.charCodeAt(0) - 96);
  return n - 1;
}

/** Where a SATA/IDE/SCSI disk sits: its `<address type='drive'>`, else libvirt's choice from its name. */
export function driveAddress(d: DiskDef): { controller: number; bus: number; target: number; unit: number } {
  if (d.address?.type === "drive") return d.address;
  const i = diskIndex(d.target);
  if (d.bus === "ide") return { controller: 0, bus: Math.floor(i / 2), target: 0, unit: i % 2 };
  if (d.bus === "sata") return { controller: Math.floor(i / 6), bus: 0, target: 0, unit: i % 6 };
  return { controller: 0, bus: 0, target: 0, unit: i };
}

// ------------------------------------------------------------------------------------------- controllers

const PCI_MODELS = [
  "pci-root",
  "pcie-root",
  "pcie-root-port",
  "pci-bridge",
  "dmi-to-pci-bridge",
  "pcie-to-pci-bridge",
  "pcie-switch-upstream-port",
  "pcie-switch-downstream-port",
] as const;
/** libvirt's PCI controller models and the QEMU devices they are (`<model name>` in the XML says the same). */
export const PCI_CONTROLLER_DEVICES: Record<string, string> = {
  "pcie-root-port": "pcie-root-port",
  "pci-bridge": "pci-bridge",
  "dmi-to-pci-bridge": "i82801b11-bridge",
  "pcie-to-pci-bridge": "pcie-pci-bridge",
  "pcie-switch-upstream-port": "x3130-upstream",
  "pcie-switch-downstream-port": "xio3130-downstream",
};
export const USB_MODELS = [
  "qemu-xhci",
  "nec-xhci",
  "piix3-uhci",
  "piix4-uhci",
  "ich9-ehci1",
  "ich9-uhci1",
  "ich9-uhci2",
  "ich9-uhci3",
  "pci-ohci",
  "none",
] as const;

function parseController(el: XmlElement, warnings: string[]): ControllerDef {
  const type = attr(el, "type");
  const allowed = ["pci", "usb", "scsi", "sata", "ide", "virtio-serial", "fdc"] as const;
  if (type === "ccid")
    throw new DomainXmlError(`${el.path}/@type`, "smartcard (ccid) controllers are not supported; remove it");
  if (!(allowed as readonly string[]).includes(type ?? "")) {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `controller type '${type ?? ""}' is not supported; allowed: ${allowed.join(", ")}`,
    );
  }
  const c: ControllerDef = {
    type: type as ControllerDef["type"],
    // -1: no index in the XML; numbered after all controllers are read, as libvirt does.
    index:
      attr(el, "index") === undefined ? -1 : parseInteger(attr(el, "index")!, `${el.path}/@index`, 0, 255),
  };
  const model = attr(el, "model");
  if (c.type === "pci") {
    c.model = oneOf(el, "model", PCI_MODELS);
    const m = child(el, "model");
    const expected = PCI_CONTROLLER_DEVICES;
    const name = m ? attr(m, "name") : undefined;
    if (name !== undefined && expected[c.model] !== undefined && name !== expected[c.model]) {
      throw new DomainXmlError(
        `${el.path}/model/@name`,
        `'${name}' is not supported for ${c.model}; use '${expected[c.model]}'`,
      );
    }
    const t = child(el, "target");
    if (t) {
      for (const [k, key] of [
        ["chassis", "chassis"],
        ["port", "port"],
        ["chassisNr", "chassisNr"],
      ] as const) {
        const v = attr(t, k);
        if (v !== undefined) c[key] = parseInteger(v, `${t.path}/@${k}`, 0, 255);
      }
      if (child(t, "node") || attr(t, "busNr") !== undefined)
        throw new DomainXmlError(t.path, "PCI expander buses and NUMA nodes are not supported");
      if (attr(t, "hotplug") !== undefined) warnings.push(`${t.path}/@hotplug: ignored`);
    }
  } else if (c.type === "usb") {
    if (model !== undefined) c.model = oneOf(el, "model", USB_MODELS);
    const master = child(el, "master");
    if (master)
      c.masterStartport = parseInteger(requireAttr(master, "startport"), `${master.path}/@startport`, 0, 15);
  } else if (c.type === "scsi") {
    c.model = oneOf(el, "model", ["virtio-scsi", "lsilogic"] as const, "lsilogic");
    const drv = child(el, "driver");
    if (drv && attr(drv, "queues") !== undefined)
      c.queues = parseInteger(attr(drv, "queues")!, `${drv.path}/@queues`, 1, 64);
    if (drv && attr(drv, "iothread") !== undefined)
      warnings.push(`${drv.path}/@iothread: ignored (host-side)`);
  } else if (model !== undefined && !(c.type === "sata" && model === "ahci")) {
    if (
      !(c.type === "ide" && model === "piix3") &&
      !(c.type === "virtio-serial" && model.startsWith("virtio"))
    )
      throw new DomainXmlError(
        `${el.path}/@model`,
        `model '${model}' is not supported for ${c.type} controllers`,
      );
  }
  const ports = attr(el, "ports");
  if (ports !== undefined) c.ports = parseInteger(ports, `${el.path}/@ports`, 1, 31);
  const vectors = attr(el, "vectors");
  if (vectors !== undefined) c.vectors = parseInteger(vectors, `${el.path}/@vectors`, 0, 2048);
  c.address = parseAddress(el);
  if (c.address && c.address.type !== "pci")
    throw new DomainXmlError(`${el.path}/address`, "a controller takes a pci address");
  return c;
}

/**
 * Gives controllers without an index one, as libvirt does: the PCI root is 0, other PCI controllers take
 * the next numbers in order; any other type takes its lowest free index. A root port without chassis or
 * port numbers gets its index as both, so that no two collide.
 */
function numberControllers(list: ControllerDef[]): void {
  for (const c of list.filter((x) => x.index < 0)) {
    const same = list.filter((x) => x.type === c.type && x.index >= 0).map((x) => x.index);
    if (c.type === "pci" && (c.model === "pcie-root" || c.model === "pci-root")) c.index = 0;
    else if (c.type === "pci") c.index = Math.max(0, ...same) + 1;
    else {
      let i = 0;
      while (same.includes(i)) i++;
      c.index = i;
    }
  }
  for (const c of list) {
    if (c.model === "pcie-root-port" || c.model === "pcie-switch-downstream-port") {
      c.chassis ??= c.index;
      c.port ??= c.index;
    }
  }
}

// ------------------------------------------------------------------------------------------- interfaces

function parseInterface(el: XmlElement, warnings: string[]): InterfaceDef {
  const type = attr(el, "type");
  const supported = ["user", "bridge", "network", "direct"];
  const fixes: Record<string, string> = {
    ethernet:
      "an unmanaged tap (type='ethernet') cannot be recreated on the destination; use type='bridge' with <source bridge>",
    vhostuser: "vhost-user interfaces are not supported; use type='bridge'",
    hostdev: "SR-IOV passthrough cannot be live-migrated; use type='bridge' or type='direct'",
    mcast: "socket networking is not supported; use type='bridge'",
    udp: "socket networking is not supported; use type='bridge'",
    server: "socket networking is not supported; use type='bridge'",
    client: "socket networking is not supported; use type='bridge'",
    vdpa: "vDPA interfaces are not supported; use type='bridge'",
  };
  if (!supported.includes(type ?? "")) {
    throw new DomainXmlError(
      `${el.path}/@type`,
      fixes[type ?? ""] ??
        `interface type '${type ?? ""}' is not supported; allowed: ${supported.join(", ")}`,
    );
  }
  const nic = type as InterfaceDef["type"];
  const macEl = child(el, "mac");
  const mac = macEl ? requireAttr(macEl, "address") : generateMac();
  if (!MAC_RE.test(mac)) throw new DomainXmlError(`${el.path}/mac/@address`, `'${mac}' is not a MAC address`);
  if (parseInt(mac.slice(0, 2), 16) & 1)
    throw new DomainXmlError(`${el.path}/mac/@address`, `'${mac}' is a multicast address; use a unicast one`);
  const modelEl = child(el, "model");
  const model = modelEl
    ? oneOf(modelEl, "type", ["virtio", "e1000", "e1000e", "rtl8139"] as const)
    : "virtio";
  const src = child(el, "source");
  let source: string | undefined;
  if (nic === "bridge") source = src && attr(src, "bridge");
  else if (nic === "network") source = src && attr(src, "network");
  else if (nic === "direct") {
    source = src && attr(src, "dev");
    const mode = src ? (attr(src, "mode") ?? "vepa") : "vepa";
    if (mode !== "bridge") {
      throw new DomainXmlError(
        `${el.path}/source/@mode`,
        `macvtap mode '${mode}' is not supported; use mode='bridge'`,
      );
    }
  }
  if (nic !== "user" && !source) {
    const a = { bridge: "bridge", network: "network", direct: "dev" }[nic];
    throw new DomainXmlError(
      `${el.path}/source/@${a}`,
      `a type='${nic}' interface needs <source ${a}='...'/>`,
    );
  }
  const i: InterfaceDef = { type: nic, mac: mac.toLowerCase(), model, linkDown: false };
  if (source) i.source = source;
  const target = child(el, "target");
  const dev = target && attr(target, "dev");
  if (dev !== undefined) {
    if (!/^[A-Za-z0-9_.-]{1,15}$/.test(dev))
      throw new DomainXmlError(
        `${el.path}/target/@dev`,
        `'${dev}' is not a valid interface name (at most 15 characters)`,
      );
    if (nic === "user") warnings.push(`${el.path}/target: ignored for user-mode networking`);
    else i.targetDev = dev;
  }
  const mtu = child(el, "mtu");
  if (mtu) i.mtu = parseInteger(requireAttr(mtu, "size"), `${el.path}/mtu/@size`, 68, 65535);
  const link = child(el, "link");
  if (link) i.linkDown = oneOf(link, "state", ["up", "down"] as const) === "down";
  const boot = child(el, "boot");
  if (boot) i.bootOrder = parseInteger(requireAttr(boot, "order"), `${el.path}/boot/@order`, 1, 999);
  const drv = child(el, "driver");
  if (drv) {
    const name = attr(drv, "name");
    if (name !== undefined) i.driver = oneOf(drv, "name", ["vhost", "qemu"] as const);
    const q = attr(drv, "queues");
    if (q !== undefined) {
      const n = parseInteger(q, `${el.path}/driver/@queues`, 1, 64);
      if (n > 1 && model !== "virtio")
        throw new DomainXmlError(`${el.path}/driver/@queues`, "multiqueue needs <model type='virtio'/>");
      if (n > 1) i.queues = n;
    }
    for (const a of Object.keys(drv.attrs)) {
      if (a !== "name" && a !== "queues")
        throw new DomainXmlError(
          `${el.path}/driver/@${a}`,
          `'${a}' is not supported (it changes what the guest sees); remove it`,
        );
    }
    if (drv.children.length) warnings.push(`${el.path}/driver: offload settings ignored`);
  }
  const rom = child(el, "rom");
  if (rom) {
    if (attr(rom, "file") !== undefined)
      throw new DomainXmlError(`${el.path}/rom/@file`, "a custom option ROM file is not supported");
    if (parseSwitch(rom, "enabled") === false) i.rom = "disabled";
    else if (parseSwitch(rom, "bar") === false) i.rom = "no-bar";
  }
  i.address = parseAddress(el);
  if (i.address && i.address.type !== "pci")
    throw new DomainXmlError(`${el.path}/address`, "an interface takes a pci address");
  for (const c of el.children) {
    if (c.name === "virtualport" || c.name === "vlan") {
      throw new DomainXmlError(
        `${el.path}/${c.name}`,
        `<${c.name}> (Open vSwitch or 802.1Qbh) is not supported; use a Linux bridge (type='bridge') without it`,
      );
    }
    if (c.name === "backend" && attr(c, "type") === "passt")
      throw new DomainXmlError(`${el.path}/backend`, "the passt backend is not supported");
    if (
      [
        "bandwidth",
        "filterref",
        "tune",
        "coalesce",
        "script",
        "ip",
        "route",
        "guest",
        "port",
        "teaming",
      ].includes(c.name)
    )
      warnings.push(`${el.path}/${c.name}: ignored (host-side)`);
  }
  return i;
}

// -------------------------------------------------------------------------------- serials and consoles

function parseSerial(el: XmlElement): SerialDef {
  const type = attr(el, "type") ?? "pty";
  const target = child(el, "target");
  const ttype = target ? attr(target, "type") : undefined;
  if (ttype !== undefined && ttype !== "isa-serial") {
    throw new DomainXmlError(
      `${el.path}/target/@type`,
      `serial target '${ttype}' is not supported; use isa-serial (or remove the <serial>)`,
    );
  }
  const port =
    target && attr(target, "port") !== undefined
      ? parseInteger(attr(target, "port")!, `${el.path}/target/@port`, 0, 3)
      : 0;
  return { type, port };
}

function parseConsole(el: XmlElement): ConsoleDef {
  const type = attr(el, "type") ?? "pty";
  const target = child(el, "target");
  const t = target ? oneOf(target, "type", ["serial", "virtio"] as const, "serial") : "serial";
  const port =
    target && attr(target, "port") !== undefined
      ? parseInteger(attr(target, "port")!, `${el.path}/target/@port`, 0, 30)
      : 0;
  return { type, target: t, port };
}

/** libvirt's own socket directory for channels: its paths mean nothing on another host, so ours replace them. */
const LIBVIRT_CHANNEL_DIRS = ["/var/lib/libvirt/qemu/channel/", "/run/libvirt/qemu/channel/"];

function parseChannel(el: XmlElement): ChannelDef {
  const type = attr(el, "type");
  const target = requireChild(el, "target");
  const ttype = attr(target, "type");
  if (ttype !== "virtio") {
    throw new DomainXmlError(
      `${el.path}/target/@type`,
      `channel target '${ttype ?? ""}' is not supported; only virtio channels are`,
    );
  }
  if (type !== "unix" && type !== "spicevmc" && type !== "pty") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `channel type '${type ?? ""}' is not supported; allowed: unix, spicevmc, pty`,
    );
  }
  const name = attr(target, "name") ?? (type === "spicevmc" ? "com.redhat.spice.0" : undefined);
  if (!name) throw new DomainXmlError(`${el.path}/target/@name`, "a virtio channel needs a name");
  const ch: ChannelDef = { type, name };
  const src = child(el, "source");
  const path = src && attr(src, "path");
  if (type === "unix" && path) {
    if (!path.startsWith("/"))
      throw new DomainXmlError(`${el.path}/source/@path`, `'${path}' must be an absolute path`);
    if (src && attr(src, "mode") === "connect")
      throw new DomainXmlError(`${el.path}/source/@mode`, "only mode='bind' channels are supported");
    if (!LIBVIRT_CHANNEL_DIRS.some((d) => path.startsWith(d))) ch.path = path;
  }
  ch.address = parseAddress(el);
  if (ch.address && ch.address.type !== "virtio-serial")
    throw new DomainXmlError(`${el.path}/address`, "a channel takes a virtio-serial address");
  return ch;
}

// ------------------------------------------------------------------------------- input, video, graphics

function parseInput(el: XmlElement): InputDef {
  const type = attr(el, "type");
  if (type !== "tablet" && type !== "mouse" && type !== "keyboard") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `input type '${type ?? ""}' is not supported; allowed: tablet, mouse, keyboard`,
    );
  }
  const bus = oneOf(el, "bus", ["usb", "ps2", "virtio"] as const, type === "tablet" ? "usb" : "ps2");
  if (type === "tablet" && bus === "ps2")
    throw new DomainXmlError(`${el.path}/@bus`, "a tablet is usb or virtio");
  return { type, bus, address: parseAddress(el) };
}

function parseVideo(el: XmlElement, first: boolean): VideoDef {
  const m = requireChild(el, "model");
  const type = attr(m, "type");
  const models = ["vga", "virtio", "qxl", "bochs", "cirrus", "ramfb", "none"] as const;
  if (!(models as readonly string[]).includes(type ?? "")) {
    throw new DomainXmlError(
      `${el.path}/model/@type`,
      `video model '${type ?? ""}' is not supported; allowed: ${models.join(", ")}`,
    );
  }
  const accel = child(m, "acceleration");
  if (accel && parseSwitch(accel, "accel3d", false))
    throw new DomainXmlError(
      `${el.path}/model/acceleration`,
      "3D acceleration needs a host GPU; set accel3d='no'",
    );
  const v: VideoDef = { model: type as VideoDef["model"], primary: parseSwitch(m, "primary", first)! };
  for (const k of ["vram", "ram", "vgamem", "heads"] as const) {
    const x = attr(m, k);
    if (x !== undefined) v[k] = parseInteger(x, `${el.path}/model/@${k}`, 0, 2 ** 31);
  }
  v.address = parseAddress(el);
  return v;
}

function parseGraphics(el: XmlElement, warnings: string[]): GraphicsDef {
  const type = attr(el, "type");
  if (type !== "vnc" && type !== "spice") {
    throw new DomainXmlError(
      `${el.path}/@type`,
      `graphics type '${type ?? ""}' is not supported on a headless host; use vnc or spice`,
    );
  }
  const portAttr = attr(el, "port");
  const port = portAttr !== undefined ? Number(portAttr) : -1;
  if (!Number.isInteger(port) || port < -1 || port > 65535)
    throw new DomainXmlError(`${el.path}/@port`, `'${portAttr}' is not a port`);
  const autoport = parseSwitch(el, "autoport", port === -1)! || port === -1;
  if (!autoport && port < 5900 && type === "vnc")
    throw new DomainXmlError(
      `${el.path}/@port`,
      "a fixed VNC port must be 5900 or above (display :0 and up)",
    );
  let listen = attr(el, "listen");
  for (const l of children(el, "listen")) {
    const lt = attr(l, "type") ?? "address";
    if (lt === "address") listen = attr(l, "address") ?? listen;
    else if (lt === "none") listen = "none";
    else {
      throw new DomainXmlError(
        `${l.path}/@type`,
        `listen type '${lt}' is not supported; use <listen type='address' address='...'/>`,
      );
    }
  }
  const g: GraphicsDef = { type, autoport, listen: listen ?? "127.0.0.1" };
  if (type === "spice" && g.listen === "none")
    throw new DomainXmlError(
      `${el.path}/listen`,
      "a SPICE display needs a listen address; give <listen type='address' address='127.0.0.1'/>",
    );
  if (!autoport) g.port = port;
  else if (port > 0) g.port = port;
  const pw = attr(el, "passwd");
  if (pw !== undefined) g.passwd = pw;
  const km = attr(el, "keymap");
  if (km !== undefined) g.keymap = km;
  for (const a of ["websocket", "tlsPort", "sharePolicy", "passwdValidTo", "connected", "defaultMode"]) {
    if (attr(el, a) !== undefined) warnings.push(`${el.path}/@${a}: ignored`);
  }
  for (const c of el.children) {
    if (c.name === "gl" && parseSwitch(c, "enable", false))
      throw new DomainXmlError(`${el.path}/gl`, "OpenGL needs a host GPU; set enable='no'");
  }
  return g;
}

// -------------------------------------------------------------------------------- the remaining devices

function parseSound(el: XmlElement): SoundDef {
  const model = oneOf(el, "model", ["ich9", "ich6", "ac97"] as const);
  const codecs = children(el, "codec");
  if (codecs.length > 1 || (codecs.length && model === "ac97"))
    throw new DomainXmlError(
      `${el.path}/codec`,
      "one codec, on an HDA sound card (ich6 or ich9), is supported",
    );
  const codec = codecs[0] ? oneOf(codecs[0], "type", ["duplex", "micro", "output"] as const) : "duplex";
  return {
    model,
    ...(codec !== "duplex" ? { codec } : {}),
    address: parseAddress(el),
  };
}

function parseRng(el: XmlElement): RngDef {
  oneOf(el, "model", ["virtio"] as const);
  const b = requireChild(el, "backend");
  const model = attr(b, "model");
  let backend: RngDef["backend"];
  if (model === "random") {
    const device = b.text || "/dev/urandom";
    if (device !== "/dev/urandom" && device !== "/dev/random" && device !== "/dev/hwrng")
      throw new DomainXmlError(
        `${el.path}/backend`,
        `'${device}' is not allowed; use /dev/urandom or /dev/random`,
      );
    backend = { model: "random", device };
  } else if (model === "builtin") {
    backend = { model: "builtin" };
  } else {
    throw new DomainXmlError(
      `${el.path}/backend/@model`,
      `rng backend '${model ?? ""}' is not supported; allowed: random, builtin`,
    );
  }
  const r: RngDef = { backend, address: parseAddress(el) };
  const rate = child(el, "rate");
  if (rate) {
    r.rate = { bytes: parseInteger(requireAttr(rate, "bytes"), `${rate.path}/@bytes`, 1, 2 ** 31) };
    const p = attr(rate, "period");
    if (p !== undefined) r.rate.period = parseInteger(p, `${rate.path}/@period`, 1, 2 ** 31);
  }
  return r;
}

function parseBalloon(el: XmlElement): MemballoonDef | undefined {
  const model = oneOf(el, "model", [
    "virtio",
    "none",
    "virtio-transitional",
    "virtio-non-transitional",
  ] as const);
  if (model === "none") return undefined;
  if (model !== "virtio")
    throw new DomainXmlError(`${el.path}/@model`, `'${model}' is not supported; use model='virtio'`);
  const b: MemballoonDef = {};
  const ad = parseSwitch(el, "autodeflate");
  if (ad !== undefined) b.autodeflate = ad;
  const fpr = parseSwitch(el, "freePageReporting");
  if (fpr !== undefined) b.freePageReporting = fpr;
  const stats = child(el, "stats");
  if (stats) b.statsPeriod = parseInteger(requireAttr(stats, "period"), `${stats.path}/@period`, 0, 2 ** 31);
  b.address = parseAddress(el);
  return b;
}

function parseTpm(el: XmlElement): TpmDef {
  const model = oneOf(el, "model", ["tpm-crb", "tpm-tis"] as const, "tpm-tis");
  const b = requireChild(el, "backend");
  const type = attr(b, "type");
  if (type !== "emulator") {
    throw new DomainXmlError(
      `${el.path}/backend/@type`,
      type === "passthrough"
        ? "a host TPM (passthrough) cannot be migrated; use <backend type='emulator' version='2.0'/> (swtpm)"
        : `TPM backend '${type ?? ""}' is not supported; use type='emulator'`,
    );
  }
  if (child(b, "encryption"))
    throw new DomainXmlError(`${el.path}/backend/encryption`, "encrypted TPM state is not supported");
  const version = oneOf(b, "version", ["2.0", "1.2"] as const, model === "tpm-crb" ? "2.0" : "1.2");
  if (model === "tpm-crb" && version !== "2.0")
    throw new DomainXmlError(
      `${el.path}/backend/@version`,
      "tpm-crb is a TPM 2.0 interface; use version='2.0'",
    );
  const banks = child(b, "active_pcr_banks");
  const pcrBanks = banks?.children.map((c) => c.name);
  for (const bank of pcrBanks ?? [])
    if (!["sha1", "sha256", "sha384", "sha512"].includes(bank))
      throw new DomainXmlError(
        `${el.path}/backend/active_pcr_banks/${bank}`,
        "not a PCR bank; use sha1, sha256, sha384 or sha512",
      );
  return { model, version, ...(pcrBanks?.length ? { pcrBanks } : {}) };
}

function parseWatchdog(el: XmlElement): WatchdogDef {
  return {
    model: oneOf(el, "model", ["i6300esb", "ib700", "itco"] as const),
    action: oneOf(
      el,
      "action",
      ["reset", "shutdown", "poweroff", "pause", "none", "dump", "inject-nmi"] as const,
      "reset",
    ),
    address: parseAddress(el),
  };
}

// --------------------------------------------------------------------------------------------- checks

/** One primary card, first; secondary heads exist only for qxl, virtio and vga. */
function checkVideos(videos: VideoDef[]): void {
  const primaries = videos.filter((v) => v.primary);
  if (videos.length && (primaries.length !== 1 || !videos[0]!.primary))
    throw new DomainXmlError(
      "domain/devices/video",
      "exactly one video device, the first, must be primary='yes'",
    );
  if (videos.length > 1 && videos[0]!.model === "none")
    throw new DomainXmlError(
      "domain/devices/video",
      "model='none' cannot be combined with other video devices",
    );
  for (const v of videos.slice(1)) {
    if (!["qxl", "virtio", "vga"].includes(v.model))
      throw new DomainXmlError(
        "domain/devices/video",
        `a secondary '${v.model}' card is not supported; secondary cards may be qxl, virtio or vga`,
      );
  }
}

function checkDevices(d: Devices, q35: boolean, name: string): void {
  const seen = new Set<string>();
  for (const x of d.disks) {
    if (seen.has(x.target)) {
      throw new DomainXmlError(
        `domain/devices/disk[target=${x.target}]`,
        `target '${x.target}' is used twice`,
      );
    }
    seen.add(x.target);
    if (x.bus === "ide" && q35) {
      throw new DomainXmlError(
        `domain/devices/disk[target=${x.target}]/target/@bus`,
        "a q35 machine has no IDE bus; use bus='sata' (and target dev='sdX')",
      );
    }
    const a = driveAddress(x);
    if (x.bus === "ide" && (a.bus > 1 || a.unit > 1 || a.controller > 0))
      throw new DomainXmlError(`domain/devices/disk[target=${x.target}]`, "IDE has 4 places (hda..hdd)");
    if (x.bus === "sata" && a.unit > 5)
      throw new DomainXmlError(
        `domain/devices/disk[target=${x.target}]`,
        "a SATA controller has 6 ports (units 0..5)",
      );
  }
  const drives = new Map<string, string>();
  for (const x of d.disks.filter((y) => y.bus !== "virtio")) {
    const a = driveAddress(x);
    const key = `${x.bus}:${a.controller}:${a.bus}:${a.target}:${a.unit}`;
    const other = drives.get(key);
    if (other)
      throw new DomainXmlError(
        `domain/devices/disk[target=${x.target}]`,
        `sits at the same place as ${other}`,
      );
    drives.set(key, x.target);
  }
  const pci = new Map<string, string>();
  // Every kind of device that can sit at a PCI address, each named for the error.
  const named = <T extends { address?: DeviceAddress }>(list: T[], name: (x: T, i: number) => string) =>
    list.map((x, i): [string, DeviceAddress | undefined] => [name(x, i), x.address]);
  const addrOf = [
    ...named(d.disks, (x) => `disk ${x.target}`),
    ...named(d.controllers, (x) => `controller ${x.type} ${x.index}`),
    ...named(d.interfaces, (x) => `interface ${x.mac}`),
    ...named(d.videos, (_, i) => `video ${i}`),
    ...named(d.inputs, (x, i) => `input ${i} (${x.type})`),
    ...named(d.sounds, (_, i) => `sound ${i}`),
    ...named(d.rngs, (_, i) => `rng ${i}`),
    ...named(d.watchdogs, (_, i) => `watchdog ${i}`),
    ...named(d.memballoon ? [d.memballoon] : [], () => "memballoon"),
  ];
  for (const [what, a] of addrOf) {
    if (a?.type !== "pci") continue;
    const key = `${a.bus}:${a.slot}.${a.function}`;
    const other = pci.get(key);
    if (other) {
      throw new DomainXmlError(
        `domain/devices (${what})`,
        `PCI address bus ${a.bus} slot ${a.slot} function ${a.function} is also used by ${other}`,
      );
    }
    pci.set(key, what);
  }
  const ctl = new Set<string>();
  for (const c of d.controllers) {
    if (c.type === "usb" && c.masterStartport !== undefined) continue;
    const key = `${c.type}:${c.index}`;
    if (ctl.has(key))
      throw new DomainXmlError(
        `domain/devices/controller`,
        `${c.type} controller ${c.index} is defined twice`,
      );
    ctl.add(key);
  }
  const serialPorts = new Set<number>();
  for (const s of d.serials) {
    if (serialPorts.has(s.port))
      throw new DomainXmlError("domain/devices/serial", `serial port ${s.port} is defined twice`);
    serialPorts.add(s.port);
  }
  const vsPorts = new Set<string>();
  for (const c of d.channels) {
    if (c.address?.type !== "virtio-serial") continue;
    const key = `${c.address.controller}:${c.address.port}`;
    if (vsPorts.has(key))
      throw new DomainXmlError("domain/devices/channel", `virtio-serial port ${key} is used twice`);
    vsPorts.add(key);
  }
  const names = new Set<string>();
  for (const c of d.channels) {
    if (names.has(c.name))
      throw new DomainXmlError("domain/devices/channel", `channel '${c.name}' is defined twice`);
    names.add(c.name);
  }
  if (
    d.graphics.filter((g) => g.type === "vnc").length > 1 ||
    d.graphics.filter((g) => g.type === "spice").length > 1
  )
    throw new DomainXmlError("domain/devices/graphics", "at most one VNC and one SPICE display");
  const usbNeeded = d.inputs.some((i) => i.bus === "usb") || d.redirdevs.length > 0 || d.hubs.length > 0;
  const usb = d.controllers.filter((c) => c.type === "usb");
  if (usbNeeded && usb.every((c) => c.model === "none")) {
    throw new DomainXmlError(
      "domain/devices/controller[type=usb]",
      `domain '${name}' has USB devices but its USB controller is model='none'; add a USB controller or remove them`,
    );
  }
  const macs = new Set<string>();
  for (const i of d.interfaces) {
    if (macs.has(i.mac))
      throw new DomainXmlError("domain/devices/interface", `MAC address ${i.mac} is used twice`);
    macs.add(i.mac);
  }
}
