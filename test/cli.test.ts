import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { Command } from "commander";
import { COMMANDS, modulesFor, VERB_MODULES } from "../src/cli/loader.js";
import { Testbed } from "../src/testbed/testbed.js";
import { available, cli, cliPath, need, testGuest } from "./helpers/env.js";
import { guestXml } from "./helpers/guest-xml.js";
import { waitFor } from "./helpers/wait.js";

const TOOLS = ["qemu-system-x86_64", "qemu-img", "ip", "nsenter", "busybox"];

describe("nbdmig CLI usage errors (no agent needed)", () => {
  const usage: [string, string[], RegExp][] = [
    ["no verb", [], /Usage: nbdmig/],
    ["unknown verb", ["frobnicate"], /unknown command 'frobnicate'/],
    ["missing argument", ["start"], /missing required argument 'domain'/],
    ["unknown option", ["list", "--bogus"], /unknown option '--bogus'/],
    [
      "bad agent URI",
      ["-c", "http://x", "list"],
      /'http:\/\/x' is not an agent URI; use nbdmig:\/\/HOST:PORT/,
    ],
    ["no local agent", ["list"], /no local agent found in .*start one with 'nbdmig daemon'/],
    [
      "missing token file",
      ["-c", "nbdmig://127.0.0.1:1", "--token-file", "/nonexistent", "list"],
      /cannot read the API token from \/nonexistent/,
    ],
    ["bad accel", ["daemon", "--accel", "xen"], /--accel takes auto, kvm or tcg/],
    [
      "bad --bytes",
      ["-c", "nbdmig://127.0.0.1:1", "--token-file", "/etc/hostname", "console", "x", "--bytes", "many"],
      /--bytes takes a whole number/,
    ],
    [
      "migrate without a destination",
      ["-c", "nbdmig://127.0.0.1:1", "--token-file", "/etc/hostname", "migrate", "vm"],
      /migrate needs the destination agent's URI: nbdmig migrate DOMAIN nbdmig:\/\/HOST:PORT/,
    ],
    [
      "a bad --recover",
      ["-c", "nbdmig://127.0.0.1:1", "--token-file", "/etc/hostname", "migrate", "--recover", "both", "vm"],
      /--recover takes 'source' or 'destination', not 'both'/,
    ],
    ["tls-host without names", ["tls-host", "--ca", "/nonexistent"], /missing required argument 'names'/],
    [
      "--verify on a running guest's changing disks",
      [
        "-c",
        "nbdmig://127.0.0.1:1",
        "--token-file",
        "/etc/hostname",
        "migrate",
        "--live",
        "--copy-storage-all",
        "--verify",
        "vm",
        "nbdmig://127.0.0.2:7800",
      ],
      /--verify compares copied disks once neither side writes them: .* with --offline or --suspend/,
    ],
  ];
  for (const [what, args, re] of usage) {
    it(`exits 2 for ${what}`, () => {
      const r = cli(args, { env: { NBDMIG_STATE_DIR: path.join(os.tmpdir(), "nbdmig-no-agent") } });
      assert.equal(r.status, 2, `exit status; stderr: ${r.stderr}`);
      assert.match(r.stderr, re);
    });
  }

  it("exits 1 with a clear message when the agent is unreachable", () => {
    const r = cli(["-c", "nbdmig://127.0.0.1:1", "--token-file", "/etc/hostname", "list"]);
    assert.equal(r.status, 1);
    assert.match(
      r.stderr,
      /cannot reach the agent at nbdmig:\/\/127.0.0.1:1: ECONNREFUSED; is 'nbdmig daemon' running there\?/,
    );
  });

  it("daemon --token-file: the agent takes the given token, not its state dir's", async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-token-"));
    const shared = path.join(dir, "cluster-token");
    fs.writeFileSync(shared, "0123456789abcdef0123456789abcdef\n", { mode: 0o600 });
    const port = 17000 + (process.pid % 1000);
    const daemon = spawn(
      process.execPath,
      [cliPath, "daemon", "--listen", `127.0.0.1:${port}`, "--state-dir", dir, "--token-file", shared],
      { stdio: "ignore" },
    );
    try {
      const uri = `nbdmig://127.0.0.1:${port}`;
      await waitFor(
        "the agent to listen",
        () => cli(["-c", uri, "--token-file", shared, "list"]).status === 0,
        20_000,
      );
      const own = path.join(dir, "token");
      if (fs.existsSync(own)) {
        const r = cli(["-c", uri, "--token-file", own, "list"]);
        assert.equal(r.status, 1, "the state dir's token is not the agent's");
      }
    } finally {
      daemon.kill();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it("prints help and version with exit 0", () => {
    assert.equal(cli(["--help"]).status, 0);
    const v = cli(["--version"]);
    assert.equal(v.status, 0);
    assert.match(v.stdout, /^\d+\.\d+\.\d+/);
  });

  it("loads only the verb's module, and knows which module registers each verb", async () => {
    const seen = new Map<string, string>();
    for (const [name, load] of Object.entries(VERB_MODULES)) {
      const program = new Command();
      (await load()).register(program);
      for (const c of program.commands) seen.set(c.name(), name);
    }
    assert.deepEqual(
      Object.fromEntries([...seen].sort()),
      Object.fromEntries(Object.entries(COMMANDS).sort()),
    );
    assert.deepEqual(modulesFor("domjobinfo"), ["migrate"]);
    assert.deepEqual(
      modulesFor("frobnicate"),
      Object.keys(VERB_MODULES),
      "an unknown verb loads all (suggestions)",
    );
    assert.deepEqual(modulesFor("constructor"), Object.keys(VERB_MODULES));
    assert.deepEqual(modulesFor(undefined, true), [], "--version alone loads no verb");
    assert.deepEqual(modulesFor("migrate", true), ["migrate"], "with a verb, its module loads");
    // A verb's help still shows its options, and the top-level help every verb.
    assert.match(cli(["migrate", "--help"]).stdout, /--copy-storage-all/);
    const help = cli(["--help"]).stdout;
    for (const verb of Object.keys(COMMANDS)) assert.match(help, new RegExp(`^  ${verb}\\b`, "m"), verb);
  });
});

describe("nbdmig CLI against a running agent", { timeout: 300_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };
  let xmlFile = "";
  const run = (args: string[]) => cli(["-c", tb!.a.mgmtUri, "--token-file", tb!.tokenFile, ...args]);
  const ok = (args: string[]) => {
    const r = run(args);
    assert.equal(r.status, 0, `nbdmig ${args.join(" ")} failed: ${r.stderr}`);
    return r.stdout;
  };

  before(async () => {
    if (!available(TOOLS, true)) return;
    guest = testGuest();
    tb = await Testbed.up();
    execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", `${tb.a.imagesDir}/c1.qcow2`, "128M"]);
    xmlFile = path.join(tb.dir, "c1.xml");
    const xml = guestXml({
      name: "c1",
      kernel: guest.kernel,
      initrd: guest.initrd,
      rate: 2,
      disks: [{ target: "vda", source: "/var/lib/nbdmig/images/c1.qcow2" }],
      nics: [{ type: "bridge", source: "br0", mac: "52:54:00:c1:00:01" }],
    });
    // Host-side tuning (a security label) is ignored with a warning; a display is honoured.
    fs.writeFileSync(
      xmlFile,
      xml
        .replace("</domain>", "  <seclabel type='dynamic' model='apparmor' relabel='yes'/>\n</domain>")
        .replace("<devices>", "<devices>\n    <graphics type='vnc' autoport='yes' listen='127.0.0.1'/>"),
    );
  });
  after(async () => tb?.down());

  it("runs every verb with virsh's output shapes", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const defined = run(["define", xmlFile]);
    assert.equal(defined.status, 0, defined.stderr);
    assert.equal(defined.stdout, `Domain 'c1' defined from ${xmlFile}\n\n`);
    assert.match(defined.stderr, /warning: domain\/seclabel: ignored \(host-side tuning\)/);

    assert.match(ok(["list", "--all"]), /^ Id\s+Name\s+State\n-+\n -\s+c1\s+shut off\n/);
    assert.doesNotMatch(ok(["list"]), /c1/);
    assert.equal(ok(["start", "c1"]), "Domain 'c1' started\n\n");
    assert.match(ok(["list"]), /\n 1\s+c1\s+running\n/);
    assert.equal(ok(["list", "--name"]), "c1\n\n");

    const info = ok(["dominfo", "c1"]);
    assert.match(
      info,
      /^Id:\s+1\nName:\s+c1\nUUID:\s+[0-9a-f-]{36}\nOS Type:\s+hvm\nState:\s+running\nCPU\(s\):\s+1\nMax memory:\s+262144 KiB\n/,
    );
    assert.match(info, /Persistent:\s+yes/);

    assert.match(
      ok(["domiflist", "c1"]),
      /^ Interface\s+Type\s+Source\s+Model\s+MAC\n-+\n vnet0\s+bridge\s+br0\s+virtio\s+52:54:00:c1:00:01\n/,
    );
    assert.equal(ok(["domdisplay", "c1"]), "vnc://127.0.0.1:0\n");
    const xml = ok(["dumpxml", "c1"]);
    assert.match(xml, /<target dev='vnet0'\/>/, "the live XML names the tap");
    assert.match(xml, /<graphics type='vnc' port='5900' autoport='yes' listen='127.0.0.1'>/);
    assert.doesNotMatch(ok(["dumpxml", "--inactive", "c1"]), /vnet0|port='5900'/);
    assert.match(xml, /<name>c1<\/name>/);
    assert.match(xml, /<source file='\/var\/lib\/nbdmig\/images\/c1.qcow2'\/>/);

    assert.match(
      ok(["domblklist", "c1"]),
      /^ Target\s+Source\n-+\n vda\s+\/var\/lib\/nbdmig\/images\/c1.qcow2\n/,
    );
    assert.match(
      ok(["domblklist", "c1", "--details"]),
      /\n file\s+disk\s+vda\s+\/var\/lib\/nbdmig\/images\/c1.qcow2\n/,
    );
    assert.match(
      ok(["domblkinfo", "c1", "vda"]),
      /^Capacity:\s+134217728\nAllocation:\s+\d+\nPhysical:\s+\d+\n/,
    );
    const missing = run(["domblkinfo", "c1", "vdz"]);
    assert.equal(missing.status, 2);
    assert.match(missing.stderr, /domain 'c1' has no disk 'vdz'; its disks are: vda/);

    assert.equal(
      JSON.parse(ok(["qemu-monitor-command", "c1", '{"execute":"query-status"}'])).return.status,
      "running",
    );
    assert.match(
      ok(["qemu-monitor-command", "c1", "--hmp", "info", "block"]),
      /(drive-vda \(vda\)|vda): \/var\/lib\/nbdmig\/images\/c1.qcow2 \(qcow2\)/,
    );
    const badQmp = run(["qemu-monitor-command", "c1", "query-status"]);
    assert.equal(badQmp.status, 2);
    assert.match(badQmp.stderr, /not a QMP JSON command/);

    await waitFor("serial output", () => /nbdmig-guest: t=/.test(ok(["console", "c1"])));

    assert.equal(ok(["suspend", "c1"]), "Domain 'c1' suspended\n\n");
    assert.match(ok(["dominfo", "c1"]), /State:\s+paused/);
    assert.equal(ok(["resume", "c1"]), "Domain 'c1' resumed\n\n");
    assert.equal(ok(["shutdown", "c1"]), "Domain 'c1' is being shutdown\n\n");

    const again = run(["start", "c1"]);
    assert.equal(again.status, 1);
    assert.match(again.stderr, /domain 'c1' is already running/);

    assert.equal(ok(["destroy", "c1"]), "Domain 'c1' destroyed\n\n");
    assert.match(ok(["list", "--all"]), /c1\s+shut off/);
    assert.equal(ok(["undefine", "c1"]), "Domain 'c1' has been undefined\n\n");
    assert.doesNotMatch(ok(["list", "--all"]), /c1/);

    // A transient domain disappears when it stops.
    assert.equal(ok(["create", xmlFile]), `Domain 'c1' created from ${xmlFile}\n\n`);
    assert.match(ok(["dominfo", "c1"]), /Persistent:\s+no/);
    ok(["destroy", "c1"]);
    const gone = run(["dominfo", "c1"]);
    assert.equal(gone.status, 1);
    assert.match(gone.stderr, /domain 'c1' not found on this host/);
  });

  it("finds the local agent without -c inside the host", (t) => {
    if (!need(t, TOOLS, true)) return;
    const r = cli(["list", "--all"], { prefix: tb!.a.execPrefix() });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /Id\s+Name\s+State/);
  });

  it("rejects bad XML with the element at fault", (t) => {
    if (!need(t, TOOLS, true)) return;
    const bad = path.join(tb!.dir, "bad.xml");
    fs.writeFileSync(
      bad,
      fs
        .readFileSync(xmlFile, "utf8")
        .replace("<devices>", "<devices><hostdev mode='subsystem' type='pci'/>"),
    );
    const r = run(["define", bad]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /domain\/devices\/hostdev: host device passthrough cannot be live-migrated/);
    const nofile = run(["define", "/nonexistent.xml"]);
    assert.equal(nofile.status, 2);
    assert.match(nofile.stderr, /cannot read \/nonexistent.xml: ENOENT/);
  });
});
