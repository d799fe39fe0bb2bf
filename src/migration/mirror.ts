/**
 * Mirror orchestration on the source QEMU: one NBD client node and one `blockdev-mirror` job per copied
 * disk, progress from `query-block-jobs`, READY/failed from events, and the two ways to end the jobs:
 * at switchover (cancel after READY: completes without pivoting) and on rollback (force, and `yank` the
 * NBD connection when a dead link would keep the cancel waiting on in-flight requests).
 */
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { errorMessage, QmpError } from "../errors.js";
import { formatNode } from "../domain/qemu-args.js";
import type { QmpClient, QmpEvent } from "../qemu/qmp.js";

/**
 * The mirror's buffer (`buf-size`): QEMU splits it into up to 16 requests in flight, so 64 MiB makes its NBD
 * writes 4 MiB each instead of the 1 MiB of the default 16 MiB. Fewer, larger requests cost both QEMUs less
 * CPU, and on these CPU-bound 2-core hosts the reference mirror reached READY in 2.13-2.34 s (6 runs)
 * against 2.22-3.19 s (median 2.64, 7 runs) with the default; 32 MiB was between, 128 MiB slower again.
 * The price is that much memory in the source QEMU per disk while its mirror runs.
 */
export const MIRROR_BUF_SIZE = 64 * 1024 * 1024;

export interface MirrorState {
  target: string;
  jobId: string;
  nodeName: string;
  /** Bytes the job has processed and its current length (grows while the guest dirties blocks). */
  offset: number;
  len: number;
  ready: boolean;
  error?: string;
  rateBps: number;
  started: boolean;
  readyAt?: number;
}

export class Mirrors {
  readonly jobs: MirrorState[];
  private lastPoll = 0;
  /** Wakes `settle` when a job becomes READY or fails. */
  private wake?: () => void;
  private readonly onEvent = (ev: QmpEvent) => this.handleEvent(ev);

  constructor(
    private readonly qmp: QmpClient,
    targets: string[],
    private readonly log: Logger,
  ) {
    this.jobs = targets.map((t) => ({
      target: t,
      jobId: `nbdmig-mirror-${t}`,
      nodeName: `nbdmig-nbd-${t}`,
      offset: 0,
      len: 0,
      ready: false,
      rateBps: 0,
      started: false,
    }));
    qmp.on("event", this.onEvent);
  }

  private handleEvent(ev: QmpEvent): void {
    const job = this.jobs.find((j) => j.jobId === ev.data.device || j.jobId === ev.data.id);
    if (!job) return;
    if (ev.event === "BLOCK_JOB_READY") {
      job.ready = true;
      job.readyAt ??= Date.now();
    } else if (ev.event === "BLOCK_JOB_COMPLETED" && typeof ev.data.error === "string") {
      job.error = ev.data.error;
    } else if (ev.event === "BLOCK_JOB_ERROR") {
      job.error ??= `I/O error during ${String(ev.data.operation)}`;
    } else return;
    this.wake?.();
  }

  /**
   * Waits `ms`, or less if a job becomes READY or fails meanwhile: the last job's READY is acted on when
   * it comes, not at the next poll.
   */
  settle(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        this.wake = undefined;
        resolve();
      };
      const timer = setTimeout(done, ms);
      this.wake = done;
    });
  }

  /** Connects an NBD node to each export and starts the mirror jobs. */
  async start(
    nbd: { host: string; port: number },
    exports: Record<string, string>,
    speed?: number,
    sync: Record<string, "full" | "top"> = {},
    copyMode: "background" | "write-blocking" = "background",
    tlsCreds?: string,
  ): Promise<void> {
    for (const j of this.jobs) {
      await this.qmp.execute("blockdev-add", {
        driver: "nbd",
        "node-name": j.nodeName,
        server: { type: "inet", host: nbd.host, port: String(nbd.port) },
        export: exports[j.target],
        // The server's certificate is checked against the address the source connects to.
        ...(tlsCreds ? { "tls-creds": tlsCreds } : {}),
      });
      j.started = true;
      await this.qmp.execute("blockdev-mirror", {
        "job-id": j.jobId,
        device: formatNode(j.target),
        target: j.nodeName,
        sync: sync[j.target] ?? "full",
        "auto-dismiss": false,
        "copy-mode": copyMode,
        "buf-size": MIRROR_BUF_SIZE,
        ...(speed ? { speed } : {}),
      });
    }
  }

  /** Refreshes offsets and rates; notices a job that vanished or concluded with an error. */
  async poll(): Promise<void> {
    const now = Date.now();
    const list = await this.qmp.execute("query-block-jobs");
    for (const j of this.jobs) {
      const info = list.find((x) => x.device === j.jobId);
      if (!info) continue;
      if (this.lastPoll) {
        const dt = (now - this.lastPoll) / 1000;
        const inst = Math.max(0, info.offset - j.offset) / dt;
        j.rateBps = j.rateBps ? j.rateBps * 0.6 + inst * 0.4 : inst;
      }
      j.offset = info.offset;
      j.len = info.len;
      if (info.ready) {
        j.ready = true;
        j.readyAt ??= now;
      }
      if (info.status === "concluded" && !j.error) j.error = info.error ?? "mirror job ended early";
      if (info.error && !j.error) j.error = info.error;
    }
    this.lastPoll = now;
  }

  get allReady(): boolean {
    return this.jobs.every((j) => j.ready);
  }

  get failure(): string | undefined {
    const j = this.jobs.find((x) => x.error);
    return j ? `mirror of ${j.target} failed: ${j.error}` : undefined;
  }

  /** At pre-switchover: cancel each READY job (completes without pivot), dismiss it, remove its NBD node. */
  async endForSwitchover(): Promise<void> {
    const done = this.jobs.map((j) =>
      this.qmp
        .waitEvent("BLOCK_JOB_COMPLETED", (d) => d.device === j.jobId, 30_000)
        .then((ev) => {
          if (typeof ev.data.error === "string")
            throw new Error(`mirror of ${j.target} failed at switchover: ${ev.data.error}`);
        }),
    );
    for (const j of this.jobs) await this.qmp.execute("block-job-cancel", { device: j.jobId });
    await Promise.all(done);
    for (const j of this.jobs) {
      await this.qmp.execute("job-dismiss", { id: j.jobId });
      await this.qmp.execute("blockdev-del", { "node-name": j.nodeName });
      j.started = false;
    }
    this.detach();
  }

  /**
   * The destination is gone: cut every NBD connection at once, out of band, so that requests stuck on a dead
   * link fail instead of holding QEMU's main loop in a drain (a throttle change or a `stop` drains the disk,
   * and a mirror's in-flight writes would keep that drain waiting until TCP gives up, minutes later).
   */
  async yank(): Promise<void> {
    for (const j of this.jobs.filter((x) => x.started)) {
      await this.qmp
        .execute(
          "yank",
          { instances: [{ type: "block-node", "node-name": j.nodeName }] },
          { oob: true, timeoutMs: 5000 },
        )
        .catch((err: unknown) => this.log.warn({ err: errorMessage(err) }, "yank failed"));
    }
  }

  /** Rollback: ends every job and removes every NBD node, however the jobs are doing. */
  async abort(): Promise<void> {
    try {
      for (let attempt = 0; attempt < 2; attempt++) {
        const jobs = (await this.qmp.execute("query-jobs")).filter((x) =>
          this.jobs.some((j) => j.jobId === x.id),
        );
        for (const x of jobs.filter((x) => x.status !== "concluded" && x.status !== "null")) {
          await this.qmp.execute("block-job-cancel", { device: x.id, force: true }).catch(() => undefined);
        }
        if (await this.waitConcluded(attempt === 0 ? 5000 : 15000)) break;
        // In-flight NBD requests on a dead link keep the cancel waiting: cut the connections.
        for (const j of this.jobs.filter((x) => x.started)) {
          await this.qmp
            .execute("yank", { instances: [{ type: "block-node", "node-name": j.nodeName }] })
            .catch((err: unknown) => this.log.warn({ err: errorMessage(err) }, "yank failed"));
        }
      }
      for (const x of await this.qmp.execute("query-jobs")) {
        if (this.jobs.some((j) => j.jobId === x.id))
          await this.qmp.execute("job-dismiss", { id: x.id }).catch(() => undefined);
      }
      for (const j of this.jobs.filter((x) => x.started)) {
        await this.qmp.execute("blockdev-del", { "node-name": j.nodeName }).catch((err: unknown) => {
          if (!(err instanceof QmpError && /not found/i.test(err.desc))) throw err;
        });
        j.started = false;
      }
    } finally {
      this.detach();
    }
  }

  private async waitConcluded(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    for (;;) {
      const jobs = (await this.qmp.execute("query-jobs")).filter((x) =>
        this.jobs.some((j) => j.jobId === x.id),
      );
      if (jobs.every((x) => x.status === "concluded" || x.status === "null")) return true;
      if (Date.now() > deadline) return false;
      await sleep(100);
    }
  }

  detach(): void {
    this.qmp.off("event", this.onEvent);
  }
}

/** At agent start: mirror jobs left by a migration whose agent died are ended and their NBD nodes removed. */
export async function recoverMirrors(qmp: QmpClient, log: Logger): Promise<string[]> {
  const jobs = (await qmp.execute("query-jobs")).filter((j) => j.id.startsWith("nbdmig-mirror-"));
  const nodes = (await qmp.execute("query-named-block-nodes", { flat: true })).filter((n) =>
    n["node-name"].startsWith("nbdmig-nbd-"),
  );
  const targets = [
    ...new Set([
      ...jobs.map((j) => j.id.slice("nbdmig-mirror-".length)),
      ...nodes.map((n) => n["node-name"].slice("nbdmig-nbd-".length)),
    ]),
  ];
  if (targets.length === 0) return [];
  log.warn({ targets }, "ending mirror jobs left by an interrupted migration");
  const m = new Mirrors(qmp, targets, log);
  for (const j of m.jobs) j.started = nodes.some((n) => n["node-name"] === j.nodeName);
  await m.abort();
  return targets;
}
