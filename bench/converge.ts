/**
 * Heavy-write benchmark: a guest writing as fast as it can (random 1 MiB blocks) over a 200 Mbit/s link,
 * 2 GiB qcow2 with 512 MiB of data, migrated with each --storage-converge mode in the same run. Reports total
 * time, downtime and the guest's median write rate during the migration, from its serial progress lines.
 */
import { execFileSync, spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { Testbed } from "../src/testbed/testbed.js";
import { median, nbdmig, referenceImage } from "./common.js";
import { libvirtUp, type Libvirt } from "./libvirt.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

export interface ConvergeRow {
  mode: string;
  result: string;
  totalS?: number;
  downtimeMs?: number;
  dataAtStartMiB: number;
  guestBeforeMiBs: number;
  guestDuringMiBs: number;
}

const WARM_S = 6;

/** Data allocated in an image (qemu-img map, read while the guest runs). */
function allocatedMiB(file: string): number {
  const map = JSON.parse(
    execFileSync("qemu-img", ["map", "-U", "--output=json", file], { encoding: "utf8" }),
  ) as { length: number; data: boolean; zero: boolean }[];
  return Math.round(map.filter((e) => e.data && !e.zero).reduce((s, e) => s + e.length, 0) / 2 ** 20);
}

/** Per-second write rates from the guest's progress lines (its serial console). */
function ratesIn(console: string): number[] {
  return console.split("\n").flatMap((l) => {
    const m = /nbdmig-guest: t=\d+ mib=\d+ rate=(\d+)/.exec(l);
    return m ? [Number(m[1])] : [];
  });
}

const rates = (tb: Testbed, name: string): number[] =>
  ratesIn(nbdmig(tb, "a", ["console", name, "--bytes", "10000000"]).stdout);

/** The writing guest: 256 MiB, no NIC, rewriting its 512 MiB for WARM_S s, then writing everywhere. */
function heavyXml(name: string, guestDir: string): string {
  return `<domain type='kvm'><name>${name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>${guestDir}/vmlinuz</kernel><initrd>${guestDir}/initrd.img</initrd>
<cmdline>console=ttyS0 quiet nbdmig.rate=0 nbdmig.span=2048 nbdmig.warm=${WARM_S}:512</cmdline></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/nbdmig/images/${name}.qcow2'/><target dev='vda' bus='virtio'/></disk><serial type='pty'/></devices></domain>`;
}

/**
 * The same guest and image migrated by libvirt 9.0 (bench/libvirt.ts): its default (a background mirror)
 * or `--copy-storage-synchronous-writes`, with `--suspend` as nbdmig's runs here; the guest's rates come
 * from its serial log.
 */
async function runLibvirt(
  tb: Testbed,
  lv: Libvirt,
  mode: string,
  guestDir: string,
  boundS: number,
): Promise<ConvergeRow> {
  const name = `heavy-${mode}`;
  referenceImage(tb, "a", `${name}.qcow2`);
  let before: number[] = [];
  let all: number[] = [];
  let dataAtStartMiB = 0;
  const r = await lv.migrate(heavyXml(name, guestDir), name, "", {
    flags: mode === "libvirt-sync" ? ["--copy-storage-synchronous-writes"] : [],
    boundS,
    ready: async () => {
      while (ratesIn(tb.a.consoleLog(name)).length < WARM_S) await sleep(200);
      before = ratesIn(tb.a.consoleLog(name));
      dataAtStartMiB = allocatedMiB(path.join(tb.a.imagesDir, `${name}.qcow2`));
    },
    after: () => (all = ratesIn(tb.a.consoleLog(name))),
  });
  return {
    mode: mode === "libvirt-sync" ? "libvirt 9.0 --copy-storage-synchronous-writes" : "libvirt 9.0 (default)",
    result: r.completed
      ? r.identical
        ? "completed, disks identical"
        : "completed, DISKS DIFFER"
      : `aborted at ${boundS} s (never READY)`,
    totalS: r.completed ? r.totalS : undefined,
    downtimeMs: r.completed ? r.downtimeMs : undefined,
    dataAtStartMiB,
    guestBeforeMiBs: median(before.slice(-5)),
    guestDuringMiBs: median(all.slice(before.length)),
  };
}

async function runMode(tb: Testbed, mode: string, guestDir: string, boundS: number): Promise<ConvergeRow> {
  const name = `heavy-${mode}`;
  referenceImage(tb, "a", `${name}.qcow2`);
  fs.writeFileSync(path.join(tb.a.dir, `${name}.xml`), heavyXml(name, guestDir));
  nbdmig(tb, "a", ["define", `/var/lib/nbdmig/${name}.xml`]);
  nbdmig(tb, "a", ["start", name]);
  // Warm-up: the guest rewrites the 512 MiB of data for WARM_S seconds (its rate before), then writes
  // across the whole disk from about when the migration starts, so the disk holds 512 MiB at the start.
  while (rates(tb, name).length < WARM_S) await sleep(200);
  const before = rates(tb, name);
  const dataAtStartMiB = allocatedMiB(path.join(tb.a.imagesDir, `${name}.qcow2`));
  const pre = tb.a.execPrefix();
  const child = spawn(
    pre[0]!,
    [
      ...pre.slice(1),
      process.execPath,
      path.join(repo, "dist/src/cli/main.js"),
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--storage-converge",
      mode,
      name,
      tb.b.uri,
    ],
    { stdio: "ignore" },
  );
  const exited = new Promise<number>((resolve) => child.on("close", (c) => resolve(c ?? -1)));
  const bound = setTimeout(() => void nbdmig(tb, "a", ["domjobabort", name]), boundS * 1000);
  const status = await exited;
  clearTimeout(bound);
  const during = rates(tb, name).slice(before.length);
  const job = JSON.parse(nbdmig(tb, "a", ["domjobinfo", name, "--completed", "--json"]).stdout || "{}") as {
    elapsedMs?: number;
    downtimeMs?: number;
  };
  for (const h of ["a", "b"] as const) {
    nbdmig(tb, h, ["destroy", name]);
    fs.rmSync(path.join(tb[h].imagesDir, `${name}.qcow2`), { force: true });
  }
  nbdmig(tb, "a", ["undefine", name]);
  return {
    mode,
    result: status === 0 ? "completed" : `aborted at ${boundS} s (never READY)`,
    totalS: status === 0 && job.elapsedMs ? job.elapsedMs / 1000 : undefined,
    downtimeMs: status === 0 ? job.downtimeMs : undefined,
    dataAtStartMiB,
    guestBeforeMiBs: median(before.slice(-5)),
    guestDuringMiBs: median(during),
  };
}

/** nbdmig's modes, then libvirt's two ("libvirt": its default, "libvirt-sync": synchronous writes). */
export async function convergeBench(
  boundS: number,
  modes = ["auto", "throttle", "sync", "none", "libvirt", "libvirt-sync"],
): Promise<ConvergeRow[]> {
  execFileSync("bash", [path.join(repo, "scripts/build-test-guest.sh")], { stdio: "inherit" });
  const guestDir = path.join(repo, ".cache/test-guest");
  const tb = await Testbed.up({ rate: "200mbit" });
  const rows: ConvergeRow[] = [];
  let lv: Libvirt | undefined;
  try {
    for (const mode of modes) {
      process.stderr.write(`converge bench: ${mode}\n`);
      if (mode.startsWith("libvirt")) {
        lv ??= await libvirtUp(tb);
        rows.push(await runLibvirt(tb, lv, mode, guestDir, boundS));
      } else rows.push(await runMode(tb, mode, guestDir, boundS));
    }
  } finally {
    await lv?.down();
    await tb.down();
  }
  return rows;
}
