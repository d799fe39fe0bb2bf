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

/** Per-second write rates from the guest's progress lines. */
function rates(tb: Testbed, name: string): number[] {
  return nbdmig(tb, "a", ["console", name, "--bytes", "10000000"])
    .stdout.split("\n")
    .flatMap((l) => {
      const m = /nbdmig-guest: t=\d+ mib=\d+ rate=(\d+)/.exec(l);
      return m ? [Number(m[1])] : [];
    });
}

async function runMode(tb: Testbed, mode: string, guestDir: string, boundS: number): Promise<ConvergeRow> {
  const name = `heavy-${mode}`;
  referenceImage(tb, "a", `${name}.qcow2`);
  fs.writeFileSync(
    path.join(tb.a.dir, `${name}.xml`),
    `<domain type='kvm'><name>${name}</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='q35'>hvm</type><kernel>${guestDir}/vmlinuz</kernel><initrd>${guestDir}/initrd.img</initrd>
<cmdline>console=ttyS0 quiet nbdmig.rate=0 nbdmig.span=2048 nbdmig.warm=${WARM_S}:512</cmdline></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/nbdmig/images/${name}.qcow2'/><target dev='vda' bus='virtio'/></disk><serial type='pty'/></devices></domain>`,
  );
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

export async function convergeBench(
  boundS: number,
  modes = ["auto", "throttle", "sync", "none"],
): Promise<ConvergeRow[]> {
  execFileSync("bash", [path.join(repo, "scripts/build-test-guest.sh")], { stdio: "inherit" });
  const guestDir = path.join(repo, ".cache/test-guest");
  const tb = await Testbed.up({ rate: "200mbit" });
  const rows: ConvergeRow[] = [];
  try {
    for (const mode of modes) {
      process.stderr.write(`converge bench: ${mode}\n`);
      rows.push(await runMode(tb, mode, guestDir, boundS));
    }
  } finally {
    await tb.down();
  }
  return rows;
}
