/**
 * The typed domain model: the part of libvirt's domain XML that nbdmig honours. Everything the guest can see
 * is here (devices, their PCI addresses, firmware, clock, ACPI features), so that the same definition gives
 * the same hardware on every host and on both sides of a migration.
 */

export type DiskFormat = "raw" | "qcow2";
export type DiskBus = "virtio" | "scsi" | "sata" | "ide";
export type CacheMode = "default" | "none" | "writethrough" | "writeback" | "directsync" | "unsafe";

export interface IoTune {
  total_bytes_sec?: number;
  read_bytes_sec?: number;
  write_bytes_sec?: number;
  total_iops_sec?: number;
  read_iops_sec?: number;
  write_iops_sec?: number;
}

export interface BackingStore {
  type: "file" | "block";
  format: DiskFormat;
  source: string;
}

/** Where a device sits, as libvirt's `<address>` says. PCI domain is always 0. */
export type DeviceAddress =
  | { type: "pci"; bus: number; slot: number; function: number; multifunction?: boolean }
  | { type: "drive"; controller: number; bus: number; target: number; unit: number }
  | { type: "virtio-serial"; controller: number; bus: number; port: number }
  | { type: "usb"; bus: number; port: string };
export type PciAddress = Extract<DeviceAddress, { type: "pci" }>;

export interface DiskDef {
  type: "file" | "block";
  device: "disk" | "cdrom";
  format: DiskFormat;
  cache?: CacheMode;
  discard?: "unmap" | "ignore";
  detectZeroes?: "off" | "on" | "unmap";
  /** Absent for an empty cdrom drive. */
  source?: string;
  /**
   * A volume of a libvirt storage pool (`<disk type='volume'>`), until the host resolves it: a directory
   * pool's volume is the file NAME in the pool's directory, and the definition then keeps that file.
   */
  volume?: { pool: string; name: string };
  /** The backing chain below `source`, top first, as libvirt's nested <backingStore> lists it. */
  backingChain: BackingStore[];
  target: string;
  bus: DiskBus;
  readonly: boolean;
  shareable: boolean;
  serial?: string;
  bootOrder?: number;
  iotune?: IoTune;
  address?: DeviceAddress;
}

export type NicModel = "virtio" | "e1000" | "e1000e" | "rtl8139";

export interface InterfaceDef {
  /**
   * user: QEMU's user-mode network; bridge: a tap on a host bridge; network: a tap on the bridge that the
   * agent maps the libvirt network name to (`daemon --network NAME=BRIDGE`); direct: a macvtap on a host
   * link, mode bridge.
   */
  type: "user" | "bridge" | "network" | "direct";
  /** Always set: generated once (52:54:00:...) when the XML has none, and kept in the definition. */
  mac: string;
  model: NicModel;
  /** bridge: the bridge; network: the network name; direct: the host link. Absent for user. */
  source?: string;
  /**
   * The tap's (or macvtap's) name. Names libvirt generates (vnet*, macvtap*, macvlan*) are generated again
   * on every start, on whichever host; others are used as given.
   */
  targetDev?: string;
  mtu?: number;
  /** `<link state='down'/>`: the guest sees no carrier. */
  linkDown: boolean;
  bootOrder?: number;
  /** `<driver name>`: vhost (vhost-net required) or qemu (never vhost); absent: vhost when it works. */
  driver?: "vhost" | "qemu";
  /** Queue pairs (multiqueue virtio-net); 1 when absent. */
  queues?: number;
  /** `<rom bar='off'/>`: the ROM is not in a PCI BAR (but still loaded); `<rom enabled='no'/>`: no ROM at all. */
  rom?: "no-bar" | "disabled";
  address?: DeviceAddress;
}

export interface SerialDef {
  /** The character device type as written in the XML; nbdmig backs port 0 with a log file. */
  type: string;
  port: number;
}

export interface ConsoleDef {
  type: string;
  /** serial: an alias of serial port `port`; virtio: a virtconsole on a virtio-serial bus. */
  target: "serial" | "virtio";
  port: number;
}

export interface ChannelDef {
  /** unix: a socket in the agent's run directory (or the given path); spicevmc: to the SPICE server. */
  type: "unix" | "spicevmc" | "pty";
  /** The virtio-serial port's name, e.g. org.qemu.guest_agent.0. */
  name: string;
  /** For unix channels with an explicit `<source path>` outside libvirt's own channel directory. */
  path?: string;
  address?: DeviceAddress;
}

export type ControllerType = "pci" | "usb" | "scsi" | "sata" | "ide" | "virtio-serial" | "fdc";

export interface ControllerDef {
  type: ControllerType;
  index: number;
  /** pci: pci-root, pcie-root, pcie-root-port, pci-bridge, ...; usb: qemu-xhci, piix3-uhci, ...; scsi. */
  model?: string;
  /** pcie-root-port: chassis and port; pci-bridge: chassisNr. */
  chassis?: number;
  port?: number;
  chassisNr?: number;
  /** usb and virtio-serial: number of ports. */
  ports?: number;
  vectors?: number;
  /** USB companion controllers (ich9-uhci*) of an EHCI master. */
  masterStartport?: number;
  /** virtio-scsi: `<driver queues>`. */
  queues?: number;
  address?: DeviceAddress;
}

export interface VideoDef {
  model: "vga" | "virtio" | "qxl" | "bochs" | "cirrus" | "ramfb" | "none";
  /** KiB, as libvirt counts them. */
  vram?: number;
  ram?: number;
  vgamem?: number;
  heads?: number;
  primary: boolean;
  address?: DeviceAddress;
}

export interface GraphicsDef {
  type: "vnc" | "spice";
  /** Pick a free port at every start (5900 and up), on whichever host. */
  autoport: boolean;
  /** The port in use (live definition), or the fixed one (autoport off). */
  port?: number;
  listen: string;
  /** A VNC/SPICE password (`passwd`). */
  passwd?: string;
  keymap?: string;
}

export interface InputDef {
  type: "tablet" | "mouse" | "keyboard";
  bus: "usb" | "ps2" | "virtio";
  address?: DeviceAddress;
}

export interface SoundDef {
  model: "ich9" | "ich6" | "ac97";
  /** The HDA codec (`<codec type>`); duplex when absent. */
  codec?: "micro" | "output";
  address?: DeviceAddress;
}

export interface RngDef {
  backend: { model: "random"; device: string } | { model: "builtin" };
  rate?: { bytes: number; period?: number };
  address?: DeviceAddress;
}

export interface MemballoonDef {
  autodeflate?: boolean;
  freePageReporting?: boolean;
  statsPeriod?: number;
  address?: DeviceAddress;
}

export interface TpmDef {
  model: "tpm-crb" | "tpm-tis";
  version: "2.0" | "1.2";
  /** `<active_pcr_banks>`: the PCR banks a new TPM 2.0 is manufactured with (swtpm_setup's default else). */
  pcrBanks?: string[];
}

export interface WatchdogDef {
  model: "i6300esb" | "ib700" | "itco";
  action: "reset" | "shutdown" | "poweroff" | "pause" | "none" | "dump" | "inject-nmi";
  address?: DeviceAddress;
}

export interface RedirdevDef {
  address?: DeviceAddress;
}

export interface FirmwareDef {
  /** The firmware executable (OVMF_CODE...) and whether it is a pflash image or a ROM. */
  loader?: { path: string; readonly: boolean; type: "pflash" | "rom"; secure: boolean; format?: "qcow2" };
  /** The per-VM variable store, created from `template` at first start (raw unless format says qcow2). */
  nvram?: { path: string; template?: string; format?: "qcow2" };
  /** `<os firmware='efi'>`: let the host pick the loader (from QEMU's firmware descriptors). */
  auto?: "efi" | "bios";
  /** `<firmware><feature>` requirements for the automatic choice. */
  features?: { secureBoot?: boolean; enrolledKeys?: boolean };
}

export interface HypervFeature {
  name: string;
  state: "on" | "off";
  value?: string;
}

export interface DomainDef {
  /** libvirt's domain type: "kvm" asks for hardware virtualisation, "qemu" for emulation (TCG). */
  type: "kvm" | "qemu";
  name: string;
  uuid: string;
  title?: string;
  description?: string;
  memoryKiB: number;
  currentMemoryKiB: number;
  vcpus: number;
  cpu?: { topology?: { sockets: number; dies: number; cores: number; threads: number } };
  os: {
    arch: string;
    machine?: string;
    kernel?: string;
    initrd?: string;
    cmdline?: string;
    boot: ("hd" | "cdrom" | "network")[];
    bootmenu?: { enable: boolean; timeoutMs?: number };
    firmware: FirmwareDef;
  };
  features: {
    acpi: boolean;
    apic: boolean;
    pae: boolean;
    vmport?: "on" | "off";
    smm?: "on" | "off";
    hyperv?: HypervFeature[];
    kvmHidden?: boolean;
  };
  clock: {
    offset: "utc" | "localtime";
    timers: { name: string; present?: boolean; tickpolicy?: string }[];
  };
  pm: { suspendToMem?: boolean; suspendToDisk?: boolean };
  onPoweroff: LifecycleAction;
  onReboot: LifecycleAction;
  onCrash: LifecycleAction;
  disks: DiskDef[];
  controllers: ControllerDef[];
  interfaces: InterfaceDef[];
  serials: SerialDef[];
  consoles: ConsoleDef[];
  channels: ChannelDef[];
  inputs: InputDef[];
  graphics: GraphicsDef[];
  videos: VideoDef[];
  sounds: SoundDef[];
  rngs: RngDef[];
  /** Absent: `<memballoon model='none'/>` or no balloon. */
  memballoon?: MemballoonDef;
  tpm?: TpmDef;
  watchdogs: WatchdogDef[];
  panics: { model: "isa" | "hyperv" }[];
  redirdevs: RedirdevDef[];
  hubs: { address?: DeviceAddress }[];
}

export type LifecycleAction =
  "destroy" | "restart" | "preserve" | "rename-restart" | "coredump-destroy" | "coredump-restart";

/** Is this disk copied by a storage migration? Shared, read-only and source-less disks never are. */
export function isMigratableDisk(d: DiskDef): boolean {
  return d.source !== undefined && !d.readonly && !d.shareable && d.device === "disk";
}

/** Interfaces that need a tap or macvtap from the host (not user-mode networking). */
export function hostNic(i: InterfaceDef): boolean {
  return i.type !== "user";
}

/** tap/macvtap names libvirt (and nbdmig) generate; such a name is generated again on every start. */
export const GENERATED_NIC_PREFIXES = ["vnet", "macvtap", "macvlan", "vif"];
export function isGeneratedNicName(name: string): boolean {
  return GENERATED_NIC_PREFIXES.some((p) => name.startsWith(p));
}

/** The machine family: q35 or i440fx ("pc"). */
export function isQ35(def: DomainDef): boolean {
  return (def.os.machine ?? "q35").includes("q35");
}
