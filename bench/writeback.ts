/**
 * Write-back benchmark: the downtime of a guest that has been writing for a while, its writes still in the
 * source host's page cache (nothing syncs before the migration, unlike the migration benchmark's rounds).
 * QEMU flushes every disk when it stops the guest for the switchover, so that flush is inside the downtime;
 * nbdmig has the kernel write the copied disks' images back at READY, while the guest still runs. Beside it
 * in the same run, interleaved: the floor (libvirt's bare QMP sequence, which does not). It only prints.
 */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { guestAddress, Testbed } from "../src/testbed/testbed.js";
import { guestServes, median, nbdmigOk, referenceVm, runAsync } from "./common.js";
import { floorOnce } from "./floor.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");

/** How long the guest writes (20 MiB/s) between serving and the migration. */
const WRITE_S = 15;

export interface WritebackRow {
  what: string;
  /** The host's dirty page cache when the migration started, MiB (medians). */
  dirtyMiB: number;
  downtimeMs: number;
  totalS: number;
  samples: number[];
}

const dirtyMiB = (): number =>
  Number(/^Dirty:\s+(\d+)/m.exec(fs.readFileSync("/proc/meminfo", "utf8"))?.[1] ?? 0) / 1024;

export async function writebackBench(runs: number): Promise<WritebackRow[]> {
  execFileSync("bash", [path.join(repo, "scripts/build-test-guest.sh")], { stdio: "inherit" });
  const guestDir = path.join(repo, ".cache/test-guest");
  const tb = await Testbed.up();
  const got: Record<"nbdmig" | "floor", { dirty: number; downtime: number; total: number }[]> = {
    nbdmig: [],
    floor: [],
  };
  try {
    let seq = 0;
    for (let i = 0; i < runs; i++) {
      for (const variant of i % 2 ? (["floor", "nbdmig"] as const) : (["nbdmig", "floor"] as const)) {
        const n = seq++;
        const name = `wb${n}`;
        const addr = guestAddress(10 + (n % 90));
        const xml = referenceVm(tb, name, addr, guestDir);
        process.stderr.write(`write-back bench: ${variant}, run ${i + 1}/${runs}\n`);
        const ready = async (console: () => string) => {
          await guestServes(tb, addr, console);
          await sleep(WRITE_S * 1000);
        };
        let r: { dirty: number; downtime: number; total: number };
        if (variant === "floor") {
          let dirty = 0;
          const f = await floorOnce(
            tb,
            xml,
            `w${n}`,
            async (c) => {
              await ready(c);
              dirty = dirtyMiB();
            },
            { sync: false },
          );
          r = { dirty, downtime: f.downtimeMs ?? NaN, total: f.totalS };
        } else {
          fs.writeFileSync(path.join(tb.a.dir, `${name}.xml`), xml);
          nbdmigOk(tb, "a", ["define", `/var/lib/nbdmig/${name}.xml`]);
          nbdmigOk(tb, "a", ["start", name]);
          await ready(() => tb.a.consoleLog(name));
          const dirty = dirtyMiB();
          const { seconds } = await runAsync(
            tb.a.cliArgv(["migrate", "--live", "--copy-storage-all", "--no-tls", name, tb.b.uri]),
          );
          const job = JSON.parse(nbdmigOk(tb, "a", ["domjobinfo", name, "--completed", "--json"])) as {
            downtimeMs: number;
          };
          nbdmigOk(tb, "b", ["destroy", name]);
          nbdmigOk(tb, "a", ["undefine", name]);
          r = { dirty, downtime: job.downtimeMs, total: seconds };
        }
        process.stderr.write(
          `  dirty ${r.dirty.toFixed(0)} MiB, downtime ${r.downtime} ms, total ${r.total.toFixed(2)} s\n`,
        );
        got[variant].push(r);
        for (const h of ["a", "b"] as const)
          for (const f of [`${name}.qcow2`, `${name}-shared.raw`])
            fs.rmSync(path.join(tb[h].imagesDir, f), { force: true });
      }
    }
  } finally {
    await tb.down();
  }
  return (["nbdmig", "floor"] as const).map((v) => ({
    what: v === "nbdmig" ? "nbdmig migrate (writes back at READY)" : "floor: the bare QMP sequence",
    dirtyMiB: median(got[v].map((x) => x.dirty)),
    downtimeMs: median(got[v].map((x) => x.downtime)),
    totalS: median(got[v].map((x) => x.total)),
    samples: got[v].map((x) => x.downtime),
  }));
}
