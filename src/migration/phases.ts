/**
 * The migration state machines, one per side. Every step of the engine and every agent call names the phases
 * in which it is valid; `advance` refuses any transition that is not in the table.
 */
import { assert, errorMessage, MigrationError, NbdmigError, type MigrationPhase } from "../errors.js";

/** Source side (outgoing). `perform:*` sub-phases are what `domjobinfo` shows. */
export type SourcePhase =
  | "begin"
  | "prepare"
  | "perform:mirror"
  | "perform:copy"
  | "perform:memory"
  | "perform:switchover"
  | "finish"
  | "finish:unknown"
  | "unsettled"
  | "confirm"
  | "completed"
  | "rollback"
  | "failed"
  | "cancelled";

const SOURCE_NEXT: Record<SourcePhase, SourcePhase[]> = {
  begin: ["prepare", "rollback"],
  // Storage in the migration stream (or none) has no mirror phase.
  prepare: ["perform:mirror", "perform:memory", "perform:copy", "rollback"],
  "perform:mirror": ["perform:memory", "rollback"],
  // Offline: the copy engine copies the shut-off domain's disks; then Finish defines it there.
  "perform:copy": ["finish", "rollback"],
  "perform:memory": ["perform:switchover", "rollback"],
  // An agent restarted after the stream completed does not know whether Finish went out: it asks.
  "perform:switchover": ["finish", "finish:unknown", "rollback"],
  // Finish sent, no answer: the destination may run the guest. The source guest stays paused until the
  // destination says it does (confirm) or that it does not and never will (rollback); else it fails paused.
  finish: ["confirm", "rollback", "finish:unknown"],
  "finish:unknown": ["confirm", "rollback", "unsettled"],
  // The job has ended without an answer: the guest stays paused and its record stays, until a restarted
  // agent or the operator (`migrate --recover`) learns or decides which copy runs.
  unsettled: ["confirm", "rollback"],
  confirm: ["completed"],
  rollback: ["failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

/**
 * Destination side (incoming). `finish` waits for the stream and flushes; `resume` is the decision to run
 * the guest here, taken (and persisted) before `cont`: from then on this copy is never removed. `held` is
 * where an agent restarted in `finish` continues, once the stream had completed: the guest is whole here
 * but paused, and it resumes only when the source says so (it has not resumed its own copy and never
 * will), or it is removed when the source cancels or stays silent. `kept` is a live copy whose --verify
 * failed: the stream completed here and the guest is paused, but it never resumes; it stays for the
 * operator to inspect until its time is up or it is discarded, and is then removed as cleanup does.
 */
export type DestPhase =
  "prepare" | "prepared" | "finish" | "held" | "kept" | "resume" | "running" | "cleanup" | "cleaned";

const DEST_NEXT: Record<DestPhase, DestPhase[]> = {
  prepare: ["prepared", "cleanup"],
  prepared: ["finish", "kept", "cleanup"],
  kept: ["cleanup"],
  finish: ["resume", "cleanup"],
  held: ["resume", "cleanup"],
  resume: ["running"],
  running: [],
  cleanup: ["cleaned"],
  cleaned: [],
};

/** Every phase of each side, for the schemas of the persisted records. */
export const SOURCE_PHASES = Object.keys(SOURCE_NEXT) as [SourcePhase, ...SourcePhase[]];
export const DEST_PHASES = Object.keys(DEST_NEXT) as [DestPhase, ...DestPhase[]];

export class PhaseMachine<P extends string> {
  private current: P;
  readonly history: { phase: P; at: number }[] = [];
  /**
   * Called with each new phase before the machine (and so the engine) acts in it: where a side writes its
   * decision to its state dir, so that a restarted agent continues from there.
   */
  onEnter?: (phase: P) => void;
  /** Told of each new phase once the machine is in it: whoever follows the job (the job long poll). */
  private readonly listeners = new Set<(phase: P) => void>();
  constructor(
    initial: P,
    private readonly table: Record<P, P[]>,
  ) {
    this.current = initial;
    this.history.push({ phase: initial, at: Date.now() });
  }
  get phase(): P {
    return this.current;
  }
  is(...phases: P[]): boolean {
    return phases.includes(this.current);
  }
  advance(next: P): void {
    assert(
      this.table[this.current].includes(next),
      `illegal migration transition ${this.current} -> ${next}`,
    );
    this.onEnter?.(next);
    this.current = next;
    this.history.push({ phase: next, at: Date.now() });
    for (const fn of [...this.listeners]) fn(next);
  }
  /** Calls `fn` after each transition; returns what stops that. */
  listen(fn: (phase: P) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
  /** Time spent entering `phase` (ms since start), if it was reached. */
  reachedAt(phase: P): number | undefined {
    return this.history.find((h) => h.phase === phase)?.at;
  }
}

/** A source machine, new (at `begin`) or continuing from a persisted phase after an agent restart. */
export const sourceMachine = (from: SourcePhase = "begin"): PhaseMachine<SourcePhase> =>
  new PhaseMachine<SourcePhase>(from, SOURCE_NEXT);
/** A destination machine, new (at `prepare`) or continuing what an agent restart left `held` or `kept`. */
export const destMachine = (from: "prepare" | "held" | "kept" = "prepare"): PhaseMachine<DestPhase> =>
  new PhaseMachine<DestPhase>(from, DEST_NEXT);

/** The protocol phase (begin/prepare/perform/finish/confirm) a source sub-phase belongs to, for errors. */
export function protocolPhase(p: SourcePhase): MigrationPhase {
  if (p.startsWith("perform")) return "perform";
  if (p === "finish:unknown" || p === "unsettled") return "finish";
  if (p === "begin" || p === "prepare" || p === "finish" || p === "confirm") return p;
  return "confirm";
}

/** The status a source job reports for its phase (domjobinfo, the CLI's wait). */
export function sourceJobStatus(
  m: PhaseMachine<SourcePhase>,
): "completed" | "failed" | "cancelled" | "active" {
  if (m.is("completed")) return "completed";
  if (m.is("failed", "unsettled")) return "failed";
  if (m.is("cancelled")) return "cancelled";
  return "active";
}

/** Why a source job failed, as it reports it: a MigrationError as it is, anything else in `phase`. */
export function asMigrationError(err: unknown, phase: SourcePhase): MigrationError {
  if (err instanceof MigrationError) return err;
  return new MigrationError(
    protocolPhase(phase),
    errorMessage(err),
    err instanceof NbdmigError ? err.code : "E_INTERNAL",
  );
}

/** domjobinfo's error fields of a failed job. */
export function failureFields(f: MigrationError | undefined): Record<string, string | undefined> {
  return { error: f?.message, errorCode: f?.code, errorPhase: f?.phase, errorDetail: f?.detail };
}

/** Throws unless the machine is in one of `valid` (an API called at the wrong time). */
export function requirePhase<P extends string>(
  m: PhaseMachine<P>,
  valid: P[],
  what: string,
  phaseOfError: MigrationPhase,
): void {
  if (!m.is(...valid)) {
    throw new MigrationError(
      phaseOfError,
      `${what} is valid in phase ${valid.join(" or ")}, not in ${m.phase}`,
      "E_MIGRATION_PHASE",
    );
  }
}
