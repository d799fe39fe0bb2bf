/** DomainDef -> libvirt-style domain XML, the inverse of parseDomainXml: parsing the output gives the model back. */
import type { DeviceAddress, DiskDef, DomainDef, InterfaceDef } from "./model.js";
import { IOTUNE_KEYS } from "./xml-devices.js";
import { escapeXml as e } from "./xml-tree.js";

const hex = (n: number, w: number) => `0x${n.toString(16).padStart(w, "0")}`;

export function addressXml(a: DeviceAddress | undefined, indent: string): string[] {
  if (!a) return [];
  switch (a.type) {
    case "pci":
      return [
        `${indent}<address type='pci' domain='0x0000' bus='${hex(a.bus, 2)}' slot='${hex(a.slot, 2)}' function='${hex(a.function, 1)}'${a.multifunction ? " multifunction='on'" : ""}/>`,
      ];
    case "drive":
      return [
        `${indent}<address type='drive' controller='${a.controller}' bus='${a.bus}' target='${a.target}' unit='${a.unit}'/>`,
      ];
    case "virtio-serial":
      return [
        `${indent}<address type='virtio-serial' controller='${a.controller}' bus='${a.bus}' port='${a.port}'/>`,
      ];
    case "usb":
      return [`${indent}<address type='usb' bus='${a.bus}' port='${a.port}'/>`];
  }
}

export function domainToXml(def: DomainDef): string {
  const out: string[] = [];
  out.push(`<domain type='${def.type}'>`);
  out.push(`  <name>${e(def.name)}</name>`);
  out.push(`  <uuid>${def.uuid}</uuid>`);
  if (def.title) out.push(`  <title>${e(def.title)}</title>`);
  if (def.description) out.push(`  <description>${e(def.description)}</description>`);
  out.push(`  <memory unit='KiB'>${def.memoryKiB}</memory>`);
  out.push(`  <currentMemory unit='KiB'>${def.currentMemoryKiB}</currentMemory>`);
  out.push(`  <vcpu placement='static'>${def.vcpus}</vcpu>`);
  out.push(...osXml(def));
  out.push(...featuresXml(def));
  if (def.cpu) {
    const t = def.cpu.topology;
    out.push(
      t
        ? `  <cpu><topology sockets='${t.sockets}' dies='${t.dies}' cores='${t.cores}' threads='${t.threads}'/></cpu>`
        : "  <cpu/>",
    );
  }
  out.push(`  <clock offset='${def.clock.offset}'>`);
  for (const t of def.clock.timers) {
    let s = `    <timer name='${e(t.name)}'`;
    if (t.tickpolicy !== undefined) s += ` tickpolicy='${e(t.tickpolicy)}'`;
    if (t.present !== undefined) s += ` present='${t.present ? "yes" : "no"}'`;
    out.push(s + "/>");
  }
  out.push("  </clock>");
  out.push(`  <on_poweroff>${def.onPoweroff}</on_poweroff>`);
  out.push(`  <on_reboot>${def.onReboot}</on_reboot>`);
  out.push(`  <on_crash>${def.onCrash}</on_crash>`);
  if (def.pm.suspendToMem !== undefined || def.pm.suspendToDisk !== undefined) {
    out.push("  <pm>");
    if (def.pm.suspendToMem !== undefined)
      out.push(`    <suspend-to-mem enabled='${def.pm.suspendToMem ? "yes" : "no"}'/>`);
    if (def.pm.suspendToDisk !== undefined)
      out.push(`    <suspend-to-disk enabled='${def.pm.suspendToDisk ? "yes" : "no"}'/>`);
    out.push("  </pm>");
  }
  out.push("  <devices>");
  out.push(...devicesXml(def));
  out.push("  </devices>");
  out.push("</domain>");
  return out.join("\n") + "\n";
}

function osXml(def: DomainDef): string[] {
  const out: string[] = [];
  const fw = def.os.firmware;
  out.push(fw.auto ? `  <os firmware='${fw.auto}'>` : "  <os>");
  out.push(
    `    <type arch='${def.os.arch}'${def.os.machine ? ` machine='${e(def.os.machine)}'` : ""}>hvm</type>`,
  );
  if (fw.features && (fw.features.secureBoot !== undefined || fw.features.enrolledKeys !== undefined)) {
    out.push("    <firmware>");
    if (fw.features.enrolledKeys !== undefined)
      out.push(`      <feature enabled='${fw.features.enrolledKeys ? "yes" : "no"}' name='enrolled-keys'/>`);
    if (fw.features.secureBoot !== undefined)
      out.push(`      <feature enabled='${fw.features.secureBoot ? "yes" : "no"}' name='secure-boot'/>`);
    out.push("    </firmware>");
  }
  if (fw.loader) {
    const l = fw.loader;
    out.push(
      `    <loader readonly='${l.readonly ? "yes" : "no"}'${l.secure ? " secure='yes'" : ""} type='${l.type}'${l.format ? ` format='${l.format}'` : ""}>${e(l.path)}</loader>`,
    );
  }
  if (fw.nvram) {
    const t =
      (fw.nvram.template !== undefined ? ` template='${e(fw.nvram.template)}'` : "") +
      (fw.nvram.format ? ` format='${fw.nvram.format}' templateFormat='${fw.nvram.format}'` : "");
    out.push(fw.nvram.path ? `    <nvram${t}>${e(fw.nvram.path)}</nvram>` : `    <nvram${t}/>`);
  }
  if (def.os.kernel) out.push(`    <kernel>${e(def.os.kernel)}</kernel>`);
  if (def.os.initrd) out.push(`    <initrd>${e(def.os.initrd)}</initrd>`);
  if (def.os.cmdline) out.push(`    <cmdline>${e(def.os.cmdline)}</cmdline>`);
  for (const b of def.os.boot) out.push(`    <boot dev='${b}'/>`);
  if (def.os.bootmenu) {
    const t = def.os.bootmenu.timeoutMs !== undefined ? ` timeout='${def.os.bootmenu.timeoutMs}'` : "";
    out.push(`    <bootmenu enable='${def.os.bootmenu.enable ? "yes" : "no"}'${t}/>`);
  }
  out.push("  </os>");
  return out;
}

function featuresXml(def: DomainDef): string[] {
  const f = def.features;
  const inner: string[] = [];
  if (f.acpi) inner.push("    <acpi/>");
  if (f.apic) inner.push("    <apic/>");
  if (f.pae) inner.push("    <pae/>");
  if (f.hyperv) {
    inner.push("    <hyperv mode='custom'>");
    for (const h of f.hyperv) {
      if (h.name === "stimer-direct") continue;
      let s = `      <${h.name} state='${h.state}'`;
      if (h.name === "spinlocks" && h.value !== undefined) s += ` retries='${e(h.value)}'`;
      if (h.name === "vendor_id" && h.value !== undefined) s += ` value='${e(h.value)}'`;
      const direct = h.name === "stimer" ? f.hyperv.find((x) => x.name === "stimer-direct") : undefined;
      inner.push(direct ? `${s}>\n        <direct state='${direct.state}'/>\n      </${h.name}>` : `${s}/>`);
    }
    inner.push("    </hyperv>");
  }
  if (f.kvmHidden !== undefined) inner.push(`    <kvm><hidden state='${f.kvmHidden ? "on" : "off"}'/></kvm>`);
  if (f.vmport) inner.push(`    <vmport state='${f.vmport}'/>`);
  if (f.smm) inner.push(`    <smm state='${f.smm}'/>`);
  return inner.length ? ["  <features>", ...inner, "  </features>"] : [];
}

function devicesXml(def: DomainDef): string[] {
  const out: string[] = [];
  for (const d of def.disks) out.push(...diskXml(d));
  for (const c of def.controllers) {
    let s = `    <controller type='${c.type}' index='${c.index}'`;
    if (c.model) s += ` model='${c.model}'`;
    if (c.ports !== undefined) s += ` ports='${c.ports}'`;
    if (c.vectors !== undefined) s += ` vectors='${c.vectors}'`;
    const inner: string[] = [];
    if (c.masterStartport !== undefined) inner.push(`      <master startport='${c.masterStartport}'/>`);
    if (c.queues !== undefined) inner.push(`      <driver queues='${c.queues}'/>`);
    const t: string[] = [];
    if (c.chassis !== undefined) t.push(`chassis='${c.chassis}'`);
    if (c.port !== undefined) t.push(`port='${hex(c.port, 1)}'`);
    if (c.chassisNr !== undefined) t.push(`chassisNr='${c.chassisNr}'`);
    if (t.length) inner.push(`      <target ${t.join(" ")}/>`);
    inner.push(...addressXml(c.address, "      "));
    out.push(inner.length ? `${s}>\n${inner.join("\n")}\n    </controller>` : `${s}/>`);
  }
  for (const i of def.interfaces) out.push(...interfaceXml(i));
  for (const s of def.serials) {
    out.push(`    <serial type='${e(s.type)}'>`);
    out.push(`      <target type='isa-serial' port='${s.port}'/>`);
    out.push("    </serial>");
  }
  for (const c of def.consoles) {
    out.push(`    <console type='${e(c.type)}'>`);
    out.push(`      <target type='${c.target}' port='${c.port}'/>`);
    out.push("    </console>");
  }
  for (const c of def.channels) {
    out.push(`    <channel type='${c.type}'>`);
    if (c.path) out.push(`      <source mode='bind' path='${e(c.path)}'/>`);
    out.push(`      <target type='virtio' name='${e(c.name)}'/>`);
    out.push(...addressXml(c.address, "      "));
    out.push("    </channel>");
  }
  for (const i of def.inputs) {
    const a = addressXml(i.address, "      ");
    const s = `    <input type='${i.type}' bus='${i.bus}'`;
    out.push(a.length ? `${s}>\n${a.join("\n")}\n    </input>` : `${s}/>`);
  }
  for (const g of def.graphics) {
    let s = `    <graphics type='${g.type}' port='${g.port ?? -1}' autoport='${g.autoport ? "yes" : "no"}'`;
    if (g.listen !== "none") s += ` listen='${e(g.listen)}'`;
    if (g.passwd !== undefined) s += ` passwd='${e(g.passwd)}'`;
    if (g.keymap !== undefined) s += ` keymap='${e(g.keymap)}'`;
    out.push(
      g.listen === "none"
        ? `${s}>\n      <listen type='none'/>\n    </graphics>`
        : `${s}>\n      <listen type='address' address='${e(g.listen)}'/>\n    </graphics>`,
    );
  }
  for (const v of def.videos) {
    let s = `      <model type='${v.model}'`;
    for (const k of ["ram", "vram", "vgamem", "heads"] as const)
      if (v[k] !== undefined) s += ` ${k}='${v[k]}'`;
    s += ` primary='${v.primary ? "yes" : "no"}'/>`;
    out.push("    <video>", s, ...addressXml(v.address, "      "), "    </video>");
  }
  for (const snd of def.sounds) {
    const inner = [
      ...(snd.codec ? [`      <codec type='${snd.codec}'/>`] : []),
      ...addressXml(snd.address, "      "),
    ];
    out.push(
      inner.length
        ? `    <sound model='${snd.model}'>\n${inner.join("\n")}\n    </sound>`
        : `    <sound model='${snd.model}'/>`,
    );
  }
  if (def.tpm) {
    out.push(`    <tpm model='${def.tpm.model}'>`);
    const banks = def.tpm.pcrBanks?.map((b) => `<${b}/>`).join("");
    out.push(
      banks
        ? `      <backend type='emulator' version='${def.tpm.version}'><active_pcr_banks>${banks}</active_pcr_banks></backend>`
        : `      <backend type='emulator' version='${def.tpm.version}'/>`,
    );
    out.push("    </tpm>");
  }
  for (const r of def.redirdevs) {
    const a = addressXml(r.address, "      ");
    out.push(
      a.length
        ? `    <redirdev bus='usb' type='spicevmc'>\n${a.join("\n")}\n    </redirdev>`
        : "    <redirdev bus='usb' type='spicevmc'/>",
    );
  }
  for (const h of def.hubs) {
    const a = addressXml(h.address, "      ");
    out.push(a.length ? `    <hub type='usb'>\n${a.join("\n")}\n    </hub>` : "    <hub type='usb'/>");
  }
  for (const w of def.watchdogs) {
    const a = addressXml(w.address, "      ");
    const s = `    <watchdog model='${w.model}' action='${w.action}'`;
    out.push(a.length ? `${s}>\n${a.join("\n")}\n    </watchdog>` : `${s}/>`);
  }
  if (def.memballoon) {
    const b = def.memballoon;
    let s = "    <memballoon model='virtio'";
    if (b.autodeflate !== undefined) s += ` autodeflate='${b.autodeflate ? "on" : "off"}'`;
    if (b.freePageReporting !== undefined) s += ` freePageReporting='${b.freePageReporting ? "on" : "off"}'`;
    const inner = [
      ...(b.statsPeriod !== undefined ? [`      <stats period='${b.statsPeriod}'/>`] : []),
      ...addressXml(b.address, "      "),
    ];
    out.push(inner.length ? `${s}>\n${inner.join("\n")}\n    </memballoon>` : `${s}/>`);
  } else {
    out.push("    <memballoon model='none'/>");
  }
  for (const r of def.rngs) {
    out.push("    <rng model='virtio'>");
    if (r.rate)
      out.push(
        `      <rate bytes='${r.rate.bytes}'${r.rate.period !== undefined ? ` period='${r.rate.period}'` : ""}/>`,
      );
    out.push(
      r.backend.model === "random"
        ? `      <backend model='random'>${e(r.backend.device)}</backend>`
        : "      <backend model='builtin'/>",
    );
    out.push(...addressXml(r.address, "      "));
    out.push("    </rng>");
  }
  for (const p of def.panics) out.push(`    <panic model='${p.model}'/>`);
  return out;
}

function interfaceXml(i: InterfaceDef): string[] {
  const out: string[] = [`    <interface type='${i.type}'>`];
  out.push(`      <mac address='${i.mac}'/>`);
  if (i.source !== undefined) {
    if (i.type === "bridge") out.push(`      <source bridge='${e(i.source)}'/>`);
    else if (i.type === "network") out.push(`      <source network='${e(i.source)}'/>`);
    else if (i.type === "direct") out.push(`      <source dev='${e(i.source)}' mode='bridge'/>`);
  }
  if (i.targetDev !== undefined) out.push(`      <target dev='${e(i.targetDev)}'/>`);
  out.push(`      <model type='${i.model}'/>`);
  if (i.driver !== undefined || i.queues !== undefined) {
    let s = "      <driver";
    if (i.driver !== undefined) s += ` name='${i.driver}'`;
    if (i.queues !== undefined) s += ` queues='${i.queues}'`;
    out.push(s + "/>");
  }
  if (i.mtu !== undefined) out.push(`      <mtu size='${i.mtu}'/>`);
  if (i.linkDown) out.push("      <link state='down'/>");
  if (i.bootOrder !== undefined) out.push(`      <boot order='${i.bootOrder}'/>`);
  if (i.rom === "disabled") out.push("      <rom enabled='no'/>");
  else if (i.rom === "no-bar") out.push("      <rom bar='off'/>");
  out.push(...addressXml(i.address, "      "));
  out.push("    </interface>");
  return out;
}

function diskXml(d: DiskDef): string[] {
  const out: string[] = [];
  out.push(`    <disk type='${d.volume ? "volume" : d.type}' device='${d.device}'>`);
  let drv = `      <driver name='qemu' type='${d.format}'`;
  if (d.cache) drv += ` cache='${d.cache}'`;
  if (d.discard) drv += ` discard='${d.discard}'`;
  if (d.detectZeroes) drv += ` detect_zeroes='${d.detectZeroes}'`;
  out.push(drv + "/>");
  if (d.volume) out.push(`      <source pool='${e(d.volume.pool)}' volume='${e(d.volume.name)}'/>`);
  else if (d.source !== undefined)
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
  if (d.readonly) out.push("      <readonly/>");
  if (d.shareable) out.push("      <shareable/>");
  if (d.serial) out.push(`      <serial>${e(d.serial)}</serial>`);
  out.push(...addressXml(d.address, "      "));
  out.push("    </disk>");
  return out;
}
