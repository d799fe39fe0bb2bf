/**
 * Storage convergence: keeps a mirror from chasing a guest that writes faster than the link can copy.
 *
 * - `none`: background mirror, nothing else (a fast writer may keep it from ever becoming READY).
 * - `sync`: `copy-mode: write-blocking` from the start (libvirt's --copy-storage-synchronous-writes): every
 *   guest write waits for the destination, so the guest runs at link speed for the whole copy.
 * - `throttle`: background mirror; once a second the copy rate and the guest's dirty rate are measured from
 *   the jobs' progress. While the predicted time to READY exceeds FACTOR times what the link alone would
 *   need for the remaining data (at least TARGET_S), the guest's write bandwidth on the migrating disks is
 *   capped (`block_set_io_throttle`, `bps_wr`), stepping down while the prediction misses that and back
 *   up while there is room. The cap is lifted at READY (and set again if the dirty backlog grows during
 *   the RAM phase), and the source gets back exactly the limits it had when the job ends, however it ends.
 * - `auto`: `throttle`, plus switching the jobs to write-blocking after READY where QEMU has
 *   `block-job-change` (8.2 and later), so nothing is left to drain at switchover.
 */
import type { Logger } from "pino";
import { errorMessage } from "../errors.js";
import { blockOf } from "../qemu/qmp-util.js";
import type { QmpClient } from "../qemu/qmp.js";
import type { MirrorState } from "./mirror.js";

export type ConvergeMode = "auto" | "throttle" | "sync" | "none";
export const CONVERGE_MODES: ConvergeMode[] = ["auto", "throttle", "sync", "none"];

/** Aim to reach READY within this many seconds, or within FACTOR times what the link alone needs if more. */
const TARGET_S = Number(process.env.NBDMIG_CONVERGE_TARGET_S ?? 20);
const MIN_CAP = 1024 * 1024;
/** How much longer than the link alone the copy may take because the guest keeps writing. */
const FACTOR = 1.4;
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
  private last?: { at: number; offset: number; len: number };
  private started = Date.now();
  copyRateBps = 0;
  dirtyRateBps = 0;
  predictedReadyS?: number;
  private blockJobChange = false;
  private switchedToBlocking = false;

  constructor(
    private readonly qmp: QmpClient,
    private readonly targets: string[],
    readonly mode: ConvergeMode,
    private readonly log: Logger,
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
    const offset = jobs.reduce((s, j) => s + j.offset, 0);
    const len = jobs.reduce((s, j) => s + j.len, 0);
    const remaining = Math.max(0, len - offset);
    if (this.last && now - this.last.at >= 500) {
      const dt = (now - this.last.at) / 1000;
      const copy = Math.max(0, offset - this.last.offset) / dt;
      const dirty = Math.max(0, len - this.last.len) / dt;
      this.copyRateBps = this.copyRateBps ? this.copyRateBps * 0.5 + copy * 0.5 : copy;
      this.dirtyRateBps = this.dirtyRateBps ? this.dirtyRateBps * 0.5 + dirty * 0.5 : dirty;
      this.last = { at: now, offset, len };
    } else if (!this.last) {
      this.last = { at: now, offset, len };
      return;
    } else {
      return;
    }
    const net = this.copyRateBps - this.dirtyRateBps;
    this.predictedReadyS = net > 0 ? remaining / net : undefined;
    if (!this.throttling) return;
    if (phase === "memory") {
      // After READY the cap is off, but whatever is dirty at the switchover is copied while the guest is
      // paused: keep the backlog within about a quarter second of copying, lowering the cap while it grows.
      const small = Math.max(8 * MiB, this.copyRateBps / 4);
      if (remaining > small && now - this.capChangedAt >= 1000) {
        const base = this.capBps ?? Math.min(this.lastCap ?? Infinity, this.copyRateBps * 0.5);
        const next = this.capBps === undefined ? base : base / 2;
        await this.apply(
          Math.max(MIN_CAP, Math.round(next)),
          `dirty backlog of ${Math.round(remaining / MiB)} MiB in the RAM phase`,
        );
      }
      return;
    }
    if (now - this.started < 3000 || now - this.capChangedAt < 2000 || this.copyRateBps < MIN_CAP) return;
    // Even a guest that stopped writing needs remaining/copy seconds; allow FACTOR times that (at least
    // TARGET_S). Known weakness: the copy rate comes from the jobs' progress, which counts zero regions
    // (sent as WRITE_ZEROES), so it and the prediction run optimistic and the cap bites late (README,
    // Benchmarks). Measuring the bytes on the NBD connection would fix both.
    const allowed = Math.max(TARGET_S, FACTOR * (remaining / this.copyRateBps));
    const late = this.predictedReadyS === undefined || this.predictedReadyS > allowed;
    if (late) {
      const next = this.capBps === undefined ? this.copyRateBps * 0.5 : this.capBps / 2;
      const why = `remaining ${Math.round(remaining / MiB)} MiB, predicted ${this.predictedReadyS === undefined ? "never" : `${this.predictedReadyS.toFixed(0)} s`}, allowed ${allowed.toFixed(0)} s`;
      await this.apply(Math.max(MIN_CAP, Math.round(next)), why);
    } else if (
      this.capBps !== undefined &&
      this.predictedReadyS! < allowed / 2 &&
      this.capBps < this.copyRateBps * 0.75
    ) {
      await this.apply(
        Math.round(Math.min(this.capBps * 1.5, this.copyRateBps * 0.75)),
        "converging with room to spare",
      );
    }
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
    if (this.capBps !== undefined) {
      this.lastCap = this.capBps;
      await this.restore();
      this.log.info({ targets: this.targets }, "mirrors READY: write cap lifted");
    }
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
    this.log.info(
      {
        capMiBs: (cap / MiB).toFixed(1),
        copyMiBs: (this.copyRateBps / MiB).toFixed(1),
        dirtyMiBs: (this.dirtyRateBps / MiB).toFixed(1),
        why,
      },
      "guest write cap set",
    );
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
      predictedReadyS: this.predictedReadyS === undefined ? null : Math.round(this.predictedReadyS * 10) / 10,
      writeBlockingAfterReady: this.switchedToBlocking,
    };
  }
}

function zeroLimits(): Record<string, number> {
  return { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };
}
