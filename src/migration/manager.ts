/**
 * Migration jobs of one agent, and their API. Source calls come from the CLI; destination calls come from
 * the source agent (peer to peer). Each route says in which phase it is valid; the job enforces it.
 */
import { probeQemuFeatures } from "../qemu/features.js";
import type { Logger } from "pino";
import { DomainStateError, NbdmigError, UsageError } from "../errors.js";
import type { DomainRegistry } from "../agent/domains.js";
import type { Router } from "../agent/http.js";
import { errorMessage } from "../errors.js";
import { IncomingMigration, recoverIncoming, type PrepareRequest } from "./destination.js";
import { recoverMirrors } from "./mirror.js";
import { OutgoingMigration, type MigrateRequest } from "./source.js";
import { OfflineMigration, offlineHint } from "./offline.js";
import { PartialCopies } from "./partials.js";
import {
  CancelRequestSchema,
  FinishRequestSchema,
  ProgressRequestSchema,
  MigrateRequestSchema,
  PrepareRequestSchema,
  RecoverRequestSchema,
  type RecoverRequest,
} from "./schemas.js";
import { OutgoingRecords, SourceHandoff, type OutgoingRecord } from "./handoff.js";

export interface ManagerOptions {
  /** This agent's own token; used for the peer unless the request brings one. */
  token: string;
  noNbd: boolean;
}

export class MigrationManager {
  readonly incoming = new Map<string, IncomingMigration>();
  /** The last finished job per domain (domjobinfo --completed, and the CLI's final answer). */
  readonly finished = new Map<string, Record<string, unknown>>();
  /** Callers of waitJobInfo waiting for a domain's job to end. */
  private readonly endWaiters = new Map<string, Set<() => void>>();
  private readonly records: OutgoingRecords;
  /** Outgoing migrations continued from their records (after a restart, or for `--recover`). */
  private readonly handoffs = new Map<string, SourceHandoff>();
  /** Partial copies offline migrations kept here (--keep-partial). */
  readonly partials: PartialCopies;

  constructor(
    private readonly reg: DomainRegistry,
    private readonly log: Logger,
    private readonly opts: ManagerOptions,
  ) {
    this.records = new OutgoingRecords(reg.state.outgoingDir);
    this.partials = new PartialCopies(reg.state.partialsDir, log);
  }

  /** Continues or cleans up after migrations that were in progress when this agent last stopped. */
  async recover(): Promise<void> {
    for (const m of await recoverIncoming(this.reg, this.log, this.incomingDone, this.partials))
      this.incoming.set(m.id, m);
    this.partials.schedule();
    const continued = new Set<string>();
    for (const rec of this.records.all(this.log)) {
      const h = this.handoffFor(rec);
      if (!h) continue;
      continued.add(rec.name);
      try {
        await h.afterRestart();
      } catch (err) {
        this.log.error(
          { domain: rec.name, err: errorMessage(err) },
          "cannot continue an interrupted migration; its guest stays as it is",
        );
      }
    }
    for (const e of this.reg.list()) {
      if (!e.running || continued.has(e.name)) continue;
      try {
        await recoverMirrors(e.running.qmp, this.log);
        await e.running.qmp.execute("migrate-set-capabilities", {
          capabilities: [{ capability: "pause-before-switchover", state: false }],
        });
      } catch (err) {
        this.log.error(
          { domain: e.name, err: errorMessage(err) },
          "cannot clean up after an interrupted migration",
        );
      }
    }
  }

  /** A record's handoff, if its source QEMU still runs; a stale record (QEMU gone) is removed. */
  private handoffFor(rec: OutgoingRecord): SourceHandoff | undefined {
    const e = this.reg.has(rec.name) ? this.reg.get(rec.name) : undefined;
    if (!e?.running || e.running.pid !== rec.pid) {
      this.log.info(
        { domain: rec.name, phase: rec.phase },
        "outgoing migration record without its QEMU; removed",
      );
      this.records.remove(rec.name);
      return undefined;
    }
    const h = new SourceHandoff(this.reg, this.log, this.records, rec, e, this.opts.token, (done) =>
      this.ended(done.name, done.describe()),
    );
    this.handoffs.set(rec.name, h);
    return h;
  }

  /**
   * `migrate --recover`: the operator decides which copy runs, for a migration whose outcome this agent
   * could not learn. Valid once its job has ended (or a restarted agent is asking); refused when the
   * destination's state contradicts the choice.
   */
  async recoverChoice(name: string, req: RecoverRequest): Promise<Record<string, unknown>> {
    const e = this.reg.get(name);
    if (e.job && e.job.kind !== "migration handoff")
      throw new DomainStateError(
        "E_DOMAIN_BUSY",
        `the migration of '${name}' is still running or asking its destination; wait for it to end ('nbdmig domjobinfo ${name}')`,
      );
    const rec = this.records.load(name);
    const kept = this.handoffs.get(name);
    // The handoff already running for this record (a restarted agent asking), else one made from it.
    const h = !rec
      ? undefined
      : kept?.record.pid === rec.pid && e.running?.pid === rec.pid
        ? kept
        : this.handoffFor(rec);
    if (!h)
      throw new DomainStateError(
        "E_NO_MIGRATION",
        `domain '${name}' has no migration whose outcome is open on this host; nothing to recover`,
      );
    // One decision at a time per domain.
    const message = await e.lock.run(() => h.decide(req.keep, req.force));
    this.ended(name, h.describe());
    this.handoffs.delete(name);
    return { message };
  }

  /** Valid when the domain runs and has no job. Begin runs before this returns; the rest in background. */
  async migrate(name: string, req: MigrateRequest): Promise<Record<string, unknown>> {
    const entry = this.reg.get(name);
    if (entry.hold)
      throw new DomainStateError("E_DOMAIN_HELD", `domain '${name}' cannot be migrated: ${entry.hold}`);
    if (req.offline)
      return entry.lock.run(async () => {
        const m = await OfflineMigration.begin(this.reg, name, req, this.opts.token, this.log, (done) =>
          this.ended(done.name, done.describe()),
        );
        this.finished.delete(name);
        m.start();
        return m.describe();
      });
    if (!entry.running) throw offlineHint(name);
    return entry.lock.run(async () => {
      const m = await OutgoingMigration.begin(
        this.reg,
        name,
        req,
        this.opts.token,
        this.log,
        this.records,
        (done) => {
          this.ended(done.name, done.describe());
        },
      );
      this.finished.delete(name);
      m.start();
      return m.describe();
    });
  }

  /** Valid in no phase on this host: the name must be free. */
  async prepare(req: PrepareRequest): Promise<Record<string, unknown>> {
    const path = req.cookie.storagePath ?? (req.cookie.disks.length > 0 ? "nbd" : "none");
    if (path === "nbd" && this.opts.noNbd) {
      throw new UsageError(`this agent runs with --no-nbd and cannot receive disks over NBD`, "E_NO_NBD");
    }
    if (path === "stream") {
      const qemu = await probeQemuFeatures();
      if (!qemu.blockMigration)
        throw new UsageError(
          `this host's QEMU ${qemu.version} cannot receive disks in the migration stream`,
          "E_NO_STORAGE_PATH",
        );
    }
    const m = new IncomingMigration(this.reg, this.log, req, this.incomingDone, this.partials);
    this.incoming.set(m.id, m);
    const prepared = await m.prepare();
    return { prepared };
  }

  /** An incoming migration has ended either way. */
  private readonly incomingDone = (done: IncomingMigration): void => {
    this.ended(done.name, done.describe());
    // Keep the record a while so the source's heartbeat sees how it ended.
    setTimeout(() => this.incoming.delete(done.id), 60_000).unref();
  };

  incomingById(id: string): IncomingMigration {
    const m = this.incoming.get(id);
    if (!m) throw new NbdmigError("E_NO_MIGRATION", `no incoming migration ${id} on this host`);
    return m;
  }

  /**
   * `nbdmig partial list`: the partial copies offline migrations kept here, and the live copies whose
   * --verify failed, kept paused for inspection (every disk whole, `paused`).
   */
  listPartials(): Record<string, unknown> {
    const kept = [...this.incoming.values()]
      .filter((m) => m.machine.is("kept"))
      .map((m) => ({
        name: m.name,
        uuid: m.req.cookie.uuid,
        keptUntil: m.keptUntil,
        reason: `migration ${m.id}: its --verify failed; the copy is paused here, never resumed`,
        paused: true,
        disks: m.req.cookie.disks.map((d) => ({
          target: d.target,
          path: d.source,
          format: d.format,
          virtualSize: d.virtualSize,
          doneTo: d.virtualSize,
        })),
        files: m.created,
      }));
    return { partials: [...this.partials.all(), ...kept] };
  }

  /** `nbdmig partial discard NAME`: valid while no migration of NAME runs here. */
  async discardPartial(name: string): Promise<Record<string, unknown>> {
    const kept = [...this.incoming.values()].find((m) => m.name === name && m.machine.is("kept"));
    if (kept) {
      const files = [...kept.created];
      await kept.cleanup("discarded by the operator");
      return { removed: files };
    }
    const p = this.partials.load(name);
    if (!p)
      throw new NbdmigError(
        "E_NO_PARTIAL",
        `no partial copy of '${name}' is kept on this host (see 'nbdmig partial list')`,
      );
    if (this.reg.has(name) && this.reg.get(name).job)
      throw new DomainStateError(
        "E_DOMAIN_BUSY",
        `a migration of '${name}' is in progress here; wait for it to end`,
      );
    this.partials.discard(p, "discarded by the operator");
    return { removed: p.files };
  }

  /** A job has ended: it is what `domjobinfo --completed` shows, and whoever waits for it is answered. */
  private ended(name: string, job: Record<string, unknown>): void {
    this.finished.set(name, job);
    for (const wake of this.endWaiters.get(name) ?? []) wake();
    this.endWaiters.delete(name);
  }

  /**
   * The domain's job; with `waitMs`, answered once the active job ends or after that long, whichever is
   * first (the CLI's progress loop: it learns of the end at once, without polling faster). With `phase`
   * (the phase the caller last saw) it is also answered as soon as the job is in another phase: a follower
   * sees every phase it enters as it enters it (a job's `phaseTimes` names the ones it went through
   * between two answers). Not while the job is quiet (QUIET_CHECK_MS): what is due then is answered when
   * it is over. A job that has let go of its domain but not yet ended (a source clears it before
   * stopping its QEMU in Confirm, and reports after) has no finished record yet: its end is waited for too,
   * or the CLI would ask again and again without pause until it comes.
   */
  async waitJobInfo(name: string, waitMs: number, phase?: string): Promise<Record<string, unknown>> {
    const e = this.reg.has(name) ? this.reg.get(name) : undefined;
    const job = e?.job;
    const moved = () => phase !== undefined && job !== undefined && job.describe().phase !== phase;
    const quiet = () => job?.quiet?.() === true;
    if (waitMs > 0 && (job || !this.finished.has(name)) && (!moved() || quiet())) {
      await new Promise<void>((resolve) => {
        const waiters = this.endWaiters.get(name) ?? new Set<() => void>();
        this.endWaiters.set(name, waiters);
        let unwatch: (() => void) | undefined;
        const holdUntil = Date.now() + MAX_JOB_WAIT_MS;
        const done = () => {
          clearTimeout(timer);
          waiters.delete(done);
          unwatch?.();
          resolve();
        };
        // Held while the job is quiet (see QUIET_CHECK_MS), answered soon after.
        const wake = () => {
          const left = holdUntil - Date.now();
          if (quiet() && left > 0) {
            clearTimeout(timer);
            timer = setTimeout(wake, Math.min(QUIET_CHECK_MS, left));
            return;
          }
          done();
        };
        // A job that has moved on is here only because it is quiet: answered as soon as that is over.
        let timer = setTimeout(wake, moved() ? QUIET_CHECK_MS : waitMs);
        waiters.add(done);
        if (phase !== undefined) unwatch = job?.watch?.(wake);
      });
    }
    return this.jobInfo(name);
  }

  jobInfo(name: string): Record<string, unknown> {
    const e = this.reg.has(name) ? this.reg.get(name) : undefined;
    if (e?.job) return { active: true, job: e.job.describe() };
    const last = this.finished.get(name);
    if (last) return { active: false, job: last };
    if (!e)
      throw new DomainStateError(
        "E_NO_DOMAIN",
        `domain '${name}' not found on this host (see 'nbdmig list --all')`,
      );
    return { active: false, job: null };
  }

  async abort(name: string): Promise<void> {
    const e = this.reg.get(name);
    if (!e.job) throw new DomainStateError("E_NO_JOB", `domain '${name}' has no active job to abort`);
    await e.job.abort();
  }
}

export function migrationRoutes(router: Router, mm: MigrationManager): Router {
  return router
    .add("POST", "/v1/domains/:name/migrate", MigrateRequestSchema, (r) => mm.migrate(r.params.name!, r.body))
    .add("POST", "/v1/domains/:name/migrate/recover", RecoverRequestSchema, (r) =>
      mm.recoverChoice(r.params.name!, r.body),
    )
    .add("GET", "/v1/domains/:name/job", (r) =>
      mm.waitJobInfo(r.params.name!, waitMs(r.query), r.query.get("phase") ?? undefined),
    )
    .add("POST", "/v1/domains/:name/job/abort", async (r) => {
      await mm.abort(r.params.name!);
      return {};
    })
    .add("POST", "/v1/migrations/prepare", PrepareRequestSchema, (r) => mm.prepare(r.body))
    .add("GET", "/v1/migrations/:id", (r) => {
      const m = mm.incomingById(r.params.id!);
      m.lastSeen = Date.now();
      return m.describe();
    })
    .add("POST", "/v1/migrations/:id/finish", FinishRequestSchema, async (r) => {
      await mm.incomingById(r.params.id!).finish(r.body);
      return {};
    })
    .add("POST", "/v1/migrations/:id/resume", async (r) => {
      await mm.incomingById(r.params.id!).resume();
      return {};
    })
    .add("POST", "/v1/migrations/:id/cancel", CancelRequestSchema, (r) =>
      mm.incomingById(r.params.id!).cancel(r.body),
    )
    .add("POST", "/v1/migrations/:id/progress", ProgressRequestSchema, (r) => {
      mm.incomingById(r.params.id!).checkpoint(r.body.target, r.body.doneTo);
      return {};
    })
    .add("GET", "/v1/partials", () => mm.listPartials())
    .add("DELETE", "/v1/partials/:name", (r) => mm.discardPartial(r.params.name!));
}

/** `?waitMs=N` on GET .../job: how long to wait for the active job to end (0 to 10000 ms). */
function waitMs(q: URLSearchParams): number {
  const v = q.get("waitMs");
  if (v === null) return 0;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0 || n > MAX_JOB_WAIT_MS)
    throw new UsageError(
      `waitMs takes a whole number of milliseconds from 0 to ${MAX_JOB_WAIT_MS}, not '${v}'`,
      "E_BAD_QUERY",
    );
  return n;
}

const MAX_JOB_WAIT_MS = 10_000;

/**
 * While a job is quiet (the guest paused at the switchover), a long poll that is due is not answered: the
 * answer would wake the CLI (and the agent to serve its next request) on the CPUs the downtime waits for.
 * Measured on the 2-core hosts: the mirrors' cancel at pre-switchover took 6-13 ms with the CLI woken
 * there, against 2-7 ms for the bare QMP sequence. The poll is answered within this long after it ends.
 */
const QUIET_CHECK_MS = 20;
