import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { describe, it } from "node:test";
import { DomainXmlError } from "../src/errors.js";
import { buildQemuArgs, type HostResources } from "../src/domain/qemu-args.js";
import { domainToXml, parseDomainXml } from "../src/domain/xml.js";
import { isMigratableDisk } from "../src/domain/model.js";
import { repoRoot } from "./helpers/env.js";

const realistic = fs.readFileSync(path.join(repoRoot, "test/fixtures/virsh-dumpxml.xml"), "utf8");
const testHost: HostResources = {
  nics: [{ kind: "user" }],
  channelSocket: (n) => `/run/web01.${n}.sock`,
  consoleLog: (p) => `/log/web01.console${p}.log`,
};

describe("domain XML", () => {
  it("accepts what virsh dumpxml prints for an ordinary guest, with warnings for what it ignores", () => {
    const { def, warnings } = parseDomainXml(realistic);
    assert.equal(def.name, "web01");
    assert.equal(def.uuid, "4dea22b3-1d52-d8f3-2516-782e98ab3fa0");
    assert.equal(def.memoryKiB, 2 * 1024 * 1024);
    assert.equal(def.vcpus, 2);
    assert.equal(def.os.machine, "pc-q35-7.2");
    assert.equal(def.description, "Front end & cache");
    assert.deepEqual(
      def.disks.map((d) => [d.target, d.bus, d.format, d.type, d.readonly, d.shareable]),
      [
        ["vda", "virtio", "qcow2", "file", false, false],
        ["vdb", "virtio", "raw", "block", false, false],
        ["sda", "scsi", "raw", "file", false, true],
        ["sdb", "sata", "raw", "file", true, false],
      ],
    );
    assert.deepEqual(def.disks[0]!.backingChain, [
      { type: "file", format: "qcow2", source: "/var/lib/libvirt/images/debian12-base.qcow2" },
    ]);
    assert.equal(def.disks[1]!.iotune?.write_bytes_sec, 104857600);
    assert.equal(def.disks[1]!.serial, "DATA01");
    assert.equal(def.disks[1]!.detectZeroes, "unmap");
    assert.deepEqual(def.interfaces, [
      { type: "user", mac: "52:54:00:6b:3c:58", model: "virtio", linkDown: false },
    ]);
    // Guest-visible devices are honoured, not ignored.
    assert.deepEqual(def.channels, [{ type: "unix", name: "org.qemu.guest_agent.0" }]);
    assert.deepEqual(
      def.inputs.map((i) => `${i.type}/${i.bus}`),
      ["tablet/usb", "mouse/ps2", "keyboard/ps2"],
    );
    assert.deepEqual(def.graphics, [{ type: "vnc", autoport: true, port: 5900, listen: "127.0.0.1" }]);
    assert.deepEqual(def.videos, [{ model: "virtio", heads: 1, primary: true }]);
    assert.deepEqual(def.memballoon, {});
    assert.deepEqual(def.rngs, [{ backend: { model: "random", device: "/dev/urandom" } }]);
    assert.deepEqual(
      def.controllers.map((c) => `${c.type}/${c.index}/${c.model ?? ""}`),
      ["usb/0/qemu-xhci", "pci/0/pcie-root", "scsi/0/virtio-scsi", "sata/0/", "virtio-serial/0/"],
    );
    assert.deepEqual(def.clock, {
      offset: "utc",
      timers: [
        { name: "rtc", tickpolicy: "catchup" },
        { name: "pit", tickpolicy: "delay" },
        { name: "hpet", present: false },
      ],
    });
    assert.deepEqual(def.pm, { suspendToMem: false, suspendToDisk: false });
    assert.deepEqual(def.features, { acpi: true, apic: true, pae: false, vmport: "off" });
    assert.deepEqual(
      def.disks.filter(isMigratableDisk).map((d) => d.target),
      ["vda", "vdb"],
    );
    for (const w of ["domain/cpu", "domain/resource", "domain/seclabel"]) {
      assert.ok(
        warnings.some((x) => x.includes(w)),
        `a warning mentions ${w}: ${warnings.join("; ")}`,
      );
    }
  });

  it("round-trips: dumpxml of a parsed domain parses to the same model", () => {
    const { def } = parseDomainXml(realistic);
    const again = parseDomainXml(domainToXml(def));
    assert.deepEqual(again.def, def);
    assert.deepEqual(again.warnings, []);
  });

  it("converts memory units like libvirt", () => {
    const xml = (mem: string) => `<domain type='qemu'><name>m</name>${mem}<os><type>hvm</type></os></domain>`;
    assert.equal(parseDomainXml(xml("<memory unit='GiB'>1</memory>")).def.memoryKiB, 1048576);
    assert.equal(parseDomainXml(xml("<memory unit='MB'>512</memory>")).def.memoryKiB, 500000);
    assert.equal(parseDomainXml(xml("<memory>262144</memory>")).def.memoryKiB, 262144);
    assert.equal(parseDomainXml(xml("<memory unit='b'>268435456</memory>")).def.memoryKiB, 262144);
  });

  const base = (devices: string, extra = "", os = "<type arch='x86_64'>hvm</type>") =>
    `<domain type='kvm'><name>bad</name><memory unit='MiB'>256</memory>${extra}<os>${os}</os><devices>${devices}</devices></domain>`;
  const disk = (inner: string, attrs = "type='file' device='disk'") => `<disk ${attrs}>${inner}</disk>`;
  const ok = disk(
    "<driver name='qemu' type='qcow2'/><source file='/i/a.qcow2'/><target dev='vda' bus='virtio'/>",
  );

  const cases: [string, string, RegExp][] = [
    ["malformed XML", "<domain type='kvm'><name>x</name>", /malformed at line \d+, column \d+/],
    ["wrong root", "<network><name>x</name></network>", /root element must be <domain>/],
    [
      "missing name",
      "<domain type='kvm'><memory>262144</memory><os><type>hvm</type></os></domain>",
      /domain\/name: missing required element/,
    ],
    [
      "bad name",
      base("").replace("<name>bad</name>", "<name>a b</name>"),
      /domain\/name: 'a b' is not a valid name/,
    ],
    [
      "bad domain type",
      base("").replace("type='kvm'", "type='xen'"),
      /domain\/@type: 'xen' is not supported; allowed: kvm, qemu/,
    ],
    [
      "bad memory unit",
      base("").replace("unit='MiB'", "unit='furlongs'"),
      /domain\/memory\/@unit: 'furlongs' is not a unit/,
    ],
    [
      "non-numeric memory",
      base("").replace(">256<", ">lots<"),
      /domain\/memory: 'lots' is not a whole number/,
    ],
    ["bad vcpu", base("", "<vcpu>0</vcpu>"), /domain\/vcpu: 0 is out of range/],
    [
      "hostdev passthrough",
      base("<hostdev mode='subsystem' type='pci'/>"),
      /domain\/devices\/hostdev: host device passthrough cannot be live-migrated/,
    ],
    [
      "network disk",
      base(
        disk(
          "<source protocol='rbd' name='p/i'/><target dev='vda' bus='virtio'/>",
          "type='network' device='disk'",
        ),
      ),
      /disk\/@type: disk type 'network' is not supported/,
    ],
    [
      "bad disk format",
      base(ok.replace("type='qcow2'", "type='vmdk'")),
      /disk\[target=vda\]\/driver\/@type: 'vmdk' is not supported; allowed: raw, qcow2/,
    ],
    [
      "bad bus",
      base(ok.replace("bus='virtio'", "bus='usb'")),
      /target\/@bus: 'usb' is not supported; allowed: virtio, scsi, sata, ide/,
    ],
    [
      "IDE on q35",
      base(
        disk("<source file='/i/a.raw'/><target dev='hda' bus='ide'/>"),
        "",
        "<type arch='x86_64' machine='q35'>hvm</type>",
      ),
      /a q35 machine has no IDE bus; use bus='sata'/,
    ],
    [
      "target does not fit bus",
      base(ok.replace("bus='virtio'", "bus='scsi'")),
      /'vda' does not fit bus 'scsi'; use sda, sdb/,
    ],
    ["duplicate target", base(ok + ok), /target 'vda' is used twice/],
    ["relative source", base(ok.replace("/i/a.qcow2", "a.qcow2")), /'a.qcow2' must be an absolute path/],
    [
      "disk without source",
      base(disk("<driver name='qemu' type='raw'/><target dev='vda' bus='virtio'/>")),
      /a disk \(not a cdrom\) needs a <source>/,
    ],
    [
      "unmanaged tap interface",
      base("<interface type='ethernet'><target dev='tap9'/></interface>"),
      /interface\/@type: an unmanaged tap \(type='ethernet'\) cannot be recreated on the destination; use type='bridge'/,
    ],
    [
      "bridge interface without a bridge",
      base("<interface type='bridge'><model type='virtio'/></interface>"),
      /interface\/source\/@bridge: a type='bridge' interface needs <source bridge='...'\/>/,
    ],
    [
      "Open vSwitch port",
      base("<interface type='bridge'><source bridge='ovsbr0'/><virtualport type='openvswitch'/></interface>"),
      /interface\/virtualport: <virtualport> \(Open vSwitch or 802.1Qbh\) is not supported/,
    ],
    [
      "macvtap not in bridge mode",
      base("<interface type='direct'><source dev='eth0' mode='vepa'/></interface>"),
      /interface\/source\/@mode: macvtap mode 'vepa' is not supported; use mode='bridge'/,
    ],
    [
      "a TPM passed through from the host",
      base("<tpm model='tpm-crb'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>"),
      /tpm\/backend\/@type: a host TPM \(passthrough\) cannot be migrated; use <backend type='emulator'/,
    ],
    [
      "an unknown device",
      base("<frobnicator/>"),
      /devices\/frobnicator: device <frobnicator> is not supported; remove it/,
    ],
    [
      "two devices at one PCI address",
      base(
        "<memballoon model='virtio'><address type='pci' bus='0x00' slot='0x05'/></memballoon>" +
          "<rng model='virtio'><backend model='random'>/dev/urandom</backend><address type='pci' bus='0x00' slot='0x05'/></rng>",
      ),
      /PCI address bus 0 slot 5 function 0 is also used by/,
    ],
    [
      "a secondary cirrus card",
      base("<video><model type='vga' primary='yes'/></video><video><model type='cirrus'/></video>"),
      /a secondary 'cirrus' card is not supported/,
    ],
    [
      "bad mac",
      base("<interface type='user'><mac address='zz'/></interface>"),
      /mac\/@address: 'zz' is not a MAC address/,
    ],
    [
      "a relative UEFI loader",
      base("", "", "<type>hvm</type><loader readonly='yes' type='pflash'>OVMF_CODE.fd</loader>"),
      /os\/loader: 'OVMF_CODE.fd' must be an absolute path/,
    ],
    [
      "firmware features without firmware='efi'",
      base("", "", "<type>hvm</type><firmware><feature enabled='no' name='secure-boot'/></firmware>"),
      /os\/firmware: <firmware> features are for <os firmware='efi'>/,
    ],
    ["non-hvm os", base("", "", "<type>linux</type>"), /os\/type: 'linux' is not supported; only 'hvm'/],
    ["bad uuid", base("", "<uuid>not-a-uuid</uuid>"), /domain\/uuid: 'not-a-uuid' is not a UUID/],
    [
      "iotune total+write",
      base(
        ok.replace(
          "</disk>",
          "<iotune><total_bytes_sec>1</total_bytes_sec><write_bytes_sec>1</write_bytes_sec></iotune></disk>",
        ),
      ),
      /total_bytes_sec cannot be combined/,
    ],
    [
      "currentMemory above memory",
      base("", "<currentMemory unit='GiB'>4</currentMemory>"),
      /currentMemory: must not exceed <memory>/,
    ],
    [
      "virtio cdrom",
      base(disk("<target dev='vdc' bus='virtio'/>", "type='file' device='cdrom'")),
      /a cdrom cannot be on the virtio bus/,
    ],
  ];
  for (const [what, xml, re] of cases) {
    it(`rejects ${what} with an error naming the element`, () => {
      assert.throws(
        () => parseDomainXml(xml),
        (err: unknown) => {
          assert.ok(err instanceof DomainXmlError, `DomainXmlError, got ${String(err)}`);
          assert.equal(err.code, "E_DOMAIN_XML");
          assert.match(err.message, re);
          return true;
        },
      );
    });
  }

  it("builds -blockdev nodes named after the target and the right devices", () => {
    const { def } = parseDomainXml(realistic);
    const args = buildQemuArgs(def, {
      accel: "tcg",
      qmpSocket: "/run/q.sock",
      serialLog: "/log/s.log",
      host: testHost,
    });
    const blockdevs = args.flatMap((a, i) =>
      args[i - 1] === "-blockdev" ? [JSON.parse(a) as Record<string, unknown>] : [],
    );
    const vda = blockdevs.find((b) => b["node-name"] === "vda")!;
    assert.equal(vda.driver, "qcow2");
    assert.equal(vda.file, "vda-storage");
    const vdbStorage = blockdevs.find((b) => b["node-name"] === "vdb-storage")!;
    assert.equal(vdbStorage.driver, "host_device");
    assert.deepEqual(vdbStorage.cache, { direct: true, "no-flush": false });
    const devices = args.flatMap((a, i) => (args[i - 1] === "-device" ? [a] : []));
    assert.ok(devices.includes("virtio-scsi-pci,id=scsi0"));
    assert.ok(
      devices.some((d) => d.startsWith("scsi-hd,id=disk-sda,drive=sda") && d.includes("share-rw=on")),
    );
    assert.ok(devices.some((d) => d.startsWith("ide-cd,id=disk-sdb,drive=sdb") && d.includes("bus=ide.1")));
    assert.ok(
      devices.some(
        (d) => d.startsWith("virtio-blk-pci,id=disk-vdb,drive=vdb") && d.includes("serial=DATA01"),
      ),
    );
    assert.ok(
      devices.some((d) => d.startsWith("virtio-net-pci,netdev=net0") && d.includes("mac=52:54:00:6b:3c:58")),
    );
    assert.equal(args[args.indexOf("-cpu") + 1], "qemu64");
    assert.ok(!args.includes("-incoming"));
    const incoming = buildQemuArgs(def, {
      accel: "kvm",
      qmpSocket: "/q",
      serialLog: "/s",
      incoming: true,
      host: testHost,
    });
    assert.deepEqual(incoming.slice(-3), ["-S", "-incoming", "defer"]);
    assert.equal(incoming[incoming.indexOf("-cpu") + 1], "host,arch-capabilities=off");
  });

  it("the drive layout gives the same nodes a named BlockBackend, with commas in paths escaped", () => {
    const { def } = parseDomainXml(realistic);
    def.disks[0]!.source = "/images/web,01.qcow2";
    const args = buildQemuArgs(def, {
      accel: "tcg",
      qmpSocket: "/q",
      serialLog: "/s",
      layout: "drive",
      host: testHost,
    });
    assert.ok(!args.includes("-blockdev"));
    const drives = args.flatMap((a, i) => (args[i - 1] === "-drive" ? [a] : []));
    const vda = drives.find((d) => d.includes("id=drive-vda,"))!;
    for (const opt of [
      "if=none",
      "node-name=vda",
      "driver=qcow2",
      "read-only=off",
      "file.driver=file",
      "file.filename=/images/web,,01.qcow2",
      "file.node-name=vda-storage",
      "file.cache.direct=on",
    ])
      assert.ok(vda.split(/,(?!,)/).includes(opt) || vda.includes(opt), `${opt} in ${vda}`);
    assert.ok(
      drives.find((d) => d.includes("id=drive-sdb,"))!.includes("read-only=on"),
      "the cdrom is read-only",
    );
    const devices = args.flatMap((a, i) => (args[i - 1] === "-device" ? [a] : []));
    assert.ok(devices.some((d) => d.startsWith("virtio-blk-pci,id=disk-vda,drive=drive-vda")));
    assert.ok(devices.some((d) => d.startsWith("scsi-hd,id=disk-sda,drive=drive-sda")));
  });
});
