/**
 * The QEMU command line for a domain: disk nodes named after the disk target, one QMP socket.
 *
 * Two disk layouts give the same node names (`vda`, `vda-storage`) and device ids (`disk-vda`):
 * - `blockdev`: `-blockdev` nodes, the device's BlockBackend anonymous (the modern way);
 * - `drive`: `-drive if=none,id=drive-vda,...`: the same nodes under a *named* BlockBackend. QEMU's
 *   in-stream block migration (7.2 and older) finds disks on the destination by that name and fails on
 *   nameless ones ("Error unknown block device"), so the agent uses this layout wherever its QEMU still
 *   has block migration (README, Architecture).
 */
import type { DiskDef, DomainDef } from "./model.js";
import { diskIndex } from "./xml.js";

export type Accel = "kvm" | "tcg";
export type DiskLayout = "blockdev" | "drive";
export const DISK_LAYOUTS: DiskLayout[] = ["blockdev", "drive"];

export interface QemuArgsOptions {
  accel: Accel;
  qmpSocket: string;
  serialLog: string;
  /** Start paused waiting for an incoming migration (`-S -incoming defer`). */
  incoming?: boolean;
  /** How disks are attached; `blockdev` when absent. */
  layout?: DiskLayout;
}

/** Node names: the format node is the target (`vda`), its protocol node `vda-storage`; device id `disk-vda`. */
export const formatNode = (target: string): string => target;
export const storageNode = (target: string): string => `${target}-storage`;
export const deviceId = (target: string): string => `disk-${target}`;
/** The named BlockBackend of the `drive` layout. */
export const driveId = (target: string): string => `drive-${target}`;

export function isQ35(def: DomainDef): boolean {
  return (def.os.machine ?? "q35").includes("q35");
}

export function buildQemuArgs(def: DomainDef, opts: QemuArgsOptions): string[] {
  const a: string[] = [];
  a.push("-name", `guest=${def.name},debug-threads=on`);
  a.push("-uuid", def.uuid);
  a.push("-machine", def.os.machine ?? "q35");
  a.push("-accel", opts.accel);
  // Both sides of a migration must present the same CPU; with TCG a fixed model keeps that true.
  a.push("-cpu", opts.accel === "kvm" ? "host,arch-capabilities=off" : "qemu64");
  a.push("-m", `size=${def.memoryKiB}k`);
  a.push("-smp", String(def.vcpus));
  a.push("-no-user-config", "-nodefaults", "-display", "none");
  a.push("-msg", "timestamp=on");
  a.push("-chardev", `socket,id=qmp,path=${opts.qmpSocket},server=on,wait=off`);
  a.push("-mon", "chardev=qmp,mode=control");
  if (def.serials.length > 0) {
    a.push("-chardev", `file,id=serial0,path=${opts.serialLog},append=on`);
    a.push("-serial", "chardev:serial0");
  }
  if (def.os.kernel) a.push("-kernel", def.os.kernel);
  if (def.os.initrd) a.push("-initrd", def.os.initrd);
  if (def.os.cmdline) a.push("-append", def.os.cmdline);
  if (def.os.boot.length > 0 && !def.disks.some((d) => d.bootOrder !== undefined)) {
    a.push("-boot", `order=${def.os.boot.map((b) => ({ hd: "c", cdrom: "d", network: "n" })[b]).join("")}`);
  }
  if (def.onReboot === "destroy") a.push("-no-reboot");

  if (def.disks.some((d) => d.bus === "scsi")) a.push("-device", "virtio-scsi-pci,id=scsi0");
  if (def.disks.some((d) => d.bus === "sata") && !isQ35(def)) a.push("-device", "ahci,id=sata0");
  for (const d of def.disks) a.push(...diskArgs(def, d, opts.layout ?? "blockdev"));

  def.interfaces.forEach((nic, i) => {
    a.push("-netdev", `user,id=net${i}`);
    const model = { virtio: "virtio-net-pci", e1000: "e1000", e1000e: "e1000e", rtl8139: "rtl8139" }[
      nic.model
    ];
    a.push("-device", `${model},netdev=net${i},id=net${i}${nic.mac ? `,mac=${nic.mac}` : ""}`);
  });
  if (opts.incoming) a.push("-S", "-incoming", "defer");
  return a;
}

function diskArgs(def: DomainDef, d: DiskDef, layout: DiskLayout): string[] {
  const a: string[] = [];
  const cache = d.cache ?? "default";
  const direct = cache === "none" || cache === "directsync";
  const writeCache = !(cache === "writethrough" || cache === "directsync");
  const noFlush = cache === "unsafe";
  if (d.source !== undefined) {
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
    if (layout === "blockdev") {
      a.push("-blockdev", JSON.stringify(storage), "-blockdev", JSON.stringify(format));
    } else {
      const opts: [string, unknown][] = [
        ["if", "none"],
        ["id", driveId(d.target)],
        ...Object.entries(format).filter(([k]) => k !== "file"),
        ...Object.entries(storage)
          .filter(([k]) => k !== "auto-read-only")
          .map(([k, v]): [string, unknown] => [`file.${k}`, v]),
      ];
      a.push("-drive", driveOpts(opts));
    }
  }
  const props: string[] = [`id=${deviceId(d.target)}`];
  if (d.source !== undefined)
    props.push(`drive=${layout === "blockdev" ? formatNode(d.target) : driveId(d.target)}`);
  if (d.device === "disk") props.push(`write-cache=${writeCache ? "on" : "off"}`);
  if (d.shareable) props.push("share-rw=on");
  if (d.serial) props.push(`serial=${d.serial}`);
  if (d.bootOrder !== undefined) props.push(`bootindex=${d.bootOrder}`);
  let driver: string;
  if (d.bus === "virtio") {
    driver = "virtio-blk-pci";
  } else if (d.bus === "scsi") {
    driver = d.device === "cdrom" ? "scsi-cd" : "scsi-hd";
    props.push("bus=scsi0.0", "channel=0", `scsi-id=${diskIndex(d.target)}`, "lun=0");
  } else {
    driver = d.device === "cdrom" ? "ide-cd" : "ide-hd";
    props.push(`bus=${isQ35(def) ? "ide" : "sata0"}.${diskIndex(d.target)}`);
  }
  a.push("-device", `${driver},${props.join(",")}`);
  return a;
}

/** `-drive` key=value options: nested objects become dotted keys, booleans on/off, commas doubled. */
function driveOpts(entries: [string, unknown][]): string {
  const out: string[] = [];
  const add = (key: string, v: unknown): void => {
    if (v !== null && typeof v === "object") {
      for (const [k, x] of Object.entries(v)) add(`${key}.${k}`, x);
    } else {
      const val = typeof v === "boolean" ? (v ? "on" : "off") : String(v);
      out.push(`${key}=${val.replaceAll(",", ",,")}`);
    }
  };
  for (const [k, v] of entries) add(k, v);
  return out.join(",");
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
