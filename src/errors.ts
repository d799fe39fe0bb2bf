/**
 * Every failure nbdmig reports has a class and a stable `code` that scripts can match on. A user mistake is
 * a UsageError (or a more specific subclass) whose message says how to fix it; a bug is an assertion.
 */
export class NbdmigError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }
}

/** Bad command line or API input. The CLI exits 2 for these. */
export class UsageError extends NbdmigError {
  constructor(message: string, code = "E_USAGE") {
    super(code, message);
  }
}

/** A domain XML that cannot be accepted; `element` names the XML element or attribute at fault. */
export class DomainXmlError extends UsageError {
  readonly element: string;
  constructor(element: string, message: string) {
    super(`${element}: ${message}`, "E_DOMAIN_XML");
    this.element = element;
  }
}

/** An error reported by QEMU over QMP (`errorClass`/`desc` as QEMU sent them), or a lost QMP connection. */
export class QmpError extends NbdmigError {
  readonly errorClass: string;
  readonly desc: string;
  constructor(errorClass: string, desc: string, command?: string) {
    super("E_QMP", command ? `${command}: ${desc}` : desc);
    this.errorClass = errorClass;
    this.desc = desc;
  }
}

/** A domain does not exist, exists already, or is in the wrong state for the request. */
export class DomainStateError extends NbdmigError {}

/** Failure talking to an agent (connection refused, bad token, HTTP error without a structured body). */
export class AgentError extends NbdmigError {
  readonly status: number;
  constructor(code: string, message: string, status = 0) {
    super(code, message);
    this.status = status;
  }
}

export type MigrationPhase = "begin" | "prepare" | "perform" | "finish" | "confirm";

/** A failed migration; `phase` says where, `host` on which side when known. */
export class MigrationError extends NbdmigError {
  readonly phase: MigrationPhase;
  /** The message without its phase prefix, to re-raise the error elsewhere (peer, CLI) unchanged. */
  readonly detail: string;
  constructor(phase: MigrationPhase, message: string, code = "E_MIGRATION", options?: { cause?: unknown }) {
    // "prepare on 198.18.0.2: not enough space ..." reads better than "prepare: on 198.18.0.2: ...".
    super(code, `${phase}${message.startsWith("on ") ? " " : ": "}${message}`, options);
    this.phase = phase;
    this.detail = message;
  }
}

export function assert(cond: unknown, message: string): asserts cond {
  if (!cond) throw new Error(`assertion failed: ${message}`);
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
