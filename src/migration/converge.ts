/**
 * Storage convergence: keeps a mirror from chasing a guest that writes faster than the link can copy.
 *
 * - `none`: background mirror, nothing else (a fast writer may keep it from ever becoming READY).
 * - `sync`: `copy-mode: write-blocking` from the start (libvirt's --copy-storage-synchronous-writes): every
 *   guest write waits for the destination, so the guest runs at link speed for the whole copy.
 * - `throttle`: background mirror; once a second the copy rate (bytes the destination acknowledged on
 *   QEMU's NBD connection) and the guest's write rate on the migrating disks (`query-blockstats`) are
 *   measured. Every guest write counts as new work until READY: one ahead of the copy turns a cheap zero
 *   region into data without growing QEMU's dirty bitmap. The remaining data must shrink at least at
 *   copy / FACTOR (READY within FACTOR times what the link alone needs); when the guest writes more than
 *   the rest, its write bandwidth is capped (`block_set_io_throttle`, `bps_wr`) at that share, stepping
 *   lower only once its writes obey the cap and the copy still falls short, and back up when there is
 *   room. A guest that writes less is never capped. At READY the cap is lifted, unless the guest still
 *   writes at it: then it is halved for the RAM phase (memory shares the link) and kept until the
 *   switchover; a growing dirty backlog in the RAM phase lowers it further. The source gets back exactly
 *   the limits it had when the job ends, however it ends.
 * - `auto`: `throttle`, plus switching the jobs to write-blocking after READY where QEMU has
 *   `block-job-change` (8.2 and later), so nothing is left to drain at switchover.
 */
import type { Logger } from "pino";
import { errorMessage } from "../errors.js";
import { blockOf } from "../qemu/qmp-util.js";
import type { QmpClient } from "../qemu/qmp.js";
import type { MirrorState } from "./mirror.js";
import type { ConvergeMode } from "./options.js";

const MIN_CAP = 1024 * 1024;
/**
 * READY may take at most this many times what the link alone needs for the data: the guest keeps
 * 1 - 1/FACTOR of the link for its writes (a third at 1.5). Tunable for experiments.
 */
const FACTOR = Number(process.env.NBDMIG_CONVERGE_FACTOR ?? 1.6);
const MiB = 1024 * 1024;
/** block_set_io_throttle's fields that query-block reports, restored exactly as they were. */
const THROTTLE_KEYS = [
  "bps",
  "bps_rd",
  "bps_wr",
  "iops",
  "iops_rd",
  "iops_wr",
  "bps_max",
  "bps_rd_max",
  "bps_wr_max",
  "iops_max",
  "iops_rd_max",
  "iops_wr_max",
  "bps_max_length",
  "bps_rd_max_length",
  "bps_wr_max_length",
  "iops_max_length",
  "iops_rd_max_length",
  "iops_wr_max_length",
  "iops_size",
  "group",
] as const;

type Limits = Record<string, number | string>;

export class StorageConverger {
  private readonly original = new Map<string, Limits>();
  private readonly qdev = new Map<string, string>();
  private capBps?: number;
  private lastCap?: number;
  private capChangedAt = 0;
  private last?: { at: number; offset: number; len: number; wire?: number; written: number };
  private wireMissing = false;
  copyRateBps = 0;
  dirtyRateBps = 0;
  guestWriteBps = 0;
  predictedReadyS?: number;
  private blockJobChange = false;
  private switchedToBlocking = false;

  constructor(
    private readonly qmp: QmpClient,
    private readonly targets: string[],
    readonly mode: ConvergeMode,
    private readonly log: Logger,
    /** Bytes acknowledged so far on the mirrors' NBD connection(s), when they can be read. */
    private readonly wire?: () => Promise<number | undefined>,
  ) {}

  /** The mirror's copy mode at start. */
  get initialCopyMode(): "background" | "write-blocking" {
    return this.mode === "sync" ? "write-blocking" : "background";
  }

  /** Records the limits the disks have now; they are what restore() puts back. */
  async init(): Promise<void> {
    if (this.mode === "auto") {
      const cmds = await this.qmp.execute("query-commands");
      this.blockJobChange = cmds.some((c) => c.name === "block-job-change");
    }
    const blocks = await this.qmp.execute("query-block");
    for (const t of this.targets) {
      const b = blockOf(blocks, t);
      this.qdev.set(t, b.qdev);
      const limits: Limits = {};
      for (const k of THROTTLE_KEYS) {
        const v = b.inserted[k];
        if (typeof v === "number" || typeof v === "string") limits[k] = v;
      }
      this.original.set(t, limits);
    }
  }

  get throttling(): boolean {
    return this.mode === "throttle" || this.mode === "auto";
  }

  /** Called about once a second while the mirrors run. */
  async tick(jobs: MirrorState[], phase: "mirror" | "memory"): Promise<void> {
    const now = Date.now();
    if (this.last && now - this.last.at < 900) return;
    const offset = jobs.reduce((s, j) => s + j.offset, 0);
    const len = jobs.reduce((s, j) => s + j.len, 0);
    const wire = this.wire ? await this.wire() : undefined;
    if (this.wire && wire === undefined && !this.wireMissing) {
      this.wireMissing = true;
      this.log.warn(
        "cannot read the NBD connection's byte count with ss; estimating the copy rate from job progress",
      );
    }
    const qdevs = new Set(this.qdev.values());
    const written = (await this.qmp.execute("query-blockstats"))
      .filter((b) => b.qdev !== undefined && qdevs.has(b.qdev))
      .reduce((s, b) => s + b.stats.wr_bytes, 0);
    const remaining = Math.max(0, len - offset);
    const last = this.last;
    this.last = { at: now, offset, len, wire, written };
    if (!last) return;
    const dt = (now - last.at) / 1000;
    const copy =
      wire !== undefined && last.wire !== undefined
        ? Math.max(0, wire - last.wire) / dt
        : Math.max(0, offset - last.offset) / dt;
    const ewma = (prev: number, x: number): number => (prev ? prev * 0.5 + x * 0.5 : x);
    this.copyRateBps = ewma(this.copyRateBps, copy);
    this.dirtyRateBps = ewma(this.dirtyRateBps, Math.max(0, len - last.len) / dt);
    this.guestWriteBps = ewma(this.guestWriteBps, Math.max(0, written - last.written) / dt);
    // `remaining` still holds zero regions the copy will skip over, so this errs on the late side.
    const shrink = this.copyRateBps - this.dirtyRateBps;
    this.predictedReadyS = shrink > 0 ? remaining / shrink : undefined;
    if (!this.throttling) return;
    if (phase === "memory") {
      // Whatever is dirty at the switchover is copied while the guest is paused: keep the backlog within
      // about a quarter second of copying, lowering the cap while it grows.
      const small = Math.max(8 * MiB, this.copyRateBps / 4);
      if (remaining > small && now - this.capChangedAt >= 1000) {
        const next = this.capBps ?? Math.min(this.lastCap ?? Infinity, this.share);
        await this.apply(
          Math.max(MIN_CAP, Math.round(this.capBps === undefined ? next : next / 2)),
          `dirty backlog of ${Math.round(remaining / MiB)} MiB in the RAM phase`,
        );
      }
      return;
    }
    if (now - this.capChangedAt < 2000 || this.copyRateBps < MIN_CAP) return;
    // What the guest writes costs copy time even where QEMU's bitmap does not grow: a write ahead of the
    // copy turns a cheap zero region into data. So the guest's write rate counts in full until READY.
    const pressure = Math.max(this.dirtyRateBps, this.guestWriteBps);
    const net = this.copyRateBps - pressure;
    const needed = this.copyRateBps / FACTOR;
    const why = `copy ${mibs(this.copyRateBps)}, guest writes ${mibs(this.guestWriteBps)} (dirty ${mibs(this.dirtyRateBps)}), remaining ${Math.round(remaining / MiB)} MiB shrinks at ${mibs(net)}, needs ${mibs(needed)}`;
    if (net < needed * 0.9) {
      // First the guest's share. Lower only once the measured writes obey the cap (the average lags it)
      // and the remaining data still shrinks too slowly, e.g. because the link got slower.
      if (this.capBps !== undefined && this.guestWriteBps > this.capBps * 1.1) return;
      const next = this.capBps === undefined ? this.share : Math.min(this.capBps * 0.75, this.share);
      if (this.capBps === undefined || next < this.capBps * 0.95)
        await this.apply(Math.max(MIN_CAP, Math.round(next)), why);
    } else if (this.capBps !== undefined && net > needed * 1.25 && this.capBps < this.share * 0.95) {
      await this.apply(Math.round(Math.min(this.capBps * 1.25, this.share)), why);
    }
  }

  /** The write bandwidth that still leaves the copy shrinking the remaining data at copy / FACTOR. */
  private get share(): number {
    return this.copyRateBps * (1 - 1 / FACTOR);
  }

  /** At READY: lift the cap; with `auto`, switch to write-blocking where QEMU can. */
  async onReady(jobs: MirrorState[]): Promise<void> {
    if (this.mode === "auto" && this.blockJobChange && !this.switchedToBlocking) {
      for (const j of jobs)
        await this.qmp.raw("block-job-change", {
          id: j.jobId,
          type: "mirror",
          "copy-mode": "write-blocking",
        });
      this.switchedToBlocking = true;
    }
    if (this.capBps === undefined) return;
    // A guest still pressing against the cap would refill the backlog at once and slow the RAM phase,
    // so the cap then stays until the switchover (the destination starts without it).
    // Memory now shares the link with those writes, so the cap is halved to bring the switchover sooner.
    if (!this.switchedToBlocking && this.guestWriteBps >= this.capBps * 0.8) {
      await this.apply(
        Math.max(MIN_CAP, Math.round(this.capBps / 2)),
        `READY with the guest still writing at its cap (${mibs(this.guestWriteBps)}): halved until the switchover while memory is copied`,
      );
      return;
    }
    this.lastCap = this.capBps;
    await this.restore();
    this.log.info({ targets: this.targets }, "mirrors READY: write cap lifted");
  }

  private async apply(cap: number, why: string): Promise<void> {
    for (const t of this.targets) {
      const orig = this.original.get(t) ?? {};
      const args: Record<string, unknown> = { ...zeroLimits(), ...orig, id: this.qdev.get(t) };
      delete args.group;
      if (Number(orig.bps ?? 0) > 0) args.bps = Math.min(Number(orig.bps), cap);
      else args.bps_wr = Number(orig.bps_wr ?? 0) > 0 ? Math.min(Number(orig.bps_wr), cap) : cap;
      await this.qmp.raw("block_set_io_throttle", args);
    }
    this.capBps = cap;
    this.capChangedAt = Date.now();
    this.log.info({ cap: mibs(cap), why }, "guest write cap set");
  }

  /** Puts back exactly the limits the disks had before the migration (idempotent). */
  async restore(): Promise<void> {
    if (this.capBps === undefined) return;
    for (const t of this.targets) {
      const orig = this.original.get(t) ?? {};
      const args: Record<string, unknown> = { ...zeroLimits(), ...orig, id: this.qdev.get(t) };
      if (!Object.values(orig).some((v) => typeof v === "number" && v > 0)) delete args.group;
      try {
        await this.qmp.raw("block_set_io_throttle", args);
      } catch (err) {
        this.log.error({ target: t, err: errorMessage(err) }, "cannot restore the disk's I/O limits");
        throw err;
      }
    }
    this.capBps = undefined;
  }

  describe(): Record<string, unknown> {
    return {
      mode: this.mode,
      writeCapBps: this.capBps ?? null,
      copyRateBps: Math.round(this.copyRateBps),
      dirtyRateBps: Math.round(this.dirtyRateBps),
      guestWriteBps: Math.round(this.guestWriteBps),
      predictedReadyS: this.predictedReadyS === undefined ? null : Math.round(this.predictedReadyS * 10) / 10,
      writeBlockingAfterReady: this.switchedToBlocking,
    };
  }
}

const mibs = (bps: number): string => `${(bps / MiB).toFixed(1)} MiB/s`;

function zeroLimits(): Record<string, number> {
  return { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };
}
