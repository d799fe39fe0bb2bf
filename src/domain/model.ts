/** The typed domain model: the part of libvirt's domain XML that nbdmig honours. */

export type DiskFormat = "raw" | "qcow2";
export type DiskBus = "virtio" | "scsi" | "sata";
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

export interface DiskDef {
  type: "file" | "block";
  device: "disk" | "cdrom";
  format: DiskFormat;
  cache?: CacheMode;
  discard?: "unmap" | "ignore";
  detectZeroes?: "off" | "on" | "unmap";
  /** Absent for an empty cdrom drive. */
  source?: string;
  /** The backing chain below `source`, top first, as libvirt's nested <backingStore> lists it. */
  backingChain: BackingStore[];
  target: string;
  bus: DiskBus;
  readonly: boolean;
  shareable: boolean;
  serial?: string;
  bootOrder?: number;
  iotune?: IoTune;
}

export interface InterfaceDef {
  type: "user";
  mac?: string;
  model: "virtio" | "e1000" | "e1000e" | "rtl8139";
}

export interface SerialDef {
  /** The character device type as written in the XML; nbdmig always backs port 0 with a log file. */
  type: string;
  port: number;
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
  os: {
    arch: string;
    machine?: string;
    kernel?: string;
    initrd?: string;
    cmdline?: string;
    boot: ("hd" | "cdrom" | "network")[];
  };
  features: string[];
  onPoweroff: LifecycleAction;
  onReboot: LifecycleAction;
  onCrash: LifecycleAction;
  disks: DiskDef[];
  interfaces: InterfaceDef[];
  serials: SerialDef[];
  /** Whether the XML had a <console> (virsh adds one beside the serial). */
  console: boolean;
}

export type LifecycleAction =
  "destroy" | "restart" | "preserve" | "rename-restart" | "coredump-destroy" | "coredump-restart";

/** Is this disk copied by a storage migration? Shared, read-only and source-less disks never are. */
export function isMigratableDisk(d: DiskDef): boolean {
  return d.source !== undefined && !d.readonly && !d.shareable && d.device === "disk";
}
