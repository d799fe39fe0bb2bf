/**
 * The demo: two hosts (network + mount namespaces joined by a veth), a VM whose guest writes to its disk,
 * started on host a and listed on both hosts through the nbdmig CLI. Run with `sudo npm run demo`.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { Testbed } from "../src/testbed/testbed.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const step = (s: string) => console.log(`\n\x1b[1m==> ${s}\x1b[0m`);

function nbdmig(tb: Testbed, host: "a" | "b", args: string[], show = true): string {
  const argv = tb[host].cliArgv(args);
  if (show) console.log(`[host ${host}]$ nbdmig ${args.join(" ")}`);
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", stdio: ["ignore", "pipe", "inherit"] });
  if (show) process.stdout.write(r.stdout);
  if (r.status !== 0) throw new Error(`nbdmig ${args.join(" ")} failed (exit ${r.status})`);
  return r.stdout;
}

step("building the writing test guest from Debian packages (cached)");
execFileSync("bash", [path.join(repo, "scripts/build-test-guest.sh")], { stdio: "inherit" });
const guestDir = path.join(repo, ".cache/test-guest");

step("creating two hosts: network namespaces joined by a veth pair, private /var/lib/nbdmig each");
const tb = await Testbed.up();
try {
  for (const h of tb.hosts)
    console.log(`host ${h.name}: ${h.addr} (agent ${h.uri}); /var/lib/nbdmig there is ${h.dir}`);

  step("creating a 1 GiB qcow2 disk on host a and defining the VM from libvirt domain XML");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", path.join(tb.a.imagesDir, "demo.qcow2"), "1G"]);
  const xml = `<domain type='kvm'>
  <name>demo</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${guestDir}/vmlinuz</kernel>
    <initrd>${guestDir}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet nbdmig.rate=10</cmdline>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nbdmig/images/demo.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
`;
  const xmlFile = path.join(tb.a.dir, "demo.xml");
  fs.writeFileSync(xmlFile, xml);
  nbdmig(tb, "a", ["define", "/var/lib/nbdmig/demo.xml"]);
  nbdmig(tb, "a", ["start", "demo"]);

  step("the guest boots and writes 10 MiB/s of random data to its disk");
  for (let i = 0; i < 60; i++) {
    if (/nbdmig-guest: t=\d+/.test(nbdmig(tb, "a", ["console", "demo"], false))) break;
    await sleep(500);
  }
  const lines = nbdmig(tb, "a", ["console", "demo"], false)
    .split("\n")
    .filter((l) => l.startsWith("nbdmig-guest"));
  console.log(lines.slice(-3).join("\n"));

  step("listing domains on both hosts");
  nbdmig(tb, "a", ["list", "--all"]);
  nbdmig(tb, "b", ["list", "--all"]);
  nbdmig(tb, "a", ["domblklist", "demo"]);

  step("destroying the VM");
  nbdmig(tb, "a", ["destroy", "demo"]);
  console.log("\ndemo finished");
} finally {
  step("tearing the hosts down");
  await tb.down();
}
