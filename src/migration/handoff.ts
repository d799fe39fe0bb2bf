/**
 * The handoff: after the migration stream has completed, which copy runs. The source resumes its guest only
 * when it knows the destination does not run it and never will; when it cannot know, it keeps the guest
 * paused and asks. Each source persists its phase (and the destination migration's id) in
 * `migrations/outgoing/NAME.json` before acting in it, so that an agent restarted in the middle continues:
 * before the switchover it rolls back (cancels QEMU's migration, resumes the guest, cancels the
 * destination); after it, it asks the destination and completes or rolls back; with no answer it keeps the
 * guest paused for the operator's `migrate --recover source|destination`, refused when the destination's
 * state contradicts the choice.
 */
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { z } from "zod";
import { AgentClient, parseAgentUri, peerClient } from "../agent/client.js";
import type { DomainEntry, DomainRegistry, RunningDomain } from "../agent/domains.js";
import { writeFileAtomic } from "../agent/state-dir.js";
import { DomainStateError, errorMessage, NbdmigError } from "../errors.js";
import { removeTlsCreds } from "../qemu/pki.js";
import type { QmpClient } from "../qemu/qmp.js";
import { recoverMirrors } from "./mirror.js";
import { PhaseMachine, SOURCE_PHASES, sourceMachine, type SourcePhase } from "./phases.js";
import type { CancelRequest, CancelResult } from "./schemas.js";

/** What a source writes before acting in each phase. Not strict: a newer agent may add fields. */
export const OutgoingRecordSchema = z.object({
  name: z.string().min(1),
  /** The source QEMU; a record whose QEMU is gone is stale. */
  pid: z.number().int().positive(),
  phase: z.enum(SOURCE_PHASES),
  dest: z.string().min(1),
  destToken: z.string().optional(),
  /** The destination's migration id, once Prepare has answered. */
  id: z.string().optional(),
  wasRunning: z.boolean(),
  /** Storage in the migration stream: its capabilities are to be turned off again on a rollback. */
  stream: z.boolean().default(false),
  undefineSource: z.boolean(),
  startedAt: z.number(),
});
export type OutgoingRecord = z.infer<typeof OutgoingRecordSchema>;

/** The source records of one agent, one file per domain. */
export class OutgoingRecords {
  constructor(readonly dir: string) {}
  private file(name: string): string {
    return path.join(this.dir, `${name}.json`);
  }
  save(rec: OutgoingRecord): void {
    writeFileAtomic(this.file(rec.name), JSON.stringify(rec));
  }
  remove(name: string): void {
    fs.rmSync(this.file(name), { force: true });
  }
  load(name: string): OutgoingRecord | undefined {
    let text: string;
    try {
      text = fs.readFileSync(this.file(name), "utf8");
    } catch {
      return undefined;
    }
    const r = OutgoingRecordSchema.safeParse(JSON.parse(text));
    return r.success ? r.data : undefined;
  }
  all(log: Logger): OutgoingRecord[] {
    const out: OutgoingRecord[] = [];
    for (const f of fs.readdirSync(this.dir).filter((x) => x.endsWith(".json"))) {
      try {
        out.push(OutgoingRecordSchema.parse(JSON.parse(fs.readFileSync(path.join(this.dir, f), "utf8"))));
      } catch (err) {
        log.error({ file: f, err: errorMessage(err) }, "not an outgoing migration record; left alone");
      }
    }
    return out;
  }
}

/** Phases in which nothing is left to do and the record goes. */
export const SOURCE_ENDED: SourcePhase[] = ["completed", "failed", "cancelled"];

/** Makes a machine write its record before each new phase, and remove it when the job has ended. */
export function persistPhases(
  machine: PhaseMachine<SourcePhase>,
  records: OutgoingRecords,
  record: () => Omit<OutgoingRecord, "phase">,
): void {
  machine.onEnter = (phase) => {
    if (SOURCE_ENDED.includes(phase)) records.remove(record().name);
    else records.save({ ...record(), phase });
  };
}

/**
 * Tells the destination to remove what Prepare created (`discard`: even a partial copy it would keep;
 * `inspect`: a live copy that failed --verify stays there paused instead, see IncomingMigration.keep).
 * Returns what the destination keeps, if anything; unreachable, its watchdog cleans up.
 */
export async function cancelOnDestination(
  peer: AgentClient,
  id: string,
  log: Logger,
  domain: string,
  opts: CancelRequest = {},
): Promise<CancelResult> {
  try {
    // Only the flags set: an agent from before a flag existed refuses a body that names it.
    const body = Object.fromEntries(Object.entries(opts).filter(([, v]) => v));
    return await peer.call<CancelResult>("POST", `/v1/migrations/${id}/cancel`, body, 5000);
  } catch (e) {
    log.warn({ domain, err: errorMessage(e) }, "cannot reach the destination to clean up; its watchdog will");
    return {};
  }
}

export type Verdict = "runs" | "never" | "unknown";

/**
 * Does the destination run the guest, or will it ("runs"), or will it never ("never")? A destination still
 * prepared (Finish never arrived) is cancelled first, so that a late Finish cannot resume it there. One
 * `held` (its agent restarted in Finish, the guest whole there and paused) waits for this side's word:
 * `held` says which (resume it there and complete, or cancel it there to keep the source's copy). Only a
 * source that has not resumed its copy, and will not, may ask.
 */
export async function destinationVerdict(
  peer: AgentClient,
  id: string,
  name: string,
  held: "resume" | "cancel" = "resume",
): Promise<Verdict> {
  try {
    const r = await peer.call<{ phase: string }>("GET", `/v1/migrations/${id}`, undefined, 5000);
    if (r.phase === "running" || r.phase === "resume") return "runs";
    // `kept`: a copy that failed --verify, paused there for inspection, which never resumes.
    if (r.phase === "cleanup" || r.phase === "cleaned" || r.phase === "kept") return "never";
    if (r.phase === "held" && held === "resume") {
      // Unanswered, this throws: the next ask sees whether it resumed.
      await peer.call("POST", `/v1/migrations/${id}/resume`, {}, 10_000);
      return "runs";
    }
    if (r.phase === "prepared" || r.phase === "held") {
      await peer.call("POST", `/v1/migrations/${id}/cancel`, {}, 5000);
      return "never";
    }
    return "unknown"; // still finishing
  } catch (e) {
    if (!(e instanceof NbdmigError && e.code === "E_NO_MIGRATION")) throw e;
  }
  // The destination forgot the migration (its record lives 60 s after the end, and not across a restart of
  // its agent, which removes what it had not resumed): whether it runs the domain decides.
  try {
    const d = await peer.call<{ state: string }>(
      "GET",
      `/v1/domains/${encodeURIComponent(name)}`,
      undefined,
      5000,
    );
    return d.state === "shut off" ? "never" : "runs";
  } catch (e) {
    if (e instanceof NbdmigError && e.code === "E_NO_DOMAIN") return "never";
    throw e;
  }
}

/**
 * Asks for a verdict with backoff (1 s doubling to 15 s) until `deadline`; "unknown" then. `onMiss` hears
 * why each ask failed; `signal` ends the asking early (an operator decided).
 */
export async function settle(
  peer: AgentClient,
  id: string,
  name: string,
  deadline: number,
  onMiss: (why: string) => void,
  signal?: AbortSignal,
): Promise<Verdict> {
  for (let wait = 1000; ; wait = Math.min(wait * 2, 15_000)) {
    if (signal?.aborted) return "unknown";
    const v = await destinationVerdict(peer, id, name).catch((e: unknown) => {
      onMiss(errorMessage(e));
      return "unknown" as const;
    });
    if (v !== "unknown") return v;
    if (Date.now() + wait > deadline) return "unknown";
    try {
      await sleep(wait, undefined, { signal });
    } catch {
      return "unknown";
    }
  }
}

/** Cancels QEMU's outgoing migration and waits until it has ended (yanking a stuck connection after 5 s). */
export async function cancelQemuMigration(qmp: QmpClient): Promise<void> {
  const ended = (st?: string) => !st || ["cancelled", "failed", "completed", "none"].includes(st);
  if (ended((await qmp.execute("query-migrate")).status)) return;
  await qmp.execute("migrate_cancel");
  for (let i = 0; i < 100; i++) {
    if (ended((await qmp.execute("query-migrate")).status)) return;
    if (i === 50) await qmp.execute("yank", { instances: [{ type: "migration" }] }).catch(() => undefined);
    await sleep(100);
  }
}

/**
 * What a rollback undoes on the source QEMU once its migration and mirrors have ended: TLS, the migration
 * capabilities it set, and the pause; the guest runs again if it ran before the migration.
 */
export async function restoreSource(
  run: RunningDomain,
  opts: { wasRunning: boolean; stream: boolean },
): Promise<void> {
  const qmp = run.qmp;
  await removeTlsCreds(qmp);
  await qmp
    .execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "pause-before-switchover", state: false },
        { capability: "auto-converge", state: false },
        ...(opts.stream
          ? [
              { capability: "block", state: false },
              { capability: "zero-blocks", state: false },
            ]
          : []),
      ],
    })
    .catch(() => undefined);
  const st = (await qmp.execute("query-status")).status;
  if (opts.wasRunning && st !== "running") {
    await qmp.execute("cont");
    run.status = "running";
  }
}

/**
 * Confirm: the destination runs the guest, so the copy here stops. Its NVRAM stays, like the disk images;
 * the TPM state goes with the definition (--undefinesource), as on undefine, and a transient domain's went
 * with it when its QEMU stopped.
 */
export async function stopSourceCopy(
  reg: DomainRegistry,
  entry: DomainEntry,
  undefineSource: boolean,
): Promise<void> {
  await reg.kill(entry);
  if (undefineSource && entry.persistent) reg.undefine(entry.name, { nvram: "keep" });
}

/** Why a guest whose migration's outcome is open must stay paused: what `resume` and `migrate` answer. */
export function holdReason(name: string, dest: string): string {
  return `the outcome of its migration to ${dest} is unknown, and it stays paused so that two copies never run; decide with 'nbdmig migrate --recover source ${name}' (resume it here) or 'nbdmig migrate --recover destination ${name}' (keep the destination's copy)`;
}

/**
 * How long a source whose Finish went unanswered (or a restarted one) keeps asking the destination before
 * it leaves the guest paused for the operator.
 */
export const FINISH_SETTLE_MS = Number(process.env.NBDMIG_FINISH_SETTLE_MS ?? 600_000);

/**
 * A migration whose job is no longer running in this agent (the agent restarted, or the job ended without
 * an answer): continues from its record. Its guest stays paused (`entry.hold`) until it is settled.
 */
export class SourceHandoff {
  private readonly machine: PhaseMachine<SourcePhase>;
  private readonly peer: AgentClient;
  private asking?: AbortController;
  private settled?: Promise<void>;
  private deadline = 0;
  private askingNow = false;
  readonly notes: string[] = [];
  private lastMiss?: string;

  constructor(
    private readonly reg: DomainRegistry,
    private readonly log: Logger,
    private readonly records: OutgoingRecords,
    readonly record: OutgoingRecord,
    private readonly entry: DomainEntry,
    ownToken: string,
    /** Hears the job's last state when it has settled on its own (domjobinfo --completed). */
    private readonly onSettled: (h: SourceHandoff) => void = () => undefined,
  ) {
    this.machine = sourceMachine(record.phase);
    persistPhases(this.machine, records, () => this.record);
    this.peer = peerClient(parseAgentUri(record.dest), reg.state.pkiDir, record.destToken, ownToken, 10_000);
  }

  get name(): string {
    return this.record.name;
  }
  get phase(): SourcePhase {
    return this.machine.phase;
  }
  private get qmp(): QmpClient {
    return this.entry.running!.qmp;
  }

  /** At agent start: continue from the recorded phase. Settling with the destination goes on in background. */
  async afterRestart(): Promise<void> {
    const st = (await this.qmp.execute("query-migrate")).status;
    this.log.warn(
      { domain: this.name, phase: this.phase, qemuMigration: st ?? "none" },
      "continuing a migration interrupted by an agent restart",
    );
    this.notes.push(
      `continued by a restarted agent from phase ${this.phase} (QEMU's migration: ${st ?? "none"})`,
    );
    if (this.machine.is("confirm")) return this.keepDestination();
    if (this.machine.is("rollback")) return this.keepSource("the source agent restarted during the rollback");
    // Only a migration that reached the switchover can have completed: before it, a "completed" status is
    // an earlier migration's (one whose Finish failed and which resumed the guest).
    const afterStream =
      (st === "completed" && this.machine.is("perform:switchover")) ||
      this.machine.is("finish", "finish:unknown", "unsettled");
    if (!afterStream)
      return this.keepSource(`the source agent restarted in phase ${this.phase}, before the switchover`);
    if (this.machine.is("perform:switchover", "finish")) this.machine.advance("finish:unknown");
    this.hold();
    this.deadline = Date.now() + FINISH_SETTLE_MS;
    this.settled = this.settleInBackground();
  }

  private hold(): void {
    this.entry.hold = holdReason(this.name, this.record.dest);
    this.entry.job = {
      kind: "migration handoff",
      describe: () => this.describe(),
      abort: () =>
        Promise.reject(
          new DomainStateError(
            "E_MIGRATION_PHASE",
            `the migration of '${this.name}' has switched over and can no longer be aborted; decide with 'nbdmig migrate --recover source|destination ${this.name}'`,
          ),
        ),
      watch: (fn) => this.machine.listen(fn),
    };
  }

  private async settleInBackground(): Promise<void> {
    this.asking = new AbortController();
    const id = this.record.id;
    this.askingNow = true;
    const verdict = id
      ? await settle(
          this.peer,
          id,
          this.name,
          this.deadline,
          (why) => (this.lastMiss = why),
          this.asking.signal,
        )
      : ("unknown" as const);
    this.askingNow = false;
    if (this.asking.signal.aborted) return;
    try {
      if (verdict === "runs") await this.keepDestination();
      else if (verdict === "never")
        await this.keepSource("the destination confirmed that it does not run the guest");
      else {
        this.notes.push(
          `no answer from the destination (last: ${this.lastMiss ?? "none"}); the guest stays paused`,
        );
        if (!this.machine.is("unsettled")) this.machine.advance("unsettled");
        this.entry.job = undefined;
        this.log.error(
          { domain: this.name, last: this.lastMiss },
          "migration outcome still unknown; guest paused",
        );
      }
    } catch (err) {
      this.log.error({ domain: this.name, err: errorMessage(err) }, "cannot settle the migration");
    }
    this.onSettled(this);
  }

  /**
   * The operator's choice. "source" resumes the guest here: refused if the destination runs it. "destination"
   * stops the copy here: refused unless the destination runs it. When the destination cannot be asked, only
   * `force` (the operator knows, e.g. that host is down for good) lets either go ahead.
   */
  async decide(keep: "source" | "destination", force: boolean): Promise<string> {
    this.asking?.abort();
    await this.settled;
    if (SOURCE_ENDED.includes(this.phase))
      throw new DomainStateError(
        "E_NO_MIGRATION",
        `the migration of '${this.name}' has settled meanwhile: ${this.notes.at(-1) ?? this.phase}`,
      );
    // Without the destination's id, Prepare never answered: the destination cannot run the guest.
    const id = this.record.id;
    let why = "it is still finishing";
    const verdict: Verdict = id
      ? await destinationVerdict(this.peer, id, this.name, keep === "source" ? "cancel" : "resume").catch(
          (e: unknown) => {
            why = errorMessage(e);
            return "unknown" as const;
          },
        )
      : "never";
    const dest = this.record.dest;
    if (verdict === "unknown" && !force) {
      this.resumeAsking();
      throw new DomainStateError(
        "E_OUTCOME_UNKNOWN",
        `cannot learn from ${dest} whether it runs '${this.name}' (${why}); if you know which copy must run (the other host is gone for good, say), add --force`,
      );
    }
    if (keep === "source" && verdict === "runs") {
      this.resumeAsking();
      throw new DomainStateError(
        "E_RECOVER_CONTRADICTS",
        `${dest} runs '${this.name}': resuming the copy here would run two; keep the destination's with 'nbdmig migrate --recover destination ${this.name}'`,
      );
    }
    if (keep === "destination" && verdict === "never") {
      this.resumeAsking();
      throw new DomainStateError(
        "E_RECOVER_CONTRADICTS",
        `${dest} does not run '${this.name}' and never will: stopping the copy here would leave none; keep it with 'nbdmig migrate --recover source ${this.name}'`,
      );
    }
    if (keep === "source") {
      await this.keepSource(
        verdict === "never"
          ? "the destination confirmed that it does not run the guest"
          : "the operator chose the source (--force)",
      );
      return `'${this.name}' runs here again; ${dest} does not run it`;
    }
    await this.keepDestination();
    return `'${this.name}' runs on ${dest}; the copy here is stopped`;
  }

  /** After a refused decision: a restarted agent that was still asking goes on asking. */
  private resumeAsking(): void {
    if (this.machine.is("finish:unknown")) this.settled = this.settleInBackground();
  }

  /** The destination runs the guest: stop the copy here (Confirm). */
  private async keepDestination(): Promise<void> {
    if (!this.machine.is("confirm")) this.machine.advance("confirm");
    this.entry.job = undefined;
    this.entry.hold = undefined;
    await stopSourceCopy(this.reg, this.entry, this.record.undefineSource);
    this.notes.push("the destination runs the guest: the copy here is stopped");
    this.log.info({ domain: this.name, dest: this.record.dest }, "migration completed after recovery");
    this.machine.advance("completed");
  }

  /** The destination does not run the guest and never will: end QEMU's migration, resume here, clean there. */
  private async keepSource(reason: string): Promise<void> {
    if (!this.machine.is("rollback")) this.machine.advance("rollback");
    const qmp = this.qmp;
    await cancelQemuMigration(qmp);
    await recoverMirrors(qmp, this.log);
    await restoreSource(this.entry.running!, this.record);
    this.entry.job = undefined;
    this.entry.hold = undefined;
    if (this.record.id) await cancelOnDestination(this.peer, this.record.id, this.log, this.name);
    this.notes.push(`rolled back: ${reason}`);
    this.log.warn({ domain: this.name, reason }, "migration rolled back after recovery");
    this.machine.advance("failed");
  }

  describe(): Record<string, unknown> {
    const active = this.askingNow;
    return {
      type: "outgoing",
      operation: "Migration handoff",
      domain: this.name,
      dest: this.record.dest,
      phase: this.phase,
      status: active ? "active" : this.machine.is("completed") ? "completed" : "failed",
      startedAt: this.record.startedAt,
      elapsedMs: Date.now() - this.record.startedAt,
      notes: this.notes,
    };
  }
}
