/**
 * The migration state machines, one per side. Every step of the engine and every agent call names the phases
 * in which it is valid; `advance` refuses any transition that is not in the table.
 */
import { assert, MigrationError, type MigrationPhase } from "../errors.js";

/** Source side (outgoing). `perform:*` sub-phases are what `domjobinfo` shows. */
export type SourcePhase =
  | "begin"
  | "prepare"
  | "perform:mirror"
  | "perform:memory"
  | "perform:switchover"
  | "finish"
  | "finish:unknown"
  | "confirm"
  | "completed"
  | "rollback"
  | "failed"
  | "cancelled";

const SOURCE_NEXT: Record<SourcePhase, SourcePhase[]> = {
  begin: ["prepare", "rollback"],
  // Storage in the migration stream (or none) has no mirror phase.
  prepare: ["perform:mirror", "perform:memory", "rollback"],
  "perform:mirror": ["perform:memory", "rollback"],
  "perform:memory": ["perform:switchover", "rollback"],
  "perform:switchover": ["finish", "rollback"],
  // Finish sent, no answer: the destination may run the guest. The source guest stays paused until the
  // destination says it does (confirm) or that it does not and never will (rollback); else it fails paused.
  finish: ["confirm", "rollback", "finish:unknown"],
  "finish:unknown": ["confirm", "rollback", "failed"],
  confirm: ["completed"],
  rollback: ["failed", "cancelled"],
  completed: [],
  failed: [],
  cancelled: [],
};

/** Destination side (incoming). */
export type DestPhase = "prepare" | "prepared" | "finish" | "running" | "cleanup" | "cleaned";

const DEST_NEXT: Record<DestPhase, DestPhase[]> = {
  prepare: ["prepared", "cleanup"],
  prepared: ["finish", "cleanup"],
  finish: ["running", "cleanup"],
  running: [],
  cleanup: ["cleaned"],
  cleaned: [],
};

export class PhaseMachine<P extends string> {
  private current: P;
  readonly history: { phase: P; at: number }[] = [];
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
    this.current = next;
    this.history.push({ phase: next, at: Date.now() });
  }
  /** Time spent entering `phase` (ms since start), if it was reached. */
  reachedAt(phase: P): number | undefined {
    return this.history.find((h) => h.phase === phase)?.at;
  }
}

export const sourceMachine = (): PhaseMachine<SourcePhase> =>
  new PhaseMachine<SourcePhase>("begin", SOURCE_NEXT);
export const destMachine = (): PhaseMachine<DestPhase> => new PhaseMachine<DestPhase>("prepare", DEST_NEXT);

/** The protocol phase (begin/prepare/perform/finish/confirm) a source sub-phase belongs to, for errors. */
export function protocolPhase(p: SourcePhase): MigrationPhase {
  if (p.startsWith("perform")) return "perform";
  if (p === "finish:unknown") return "finish";
  if (p === "begin" || p === "prepare" || p === "finish" || p === "confirm") return p;
  return "confirm";
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
