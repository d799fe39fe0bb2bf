/** Domain XML for the writing test guest. */
export interface GuestDisk {
  target: string;
  source?: string;
  format?: "raw" | "qcow2";
  bus?: "virtio" | "scsi" | "sata";
  device?: "disk" | "cdrom";
  shareable?: boolean;
  readonly?: boolean;
  cache?: string;
  writeBps?: number;
}

export interface GuestNic {
  type: "bridge" | "network" | "direct";
  source: string;
  mac?: string;
  model?: "virtio" | "e1000" | "e1000e" | "rtl8139";
  /** The tap's name (`<target dev>`). */
  targetDev?: string;
}

export interface GuestSpec {
  name: string;
  kernel: string;
  initrd: string;
  memoryMiB?: number;
  disks: GuestDisk[];
  /** Guest write rate in MiB/s (0 = unthrottled); absent = the guest stays idle. */
  rate?: number;
  /** Limit the writer to the first N MiB of its disk. */
  span?: number;
  writeDisk?: string;
  type?: "kvm" | "qemu";
  /** Network interfaces; with `ip`, the first one gets that address and the guest serves HTTP. */
  nics?: GuestNic[];
  /** ADDR/PREFIX for the guest's first NIC (nbdmig.ip). */
  ip?: string;
  /** Boot through UEFI: the loader (default Debian's OVMF_CODE_4M.fd, no secure boot) and its NVRAM template. */
  uefi?: { loader?: string };
  /** Set this EFI variable at boot (after printing the old value). */
  efivar?: string;
  tpm?: "tpm-crb" | "tpm-tis";
  /** A display (autoport, on 127.0.0.1). */
  graphics?: "vnc" | "spice";
  /** More words for the kernel command line (which the guest's RAM then holds). */
  cmdline?: string[];
}

export function guestXml(g: GuestSpec): string {
  const cmdline = ["console=ttyS0", "quiet", "panic=-1"];
  if (g.rate !== undefined) cmdline.push(`nbdmig.rate=${g.rate}`);
  if (g.span !== undefined) cmdline.push(`nbdmig.span=${g.span}`);
  if (g.writeDisk) cmdline.push(`nbdmig.disk=${g.writeDisk}`);
  if (g.ip) cmdline.push(`nbdmig.ip=${g.ip}`);
  if (g.efivar) cmdline.push(`nbdmig.efivar=${g.efivar}`);
  cmdline.push(...(g.cmdline ?? []));
  const nics = (g.nics ?? [])
    .map((n) => {
      const src = {
        bridge: `bridge='${n.source}'`,
        network: `network='${n.source}'`,
        direct: `dev='${n.source}' mode='bridge'`,
      }[n.type];
      return `    <interface type='${n.type}'>${n.mac ? `<mac address='${n.mac}'/>` : ""}<source ${src}/>${n.targetDev ? `<target dev='${n.targetDev}'/>` : ""}<model type='${n.model ?? "virtio"}'/></interface>`;
    })
    .join("\n");
  const loader = g.uefi
    ? `\n    <loader readonly='yes' type='pflash'>${g.uefi.loader ?? "/usr/share/OVMF/OVMF_CODE_4M.fd"}</loader>\n    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'/>`
    : "";
  const tpm = g.tpm ? `\n    <tpm model='${g.tpm}'><backend type='emulator' version='2.0'/></tpm>` : "";
  const display = g.graphics
    ? `\n    <graphics type='${g.graphics}' autoport='yes' listen='127.0.0.1'/>`
    : "";
  // The guest has virtio-scsi's driver (libvirt's default SCSI controller would be an LSI one).
  const scsi = g.disks.some((d) => (d.bus ?? (d.target.startsWith("vd") ? "virtio" : "scsi")) === "scsi")
    ? "\n    <controller type='scsi' index='0' model='virtio-scsi'/>"
    : "";
  const disks = g.disks
    .map((d) => {
      const device = d.device ?? "disk";
      const lines = [`    <disk type='file' device='${device}'>`];
      lines.push(
        `      <driver name='qemu' type='${d.format ?? "qcow2"}'${d.cache ? ` cache='${d.cache}'` : ""}/>`,
      );
      if (d.source) lines.push(`      <source file='${d.source}'/>`);
      lines.push(
        `      <target dev='${d.target}' bus='${d.bus ?? (d.target.startsWith("vd") ? "virtio" : "scsi")}'/>`,
      );
      if (d.writeBps) lines.push(`      <iotune><write_bytes_sec>${d.writeBps}</write_bytes_sec></iotune>`);
      if (d.readonly) lines.push("      <readonly/>");
      if (d.shareable) lines.push("      <shareable/>");
      lines.push("    </disk>");
      return lines.join("\n");
    })
    .join("\n");
  return `<domain type='${g.type ?? "kvm"}'>
  <name>${g.name}</name>
  <memory unit='MiB'>${g.memoryMiB ?? 256}</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>${loader}
    <kernel>${g.kernel}</kernel>
    <initrd>${g.initrd}</initrd>
    <cmdline>${cmdline.join(" ")}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_reboot>destroy</on_reboot>
  <devices>
${disks}${scsi}
${nics}${tpm}${display}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
`;
}
