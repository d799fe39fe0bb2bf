/** The guest-visible devices of an ordinary libvirt guest: parsed, written back, and turned into QEMU arguments. */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import { DomainXmlError } from "../src/errors.js";
import { buildQemuArgs, type HostResources, type NicBackend } from "../src/domain/qemu-args.js";
import { canonicalMachine, resolveForHost, type HostCaps } from "../src/domain/resolve.js";
import { domainToXml, parseDomainXml } from "../src/domain/xml.js";
import type { DomainDef } from "../src/domain/model.js";
import type { QemuFeatures } from "../src/qemu/features.js";
import { loadFirmwareDescriptors } from "../src/qemu/firmware.js";
import { repoRoot } from "./helpers/env.js";

const domain = (devices: string, opts: { os?: string; features?: string; machine?: string } = {}) => `
<domain type='kvm'>
  <name>dev</name>
  <uuid>11111111-2222-3333-4444-555555555555</uuid>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <os${opts.os ?? ""}><type arch='x86_64' machine='${opts.machine ?? "pc-q35-7.2"}'>hvm</type></os>
  <features><acpi/><apic/>${opts.features ?? ""}</features>
  <devices>${devices}</devices>
</domain>`;

const host = (nics: NicBackend[] = [], tpm = false): HostResources => ({
  nics,
  tpmSocket: tpm ? "/run/dev.swtpm.sock" : undefined,
  channelSocket: (n) => `/run/dev.${n}.sock`,
  consoleLog: (p) => `/log/dev.console${p}.log`,
});

const args = (def: DomainDef, h: HostResources = host(), layout: "blockdev" | "drive" = "blockdev") =>
  buildQemuArgs(def, { accel: "tcg", qmpSocket: "/run/q", serialLog: "/log/s", host: h, layout });
const values = (a: string[], flag: string) => a.flatMap((x, i) => (a[i - 1] === flag ? [x] : []));
const roundTrips = (def: DomainDef) => assert.deepEqual(parseDomainXml(domainToXml(def)).def, def);

describe("guest devices", () => {
  it("keeps a generated MAC in the definition, and honours every interface setting", () => {
    const { def } = parseDomainXml(
      domain(`
      <interface type='bridge'><source bridge='br0'/><model type='virtio'/><mtu size='9000'/>
        <boot order='2'/><link state='down'/><driver name='qemu' queues='4'/><rom bar='off'/>
        <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>
      <interface type='network'><mac address='52:54:00:AA:bb:01'/><source network='default'/>
        <target dev='vnet7'/><model type='e1000e'/></interface>
      <interface type='direct'><mac address='52:54:00:aa:bb:02'/><source dev='eno1' mode='bridge'/>
        <target dev='guest0'/><model type='rtl8139'/></interface>`),
    );
    const [br, net, mv] = def.interfaces;
    assert.match(br!.mac, /^52:54:00(:[0-9a-f]{2}){3}$/, "a MAC was generated");
    assert.deepEqual(
      { ...br, mac: "" },
      {
        type: "bridge",
        mac: "",
        model: "virtio",
        source: "br0",
        mtu: 9000,
        linkDown: true,
        bootOrder: 2,
        driver: "qemu",
        queues: 4,
        rom: "no-bar",
        address: { type: "pci", bus: 1, slot: 0, function: 0 },
      },
    );
    assert.deepEqual(net, {
      type: "network",
      mac: "52:54:00:aa:bb:01",
      model: "e1000e",
      source: "default",
      targetDev: "vnet7",
      linkDown: false,
    });
    assert.equal(mv!.source, "eno1");
    roundTrips(def);
    // The generated MAC is written back, so it never changes.
    assert.equal(parseDomainXml(domainToXml(def)).def.interfaces[0]!.mac, br!.mac);

    const a = args(
      def,
      host([
        { kind: "tap", ifname: "vnet0", vhost: false },
        { kind: "tap", ifname: "vnet1", vhost: false },
        { kind: "fds", fds: [3] },
      ]),
    );
    assert.deepEqual(values(a, "-netdev"), [
      "tap,id=net0,ifname=vnet0,script=no,downscript=no,queues=4,vhost=off",
      "tap,id=net1,ifname=vnet1,script=no,downscript=no,vhost=off",
      "tap,id=net2,fd=3",
    ]);
    const nics = values(a, "-device").filter((d) => /netdev=/.test(d));
    assert.deepEqual(nics, [
      `virtio-net-pci,netdev=net0,id=net0,mac=${br!.mac},mq=on,vectors=10,host_mtu=9000,bootindex=2,rombar=0,bus=pci.1,addr=0x0`,
      "e1000e,netdev=net1,id=net1,mac=52:54:00:aa:bb:01",
      "rtl8139,netdev=net2,id=net2,mac=52:54:00:aa:bb:02",
    ]);
  });

  it("places devices at their PCI addresses, root ports first, fixed slots before QEMU's own choices", () => {
    const { def } = parseDomainXml(
      domain(`
      <controller type='pci' index='0' model='pcie-root'/>
      <controller type='pci' index='1' model='pcie-root-port'><model name='pcie-root-port'/>
        <target chassis='1' port='0x10'/><address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0' multifunction='on'/></controller>
      <controller type='pci' index='2' model='pcie-root-port'><model name='pcie-root-port'/>
        <target chassis='2' port='0x11'/><address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x1'/></controller>
      <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
      <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/a.qcow2'/>
        <target dev='vda' bus='virtio'/><address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/></disk>
      <video><model type='virtio' heads='1' primary='yes'/><address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></video>
      <controller type='usb' index='0' model='qemu-xhci' ports='15'><address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></controller>
      <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/></input>
      <memballoon model='virtio'><stats period='5'/></memballoon>`),
    );
    roundTrips(def);
    const devs = values(args(def), "-device");
    const at = (prefix: string) => devs.findIndex((d) => d.startsWith(prefix));
    assert.equal(
      devs[at("pcie-root-port")],
      "pcie-root-port,port=0x10,chassis=1,id=pci.1,bus=pcie.0,addr=0x2,multifunction=on",
    );
    assert.ok(devs.includes("pcie-root-port,port=0x11,chassis=2,id=pci.2,bus=pcie.0,addr=0x2.0x1"));
    assert.ok(
      devs.some((d) => d.startsWith("virtio-blk-pci,id=disk-vda") && d.endsWith(",bus=pci.2,addr=0x0")),
    );
    assert.ok(devs.includes("virtio-vga,id=video0,max_outputs=1,bus=pcie.0,addr=0x1"));
    assert.ok(devs.includes("qemu-xhci,id=usb,p2=15,p3=15,bus=pci.1,addr=0x0"));
    assert.ok(devs.includes("usb-tablet,id=input0,bus=usb.0,port=1"));
    // Devices without an address come after every device with one, so none takes a fixed slot.
    assert.ok(at("virtio-rng-pci") > at("virtio-blk-pci") && at("virtio-balloon-pci") > at("virtio-vga"));
    assert.ok(at("pcie-root-port") < at("virtio-blk-pci"), "buses exist before their devices");
    assert.ok(at("usb-tablet") > at("qemu-xhci"));
  });

  it("keeps a fixed slot on the root bus free of controllers QEMU places itself", () => {
    const { def } = parseDomainXml(
      domain(`<controller type='pci' model='pcie-root-port'/>
        <video><model type='vga' primary='yes'/><address type='pci' domain='0x0000' bus='0x00' slot='0x01' function='0x0'/></video>
        <interface type='user'><model type='virtio'/><address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></interface>`),
    );
    const devs = values(args(def), "-device");
    const at = (p: string) => devs.findIndex((d) => d.startsWith(p));
    assert.ok(at("VGA") < at("pcie-root-port"), "the VGA card takes 00:01.0 before the root port is placed");
    assert.ok(at("pcie-root-port") < at("virtio-net-pci"), "the root port exists before the NIC on its bus");
  });

  it("tells a ROM outside a PCI BAR from no ROM at all, as libvirt does", () => {
    const nic = (rom: string) =>
      parseDomainXml(domain(`<interface type='user'><model type='virtio'/>${rom}</interface>`)).def;
    const off = nic("<rom bar='off'/>");
    const none = nic("<rom enabled='no'/>");
    assert.equal(off.interfaces[0]!.rom, "no-bar");
    assert.equal(none.interfaces[0]!.rom, "disabled");
    roundTrips(off);
    roundTrips(none);
    assert.match(
      values(args(off), "-device").find((d) => d.includes("netdev="))!,
      /,rombar=0$/,
    );
    assert.match(
      values(args(none), "-device").find((d) => d.includes("netdev="))!,
      /,romfile=$/,
    );
  });

  it("honours the HDA codec, the crash and poweroff actions and the KVM timers, and refuses tick policies QEMU lacks", () => {
    const { def, warnings } = parseDomainXml(
      domain("<sound model='ich9'><codec type='micro'/></sound><panic model='isa'/>").replace(
        "<devices>",
        "<on_poweroff>preserve</on_poweroff><on_crash>restart</on_crash><clock offset='utc'><timer name='pit' tickpolicy='discard'/><timer name='kvmclock' present='no'/></clock><devices>",
      ),
    );
    roundTrips(def);
    assert.deepEqual(warnings, []);
    const tcg = args(def);
    assert.ok(
      values(tcg, "-device").includes("hda-micro,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=audio1"),
    );
    assert.deepEqual(values(tcg, "-action"), ["shutdown=pause", "panic=none"]);
    const kvm = buildQemuArgs(def, { accel: "kvm", qmpSocket: "/q", serialLog: "/s", host: host() });
    assert.ok(values(kvm, "-global").includes("kvm-pit.lost_tick_policy=discard"));
    assert.match(values(kvm, "-cpu")[0]!, /,kvmclock=off/);
    assert.throws(
      () =>
        parseDomainXml(
          domain("").replace(
            "<devices>",
            "<clock offset='utc'><timer name='pit' tickpolicy='catchup'/></clock><devices>",
          ),
        ),
      /timer\/@tickpolicy: tickpolicy 'catchup' is not supported for the pit timer; use delay or discard/,
    );
  });

  it("numbers controllers without an index as libvirt does, and gives root ports distinct slots", () => {
    const { def } = parseDomainXml(
      domain(`<controller type="pci" model="pcie-root"/><controller type="pci" model="pcie-root-port"/>
        <controller type="pci" model="pcie-root-port"/><controller type='virtio-serial'/>`),
    );
    assert.deepEqual(
      def.controllers.filter((c) => c.type === "pci").map((c) => [c.index, c.model, c.chassis, c.port]),
      [
        [0, "pcie-root", undefined, undefined],
        [1, "pcie-root-port", 1, 1],
        [2, "pcie-root-port", 2, 2],
      ],
    );
    roundTrips(def);
  });

  it("adds what libvirt adds: a USB controller, a balloon, a virtio-serial controller for channels, a video card for a display", () => {
    const q35 = parseDomainXml(
      domain(
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel><graphics type='vnc'/>",
      ),
    ).def;
    assert.deepEqual(
      q35.controllers.map((c) => `${c.type}:${c.model ?? ""}`),
      ["usb:qemu-xhci", "virtio-serial:"],
    );
    assert.deepEqual(q35.memballoon, {});
    assert.deepEqual(q35.videos, [{ model: "vga", primary: true }]);
    const pc = parseDomainXml(domain("<memballoon model='none'/>", { machine: "pc-i440fx-7.2" })).def;
    assert.deepEqual(pc.controllers, [{ type: "usb", index: 0, model: "piix3-uhci" }]);
    assert.equal(pc.memballoon, undefined);
    roundTrips(q35);
    roundTrips(pc);
  });

  it("builds displays, channels, consoles, sound, RNG, balloon, TPM, watchdog, panic and USB redirection", () => {
    const { def } = parseDomainXml(
      domain(`
      <graphics type='spice' autoport='yes'><listen type='address' address='0.0.0.0'/></graphics>
      <graphics type='vnc' port='5905' autoport='no' listen='127.0.0.1' passwd='s3cret'/>
      <video><model type='qxl' ram='65536' vram='65536' vgamem='16384' heads='1' primary='yes'/></video>
      <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/><address type='virtio-serial' controller='0' bus='0' port='1'/></channel>
      <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
      <console type='pty'><target type='virtio' port='1'/></console>
      <sound model='ich9'/>
      <rng model='virtio'><rate bytes='1024' period='2000'/><backend model='random'>/dev/random</backend></rng>
      <memballoon model='virtio' autodeflate='on' freePageReporting='on'/>
      <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
      <watchdog model='i6300esb' action='poweroff'/>
      <panic model='isa'/>
      <redirdev bus='usb' type='spicevmc'/>`),
    );
    roundTrips(def);
    def.graphics[0]!.port = 5901; // chosen by the agent at start
    const a = args(def, host([], true));
    const devs = values(a, "-device");
    assert.deepEqual(values(a, "-spice"), [
      "port=5901,addr=0.0.0.0,disable-ticketing=on,seamless-migration=on",
    ]);
    assert.deepEqual(values(a, "-vnc"), ["127.0.0.1:5,password=on"]);
    assert.ok(
      devs.includes("qxl-vga,id=video0,ram_size=67108864,vram_size=67108864,vgamem_mb=16,max_outputs=1"),
    );
    assert.ok(
      values(a, "-chardev").includes(
        "socket,id=charchannel0,path=/run/dev.org.qemu.guest_agent.0.sock,server=on,wait=off",
      ),
    );
    assert.ok(values(a, "-chardev").includes("spicevmc,id=charchannel1,name=vdagent"));
    assert.ok(
      devs.includes(
        "virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,name=org.qemu.guest_agent.0",
      ),
    );
    assert.ok(devs.includes("virtconsole,bus=virtio-serial0.0,chardev=charconsole1,id=console1"));
    assert.ok(devs.includes("ich9-intel-hda,id=sound0"));
    assert.ok(devs.includes("hda-duplex,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=audio1"));
    assert.deepEqual(values(a, "-audiodev"), [JSON.stringify({ id: "audio1", driver: "spice" })]);
    assert.ok(devs.includes("virtio-rng-pci,rng=objrng0,id=rng0,max-bytes=1024,period=2000"));
    assert.ok(devs.includes("virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting=on"));
    assert.deepEqual(values(a, "-tpmdev"), ["emulator,id=tpm-tpm0,chardev=chrtpm"]);
    assert.ok(devs.includes("tpm-crb,tpmdev=tpm-tpm0,id=tpm0"));
    assert.ok(devs.includes("i6300esb,id=watchdog0"));
    assert.deepEqual(values(a, "-watchdog-action"), ["poweroff"]);
    assert.ok(devs.includes("pvpanic,id=panic0"));
    assert.ok(devs.includes("usb-redir,chardev=charredir0,id=redir0,bus=usb.0"));
  });

  it("puts IDE disks on i440fx's IDE buses and SATA disks on q35's AHCI", () => {
    const d = (t: string, bus: string) =>
      `<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='/i/${t}'/><target dev='${t}' bus='${bus}'/></disk>`;
    const pc = parseDomainXml(
      domain(d("hda", "ide") + d("hdb", "ide") + d("hdc", "ide"), { machine: "pc" }),
    ).def;
    const pcDevs = values(args(pc), "-device");
    assert.ok(pcDevs.some((x) => x.startsWith("ide-hd,id=disk-hdb") && x.endsWith("bus=ide.0,unit=1")));
    assert.ok(pcDevs.some((x) => x.startsWith("ide-hd,id=disk-hdc") && x.endsWith("bus=ide.1,unit=0")));
    const q35 = parseDomainXml(domain(d("sda", "sata") + d("sdc", "sata"))).def;
    const qDevs = values(args(q35), "-device");
    assert.ok(qDevs.some((x) => x.startsWith("ide-hd,id=disk-sdc") && x.endsWith("bus=ide.2")));
    const pcSata = parseDomainXml(domain(d("sda", "sata"), { machine: "pc-i440fx-7.2" })).def;
    assert.ok(values(args(pcSata), "-device").includes("ahci,id=sata0"));
  });

  it("attaches UEFI code and variable store as pflash, in both disk layouts, with SMM for secure boot", () => {
    const { def } = parseDomainXml(
      domain("", {
        os: "",
        machine: "pc-q35-7.2",
      }).replace(
        "</type></os>",
        "</type><loader readonly='yes' secure='yes' type='pflash'>/fw/CODE.fd</loader><nvram template='/fw/VARS.fd'>/nv/dev_VARS.fd</nvram></os>",
      ),
    );
    roundTrips(def);
    const a = args(def);
    assert.match(
      values(a, "-machine")[0]!,
      /^pc-q35-7\.2,usb=off,dump-guest-core=off,smm=on,pflash0=firmware,pflash1=nvram$/,
    );
    const bds = values(a, "-blockdev").map((x) => JSON.parse(x) as Record<string, unknown>);
    assert.deepEqual(
      bds.map((b) => [b["node-name"], b.filename ?? b.file, b["read-only"]]),
      [
        ["firmware-storage", "/fw/CODE.fd", true],
        ["firmware", "firmware-storage", true],
        ["nvram-storage", "/nv/dev_VARS.fd", false],
        ["nvram", "nvram-storage", false],
      ],
    );
    assert.ok(values(a, "-global").includes("driver=cfi.pflash01,property=secure,value=on"));
    const drive = values(args(def, host(), "drive"), "-drive");
    assert.deepEqual(drive, [
      "if=pflash,unit=0,format=raw,readonly=on,file=/fw/CODE.fd,node-name=firmware,file.node-name=firmware-storage",
      "if=pflash,unit=1,format=raw,readonly=off,file=/nv/dev_VARS.fd,id=drive-nvram,node-name=nvram,file.node-name=nvram-storage",
    ]);
  });

  it("honours clock, ACPI, power management, topology and boot menu", () => {
    const { def } = parseDomainXml(
      domain("", { features: "<vmport state='off'/>" })
        .replace(
          "<vcpu>2</vcpu>",
          "<vcpu>4</vcpu><cpu mode='host-passthrough'><topology sockets='1' dies='1' cores='2' threads='2'/></cpu>",
        )
        .replace("</os>", "<bootmenu enable='yes' timeout='3000'/></os>")
        .replace(
          "<devices>",
          "<clock offset='localtime'><timer name='rtc' tickpolicy='catchup'/><timer name='hpet' present='no'/></clock><pm><suspend-to-mem enabled='no'/><suspend-to-disk enabled='no'/></pm><devices>",
        ),
    );
    roundTrips(def);
    const a = args(def);
    assert.equal(values(a, "-machine")[0], "pc-q35-7.2,usb=off,dump-guest-core=off,vmport=off,hpet=off");
    assert.deepEqual(values(a, "-smp"), ["4,sockets=1,dies=1,cores=2,threads=2"]);
    assert.deepEqual(values(a, "-rtc"), ["base=localtime,driftfix=slew"]);
    assert.deepEqual(values(a, "-global"), ["ICH9-LPC.disable_s3=1", "ICH9-LPC.disable_s4=1"]);
    assert.deepEqual(values(a, "-boot"), ["menu=on,splash-time=3000"]);
    const noAcpi = parseDomainXml(domain("").replace("<features><acpi/><apic/></features>", "")).def;
    assert.match(values(args(noAcpi), "-machine")[0]!, /,acpi=off/);
  });
});

describe("host resolution", () => {
  const qemu: QemuFeatures = {
    version: "7.2.22",
    nbdServer: true,
    blockMigration: true,
    machines: [
      { name: "pc-i440fx-7.1", isDefault: false, deprecated: false },
      { name: "pc-i440fx-7.2", alias: "pc", isDefault: true, deprecated: false },
      { name: "pc-q35-7.1", isDefault: false, deprecated: false },
      { name: "pc-q35-7.2", alias: "q35", isDefault: false, deprecated: false },
    ],
    devices: ["qxl-vga", "tpm-crb", "usb-redir"],
    spice: true,
  };
  /** Firmware descriptors as Debian's ovmf installs them, pointing at files in a scratch directory. */
  const firmwareDir = (): { dir: string; caps: HostCaps } => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-fw-"));
    const desc = (file: string, code: string, vars: string, machines: string[], features: string[]) => {
      fs.writeFileSync(path.join(dir, code), "");
      fs.writeFileSync(path.join(dir, vars), "");
      fs.writeFileSync(
        path.join(dir, file),
        JSON.stringify({
          "interface-types": ["uefi"],
          mapping: {
            device: "flash",
            executable: { filename: path.join(dir, code), format: "raw" },
            "nvram-template": { filename: path.join(dir, vars), format: "raw" },
          },
          targets: [{ architecture: "x86_64", machines }],
          features,
        }),
      );
    };
    desc(
      "40-secure-enrolled.json",
      "CODE.ms.fd",
      "VARS.ms.fd",
      ["pc-q35-*"],
      ["enrolled-keys", "requires-smm", "secure-boot"],
    );
    desc("50-secure.json", "CODE.secboot.fd", "VARS.fd", ["pc-q35-*"], ["requires-smm", "secure-boot"]);
    desc("60-plain.json", "CODE.fd", "VARS.fd", ["pc-i440fx-*", "pc-q35-*"], []);
    return {
      dir,
      caps: {
        qemu,
        firmware: loadFirmwareDescriptors([dir]),
        nvramDir: "/var/lib/nbdmig/nvram",
        swtpm: true,
      },
    };
  };

  it("turns aliases and an absent machine into the versioned types this QEMU runs", () => {
    assert.equal(canonicalMachine("q35", qemu), "pc-q35-7.2");
    assert.equal(canonicalMachine("pc", qemu), "pc-i440fx-7.2");
    assert.equal(canonicalMachine(undefined, qemu), "pc-i440fx-7.2");
    assert.equal(canonicalMachine("pc-q35-7.1", qemu), "pc-q35-7.1");
    assert.throws(
      () => canonicalMachine("pc-q35-rhel9.4.0", qemu),
      (e: unknown) =>
        e instanceof DomainXmlError &&
        /machine type 'pc-q35-rhel9\.4\.0' is not supported by this host's QEMU 7\.2\.22; it supports pc-i440fx-\{7\.1,7\.2\} \(pc = pc-i440fx-7\.2\); pc-q35-\{7\.1,7\.2\} \(q35 = pc-q35-7\.2\)\..*change the machine attribute \(e\.g\. to pc-q35-7\.2/.test(
          e.message,
        ),
    );
  });

  it("resolves firmware='efi' as libvirt does: first fitting descriptor, SMM for secure boot, an NVRAM path of its own", () => {
    const { dir, caps } = firmwareDir();
    const efi = (features = "", machine = "q35") =>
      resolveForHost(
        parseDomainXml(
          domain("", { os: " firmware='efi'", machine }).replace("</type>", `</type>${features}`),
        ).def,
        caps,
      ).def;
    const q35 = efi();
    assert.equal(q35.os.machine, "pc-q35-7.2");
    assert.deepEqual(q35.os.firmware.loader, {
      path: `${dir}/CODE.ms.fd`,
      readonly: true,
      type: "pflash",
      secure: true,
    });
    assert.deepEqual(q35.os.firmware.nvram, {
      path: "/var/lib/nbdmig/nvram/dev_VARS.fd",
      template: `${dir}/VARS.ms.fd`,
    });
    assert.equal(q35.features.smm, "on");
    const noSb = efi("<firmware><feature enabled='no' name='secure-boot'/></firmware>");
    assert.equal(noSb.os.firmware.loader!.path, `${dir}/CODE.fd`);
    assert.equal(noSb.os.firmware.loader!.secure, false);
    assert.equal(
      efi("", "pc").os.firmware.loader!.path,
      `${dir}/CODE.fd`,
      "i440fx gets the firmware without SMM",
    );
    // The choice is kept in the definition: resolving it again changes nothing.
    assert.deepEqual(resolveForHost(q35, caps).def, q35);
    assert.throws(
      () => efi("<firmware><feature enabled='yes' name='secure-boot'/></firmware>", "pc"),
      /cannot choose a UEFI firmware: none of the 3 UEFI firmware descriptors .* fits machine type pc-i440fx-7\.2 with secure-boot on/,
    );
    fs.rmSync(dir, { recursive: true });
  });

  it("turns a directory pool's volume into its file, and names a pool the host does not know", () => {
    const { caps } = firmwareDir();
    const xml = domain(
      "<disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='vmpool' volume='db.qcow2'/><target dev='vda' bus='virtio'/></disk>",
    );
    const parsed = parseDomainXml(xml).def;
    assert.deepEqual(parsed.disks[0]!.volume, { pool: "vmpool", name: "db.qcow2" });
    roundTrips(parsed);
    const r = resolveForHost(parsed, { ...caps, pools: { vmpool: "/srv/pools/vm" } });
    assert.equal(r.def.disks[0]!.source, "/srv/pools/vm/db.qcow2");
    assert.equal(r.def.disks[0]!.volume, undefined);
    assert.match(r.warnings.join(";"), /volume vmpool\/db.qcow2 is the file \/srv\/pools\/vm\/db.qcow2 here/);
    assert.throws(
      () => resolveForHost(parsed, { ...caps, pools: { default: "/var/lib/libvirt/images" } }),
      /storage pool 'vmpool' is not known on this host \(it has default\); start its agent with --pool vmpool=DIR/,
    );
  });

  it("refuses what this host cannot give the guest, naming the element", () => {
    const { caps } = firmwareDir();
    const refuse = (xml: string, re: RegExp, c: HostCaps = caps) =>
      assert.throws(
        () => resolveForHost(parseDomainXml(xml).def, c),
        (e: unknown) => e instanceof DomainXmlError && re.test(e.message),
      );
    refuse(
      domain("<graphics type='spice'/>"),
      /<graphics type='spice'> need SPICE, which this host's QEMU lacks/,
      {
        ...caps,
        qemu: { ...qemu, spice: false },
      },
    );
    refuse(
      domain("<tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>"),
      /swtpm is not installed on this host; apt-get install swtpm swtpm-tools/,
      { ...caps, swtpm: false },
    );
    refuse(
      domain("").replace(
        "</type>",
        "</type><loader readonly='yes' type='pflash'>/nonexistent/OVMF_CODE.fd</loader><nvram template='/x'/>",
      ),
      /os\/loader: firmware \/nonexistent\/OVMF_CODE.fd does not exist on this host; install it \(Debian: apt-get install ovmf/,
    );
    refuse(domain("<redirdev bus='usb' type='spicevmc'/>"), /need a <graphics type='spice'> display/);
  });
});

describe("the domain XML corpus (test/fixtures/domains)", () => {
  const dir = path.join(repoRoot, "test/fixtures/domains");
  const files = fs
    .readdirSync(dir)
    .filter((f) => f.endsWith(".xml"))
    .sort();

  it("parses every file or refuses it with an error naming the element; what parses writes back unchanged", () => {
    assert.ok(files.length >= 60, `${files.length} files`);
    for (const f of files) {
      const xml = fs.readFileSync(path.join(dir, f), "utf8");
      let def: DomainDef;
      try {
        def = parseDomainXml(xml).def;
      } catch (err) {
        assert.ok(err instanceof DomainXmlError, `${f}: ${String(err)}`);
        assert.match(err.element, /^(domain|XML)/, `${f}: ${err.message}`);
        continue;
      }
      assert.deepEqual(parseDomainXml(domainToXml(def)).def, def, `${f} round-trips`);
    }
  });
});
