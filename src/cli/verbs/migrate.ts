/** migrate, domjobinfo, domjobabort: the migration verbs, shaped after virsh's. */
import type cliProgressModule from "cli-progress";
import type { Command } from "commander";
import { readToken, type AgentClient } from "../../agent/client.js";
import { MigrationError, NbdmigError, UsageError, type MigrationPhase } from "../../errors.js";
import { CONVERGE_MODES, MAX_KEEP_PARTIAL_MS } from "../../migration/options.js";
import { formatBytes, formatDuration, keyValues } from "../../util/format.js";
import { agentFrom, enc, out } from "../context.js";

export interface JobInfo {
  type: string;
  operation: string;
  domain: string;
  phase: string;
  status: "active" | "completed" | "failed" | "cancelled";
  elapsedMs: number;
  timeToReadyMs?: number;
  downtimeMs?: number;
  ramBytes?: number;
  storagePath?: string;
  notes?: string[];
  nbd?: { host: string; port: number };
  convergence?: {
    mode: string;
    writeCapBps?: number | null;
    copyRateBps?: number;
    dirtyRateBps?: number;
    predictedReadyS?: number | null;
  };
  dest?: string;
  disks?: { target: string; copied: number; total: number; ready: boolean; rateBps: number }[];
  /** Block migration's progress when the disks ride in the migration stream. */
  streamDisk?: { transferred: number; remaining: number; total: number; targets: string[] };
  disk?: { processed: number; remaining: number; total: number; rateBps: number };
  memory?: {
    processed: number;
    remaining: number;
    total: number;
    rateBps: number;
    dirtyPagesRate: number;
    iterations: number;
  };
  /** When each phase began, in ms since the job started (source jobs). */
  phaseTimes?: Record<string, number>;
  error?: string;
  errorCode?: string;
  errorPhase?: MigrationPhase;
  errorDetail?: string;
}

/**
 * Follows a domain's job until it has ended, through the job long poll: answered at each new phase, at the
 * end, or after `everyMs`. Each answer goes to `onJob`; returns the ended job. `byStatus`: a job that reports
 * an outcome has ended even while it holds the domain (a copy kept paused after a failed --verify).
 */
async function followJob(
  agent: AgentClient,
  name: string,
  first: JobInfo,
  onJob: (j: JobInfo) => void,
  everyMs = 500,
  byStatus = false,
): Promise<JobInfo> {
  let job = first;
  for (;;) {
    const r = await agent.call<{ active: boolean; job: JobInfo | null }>(
      "GET",
      `/v1/domains/${enc(name)}/job?waitMs=${everyMs}&phase=${encodeURIComponent(job.phase)}`,
    );
    if (r.job) job = r.job;
    onJob(job);
    if ((!r.active || byStatus) && r.job && r.job.status !== "active") return job;
  }
}

/**
 * `--json` on migrate and `domjobinfo --follow`: the job as events, one JSON object per line on stdout.
 * `phase` for each phase the job entered (with `atMs` since its start, in order, also those it went through
 * between two answers), `progress` with the job at each answer while it runs, and `end` with its status.
 */
class JobEvents {
  private readonly seen = new Set<string>();
  constructor(private readonly domain: string) {}
  emit(j: JobInfo): void {
    const entered = j.phaseTimes
      ? Object.entries(j.phaseTimes).sort((a, b) => a[1] - b[1])
      : [[j.phase, j.elapsedMs] as const];
    for (const [phase, atMs] of entered) {
      if (this.seen.has(phase)) continue;
      this.seen.add(phase);
      this.line({ event: "phase", domain: this.domain, phase, atMs });
    }
    if (j.status === "active") this.line({ event: "progress", domain: this.domain, job: j });
    else this.line({ event: "end", domain: this.domain, status: j.status, job: j });
  }
  private line(o: Record<string, unknown>): void {
    out(JSON.stringify(o) + "\n");
  }
}

/** A failed or cancelled job as the error the command exits with. */
function jobError(job: JobInfo): MigrationError {
  return new MigrationError(
    job.errorPhase ?? "perform",
    job.errorDetail ?? job.error ?? job.status,
    job.errorCode,
  );
}

const int = (flag: string) => (v: string) => {
  if (!/^\d+$/.test(v) || Number(v) < 1)
    throw new UsageError(`${flag} takes a positive whole number, not '${v}'`);
  return Number(v);
};

const MiB = 1024 * 1024;
const mib = (n: number) => (n / MiB).toFixed(0);

/** Overall progress: disks and RAM together, with the RAM size standing in until QEMU reports totals. */
function overall(j: JobInfo): { done: number; total: number; rate: number } {
  const dDone = j.disk?.processed ?? 0;
  const dTotal = j.disk?.total ?? 0;
  const mTotal = j.memory?.total ?? j.ramBytes ?? 0;
  const mDone = j.memory ? Math.min(mTotal, j.memory.total - j.memory.remaining) : 0;
  return {
    done: dDone + mDone,
    total: dTotal + mTotal,
    rate: (j.disk?.rateBps ?? 0) + (j.memory?.rateBps ?? 0),
  };
}

/** `domjobinfo --follow`: one line per answer (elapsed, phase, status, overall progress and rate). */
function followLine(j: JobInfo): string {
  const o = overall(j);
  const pct = o.total ? `${Math.floor((o.done / o.total) * 100)}%` : "-";
  return `${(j.elapsedMs / 1000).toFixed(1).padStart(7)} s  ${j.phase.padEnd(18)} ${j.status.padEnd(9)} ${pct.padStart(4)}  ${formatBytes(o.done)}/${formatBytes(o.total)}  ${formatBytes(o.rate)}/s`;
}

function eta(j: JobInfo): string {
  const o = overall(j);
  if (!o.rate || o.total <= o.done) return "-";
  return formatDuration(((o.total - o.done) / o.rate) * 1000);
}

/** cli-progress is loaded only for --verbose (it adds about 15 ms to every CLI start). */
type CliProgress = typeof cliProgressModule;

class ProgressView {
  private readonly multi: cliProgressModule.MultiBar;
  constructor(cliProgress: CliProgress) {
    this.multi = new cliProgress.MultiBar(
      {
        format: " {label} |{bar}| {percentage}% {detail}",
        barsize: 30,
        hideCursor: true,
        clearOnComplete: false,
        noTTYOutput: true,
        notTTYSchedule: 1000,
        forceRedraw: true,
      },
      cliProgress.Presets.shades_classic,
    );
  }
  private bars = new Map<string, cliProgressModule.SingleBar>();
  private phase?: string;

  update(j: JobInfo): void {
    const o = overall(j);
    this.bar(
      "overall",
      "Migration",
      o.total,
      o.done,
      `phase ${j.phase}, ${formatBytes(o.rate)}/s, ETA ${eta(j)}${convergeText(j)}`,
    );
    for (const d of j.disks ?? []) {
      this.bar(
        `disk-${d.target}`,
        `disk ${d.target}`,
        d.total,
        d.copied,
        `${mib(d.copied)}/${mib(d.total)} MiB ${formatBytes(d.rateBps)}/s${d.ready ? " ready" : ""}`,
      );
    }
    const sd = j.streamDisk;
    if (sd)
      this.bar(
        "stream",
        `disks ${sd.targets.join(",")}`,
        sd.total,
        sd.total - sd.remaining,
        `in the migration stream, ${mib(sd.transferred)} MiB sent`,
      );
    const m = j.memory;
    if (m)
      this.bar(
        "ram",
        "RAM",
        m.total,
        m.total - m.remaining,
        `${mib(m.processed)} MiB sent, ${formatBytes(m.rateBps)}/s, pass ${m.iterations}`,
      );
    // Each new phase is drawn at once: without a terminal the bars are written only once a second, and a
    // migration whose perform phase is shorter than that would show nothing but its end in a log.
    if (j.phase !== this.phase) {
      this.phase = j.phase;
      this.multi.update();
    }
  }

  private bar(key: string, label: string, total: number, value: number, detail: string): void {
    let b = this.bars.get(key);
    const t = Math.max(1, total);
    if (!b) {
      b = this.multi.create(t, Math.min(value, t), { label: label.padEnd(10), detail });
      this.bars.set(key, b);
    } else {
      b.setTotal(t);
      b.update(Math.min(value, t), { label: label.padEnd(10), detail });
    }
  }

  stop(): void {
    this.multi.stop();
  }
}

export function register(program: Command): void {
  program
    .command("migrate")
    .description("migrate a running domain to another host's agent, copying its local disks over NBD")
    .argument("<domain>")
    .argument(
      "[dest-uri]",
      "destination agent: nbdmig://HOST:PORT (HOST is where the destination QEMU listens)",
    )
    .option("--live", "live migration (the guest keeps running; the default, as the flag is in virsh)")
    .option("--offline-pause", "pause the guest for the whole migration (virsh without --live)")
    .option(
      "--offline",
      "migrate a shut-off domain: its disks are copied by nbdmig's copy engine (with --copy-storage-all or -inc) and it is defined on the destination",
    )
    .option(
      "--verify",
      "compare every copied disk on both sides: with --offline before the domain is defined there, with --suspend before Finish (a difference fails the migration)",
    )
    .option(
      "--keep-partial",
      "with --offline: a copy cut off (link down, an agent killed, an abort) stays on the destination for 24h and the same command resumes it",
    )
    .option(
      "--keep-partial-for <duration>",
      "--keep-partial, for this long instead (e.g. 30m, 12h, 2d; at most 7d)",
    )
    .option(
      "--copy-storage-all",
      "copy every local disk (not shareable, read-only or source-less ones) over NBD",
    )
    .option(
      "--copy-storage-inc",
      "copy only the top image of each disk's backing chain (the base must be on the destination)",
    )
    .option(
      "--verify-backing",
      "with --copy-storage-inc: check that the destination's backing files have the same content",
    )
    .option("--migrate-disks <list>", "copy exactly these disk targets, e.g. vda,vdb")
    .option(
      "--bandwidth <MiB/s>",
      "cap disk copy and RAM migration bandwidth (default: unlimited)",
      int("--bandwidth"),
    )
    .option(
      "--disks-port <port>",
      "NBD port on the destination (default: from its pool)",
      int("--disks-port"),
    )
    .option("--persistent", "keep the domain defined on the destination")
    .option("--undefinesource", "remove the definition from the source after success")
    .option("--suspend", "leave the domain paused on the destination")
    .option(
      "--timeout <sec>",
      "suspend the guest if the migration runs longer (it then converges)",
      int("--timeout"),
    )
    .option(
      "--dest-token-file <file>",
      "API token of the destination agent (default: the same token as the source's)",
    )
    .option(
      "--storage-converge <mode>",
      "auto (default): throttle, then write-blocking after READY where QEMU can; throttle: cap the guest's writes while the copy falls behind; sync: write-blocking from the start; none",
    )
    .option("--copy-storage-synchronous-writes", "libvirt's name for --storage-converge sync")
    .option(
      "--timeout-suspend",
      "with --timeout: suspend the guest when it expires (the default action, as in virsh)",
    )
    .option(
      "--tls",
      "encrypt and authenticate the disk copy and the migration stream (x509, each host's state dir pki); the default when this host has certificates",
    )
    .option("--no-tls", "migrate in clear although this host has certificates")
    .option("--verbose", "show live progress")
    .option(
      "--json",
      "the job as events on stdout, one JSON object per line: each phase as it is entered, progress every half second, then the end",
    )
    .option(
      "--recover <copy>",
      "after a migration whose outcome is unknown (its guest paused here): keep the 'source' copy (resume it here) or the 'destination' one (stop it here); refused if the destination's state says otherwise",
    )
    .option("--force", "with --recover: go ahead although the destination cannot be asked")
    .action(async (name: string, dest: string | undefined, o: Record<string, unknown>, cmd: Command) => {
      const agent = agentFrom(cmd);
      if (o.recover !== undefined) {
        if (o.recover !== "source" && o.recover !== "destination")
          throw new UsageError(`--recover takes 'source' or 'destination', not '${String(o.recover)}'`);
        const r = await agent.call<{ message: string }>("POST", `/v1/domains/${enc(name)}/migrate/recover`, {
          keep: o.recover,
          force: o.force === true,
        });
        out(`${r.message}\n`);
        return;
      }
      if (o.force) throw new UsageError("--force goes with --recover source|destination");
      if (dest === undefined)
        throw new UsageError(
          "migrate needs the destination agent's URI: nbdmig migrate DOMAIN nbdmig://HOST:PORT",
        );
      if (o.live && o.offlinePause) throw new UsageError("--live and --offline-pause exclude each other");
      if (o.offline && (o.live || o.offlinePause || o.suspend || o.timeout || o.storageConverge))
        throw new UsageError(
          "--offline moves a shut-off domain: --live, --offline-pause, --suspend, --timeout and --storage-converge are for a running one",
        );
      if (o.copyStorageAll && o.copyStorageInc)
        throw new UsageError("--copy-storage-all and --copy-storage-inc exclude each other");
      if (o.migrateDisks && !o.copyStorageAll && !o.copyStorageInc) {
        throw new UsageError("--migrate-disks needs --copy-storage-all or --copy-storage-inc");
      }
      if (o.verify && !((o.offline || o.suspend) && (o.copyStorageAll || o.copyStorageInc)))
        throw new UsageError(
          "--verify compares copied disks once neither side writes them: it goes with --copy-storage-all or --copy-storage-inc, and with --offline or --suspend (a running guest's disks keep changing)",
        );
      const keep =
        o.keepPartialFor !== undefined ? String(o.keepPartialFor) : o.keepPartial ? "24h" : undefined;
      if (keep !== undefined && !(o.offline && (o.copyStorageAll || o.copyStorageInc)))
        throw new UsageError(
          "--keep-partial goes with --offline --copy-storage-all or --copy-storage-inc (a live migration's copy is redone by the mirror)",
        );
      const keepPartialMs = keep === undefined ? undefined : parseKeepDuration(keep);
      if (o.verifyBacking && !o.copyStorageInc)
        throw new UsageError("--verify-backing goes with --copy-storage-inc");
      if (o.timeoutSuspend && !o.timeout) throw new UsageError("--timeout-suspend goes with --timeout SEC");
      let converge = o.storageConverge === undefined ? undefined : String(o.storageConverge);
      if (converge !== undefined && !(CONVERGE_MODES as readonly string[]).includes(converge)) {
        const modes = `${CONVERGE_MODES.slice(0, -1).join(", ")} or ${CONVERGE_MODES.at(-1)}`;
        throw new UsageError(`--storage-converge takes ${modes}, not '${converge}'`);
      }
      if (o.copyStorageSynchronousWrites) {
        if (converge !== undefined && converge !== "sync") {
          throw new UsageError(
            "--copy-storage-synchronous-writes means --storage-converge sync; drop one of them",
          );
        }
        converge = "sync";
      }
      const migrateDisks = o.migrateDisks
        ? String(o.migrateDisks)
            .split(",")
            .map((s) => s.trim())
            .filter(Boolean)
        : undefined;
      const started = await agent.call<JobInfo>("POST", `/v1/domains/${enc(name)}/migrate`, {
        dest,
        destToken: o.destTokenFile ? readToken(String(o.destTokenFile)) : undefined,
        live: !o.offlinePause && !o.offline,
        offline: o.offline === true,
        verify: o.verify === true,
        keepPartialMs,
        copyStorage: o.copyStorageAll ? "all" : o.copyStorageInc ? "inc" : "none",
        verifyBacking: o.verifyBacking === true,
        storageConverge: converge,
        migrateDisks,
        bandwidthMiB: o.bandwidth,
        disksPort: o.disksPort,
        persistent: o.persistent === true,
        undefineSource: o.undefinesource === true,
        suspend: o.suspend === true,
        timeoutSec: o.timeout,
        tls: o.tls as boolean | undefined,
      });
      if (o.verbose) for (const n of started.notes ?? []) process.stderr.write(`${n}\n`);
      const view = o.verbose ? new ProgressView((await import("cli-progress")).default) : undefined;
      const events = o.json ? new JobEvents(name) : undefined;
      events?.emit(started);
      let job: JobInfo;
      const onSigint = () =>
        void agent.call("POST", `/v1/domains/${enc(name)}/job/abort`).catch(() => undefined);
      process.on("SIGINT", onSigint);
      try {
        job = await followJob(agent, name, started, (j) => {
          view?.update(j);
          events?.emit(j);
        });
      } finally {
        view?.stop();
        process.off("SIGINT", onSigint);
      }
      // What the job found on the way (--verify's result per disk, say), after the progress view.
      if (o.verbose || o.verify)
        for (const n of (job.notes ?? []).filter((x) => !(started.notes ?? []).includes(x)))
          process.stderr.write(`${n}\n`);
      if (job.status !== "completed") throw jobError(job);
      if (events) return;
      out(
        `Migration of '${name}' to ${dest} completed in ${formatDuration(job.elapsedMs)}` +
          `${job.downtimeMs !== undefined ? `, downtime ${job.downtimeMs} ms` : ""}` +
          `${job.disk?.total ? `, disks ${formatBytes(job.disk.total)}` : ""}\n`,
      );
    });

  program
    .command("domjobinfo")
    .description("show the active (or, with --completed, the last) job of a domain, on either side")
    .argument("<domain>")
    .option("--completed", "the last finished job")
    .option("--json", "machine-readable output")
    .option(
      "--follow",
      "follow the active job until it ends: a line at each new phase and every second (with --json, events as migrate --json writes them); exits 1 if the job fails",
    )
    .action(
      async (name: string, o: { completed?: boolean; json?: boolean; follow?: boolean }, cmd: Command) => {
        const agent = agentFrom(cmd);
        const r = await agent.call<{ active: boolean; job: JobInfo | null }>(
          "GET",
          `/v1/domains/${enc(name)}/job`,
        );
        if (o.follow) {
          if (o.completed) throw new UsageError("--follow follows the active job: drop --completed");
          if (!r.active || !r.job)
            throw new NbdmigError(
              "E_NO_JOB",
              `domain '${name}' has no active job to follow (its last one: nbdmig domjobinfo ${name} --completed)`,
            );
          const events = o.json ? new JobEvents(name) : undefined;
          const line = (j: JobInfo) => (events ? events.emit(j) : out(`${followLine(j)}\n`));
          line(r.job);
          const job =
            r.job.status === "active" ? await followJob(agent, name, r.job, line, 1000, true) : r.job;
          if (job.status !== "completed") throw jobError(job);
          return;
        }
        const job = r.job && (r.active || o.completed) ? r.job : null;
        if (o.json) {
          out(JSON.stringify(job ? { ...job, active: r.active } : { type: "none" }, null, 2) + "\n");
          return;
        }
        if (!job) {
          out(keyValues([["Job type", "None"]]) + "\n");
          return;
        }
        out(renderJob(job, r.active) + "\n");
      },
    );

  program
    .command("domjobabort")
    .description("abort a domain's migration; the source keeps running and the destination is cleaned up")
    .argument("<domain>")
    .action(async (name: string, _o, cmd: Command) => {
      await agentFrom(cmd).call("POST", `/v1/domains/${enc(name)}/job/abort`);
    });

  const partial = program
    .command("partial")
    .description(
      "copies kept on this host: partial ones of offline migrations with --keep-partial, and live ones whose --verify failed (paused)",
    );
  partial
    .command("list")
    .description("the partial copies kept here: domain, disks and how far each got, until when")
    .option("--json", "as JSON")
    .action(async (o: { json?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ partials: PartialInfo[] }>("GET", "/v1/partials");
      if (o.json) return out(JSON.stringify(r.partials, null, 2));
      if (!r.partials.length) return out("no partial copy is kept on this host");
      for (const p of r.partials) {
        const disks = p.disks
          .map((d) => `${d.target} ${formatBytes(d.doneTo)}/${formatBytes(d.virtualSize)}`)
          .join(", ");
        out(`${p.name}: ${disks}; kept until ${new Date(p.keptUntil).toISOString()} (${p.reason})`);
      }
    });
  partial
    .command("discard")
    .description("remove a partial copy kept here (its images) instead of resuming it")
    .argument("<domain>")
    .action(async (name: string, _o, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ removed: string[] }>("DELETE", `/v1/partials/${enc(name)}`);
      out(`removed the partial copy of '${name}': ${r.removed.join(", ")}`);
    });
}

interface PartialInfo {
  name: string;
  keptUntil: number;
  reason: string;
  disks: { target: string; doneTo: number; virtualSize: number }[];
}

function convergeText(j: JobInfo): string {
  const c = j.convergence;
  if (!c || !c.dirtyRateBps) return "";
  return `, guest dirties ${formatBytes(c.dirtyRateBps)}/s${c.writeCapBps ? `, write cap ${formatBytes(c.writeCapBps)}/s` : ""}`;
}

const STORAGE_PATHS: Record<string, string> = {
  nbd: "NBD mirror",
  stream: "in the migration stream (QEMU block migration)",
  none: "none (disks not copied)",
};

export function renderJob(j: JobInfo, active: boolean): string {
  const size = (n: number | undefined) => (n === undefined ? "-" : formatBytes(n));
  const rows: [string, string | number][] = [
    ["Job type", active ? "Unbounded" : j.status === "completed" ? "Completed" : "Failed"],
    ["Operation", j.operation],
    ["Phase", j.phase],
    ["Time elapsed", `${j.elapsedMs} ms`],
  ];
  if (j.dest) rows.push(["Destination", j.dest]);
  if (j.storagePath) rows.push(["Storage path", STORAGE_PATHS[j.storagePath] ?? j.storagePath]);
  if (j.nbd) rows.push(["NBD endpoint", `${j.nbd.host}:${j.nbd.port}`]);
  const o = overall(j);
  if (j.disk || j.memory) {
    rows.push(
      ["Data processed", size(o.done)],
      ["Data remaining", size(Math.max(0, o.total - o.done))],
      ["Data total", size(o.total)],
    );
  }
  if (j.memory) {
    rows.push(
      ["Memory processed", size(j.memory.processed)],
      ["Memory remaining", size(j.memory.remaining)],
      ["Memory total", size(j.memory.total)],
      ["Memory bandwidth", `${size(j.memory.rateBps)}/s`],
      ["Dirty rate", `${j.memory.dirtyPagesRate} pages/s`],
      ["Iteration", j.memory.iterations],
    );
  }
  if (j.disk) {
    rows.push(
      ["Disk processed", size(j.disk.processed)],
      ["Disk remaining", size(j.disk.remaining)],
      ["Disk total", size(j.disk.total)],
      ["Disk bandwidth", `${size(j.disk.rateBps)}/s`],
    );
  }
  const c = j.convergence;
  if (c) {
    rows.push(["Storage converge", c.mode]);
    if (c.copyRateBps !== undefined) rows.push(["Copy rate", `${size(c.copyRateBps)}/s`]);
    if (c.dirtyRateBps !== undefined) rows.push(["Disk dirty rate", `${size(c.dirtyRateBps)}/s`]);
    if (c.writeCapBps !== undefined)
      rows.push(["Guest write cap", c.writeCapBps ? `${size(c.writeCapBps)}/s` : "none"]);
    if (active && c.predictedReadyS !== undefined) {
      rows.push([
        "Predicted READY",
        c.predictedReadyS === null ? "not converging" : `${c.predictedReadyS} s`,
      ]);
    }
  }
  if (j.streamDisk) rows.push(["Disk bytes sent", size(j.streamDisk.transferred)]);
  if (j.streamDisk) rows.push(["Disk bytes sent", size(j.streamDisk.transferred)]);
  for (const d of j.disks ?? [])
    rows.push([`Disk ${d.target}`, `${size(d.copied)} / ${size(d.total)}${d.ready ? " (ready)" : ""}`]);
  if (j.timeToReadyMs !== undefined) rows.push(["Time to ready", `${j.timeToReadyMs} ms`]);
  if (j.downtimeMs !== undefined) rows.push(["Total downtime", `${j.downtimeMs} ms`]);
  if (active) rows.push(["Expected finish", eta(j)]);
  if (j.error) rows.push(["Error", j.error]);
  return keyValues(rows);
}

/** `--keep-partial-for`'s duration: a number with s, m, h or d, up to a week. */
function parseKeepDuration(text: string): number {
  const m = /^(\d+(?:\.\d+)?)([smhd])$/.exec(text.trim());
  const unit = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
  const ms = m ? Math.round(Number(m[1]) * unit[m[2] as keyof typeof unit]) : NaN;
  if (!(ms >= 1000 && ms <= MAX_KEEP_PARTIAL_MS))
    throw new UsageError(
      `--keep-partial-for takes a duration from 1s to 7d such as 30m, 12h or 2d, not '${text}'`,
    );
  return ms;
}
