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
}

export function guestXml(g: GuestSpec): string {
  const cmdline = ["console=ttyS0", "quiet", "panic=-1"];
  if (g.rate !== undefined) cmdline.push(`nbdmig.rate=${g.rate}`);
  if (g.span !== undefined) cmdline.push(`nbdmig.span=${g.span}`);
  if (g.writeDisk) cmdline.push(`nbdmig.disk=${g.writeDisk}`);
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
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${g.kernel}</kernel>
    <initrd>${g.initrd}</initrd>
    <cmdline>${cmdline.join(" ")}</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
${disks}
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
`;
}
