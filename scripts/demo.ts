/**
 * The demo: two hosts (network + mount namespaces joined by a veth, and a bridged VM network with a client),
 * a VM whose guest writes to its disks and serves HTTP on a bridged NIC, migrated live from host a to host
 * b with --copy-storage-all while the client polls it, with progress; then the disks verified and the
 * longest pause the client saw. Run with `sudo npm run demo`.
 */
import { execFileSync, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { guestAddress, longestGap, Testbed } from "../src/testbed/testbed.js";

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
const addr = guestAddress(10);
try {
  for (const h of tb.hosts)
    console.log(`host ${h.name}: ${h.addr} (agent ${h.uri}); /var/lib/nbdmig there is ${h.dir}`);
  console.log(`VM network: bridge br0 on each host, joined; a client at 10.77.0.100 on host a's side`);

  step(
    "creating the VM's disks on host a: 2 GiB qcow2 system disk with 512 MiB of data, 1 GiB raw data disk",
  );
  const sys = path.join(tb.a.imagesDir, "demo-sys.qcow2");
  const data = path.join(tb.a.imagesDir, "demo-data.raw");
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", sys, "2G"]);
  execFileSync("sh", ["-c", `head -c 512M /dev/urandom > ${tb.dir}/fill.bin`]);
  execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -s ${tb.dir}/fill.bin 0 512M`, sys], {
    stdio: "ignore",
  });
  execFileSync("qemu-img", ["create", "-q", "-f", "raw", data, "1G"]);
  const xml = `<domain type='kvm'>
  <name>demo</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${guestDir}/vmlinuz</kernel>
    <initrd>${guestDir}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet nbdmig.rate=20 nbdmig.ip=${addr}/24</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/nbdmig/images/demo-sys.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='/var/lib/nbdmig/images/demo-data.raw'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
`;
  fs.writeFileSync(path.join(tb.a.dir, "demo.xml"), xml);
  nbdmig(tb, "a", ["define", "/var/lib/nbdmig/demo.xml"]);
  nbdmig(tb, "a", ["start", "demo"]);

  step("the guest boots, writes 20 MiB/s of random 1 MiB blocks to its system disk, and serves HTTP");
  let lines: string[] = [];
  for (let i = 0; i < 120 && lines.length < 3; i++) {
    await sleep(500);
    lines = nbdmig(tb, "a", ["console", "demo"], false)
      .split("\n")
      .filter((l) => l.startsWith("nbdmig-guest: t="));
  }
  console.log(lines.slice(-3).join("\n"));
  nbdmig(tb, "a", ["domiflist", "demo"]);
  let hello = await tb.clientGet(`http://${addr}/`);
  for (let i = 0; i < 60 && hello.status !== 200; i++) {
    await sleep(500);
    hello = await tb.clientGet(`http://${addr}/`);
  }
  console.log(
    `client -> http://${addr}/: ${hello.status === 200 ? "answers" : `no answer (${hello.error})`}`,
  );
  nbdmig(tb, "a", ["list", "--all"]);
  nbdmig(tb, "b", ["list", "--all"]);

  step("live migration to host b, copying both disks over NBD while the guest keeps writing");
  console.log(`(the client polls http://${addr}/ every 50 ms meanwhile)`);
  const poll = tb.startPoller(`http://${addr}/`, 50);
  const t0 = Date.now();
  nbdmig(tb, "a", ["migrate", "--live", "--copy-storage-all", "--suspend", "--verbose", "demo", tb.b.uri]);
  const t1 = Date.now();
  nbdmig(tb, "a", ["domjobinfo", "demo", "--completed"]);

  step("verifying: the destination is paused (--suspend), so its disks must equal the source's final state");
  let identical = true;
  for (const f of ["demo-sys.qcow2", "demo-data.raw"]) {
    const r = spawnSync(
      "qemu-img",
      ["compare", "-U", path.join(tb.a.imagesDir, f), path.join(tb.b.imagesDir, f)],
      { encoding: "utf8" },
    );
    console.log(`${f}: ${r.stdout.trim() || r.stderr.trim()}`);
    identical &&= r.status === 0;
  }

  step("resuming on host b: the guest carries on writing there, and answers the client from there");
  nbdmig(tb, "b", ["resume", "demo"]);
  const t2 = Date.now();
  for (let i = 0; i < 600 && !poll.samples().some((x) => x.ok && x.at > t2); i++) await sleep(50);
  const samples = await poll.stop();
  const answeredAfter = samples.some((x) => x.ok && x.at > t2);
  // --suspend keeps the guest paused until the resume: the gap the client saw runs from the switchover to
  // the resume, which the demo chose; without --suspend it is QEMU's downtime plus the switchover.
  const gap = longestGap(samples, t0, Date.now());
  nbdmig(tb, "b", ["domiflist", "demo"]);
  const before = nbdmig(tb, "b", ["console", "demo"], false)
    .split("\n")
    .filter((l) => l.startsWith("nbdmig-guest: t=")).length;
  let after = before;
  for (let i = 0; i < 40 && after < before + 3; i++) {
    await sleep(500);
    after = nbdmig(tb, "b", ["console", "demo"], false)
      .split("\n")
      .filter((l) => l.startsWith("nbdmig-guest: t=")).length;
  }
  console.log(
    nbdmig(tb, "b", ["console", "demo"], false)
      .split("\n")
      .filter((l) => l.startsWith("nbdmig-guest"))
      .slice(-3)
      .join("\n"),
  );
  nbdmig(tb, "a", ["list", "--all"]);
  nbdmig(tb, "b", ["list", "--all"]);
  nbdmig(tb, "b", ["destroy", "demo"]);
  const writing = after > before;
  console.log(
    `\nresult: disks ${identical ? "IDENTICAL" : "DIFFERENT"}, guest ${writing ? "writing on host b" : "NOT writing on host b"}, client ${answeredAfter ? "answered from host b" : "NOT answered after the move"} (migration ${((t1 - t0) / 1000).toFixed(1)} s; longest pause ${gap.ms} ms, paused on purpose until the resume)`,
  );
  if (!identical || !writing || !answeredAfter) process.exitCode = 1;
} finally {
  step("tearing the hosts down");
  await tb.down();
}
