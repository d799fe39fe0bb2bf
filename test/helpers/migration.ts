/** Shared steps of the migration tests: a writing guest on host a, and the checks after a migration. */
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import type { Testbed } from "../../src/testbed/testbed.js";
import { cli, type CliResult } from "./env.js";
import { guestXml, type GuestDisk, type GuestSpec } from "./guest-xml.js";
import { waitFor } from "./wait.js";

/** What a two-host migration test needs on the machine (in CI these must exist: see need()). */
export const MIGRATION_TOOLS = [
  "qemu-system-x86_64",
  "qemu-img",
  "qemu-io",
  "ip",
  "nsenter",
  "busybox",
  "ss",
  "tc",
];

export const IMG = "/var/lib/nbdmig/images";

export interface ImageSpec {
  name: string;
  format?: "raw" | "qcow2";
  size: string;
  /** MiB of random data written at the start of the image. */
  fillMiB?: number;
}

/** Creates an image in a host's image directory (root-namespace path returned). */
export function makeImage(tb: Testbed, host: "a" | "b", img: ImageSpec): string {
  const file = `${tb[host].imagesDir}/${img.name}`;
  execFileSync("qemu-img", ["create", "-q", "-f", img.format ?? "qcow2", file, img.size]);
  if (img.fillMiB) {
    // Random data written through the block layer, so qcow2 allocates as a guest write would.
    const chunk = `${tb.dir}/fill-${img.name}.bin`;
    execFileSync("sh", ["-c", `head -c ${img.fillMiB}M /dev/urandom > ${chunk}`]);
    execFileSync(
      "qemu-io",
      ["-f", img.format ?? "qcow2", "-c", `write -s ${chunk} 0 ${img.fillMiB}M`, file],
      { stdio: "ignore" },
    );
    fs.rmSync(chunk);
  }
  return file;
}

export function nbdmig(tb: Testbed, host: "a" | "b", args: string[]): CliResult {
  return cli(args, { prefix: tb[host].execPrefix() });
}

export function ok(tb: Testbed, host: "a" | "b", args: string[]): string {
  const r = nbdmig(tb, host, args);
  assert.equal(r.status, 0, `[${host}] nbdmig ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** Defines a guest on host a (persistent, shut off). */
export function defineGuest(
  tb: Testbed,
  spec: Omit<GuestSpec, "kernel" | "initrd">,
  guest: { kernel: string; initrd: string },
): void {
  fs.writeFileSync(
    `${tb.a.dir}/${spec.name}.xml`,
    guestXml({ ...spec, kernel: guest.kernel, initrd: guest.initrd }),
  );
  ok(tb, "a", ["define", `/var/lib/nbdmig/${spec.name}.xml`]);
}

/** Defines a guest on host a and starts it (`start` with `flags`); answers the QEMU's pid. */
async function defineAndStart(
  tb: Testbed,
  spec: Omit<GuestSpec, "kernel" | "initrd">,
  guest: { kernel: string; initrd: string },
  flags: string[] = [],
): Promise<number> {
  defineGuest(tb, spec, guest);
  ok(tb, "a", ["start", ...flags, spec.name]);
  return (await tb.a.client().call<{ pid: number }>("GET", `/v1/domains/${spec.name}`)).pid;
}

/** Defines and starts a guest on host a; waits until its writer reports progress (when it writes). */
export async function startGuest(
  tb: Testbed,
  spec: Omit<GuestSpec, "kernel" | "initrd">,
  guest: { kernel: string; initrd: string },
): Promise<number> {
  const pid = await defineAndStart(tb, spec, guest);
  const marker = spec.rate !== undefined ? /nbdmig-guest: t=\d+/ : /nbdmig-guest: ready/;
  await waitFor(
    `guest ${spec.name} to ${spec.rate !== undefined ? "write" : "boot"}`,
    () => marker.test(tb.a.consoleLog(spec.name)),
    90_000,
  );
  return pid;
}

/**
 * Defines a guest on host a and starts it without waiting for it to boot: for a migration refused in Begin,
 * which looks at the definition and the host, not at the guest. Answers the QEMU's pid.
 */
export const startUnwaited = (
  tb: Testbed,
  spec: Omit<GuestSpec, "kernel" | "initrd">,
  guest: { kernel: string; initrd: string },
): Promise<number> => defineAndStart(tb, spec, guest);

/**
 * Defines a guest on host a and starts it paused (QEMU runs, the guest never boots): for tests whose subject
 * is QEMU and the host, not the guest. Answers the QEMU's pid.
 */
export const startPaused = (
  tb: Testbed,
  spec: Omit<GuestSpec, "kernel" | "initrd">,
  guest: { kernel: string; initrd: string },
): Promise<number> => defineAndStart(tb, spec, guest, ["--paused"]);

/** The guest writer's total MiB, from the last progress line of a host's console log. */
export function guestWritten(tb: Testbed, host: "a" | "b", name: string): number {
  const lines = tb[host]
    .consoleLog(name)
    .split("\n")
    .filter((l) => l.startsWith("nbdmig-guest: t="));
  const m = /mib=(\d+)/.exec(lines.at(-1) ?? "");
  return m ? Number(m[1]) : -1;
}

/** After a failed migration: the source guest (on a unless said) runs in the same QEMU, with no migration leftovers. */
export async function assertSourceIntact(
  tb: Testbed,
  name: string,
  pid: number,
  writing = true,
  source: "a" | "b" = "a",
): Promise<void> {
  const a = tb[source].client();
  const info = await a.call<{ state: string; pid: number; job: string | null }>("GET", `/v1/domains/${name}`);
  assert.equal(info.state, "running", "source guest running");
  assert.equal(info.pid, pid, "same source QEMU");
  assert.equal(info.job, null, "no job left on the source");
  const jobs = (
    await a.call<{ result: unknown[] }>("POST", `/v1/domains/${name}/monitor`, {
      command: '{"execute":"query-jobs"}',
    })
  ).result;
  assert.deepEqual(jobs, [], "no block jobs left");
  const nodes = (
    await a.call<{ result: { "node-name": string }[] }>("POST", `/v1/domains/${name}/monitor`, {
      command: '{"execute":"query-named-block-nodes"}',
    })
  ).result;
  assert.ok(!nodes.some((n) => n["node-name"].startsWith("nbdmig-")), "no NBD client nodes left");
  if (writing) {
    const before = guestWritten(tb, source, name);
    await waitFor("the source guest to keep writing", () => guestWritten(tb, source, name) > before, 30_000);
  }
}

/** The destination (b unless said) holds nothing of the migration: no QEMU, no domain, no created image, no open port. */
export async function assertDestClean(
  tb: Testbed,
  name: string,
  images: string[],
  timeoutMs = 30_000,
  dest: "a" | "b" = "b",
): Promise<void> {
  const h = tb[dest];
  await waitFor(
    "the destination to be clean",
    async () => {
      const qemu = h.qemuPids();
      if (qemu.length) throw new Error(`QEMU still running there: ${qemu.join(" ")}`);
      const { domains } = await h.client().call<{ domains: { name: string }[] }>("GET", "/v1/domains");
      if (domains.some((d) => d.name === name)) throw new Error(`domain ${name} still there`);
      const left = images.filter((i) => fs.existsSync(`${h.imagesDir}/${i}`));
      if (left.length) throw new Error(`images left: ${left.join(" ")}`);
      const ports = h.listeningPorts().filter((p) => p !== 7800);
      if (ports.length) throw new Error(`ports open: ${ports.join(" ")}`);
      return true;
    },
    timeoutMs,
  );
}

export function compare(a: string, b: string): string {
  try {
    return execFileSync("qemu-img", ["compare", "-U", a, b], { encoding: "utf8" }).trim();
  } catch (err) {
    return `DIFFERENT: ${String((err as { stdout?: string }).stdout ?? err)}`;
  }
}

export type { GuestDisk };

/** Starts `nbdmig migrate ARGS` on host `from` (a) in the background; `done` resolves with its exit and stderr. */
export function migrateInBackground(
  tb: Testbed,
  args: string[],
  from: "a" | "b" = "a",
): { done: Promise<{ status: number; stderr: string; stdout: string }> } {
  return cliInBackground(tb, from, ["migrate", ...args]);
}

/** An nbdmig command on a host, in the background: its exit status and what it wrote. */
export function cliInBackground(
  tb: Testbed,
  host: "a" | "b",
  args: string[],
): { done: Promise<{ status: number; stderr: string; stdout: string }>; stdout(): string } {
  const argv = tb[host].cliArgv(args);
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  let stdout = "";
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  child.stdout.on("data", (b: Buffer) => (stdout += b.toString()));
  return {
    done: new Promise((resolve) =>
      child.on("close", (code) => resolve({ status: code ?? -1, stderr, stdout })),
    ),
    stdout: () => stdout,
  };
}

/** The job of a domain on a host (a unless said), as the API reports it (null when there is none). */
export async function jobOf<T = { phase: string; disks: { copied: number }[] }>(
  tb: Testbed,
  name: string,
  host: "a" | "b" = "a",
): Promise<T | null> {
  return (await tb[host].client().call<{ job: T | null }>("GET", `/v1/domains/${name}/job`)).job;
}

/** Destroys every running domain on the given hosts, so a failed test leaves nothing for the next. */
export async function destroyAll(tb: Testbed, hosts: ("a" | "b")[]): Promise<void> {
  for (const h of hosts) {
    const { domains } = await tb[h]
      .client()
      .call<{ domains: { name: string; state: string }[] }>("GET", "/v1/domains");
    for (const d of domains)
      if (d.state !== "shut off") await tb[h].client().call("POST", `/v1/domains/${d.name}/destroy`);
  }
}

/** QEMU's own run state of a domain on a host (query-status), or "gone" when no QEMU runs it. */
export async function qemuStatus(tb: Testbed, host: "a" | "b", name: string): Promise<string> {
  try {
    const r = await tb[host]
      .client()
      .call<{ result: { status: string } }>("POST", `/v1/domains/${name}/monitor`, {
        command: '{"execute":"query-status"}',
      });
    return r.result.status;
  } catch (err) {
    if (process.env.NBDMIG_TEST_DEBUG) console.error(`qemuStatus ${host} ${name}: ${String(err)}`);
    return "gone";
  }
}

/**
 * Backing chains for the `--copy-storage-inc` tests, made inside the hosts (where /var/lib/nbdmig paths,
 * and so backing files, resolve). `tb` is read at each call, since it is set up in `before`.
 */
export function chainFixture(tb: () => Testbed) {
  /** Runs a command inside a host. */
  const inHost = (h: "a" | "b", argv: string[]) =>
    execFileSync(tb()[h].execPrefix()[0]!, [...tb()[h].execPrefix().slice(1), ...argv], {
      encoding: "utf8",
    });
  const qemuIo = (file: string, cmd: string) => inHost("a", ["qemu-io", "-f", "qcow2", "-c", cmd, file]);
  /**
   * Guest-visible comparison of a's image with b's, run inside b: a's overlay is read through its
   * root-namespace path and its backing resolves to b's base, a byte-identical copy (checked by sha256).
   */
  const compareAB = (name: string) => {
    try {
      return inHost("b", [
        "qemu-img",
        "compare",
        "-U",
        `${tb().a.imagesDir}/${name}`,
        `${IMG}/${name}`,
      ]).trim();
    } catch (err) {
      const e = err as { stdout?: string; stderr?: string };
      return `DIFFERENT: ${e.stdout ?? ""}${e.stderr ?? String(err)}`;
    }
  };
  /** A 1 GiB qcow2 base with `dataMiB` of random data, byte-identical on both hosts (as an operator copies it). */
  const base = (name: string, dataMiB: number, backing?: string) => {
    const a = `${IMG}/${name}`;
    inHost("a", [
      "qemu-img",
      "create",
      "-q",
      "-f",
      "qcow2",
      ...(backing ? ["-b", backing, "-F", "qcow2"] : []),
      a,
      "1G",
    ]);
    if (dataMiB) {
      execFileSync("sh", ["-c", `head -c ${dataMiB}M /dev/urandom > ${tb().dir}/r.bin`]);
      qemuIo(a, `write -s ${tb().dir}/r.bin ${backing ? 600 : 0}M ${dataMiB}M`);
    }
    fs.copyFileSync(`${tb().a.imagesDir}/${name}`, `${tb().b.imagesDir}/${name}`);
    return a;
  };
  /** An empty qcow2 overlay on host a over `backing` (a host path). */
  const overlay = (name: string, backing: string) => {
    const f = `${IMG}/${name}`;
    inHost("a", ["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", f]);
    return f;
  };
  return { inHost, qemuIo, compareAB, base, overlay };
}
