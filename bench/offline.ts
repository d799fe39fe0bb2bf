/**
 * Offline migration benchmark: a shut-off domain moved with `migrate --offline --copy-storage-all`, beside
 * nbdcopy copying the same image between the same two hosts into a qemu-nbd serving a fresh image, in the
 * same run on the same link, unshaped and at 1 Gbit/s. Disks: the reference disk (2 GiB qcow2, 512 MiB of
 * data at its start), and an 8 GiB disk holding 100 MiB in 100 pieces spread over it, raw (our own NBD
 * server on the destination) and qcow2 (qemu-nbd there). Targets (the issue's): nbdmig at least 0.95x
 * nbdcopy's speed, bytes on the wire at most 1.05x the allocated data, and a copy resumed with
 * `--keep-partial` after a cut at half of the data sends at most 1.1x the part that was missing. It only
 * prints: nothing here is a timed assertion.
 */
import { execFileSync, spawn } from "node:child_process";
import { randomFillSync } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { Testbed } from "../src/testbed/testbed.js";
import { testGuest } from "../test/helpers/env.js";
import { defineGuest, IMG } from "../test/helpers/migration.js";
import { dataExtents, median, nbdcopyBetweenHosts, nbdmigOk, referenceImage } from "./common.js";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

const LINKS = [
  ["unshaped", undefined],
  ["1 Gbit/s", "1gbit"],
] as const;
/** The resumed copies run on the shaped link only: unshaped, the sparse disk's copy is over before a cut lands. */
const RESUME_LINK = LINKS[1];

interface DiskCase {
  label: string;
  /** The shut-off domain on host a that has this disk (vda). */
  domain: string;
  /** The image's name in the images directory, the same on both hosts. */
  image: string;
  format: "raw" | "qcow2";
  extents: { start: number; length: number }[];
  /** Bytes that hold data (what block status reports as data): the yardstick of rates and ratios. */
  allocated: number;
}

export interface OfflineRow {
  disk: string;
  link: string;
  tool: string;
  seconds?: number;
  /** Allocated data over the seconds. */
  dataMiBs?: number;
  wireMiB?: number;
  /** Bytes on the wire over the allocated data. */
  wireRatio?: number;
  note?: string;
}

export interface ResumeRow {
  disk: string;
  link: string;
  /** What the first attempt had sent when it was cut. */
  cutMiB: number;
  /** Where the second attempt resumed (the disk's offset). */
  resumedFromMiB: number;
  /** The allocated data at or beyond that offset: the part that was missing. */
  missingMiB: number;
  seconds: number;
  wireMiB: number;
  /** The second attempt's wire bytes over the part that was missing. */
  ratio: number;
  note: string;
}

export interface OfflineResult {
  rows: OfflineRow[];
  resume: ResumeRow[];
  /** Why the resumed copies were not measured, when they were not. */
  resumeNotRun?: string;
}

/** What domjobinfo --completed --json says of an offline job (only what the benchmark reads). */
interface CompletedJob {
  elapsedMs: number;
  phaseTimes: Record<string, number>;
  disks: { target: string; total: number; dataBytes?: number; resumedFrom?: number }[];
}

interface Sample {
  seconds: number;
  wireBytes: number;
  /** nbdmig only: the job's perform:copy phase, the rest being Begin, Prepare, Finish and the CLI. */
  copySeconds?: number;
  /** nbdmig only: where the command's time went (printed while the benchmark runs). */
  breakdown?: string;
  /** The engine alone (`nbdmig nbd copy`): the copy as it timed it, without the CLI's start-up. */
  engineSeconds?: number;
  dataBytes?: number;
}

/**
 * A sparse image of `size` bytes in host a's image directory with `dataMiB` MiB of random data in `pieces`
 * equal pieces spread evenly over it. A qcow2 one is converted from the raw one, so that it holds the same
 * clusters a guest's writes would have allocated.
 */
function spreadImage(
  tb: Testbed,
  image: string,
  format: "raw" | "qcow2",
  size: number,
  dataMiB: number,
  pieces: number,
) {
  const file = path.join(tb.a.imagesDir, image);
  const raw = format === "raw" ? file : `${file}.raw`;
  const piece = (dataMiB * MiB) / pieces;
  const stride = Math.floor(size / pieces / MiB) * MiB;
  const fd = fs.openSync(raw, "w");
  try {
    fs.ftruncateSync(fd, size);
    const buf = Buffer.alloc(piece);
    for (let i = 0; i < pieces; i++) fs.writeSync(fd, randomFillSync(buf), 0, piece, i * stride);
  } finally {
    fs.closeSync(fd);
  }
  if (format === "qcow2") {
    execFileSync("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, file]);
    fs.rmSync(raw);
  }
}

function diskCase(
  tb: Testbed,
  label: string,
  domain: string,
  image: string,
  format: "raw" | "qcow2",
): DiskCase {
  const extents = dataExtents(path.join(tb.a.imagesDir, image));
  return { label, domain, image, format, extents, allocated: extents.reduce((s, e) => s + e.length, 0) };
}

function completedJob(tb: Testbed, domain: string): CompletedJob {
  return JSON.parse(nbdmigOk(tb, "a", ["domjobinfo", domain, "--completed", "--json"])) as CompletedJob;
}

/** Host b as it was before the migration: the domain undefined there, its image removed. */
function clearDestination(tb: Testbed, c: DiskCase): void {
  if (tb.b.cli(["dominfo", c.domain]).status === 0) nbdmigOk(tb, "b", ["undefine", c.domain]);
  fs.rmSync(path.join(tb.b.imagesDir, c.image), { force: true });
}

const migrateArgs = (tb: Testbed, c: DiskCase, extra: string[] = []) => [
  "migrate",
  "--offline",
  "--copy-storage-all",
  "--no-tls",
  ...extra,
  c.domain,
  tb.b.uri,
];

function nbdmigOnce(tb: Testbed, c: DiskCase): Sample {
  execFileSync("sync");
  const tx0 = tb.linkTxBytes();
  const t0 = process.hrtime.bigint();
  nbdmigOk(tb, "a", migrateArgs(tb, c));
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const wireBytes = tb.linkTxBytes() - tx0;
  const job = completedJob(tb, c.domain);
  clearDestination(tb, c);
  const at = (phase: string) => job.phaseTimes[phase] ?? NaN;
  const copyMs = at("finish") - at("perform:copy");
  const s = (ms: number) => `${(ms / 1000).toFixed(2)} s`;
  const breakdown = `CLI and Begin ${s(seconds * 1000 - job.elapsedMs)}, Prepare ${s(at("perform:copy") - at("prepare"))}, copy ${s(copyMs)}, Finish ${s(job.elapsedMs - at("finish"))}`;
  return {
    breakdown,
    seconds,
    wireBytes,
    copySeconds: Number.isFinite(copyMs) ? copyMs / 1000 : undefined,
    dataBytes: job.disks.reduce((s, d) => s + (d.dataBytes ?? 0), 0),
  };
}

async function nbdcopyOnce(tb: Testbed, c: DiskCase, tool: "nbdcopy" | "nbdmig"): Promise<Sample> {
  return nbdcopyBetweenHosts(tb, path.join(tb.a.imagesDir, c.image), { flush: true, tool });
}

/** The three ways a disk is copied in one round: the migration, nbdcopy, and our engine between the same peers. */
const TOOLS = ["nbdmig", "nbdcopy", "engine"] as const;

/**
 * A copy with --keep-partial aborted once half of the data has crossed the link, then the same command
 * again: that second attempt's seconds and wire bytes, against the allocated data at or beyond the offset
 * it resumed at.
 */
async function resumeOnce(tb: Testbed, c: DiskCase, link: string): Promise<ResumeRow> {
  const args = migrateArgs(tb, c, ["--keep-partial"]);
  const argv = tb.a.cliArgv(args);
  execFileSync("sync");
  const tx0 = tb.linkTxBytes();
  const first = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  first.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  let exitCode: number | undefined;
  const exited = new Promise<number>((resolve) =>
    first.on("close", (code) => resolve((exitCode = code ?? -1))),
  );
  while (exitCode === undefined && tb.linkTxBytes() - tx0 < c.allocated / 2) await sleep(10);
  if (exitCode !== undefined)
    throw new Error(`the first attempt ended before the cut (${exitCode}): ${stderr}`);
  // The agent's API, not `nbdmig domjobabort`: a CLI's start-up would let another ~40 MiB through at 1 Gbit/s.
  await tb.a.client().call("POST", `/v1/domains/${encodeURIComponent(c.domain)}/job/abort`);
  if ((await exited) === 0) throw new Error("the first attempt completed although it was aborted");
  const cut = tb.linkTxBytes() - tx0;

  const tx1 = tb.linkTxBytes();
  const t0 = process.hrtime.bigint();
  nbdmigOk(tb, "a", args);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const wire = tb.linkTxBytes() - tx1;
  const job = completedJob(tb, c.domain);
  clearDestination(tb, c);
  const from = job.disks[0]?.resumedFrom ?? 0;
  const missing = c.extents.reduce(
    (s, e) => s + Math.max(0, e.start + e.length - Math.max(e.start, from)),
    0,
  );
  const sent = job.disks.reduce((s, d) => s + (d.dataBytes ?? 0), 0);
  return {
    disk: c.label,
    link,
    cutMiB: cut / MiB,
    resumedFromMiB: from / MiB,
    missingMiB: missing / MiB,
    seconds,
    wireMiB: wire / MiB,
    ratio: wire / Math.max(1, missing),
    note: `sent ${(sent / MiB).toFixed(0)} MiB as data${job.disks[0]?.resumedFrom === undefined ? "; no resumedFrom: started over" : ""}`,
  };
}

const met = (ok: boolean) => (ok ? "met" : "NOT met");

export async function offlineBench(runs: number): Promise<OfflineResult> {
  const guest = testGuest();
  const tb = await Testbed.up();
  try {
    referenceImage(tb, "a", "offref.qcow2");
    spreadImage(tb, "offraw.raw", "raw", 8 * GiB, 100, 100);
    spreadImage(tb, "offq.qcow2", "qcow2", 8 * GiB, 100, 100);
    const cases = [
      diskCase(tb, "reference: 2 GiB qcow2, 512 MiB data", "offref", "offref.qcow2", "qcow2"),
      diskCase(tb, "8 GiB raw, 100 MiB data in 100 pieces", "offraw", "offraw.raw", "raw"),
      diskCase(tb, "8 GiB qcow2, 100 MiB data in 100 pieces", "offq", "offq.qcow2", "qcow2"),
    ];
    for (const c of cases)
      defineGuest(
        tb,
        { name: c.domain, disks: [{ target: "vda", source: `${IMG}/${c.image}`, format: c.format }] },
        guest,
      );

    const rows: OfflineRow[] = [];
    for (const [link, rate] of LINKS) {
      tb.setRate(rate);
      const ours = new Map<DiskCase, Sample[]>(cases.map((c) => [c, []]));
      const peer = new Map<DiskCase, Sample[]>(cases.map((c) => [c, []]));
      const engine = new Map<DiskCase, Sample[]>(cases.map((c) => [c, []]));
      for (let i = 0; i < runs; i++)
        for (const c of cases) {
          process.stderr.write(`offline bench: ${link}, ${c.label}, run ${i + 1}/${runs}\n`);
          // Who goes first rotates, so that none always finds the page cache as another left it.
          for (let k = 0; k < TOOLS.length; k++) {
            const tool = TOOLS[(i + k) % TOOLS.length]!;
            const s =
              tool === "nbdmig"
                ? nbdmigOnce(tb, c)
                : await nbdcopyOnce(tb, c, tool === "engine" ? "nbdmig" : "nbdcopy");
            process.stderr.write(
              `  ${tool}: ${s.seconds.toFixed(2)} s${s.copySeconds ? ` (copy phase ${s.copySeconds.toFixed(2)} s)` : ""}${s.engineSeconds ? ` (copy ${s.engineSeconds.toFixed(2)} s)` : ""}, ${(s.wireBytes / MiB).toFixed(1)} MiB on the wire${s.breakdown ? `; ${s.breakdown}` : ""}\n`,
            );
            (tool === "nbdmig" ? ours : tool === "engine" ? engine : peer).get(c)!.push(s);
          }
        }
      for (const c of cases) {
        const row = (tool: string, ss: Sample[]): OfflineRow => {
          const seconds = median(ss.map((s) => s.seconds));
          const wire = median(ss.map((s) => s.wireBytes));
          return {
            disk: c.label,
            link,
            tool,
            seconds,
            dataMiBs: c.allocated / MiB / seconds,
            wireMiB: wire / MiB,
            wireRatio: wire / c.allocated,
          };
        };
        const a = row("nbdmig migrate --offline", ours.get(c)!);
        const copyS = median(ours.get(c)!.map((s) => s.copySeconds ?? 0));
        a.note = `wire <= 1.05x data: ${met(a.wireRatio! <= 1.05)}; copy phase ${copyS.toFixed(2)} s`;
        const b = row("nbdcopy --flush", peer.get(c)!);
        const e = row("nbdmig nbd copy --flush (engine alone, same peers)", engine.get(c)!);
        e.note = `its own timing, without the CLI's start-up: ${median(engine.get(c)!.map((s) => s.engineSeconds ?? 0)).toFixed(2)} s; ${(b.seconds! / e.seconds!).toFixed(2)}x nbdcopy's speed`;
        const speed = b.seconds! / a.seconds!;
        rows.push(a, b, e, {
          disk: c.label,
          link,
          tool: "speed nbdmig / nbdcopy",
          note: `${speed.toFixed(2)}x (target >= 0.95: ${met(speed >= 0.95)})`,
        });
      }
    }

    const resume: ResumeRow[] = [];
    if (!tb.a.cli(["migrate", "--help"]).stdout.includes("--keep-partial"))
      return { rows, resume, resumeNotRun: "this nbdmig has no migrate --keep-partial" };
    tb.setRate(RESUME_LINK[1]);
    for (const c of cases) {
      const rs: ResumeRow[] = [];
      for (let i = 0; i < runs; i++) {
        process.stderr.write(
          `offline bench: resumed copy, ${RESUME_LINK[0]}, ${c.label}, run ${i + 1}/${runs}\n`,
        );
        const r = await resumeOnce(tb, c, RESUME_LINK[0]);
        process.stderr.write(
          `  cut at ${r.cutMiB.toFixed(0)} MiB, resumed from ${r.resumedFromMiB.toFixed(0)} MiB, ${r.wireMiB.toFixed(1)} MiB on the wire for ${r.missingMiB.toFixed(1)} MiB missing\n`,
        );
        rs.push(r);
      }
      const med = (f: (r: ResumeRow) => number) => median(rs.map(f));
      const ratio = med((r) => r.ratio);
      resume.push({
        disk: c.label,
        link: RESUME_LINK[0],
        cutMiB: med((r) => r.cutMiB),
        resumedFromMiB: med((r) => r.resumedFromMiB),
        missingMiB: med((r) => r.missingMiB),
        seconds: med((r) => r.seconds),
        wireMiB: med((r) => r.wireMiB),
        ratio,
        note: `target <= 1.1x: ${met(ratio <= 1.1)}; ${rs.map((r) => r.note).join(" / ")}`,
      });
    }
    return { rows, resume };
  } finally {
    await tb.down();
  }
}
