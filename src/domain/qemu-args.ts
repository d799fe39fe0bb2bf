/**
 * The QEMU command line for a domain: disk nodes named after the disk target, one QMP socket, and every
 * device the definition lists, at the PCI address it gives. The same definition gives the same command line
 * on every host, so both sides of a migration present the same hardware.
 *
 * Two disk layouts give the same node names (`vda`, `vda-storage`) and device ids (`disk-vda`):
 * - `blockdev`: `-blockdev` nodes, the device's BlockBackend anonymous (the modern way);
 * - `drive`: `-drive if=none,id=drive-vda,...`: the same nodes under a *named* BlockBackend. QEMU's
 *   in-stream block migration (7.2 and older) finds disks on the destination by that name and fails on
 *   nameless ones ("Error unknown block device"), so the agent uses this layout wherever its QEMU still
 *   has block migration (README, Architecture). The UEFI variable store follows the same layout.
 *
 * Devices are emitted in groups: everything with a fixed slot on the root bus (controllers and devices),
 * then PCI controllers without an address, then fixed slots on the other buses, then what QEMU places
 * itself, then devices on other kinds of bus (USB, SCSI, virtio-serial). QEMU places a device in the first
 * free slot when it is created, so a device with a fixed slot that came later could find it taken; and a
 * bus must exist before its devices (libvirt numbers a controller after the one it sits on).
 */
import { assert } from "../errors.js";
import {
  isQ35,
  type ControllerDef,
  type DeviceAddress,
  type DiskDef,
  type DomainDef,
  type InterfaceDef,
} from "./model.js";
import { driveAddress, PCI_CONTROLLER_DEVICES } from "./xml-devices.js";

export type Accel = "kvm" | "tcg";
export type DiskLayout = "blockdev" | "drive";
export const DISK_LAYOUTS: DiskLayout[] = ["blockdev", "drive"];

/** How QEMU gets the host side of one interface (prepared by the agent before QEMU starts). */
export type NicBackend =
  | { kind: "user" }
  | { kind: "tap"; ifname: string; vhost: boolean }
  /** A macvtap: QEMU inherits the open /dev/tapN descriptors (one per queue) at these numbers. */
  | { kind: "fds"; fds: number[]; vhostFds?: number[] };

/** Host resources the agent prepared for this start. */
export interface HostResources {
  /** One per interface, in the definition's order. */
  nics: NicBackend[];
  /** swtpm's control socket, when the domain has a TPM. */
  tpmSocket?: string;
  /** The socket path of a unix channel without a path of its own. */
  channelSocket: (name: string) => string;
  /** The log file of a virtio console. */
  consoleLog: (port: number) => string;
}

export interface QemuArgsOptions {
  accel: Accel;
  qmpSocket: string;
  serialLog: string;
  /** Start paused waiting for an incoming migration (`-S -incoming defer`). */
  incoming?: boolean;
  /** How disks are attached; `blockdev` when absent. */
  layout?: DiskLayout;
  /** Absent only for domains without host interfaces, TPM or channels (unit tests). */
  host?: HostResources;
}

/** Node names: the format node is the target (`vda`), its protocol node `vda-storage`; device id `disk-vda`. */
export const formatNode = (target: string): string => target;
export const storageNode = (target: string): string => `${target}-storage`;
export const deviceId = (target: string): string => `disk-${target}`;
/** The named BlockBackend of the `drive` layout. */
export const driveId = (target: string): string => `drive-${target}`;
/** The UEFI variable store is migrated like a disk under this name ("target"); the code is `firmware`. */
export const NVRAM_TARGET = "nvram";
export const FIRMWARE_NODE = "firmware";
/** The QEMU id of interface i (its netdev has the same id). */
export const nicId = (i: number): string => `net${i}`;

/** Ordering groups of -device arguments (see the header); a group keeps the order of insertion. */
const G_ROOT_FIXED = 0;
const G_AUTO_PCI_CONTROLLER = 1;
const G_FIXED = 2;
const G_AUTO_CONTROLLER = 3;
const G_AUTO = 4;
/** USB hubs, before the USB devices that may sit on them. */
const G_HUB = 5;
const G_CHILD = 6;

/** The group of a PCI device or controller: by its address, or `auto` when it has none. */
function slotGroup(addr: DeviceAddress | undefined, auto: number): number {
  if (addr?.type !== "pci") return auto;
  return addr.bus === 0 ? G_ROOT_FIXED : G_FIXED;
}

interface Dev {
  group: number;
  args: string[];
}

export function buildQemuArgs(def: DomainDef, opts: QemuArgsOptions): string[] {
  const q35 = isQ35(def);
  const layout = opts.layout ?? "blockdev";
  const a: string[] = [];
  const devs: Dev[] = [];
  const dev = (group: number, ...args: string[]) => devs.push({ group, args });
  const pciGroup = (addr: DeviceAddress | undefined) => slotGroup(addr, G_AUTO);

  a.push("-name", `guest=${def.name},debug-threads=on`);
  a.push("-uuid", def.uuid);
  a.push("-machine", machineArg(def, layout));
  a.push("-accel", opts.accel);
  a.push("-cpu", cpuArg(def, opts.accel));
  a.push("-m", `size=${def.memoryKiB}k`);
  const t = def.cpu?.topology;
  a.push(
    "-smp",
    t
      ? `${def.vcpus},sockets=${t.sockets},dies=${t.dies},cores=${t.cores},threads=${t.threads}`
      : String(def.vcpus),
  );
  a.push("-no-user-config", "-nodefaults", "-display", "none");
  a.push("-msg", "timestamp=on");
  a.push("-chardev", `socket,id=qmp,path=${opts.qmpSocket},server=on,wait=off`);
  a.push("-mon", "chardev=qmp,mode=control");
  a.push(...firmwareArgs(def, layout));
  a.push(...clockArgs(def, opts.accel));
  a.push(...pmArgs(def, q35));
  if (def.os.kernel) a.push("-kernel", def.os.kernel);
  if (def.os.initrd) a.push("-initrd", def.os.initrd);
  if (def.os.cmdline) a.push("-append", def.os.cmdline);
  const bootOpts: string[] = [];
  const perDevice =
    def.disks.some((d) => d.bootOrder !== undefined) || def.interfaces.some((i) => i.bootOrder !== undefined);
  if (def.os.boot.length > 0 && !perDevice)
    bootOpts.push(`order=${def.os.boot.map((b) => ({ hd: "c", cdrom: "d", network: "n" })[b]).join("")}`);
  if (def.os.bootmenu?.enable) {
    bootOpts.push("menu=on");
    if (def.os.bootmenu.timeoutMs !== undefined) bootOpts.push(`splash-time=${def.os.bootmenu.timeoutMs}`);
  }
  if (bootOpts.length) a.push("-boot", bootOpts.join(","));
  a.push(...actionArgs(def));

  // Serial ports: port 0 goes to the console log, the others exist for the guest but lead nowhere.
  for (const s of [...def.serials].sort((x, y) => x.port - y.port)) {
    const id = `charserial${s.port}`;
    a.push("-chardev", s.port === 0 ? `file,id=${id},path=${opts.serialLog},append=on` : `null,id=${id}`);
    dev(G_CHILD, "-device", `isa-serial,chardev=${id},id=serial${s.port},index=${s.port}`);
  }

  controllerDevs(def, q35, dev);
  for (const d of def.disks) a.push(...diskBlockArgs(d, layout));
  for (const d of def.disks)
    dev(d.bus === "virtio" ? pciGroup(d.address) : G_CHILD, ...diskDevice(def, d, layout));

  def.interfaces.forEach((nic, i) => {
    const backend = opts.host?.nics[i] ?? (nic.type === "user" ? { kind: "user" as const } : undefined);
    assert(backend, `interface ${i} (${nic.type}) has no host backend`);
    a.push("-netdev", netdevArg(nic, i, backend));
    dev(pciGroup(nic.address), "-device", nicDevice(def, nic, i));
  });

  def.videos.forEach((v, i) => {
    const d = videoDevice(def, v, i);
    if (d) dev(v.model === "ramfb" ? G_CHILD : pciGroup(v.address), "-device", d);
  });
  for (const g of def.graphics) a.push(...graphicsArgs(g));

  def.inputs.forEach((inp, i) => {
    if (inp.bus === "ps2") return; // the i8042 of every PC machine
    const name = { tablet: "tablet", mouse: "mouse", keyboard: "keyboard" }[inp.type];
    if (inp.bus === "virtio")
      dev(pciGroup(inp.address), "-device", `virtio-${name}-pci,id=input${i}${pciProps(def, inp.address)}`);
    else {
      const usb = { tablet: "usb-tablet", mouse: "usb-mouse", keyboard: "usb-kbd" }[inp.type];
      dev(G_CHILD, "-device", `${usb},id=input${i}${usbProps(inp.address)}`);
    }
  });

  if (def.sounds.length) {
    const spice = def.graphics.some((g) => g.type === "spice");
    a.push("-audiodev", JSON.stringify({ id: "audio1", driver: spice ? "spice" : "none" }));
  }
  def.sounds.forEach((s, i) => {
    const addr = pciProps(def, s.address);
    if (s.model === "ac97") {
      dev(pciGroup(s.address), "-device", `AC97,id=sound${i},audiodev=audio1${addr}`);
    } else {
      dev(
        pciGroup(s.address),
        "-device",
        `${s.model === "ich9" ? "ich9-intel-hda" : "intel-hda"},id=sound${i}${addr}`,
      );
      dev(
        G_CHILD,
        "-device",
        `hda-${s.codec ?? "duplex"},id=sound${i}-codec0,bus=sound${i}.0,cad=0,audiodev=audio1`,
      );
    }
  });

  // virtio-serial ports: channels, then virtio consoles.
  def.channels.forEach((c, i) => {
    const id = `charchannel${i}`;
    if (c.type === "unix") {
      const path = c.path ?? opts.host?.channelSocket(c.name);
      assert(path, `channel ${c.name} has no socket path`);
      a.push("-chardev", `socket,id=${id},path=${path},server=on,wait=off`);
    } else if (c.type === "spicevmc") {
      a.push("-chardev", `spicevmc,id=${id},name=vdagent`);
    } else {
      a.push("-chardev", `pty,id=${id}`);
    }
    const va = c.address?.type === "virtio-serial" ? c.address : undefined;
    const bus = `virtio-serial${va?.controller ?? 0}.${va?.bus ?? 0}`;
    dev(
      G_CHILD,
      "-device",
      `virtserialport,bus=${bus}${va ? `,nr=${va.port}` : ""},chardev=${id},id=channel${i},name=${c.name}`,
    );
  });
  for (const c of def.consoles.filter((x) => x.target === "virtio")) {
    const id = `charconsole${c.port}`;
    const log = opts.host?.consoleLog(c.port);
    assert(log, `virtio console ${c.port} has no log file`);
    a.push("-chardev", `file,id=${id},path=${log},append=on`);
    dev(G_CHILD, "-device", `virtconsole,bus=virtio-serial0.0,chardev=${id},id=console${c.port}`);
  }

  def.rngs.forEach((r, i) => {
    a.push(
      "-object",
      JSON.stringify(
        r.backend.model === "random"
          ? { "qom-type": "rng-random", id: `objrng${i}`, filename: r.backend.device }
          : { "qom-type": "rng-builtin", id: `objrng${i}` },
      ),
    );
    const rate = r.rate ? `,max-bytes=${r.rate.bytes},period=${r.rate.period ?? 1000}` : "";
    dev(
      pciGroup(r.address),
      "-device",
      `virtio-rng-pci,rng=objrng${i},id=rng${i}${rate}${pciProps(def, r.address)}`,
    );
  });
  if (def.memballoon) {
    const b = def.memballoon;
    let s = "virtio-balloon-pci,id=balloon0";
    if (b.autodeflate !== undefined) s += `,deflate-on-oom=${b.autodeflate ? "on" : "off"}`;
    if (b.freePageReporting !== undefined) s += `,free-page-reporting=${b.freePageReporting ? "on" : "off"}`;
    dev(pciGroup(b.address), "-device", s + pciProps(def, b.address));
  }
  if (def.tpm) {
    assert(opts.host?.tpmSocket, "a TPM needs swtpm's socket");
    a.push("-chardev", `socket,id=chrtpm,path=${opts.host.tpmSocket}`);
    a.push("-tpmdev", "emulator,id=tpm-tpm0,chardev=chrtpm");
    dev(G_CHILD, "-device", `${def.tpm.model},tpmdev=tpm-tpm0,id=tpm0`);
  }
  def.watchdogs.forEach((w, i) => {
    if (w.model === "itco") a.push("-global", "ICH9-LPC.noreboot=off");
    else if (w.model === "ib700") dev(G_CHILD, "-device", `ib700,id=watchdog${i}`);
    else dev(pciGroup(w.address), "-device", `i6300esb,id=watchdog${i}${pciProps(def, w.address)}`);
  });
  if (def.watchdogs.length) {
    const act = def.watchdogs[0]!.action;
    a.push("-watchdog-action", act === "dump" ? "pause" : act);
  }
  if (def.panics.some((p) => p.model === "isa")) dev(G_CHILD, "-device", "pvpanic,id=panic0");
  def.redirdevs.forEach((r, i) => {
    a.push("-chardev", `spicevmc,id=charredir${i},name=usbredir`);
    dev(G_CHILD, "-device", `usb-redir,chardev=charredir${i},id=redir${i}${usbProps(r.address)}`);
  });
  def.hubs.forEach((h, i) => dev(G_HUB, "-device", `usb-hub,id=hub${i}${usbProps(h.address)}`));

  for (const d of [...devs].sort((x, y) => x.group - y.group)) a.push(...d.args);
  if (opts.incoming) a.push("-S", "-incoming", "defer");
  return a;
}

function machineArg(def: DomainDef, layout: DiskLayout): string {
  const m = [def.os.machine ?? "pc", "usb=off", "dump-guest-core=off"];
  if (!def.features.acpi) m.push("acpi=off");
  if (def.features.vmport) m.push(`vmport=${def.features.vmport}`);
  const secure = def.os.firmware.loader?.secure === true;
  if (def.features.smm) m.push(`smm=${def.features.smm}`);
  else if (secure) m.push("smm=on");
  const hpet = def.clock.timers.find((t) => t.name === "hpet");
  if (hpet?.present === false) m.push("hpet=off");
  const fw = def.os.firmware;
  if (layout === "blockdev" && fw.loader?.type === "pflash") {
    m.push(`pflash0=${FIRMWARE_NODE}`);
    if (fw.nvram) m.push(`pflash1=${formatNode(NVRAM_TARGET)}`);
  }
  return m.join(",");
}

/** Hyper-V enlightenments as QEMU's CPU flags (KVM only; QEMU's TCG has none of them). */
export const HV_FLAGS: Record<string, string> = {
  relaxed: "hv-relaxed",
  vapic: "hv-vapic",
  spinlocks: "hv-spinlocks",
  vpindex: "hv-vpindex",
  runtime: "hv-runtime",
  synic: "hv-synic",
  stimer: "hv-stimer",
  "stimer-direct": "hv-stimer-direct",
  reset: "hv-reset",
  vendor_id: "hv-vendor-id",
  frequencies: "hv-frequencies",
  reenlightenment: "hv-reenlightenment",
  tlbflush: "hv-tlbflush",
  ipi: "hv-ipi",
  evmcs: "hv-evmcs",
  avic: "hv-avic",
};

function cpuArg(def: DomainDef, accel: Accel): string {
  // Both sides of a migration must present the same CPU; with TCG a fixed model keeps that true.
  if (accel === "tcg") return "qemu64";
  const flags = ["host", "arch-capabilities=off"];
  for (const h of def.features.hyperv ?? []) {
    const f = HV_FLAGS[h.name];
    if (!f || h.state !== "on") continue;
    if (h.name === "spinlocks") flags.push(`${f}=0x${Number(h.value ?? 8191).toString(16)}`);
    else if (h.name === "vendor_id") flags.push(`${f}=${h.value ?? ""}`);
    else flags.push(`${f}=on`);
  }
  if (def.clock.timers.some((t) => t.name === "hypervclock" && t.present !== false) && def.features.hyperv)
    flags.push("hv-time=on");
  if (def.panics.some((p) => p.model === "hyperv")) flags.push("hv-crash=on");
  if (def.clock.timers.some((t) => t.name === "kvmclock" && t.present === false)) flags.push("kvmclock=off");
  if (def.features.kvmHidden) flags.push("kvm=off");
  return flags.join(",");
}

/**
 * What QEMU does on poweroff, reboot and panic (`-action`), after on_poweroff, on_reboot and on_crash. A
 * panic is seen only with a panic device: destroy ends QEMU (QEMU's default, shutdown), preserve and the
 * coredump actions pause the guest (nbdmig takes no core dumps), restart leaves the panic to the guest
 * (Linux with panic=N and Windows reboot by themselves). The parser warns where these differ from libvirt.
 */
function actionArgs(def: DomainDef): string[] {
  const a: string[] = [];
  if (def.onReboot === "destroy") a.push("-no-reboot");
  if (def.onPoweroff === "preserve") a.push("-action", "shutdown=pause");
  const crash = def.onCrash;
  if (crash === "preserve" || crash === "coredump-destroy") a.push("-action", "panic=pause");
  else if (crash === "restart" || crash === "rename-restart" || crash === "coredump-restart")
    a.push("-action", "panic=none");
  return a;
}

function clockArgs(def: DomainDef, accel: Accel): string[] {
  const rtc = [`base=${def.clock.offset}`];
  if (def.clock.timers.some((t) => t.name === "rtc" && t.tickpolicy === "catchup")) rtc.push("driftfix=slew");
  const a = ["-rtc", rtc.join(",")];
  // The PIT's lost ticks are KVM's in-kernel PIT's to handle; TCG's PIT has no such policy.
  const pit = def.clock.timers.find((t) => t.name === "pit")?.tickpolicy;
  if (pit && accel === "kvm") a.push("-global", `kvm-pit.lost_tick_policy=${pit}`);
  return a;
}

function pmArgs(def: DomainDef, q35: boolean): string[] {
  const dev = q35 ? "ICH9-LPC" : "PIIX4_PM";
  const a: string[] = [];
  if (def.pm.suspendToMem !== undefined)
    a.push("-global", `${dev}.disable_s3=${def.pm.suspendToMem ? 0 : 1}`);
  if (def.pm.suspendToDisk !== undefined)
    a.push("-global", `${dev}.disable_s4=${def.pm.suspendToDisk ? 0 : 1}`);
  return a;
}

function firmwareArgs(def: DomainDef, layout: DiskLayout): string[] {
  const fw = def.os.firmware;
  const a: string[] = [];
  if (!fw.loader) return a;
  if (fw.loader.type === "rom") return ["-bios", fw.loader.path];
  const nodes: [string, string, boolean, number, string][] = [
    [FIRMWARE_NODE, fw.loader.path, true, 0, fw.loader.format ?? "raw"],
  ];
  if (fw.nvram) nodes.push([formatNode(NVRAM_TARGET), fw.nvram.path, false, 1, fw.nvram.format ?? "raw"]);
  for (const [node, file, ro, unit, fmt] of nodes) {
    if (layout === "blockdev") {
      a.push(
        "-blockdev",
        JSON.stringify({ driver: "file", filename: file, "node-name": `${node}-storage`, "read-only": ro }),
        "-blockdev",
        JSON.stringify({ driver: fmt, file: `${node}-storage`, "node-name": node, "read-only": ro }),
      );
    } else {
      // The variable store needs a named BlockBackend for in-stream migration, like the disks.
      const id = ro ? "" : `,id=${driveId(NVRAM_TARGET)}`;
      a.push(
        "-drive",
        `if=pflash,unit=${unit},format=${fmt},readonly=${ro ? "on" : "off"},file=${escapeOpt(file)}${id},node-name=${node},file.node-name=${node}-storage`,
      );
    }
  }
  if (fw.loader.secure) a.push("-global", "driver=cfi.pflash01,property=secure,value=on");
  return a;
}

// --------------------------------------------------------------------------------------------- buses

/** The QEMU id of PCI bus N: the root is pcie.0 (q35) or pci.0 (i440fx), the others libvirt's pci.N. */
function pciBus(def: DomainDef, n: number): string {
  if (n === 0) return isQ35(def) ? "pcie.0" : "pci.0";
  return `pci.${n}`;
}

/** `,bus=...,addr=...` for a device with a PCI address, else nothing (QEMU picks a slot). */
export function pciProps(def: DomainDef, addr: DeviceAddress | undefined): string {
  if (addr?.type !== "pci") return "";
  const fn = addr.function ? `.0x${addr.function.toString(16)}` : "";
  return `,bus=${pciBus(def, addr.bus)},addr=0x${addr.slot.toString(16)}${fn}${addr.multifunction ? ",multifunction=on" : ""}`;
}

function usbBus(bus: number): string {
  return bus === 0 ? "usb.0" : `usb${bus}.0`;
}

function usbProps(addr: DeviceAddress | undefined): string {
  if (addr?.type !== "usb") return ",bus=usb.0";
  return `,bus=${usbBus(addr.bus)},port=${addr.port}`;
}

const USB_DEVICES: Record<string, string> = {
  "qemu-xhci": "qemu-xhci",
  "nec-xhci": "nec-usb-xhci",
  "piix3-uhci": "piix3-usb-uhci",
  "piix4-uhci": "piix4-usb-uhci",
  "ich9-ehci1": "ich9-usb-ehci1",
  "ich9-uhci1": "ich9-usb-uhci1",
  "ich9-uhci2": "ich9-usb-uhci2",
  "ich9-uhci3": "ich9-usb-uhci3",
  "pci-ohci": "pci-ohci",
};

function controllerDevs(def: DomainDef, q35: boolean, dev: (group: number, ...args: string[]) => void): void {
  const pci = def.controllers.filter((c) => c.type === "pci").sort((x, y) => x.index - y.index);
  for (const c of pci) {
    const model = PCI_CONTROLLER_DEVICES[c.model ?? ""];
    if (!model) continue; // pci-root / pcie-root: the machine's own bus
    const p = [`${model}`];
    if (c.port !== undefined) p.push(`port=0x${c.port.toString(16)}`);
    if (c.chassis !== undefined) p.push(`chassis=${c.chassis}`);
    if (c.model === "pci-bridge") p.push(`chassis_nr=${c.chassisNr ?? c.index}`);
    p.push(`id=${pciBus(def, c.index)}`);
    dev(slotGroup(c.address, G_AUTO_PCI_CONTROLLER), "-device", p.join(",") + pciProps(def, c.address));
  }
  const grp = (c: ControllerDef) => slotGroup(c.address, G_AUTO_CONTROLLER);
  for (const c of def.controllers) {
    const addr = pciProps(def, c.address);
    switch (c.type) {
      case "usb": {
        if (c.model === "none") break;
        const model = c.model ?? (q35 ? "qemu-xhci" : "piix3-uhci");
        const id = c.index === 0 ? "usb" : `usb${c.index}`;
        let s = `${USB_DEVICES[model]!}`;
        if (c.masterStartport !== undefined) s += `,masterbus=${id}.0,firstport=${c.masterStartport}`;
        else s += `,id=${id}`;
        if (c.ports !== undefined && model.endsWith("xhci")) s += `,p2=${c.ports},p3=${c.ports}`;
        dev(grp(c), "-device", s + addr);
        break;
      }
      case "scsi": {
        const base = c.model === "virtio-scsi" ? "virtio-scsi-pci" : "lsi";
        dev(
          grp(c),
          "-device",
          `${base},id=scsi${c.index}${c.queues ? `,num_queues=${c.queues}` : ""}${addr}`,
        );
        break;
      }
      case "sata":
        // q35's own AHCI (00:1f.2) is SATA controller 0, named "ide".
        if (!(q35 && c.index === 0)) dev(grp(c), "-device", `ahci,id=sata${c.index}${addr}`);
        break;
      case "virtio-serial": {
        let s = `virtio-serial-pci,id=virtio-serial${c.index}`;
        if (c.ports !== undefined) s += `,max_ports=${c.ports}`;
        if (c.vectors !== undefined) s += `,vectors=${c.vectors}`;
        dev(grp(c), "-device", s + addr);
        break;
      }
      default:
        break; // pci (above), ide and fdc: part of the machine
    }
  }
  // A SATA disk on i440fx without a SATA controller in the XML (libvirt adds one).
  if (!q35 && def.disks.some((d) => d.bus === "sata") && !def.controllers.some((c) => c.type === "sata"))
    dev(G_AUTO_CONTROLLER, "-device", "ahci,id=sata0");
}

// --------------------------------------------------------------------------------------------- disks

function diskBlockArgs(d: DiskDef, layout: DiskLayout): string[] {
  if (d.source === undefined) return [];
  const cache = d.cache ?? "default";
  const direct = cache === "none" || cache === "directsync";
  const noFlush = cache === "unsafe";
  const storage: Record<string, unknown> = {
    driver: d.type === "block" ? "host_device" : "file",
    filename: d.source,
    "node-name": storageNode(d.target),
    "auto-read-only": true,
    discard: d.discard === "unmap" ? "unmap" : "ignore",
    cache: { direct, "no-flush": noFlush },
  };
  const format: Record<string, unknown> = {
    "node-name": formatNode(d.target),
    "read-only": d.readonly,
    driver: d.format,
    file: storageNode(d.target),
    discard: d.discard === "unmap" ? "unmap" : "ignore",
    cache: { direct, "no-flush": noFlush },
  };
  if (d.detectZeroes) format["detect-zeroes"] = d.detectZeroes;
  if (layout === "blockdev")
    return ["-blockdev", JSON.stringify(storage), "-blockdev", JSON.stringify(format)];
  const opts: [string, unknown][] = [
    ["if", "none"],
    ["id", driveId(d.target)],
    ...Object.entries(format).filter(([k]) => k !== "file"),
    ...Object.entries(storage)
      .filter(([k]) => k !== "auto-read-only")
      .map(([k, v]): [string, unknown] => [`file.${k}`, v]),
  ];
  return ["-drive", driveOpts(opts)];
}

function diskDevice(def: DomainDef, d: DiskDef, layout: DiskLayout): string[] {
  const cache = d.cache ?? "default";
  const writeCache = !(cache === "writethrough" || cache === "directsync");
  const props: string[] = [`id=${deviceId(d.target)}`];
  if (d.source !== undefined)
    props.push(`drive=${layout === "blockdev" ? formatNode(d.target) : driveId(d.target)}`);
  if (d.device === "disk") props.push(`write-cache=${writeCache ? "on" : "off"}`);
  if (d.shareable) props.push("share-rw=on");
  if (d.serial) props.push(`serial=${escapeOpt(d.serial)}`);
  if (d.bootOrder !== undefined) props.push(`bootindex=${d.bootOrder}`);
  let driver: string;
  if (d.bus === "virtio") {
    driver = "virtio-blk-pci";
    return ["-device", `${driver},${props.join(",")}${pciProps(def, d.address)}`];
  }
  const a = driveAddress(d);
  if (d.bus === "scsi") {
    driver = d.device === "cdrom" ? "scsi-cd" : "scsi-hd";
    const ctl = def.controllers.find((c) => c.type === "scsi" && c.index === a.controller);
    if (ctl?.model === "virtio-scsi")
      props.push(`bus=scsi${a.controller}.0`, `channel=${a.bus}`, `scsi-id=${a.target}`, `lun=${a.unit}`);
    else props.push(`bus=scsi${a.controller}.0`, `scsi-id=${a.unit}`);
  } else if (d.bus === "sata") {
    driver = d.device === "cdrom" ? "ide-cd" : "ide-hd";
    props.push(`bus=${isQ35(def) && a.controller === 0 ? "ide" : `sata${a.controller}`}.${a.unit}`);
  } else {
    driver = d.device === "cdrom" ? "ide-cd" : "ide-hd";
    props.push(`bus=ide.${a.bus}`, `unit=${a.unit}`);
  }
  return ["-device", `${driver},${props.join(",")}`];
}

/** `-drive` key=value options: nested objects become dotted keys, booleans on/off, commas doubled. */
function driveOpts(entries: [string, unknown][]): string {
  const out: string[] = [];
  const add = (key: string, v: unknown): void => {
    if (v !== null && typeof v === "object") {
      for (const [k, x] of Object.entries(v)) add(`${key}.${k}`, x);
    } else {
      const val = typeof v === "boolean" ? (v ? "on" : "off") : String(v);
      out.push(`${key}=${escapeOpt(val)}`);
    }
  };
  for (const [k, v] of entries) add(k, v);
  return out.join(",");
}

/** QEMU's option syntax doubles commas inside a value. */
function escapeOpt(v: string): string {
  return v.replaceAll(",", ",,");
}

// ---------------------------------------------------------------------------------------- NICs, video

const NIC_DEVICES = { virtio: "virtio-net-pci", e1000: "e1000", e1000e: "e1000e", rtl8139: "rtl8139" };

function netdevArg(nic: InterfaceDef, i: number, b: NicBackend): string {
  const id = nicId(i);
  if (b.kind === "user") return `user,id=${id}`;
  const q = nic.queues ?? 1;
  if (b.kind === "tap") {
    let s = `tap,id=${id},ifname=${b.ifname},script=no,downscript=no`;
    if (q > 1) s += `,queues=${q}`;
    return s + (b.vhost ? ",vhost=on" : ",vhost=off");
  }
  let s = `tap,id=${id},${b.fds.length > 1 ? `fds=${b.fds.join(":")}` : `fd=${b.fds[0]}`}`;
  if (b.vhostFds?.length)
    s += `,vhost=on,${b.vhostFds.length > 1 ? `vhostfds=${b.vhostFds.join(":")}` : `vhostfd=${b.vhostFds[0]}`}`;
  return s;
}

function nicDevice(def: DomainDef, nic: InterfaceDef, i: number): string {
  const p = [NIC_DEVICES[nic.model], `netdev=${nicId(i)}`, `id=${nicId(i)}`, `mac=${nic.mac}`];
  const q = nic.queues ?? 1;
  if (q > 1) p.push("mq=on", `vectors=${2 * q + 2}`);
  if (nic.mtu !== undefined && nic.model === "virtio") p.push(`host_mtu=${nic.mtu}`);
  if (nic.bootOrder !== undefined) p.push(`bootindex=${nic.bootOrder}`);
  if (nic.rom === "disabled") p.push("romfile=");
  else if (nic.rom === "no-bar") p.push("rombar=0");
  return p.join(",") + pciProps(def, nic.address);
}

function videoDevice(def: DomainDef, v: DomainDef["videos"][number], i: number): string | undefined {
  const id = `video${i}`;
  let s: string;
  switch (v.model) {
    case "none":
      return undefined;
    case "ramfb":
      return `ramfb,id=${id}`;
    case "vga":
      s = v.primary ? `VGA,id=${id}` : `secondary-vga,id=${id}`;
      if (v.vram) s += `,vgamem_mb=${Math.max(1, Math.floor(v.vram / 1024))}`;
      break;
    case "cirrus":
      assert(v.primary, "a cirrus card is always the primary one (the parser refuses others)");
      s = `cirrus-vga,id=${id}`;
      break;
    case "qxl":
      s = `${v.primary ? "qxl-vga" : "qxl"},id=${id}`;
      if (v.ram) s += `,ram_size=${v.ram * 1024}`;
      if (v.vram) s += `,vram_size=${v.vram * 1024}`;
      if (v.vgamem) s += `,vgamem_mb=${Math.max(1, Math.floor(v.vgamem / 1024))}`;
      if (v.heads) s += `,max_outputs=${v.heads}`;
      break;
    case "virtio":
      s = `${v.primary ? "virtio-vga" : "virtio-gpu-pci"},id=${id}`;
      if (v.heads) s += `,max_outputs=${v.heads}`;
      break;
    case "bochs":
      assert(v.primary, "a bochs display is always the primary one (the parser refuses others)");
      s = `bochs-display,id=${id}`;
      if (v.vram) s += `,vgamem=${v.vram * 1024}`;
      break;
  }
  return s + pciProps(def, v.address);
}

function graphicsArgs(g: DomainDef["graphics"][number]): string[] {
  assert(g.port !== undefined || g.listen === "none", `${g.type} display without a port`);
  if (g.type === "vnc") {
    const where =
      g.listen === "none"
        ? "none"
        : `${g.listen.includes(":") ? `[${g.listen}]` : g.listen}:${g.port! - 5900}`;
    const a = ["-vnc", `${where}${g.passwd !== undefined ? ",password=on" : ""}`];
    if (g.keymap) a.push("-k", g.keymap);
    return a;
  }
  const s = [`port=${g.port}`];
  if (g.listen !== "none") s.push(`addr=${g.listen}`);
  const a: string[] = [];
  if (g.passwd !== undefined) {
    a.push("-object", JSON.stringify({ "qom-type": "secret", id: "spice-password", data: g.passwd }));
    s.push("password-secret=spice-password");
  } else {
    s.push("disable-ticketing=on");
  }
  s.push("seamless-migration=on");
  a.push("-spice", s.join(","));
  return a;
}

/**
 * Arguments for `block_set_io_throttle` from a disk's <iotune>, or undefined when it has none. `qdev` is the
 * device that owns the disk's BlockBackend, as query-block reports it (for virtio-blk the `virtio-backend`
 * child of the PCI device, not the PCI device itself).
 */
export function throttleArgs(d: DiskDef, qdev: string): Record<string, unknown> | undefined {
  const t = d.iotune;
  if (!t || Object.values(t).every((v) => !v)) return undefined;
  return {
    id: qdev,
    bps: t.total_bytes_sec ?? 0,
    bps_rd: t.read_bytes_sec ?? 0,
    bps_wr: t.write_bytes_sec ?? 0,
    iops: t.total_iops_sec ?? 0,
    iops_rd: t.read_iops_sec ?? 0,
    iops_wr: t.write_iops_sec ?? 0,
  };
}
