/**
 * The domains of one host: persistent definitions, running QEMU processes, and their lifecycle. QEMU runs in
 * its own session and outlives the agent; on start the registry reattaches to every QEMU still running.
 */
import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import { DomainStateError, UsageError } from "../errors.js";
import type { DomainDef } from "../domain/model.js";
import { buildQemuArgs, throttleArgs, type Accel, type DiskLayout } from "../domain/qemu-args.js";
import { domainToXml, parseDomainXml } from "../domain/xml.js";
import { probeQemuFeatures } from "../qemu/features.js";
import { imageInfo } from "../qemu/img.js";
import { chooseAccel, launchQemu, pidAlive } from "../qemu/launcher.js";
import { QmpClient } from "../qemu/qmp.js";
import { blockOf } from "../qemu/qmp-util.js";
import type { RunState } from "../qemu/qmp-schema.js";
import { Mutex } from "../util/mutex.js";
import { StateDir, writeFileAtomic } from "./state-dir.js";

export type DomainState = "running" | "paused" | "in shutdown" | "shut off" | "crashed";

export interface RunningDomain {
  id: number;
  pid: number;
  accel: Accel;
  /** How QEMU attached the disks; `drive` gives them the named BlockBackends in-stream migration needs. */
  layout: DiskLayout;
  qmp: QmpClient;
  startedAt: number;
  /** The definition QEMU was started from (may differ from the persistent one after a redefine). */
  def: DomainDef;
  status: RunState;
}

export interface DomainEntry {
  name: string;
  /** The persistent definition, or the live one for a transient domain. */
  def: DomainDef;
  persistent: boolean;
  running?: RunningDomain;
  /** Set while a migration job owns the domain; other lifecycle calls are refused. */
  job?: { kind: string; describe(): Record<string, unknown>; abort(): Promise<void> };
  lastJob?: Record<string, unknown>;
  lock: Mutex;
}

interface RuntimeRecord {
  name: string;
  id: number;
  pid: number;
  accel: Accel;
  layout?: DiskLayout;
  startedAt: number;
  persistent: boolean;
  xml: string;
}

export interface StartOptions {
  paused?: boolean;
  /** Start with `-S -incoming defer` for an incoming migration. */
  incoming?: boolean;
  /** Use this accelerator (a migration destination must match its source). */
  accel?: Accel;
  /** Use this disk layout instead of the agent's choice (an in-stream destination needs `drive`). */
  layout?: DiskLayout;
}

export class DomainRegistry {
  private readonly entries = new Map<string, DomainEntry>();
  private nextId = 1;

  constructor(
    readonly state: StateDir,
    private readonly log: Logger,
    private readonly accelChoice: "auto" | Accel,
    /** `auto`: `drive` where this QEMU has in-stream block migration, else `blockdev`. */
    private readonly layoutChoice: "auto" | DiskLayout = "auto",
  ) {}

  /** The disk layout new domains get here. */
  async diskLayout(): Promise<DiskLayout> {
    if (this.layoutChoice !== "auto") return this.layoutChoice;
    return (await probeQemuFeatures()).blockMigration ? "drive" : "blockdev";
  }

  /** Loads definitions and reattaches to QEMU processes that survived an agent restart. */
  async load(): Promise<void> {
    for (const f of fs.readdirSync(this.state.domainsDir).filter((f) => f.endsWith(".xml"))) {
      try {
        const { def } = parseDomainXml(fs.readFileSync(`${this.state.domainsDir}/${f}`, "utf8"));
        this.entries.set(def.name, { name: def.name, def, persistent: true, lock: new Mutex() });
      } catch (err) {
        this.log.error({ file: f, err: (err as Error).message }, "cannot load definition; skipped");
      }
    }
    for (const f of fs.readdirSync(this.state.runDir).filter((f) => f.endsWith(".json"))) {
      const file = `${this.state.runDir}/${f}`;
      let rec: RuntimeRecord;
      try {
        rec = JSON.parse(fs.readFileSync(file, "utf8")) as RuntimeRecord;
      } catch {
        fs.rmSync(file, { force: true });
        continue;
      }
      this.nextId = Math.max(this.nextId, rec.id + 1);
      if (!pidAlive(rec.pid) || !isQemu(rec.pid)) {
        this.log.info({ domain: rec.name, pid: rec.pid }, "QEMU exited while the agent was down");
        this.removeRuntime(rec.name);
        continue;
      }
      try {
        const qmp = await QmpClient.connect(this.state.qmpSocket(rec.name), { waitMs: 2000 });
        const { def } = parseDomainXml(rec.xml);
        let entry = this.entries.get(rec.name);
        if (!entry) {
          entry = { name: rec.name, def, persistent: false, lock: new Mutex() };
          this.entries.set(rec.name, entry);
        }
        const status = (await qmp.execute("query-status")).status;
        this.attach(entry, {
          id: rec.id,
          pid: rec.pid,
          accel: rec.accel,
          layout: rec.layout ?? "blockdev",
          qmp,
          startedAt: rec.startedAt,
          def,
          status,
        });
        this.log.info({ domain: rec.name, pid: rec.pid, status }, "reattached to running QEMU");
      } catch (err) {
        this.log.error(
          { domain: rec.name, pid: rec.pid, err: (err as Error).message },
          "cannot reattach to QEMU",
        );
      }
    }
  }

  list(): DomainEntry[] {
    return [...this.entries.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  get(name: string): DomainEntry {
    const e = this.entries.get(name);
    if (!e)
      throw new DomainStateError(
        "E_NO_DOMAIN",
        `domain '${name}' not found on this host (see 'nbdmig list --all')`,
      );
    return e;
  }

  running(name: string): DomainEntry & { running: RunningDomain } {
    const e = this.get(name);
    if (!e.running) throw new DomainStateError("E_DOMAIN_STATE", `domain '${name}' is not running`);
    return e as DomainEntry & { running: RunningDomain };
  }

  stateOf(e: DomainEntry): DomainState {
    if (!e.running) return "shut off";
    switch (e.running.status) {
      case "running":
        return "running";
      case "shutdown":
        return "in shutdown";
      case "internal-error":
      case "guest-panicked":
      case "io-error":
        return "crashed";
      default:
        return "paused";
    }
  }

  /** Defines (or redefines) a persistent domain. */
  define(xml: string): { name: string; warnings: string[]; created: boolean } {
    const { def, warnings } = parseDomainXml(xml);
    const existing = this.entries.get(def.name);
    if (existing && existing.def.uuid !== def.uuid) {
      throw new DomainStateError(
        "E_DOMAIN_EXISTS",
        `domain '${def.name}' already exists with uuid ${existing.def.uuid}; undefine it first or use its uuid`,
      );
    }
    for (const other of this.entries.values()) {
      if (other.name !== def.name && other.def.uuid === def.uuid) {
        throw new DomainStateError(
          "E_DOMAIN_EXISTS",
          `uuid ${def.uuid} is already used by domain '${other.name}'`,
        );
      }
    }
    writeFileAtomic(this.state.definition(def.name), domainToXml(def));
    if (existing) {
      existing.def = def;
      existing.persistent = true;
    } else {
      this.entries.set(def.name, { name: def.name, def, persistent: true, lock: new Mutex() });
    }
    this.log.info({ domain: def.name, warnings }, existing ? "domain redefined" : "domain defined");
    return { name: def.name, warnings, created: !existing };
  }

  /** Removes the persistent definition; a running domain stays running as a transient one. */
  undefine(name: string): void {
    const e = this.get(name);
    if (!e.persistent)
      throw new DomainStateError(
        "E_DOMAIN_STATE",
        `domain '${name}' is transient; it has no definition to remove`,
      );
    fs.rmSync(this.state.definition(name), { force: true });
    e.persistent = false;
    if (!e.running) this.entries.delete(name);
    else this.writeRuntime(e);
    this.log.info({ domain: name }, "domain undefined");
  }

  /** Adds a transient domain (not yet running), e.g. the destination side of a migration. */
  addTransient(def: DomainDef): DomainEntry {
    if (this.entries.has(def.name)) {
      throw new DomainStateError("E_DOMAIN_EXISTS", `domain '${def.name}' already exists on this host`);
    }
    const e: DomainEntry = { name: def.name, def, persistent: false, lock: new Mutex() };
    this.entries.set(def.name, e);
    return e;
  }

  /** Forgets a transient domain that is not running (rollback of a prepared migration). */
  forgetTransient(name: string): void {
    const e = this.entries.get(name);
    if (e && !e.persistent && !e.running) this.entries.delete(name);
  }

  /** Makes a domain persistent with the definition it runs with (virsh migrate --persistent). */
  persist(name: string): void {
    const e = this.get(name);
    const def = e.running?.def ?? e.def;
    writeFileAtomic(this.state.definition(name), domainToXml(def));
    e.persistent = true;
    e.def = def;
    if (e.running) this.writeRuntime(e);
  }

  async start(name: string, opts: StartOptions = {}): Promise<RunningDomain> {
    const e = this.get(name);
    if (e.running) throw new DomainStateError("E_DOMAIN_STATE", `domain '${name}' is already running`);
    const def = e.def;
    for (const d of def.disks) {
      if (d.source !== undefined && !fs.existsSync(d.source)) {
        throw new UsageError(
          `disk ${d.target}: source '${d.source}' does not exist; create it (qemu-img create) or fix the XML`,
        );
      }
    }
    const accel = opts.accel ?? (await chooseAccel(this.accelChoice, def.type));
    const layout = opts.layout ?? (await this.diskLayout());
    const args = buildQemuArgs(def, {
      accel,
      layout,
      qmpSocket: this.state.qmpSocket(name),
      serialLog: this.state.serialLog(name),
      incoming: opts.incoming,
    });
    // Start stopped so the domain's I/O limits are in place before the guest runs.
    if (!opts.incoming) args.push("-S");
    fs.appendFileSync(this.state.qemuLog(name), `${new Date().toISOString()} starting: ${args.join(" ")}\n`);
    const { pid, qmp } = await launchQemu(args, this.state.qmpSocket(name), this.state.qemuLog(name));
    const run: RunningDomain = {
      id: this.nextId++,
      pid,
      accel,
      layout,
      qmp,
      startedAt: Date.now(),
      def,
      status: "prelaunch",
    };
    this.attach(e, run);
    this.writeRuntime(e);
    try {
      const limited = def.disks.filter((d) => d.source !== undefined && d.iotune);
      const blocks = limited.length ? await qmp.execute("query-block") : [];
      for (const d of limited) {
        const t = throttleArgs(d, blockOf(blocks, d.target).qdev);
        if (t) await qmp.raw("block_set_io_throttle", t);
      }
      if (!opts.incoming && !opts.paused) await qmp.execute("cont");
      run.status = (await qmp.execute("query-status")).status;
    } catch (err) {
      await this.kill(e);
      throw err;
    }
    this.log.info({ domain: name, pid, accel, id: run.id }, "domain started");
    return run;
  }

  private attach(e: DomainEntry, run: RunningDomain): void {
    e.running = run;
    run.qmp.on("event", (ev) => {
      if (ev.event === "STOP") run.status = "paused";
      else if (ev.event === "RESUME") run.status = "running";
      else if (ev.event === "SHUTDOWN") run.status = "shutdown";
      else if (ev.event === "GUEST_PANICKED") run.status = "guest-panicked";
    });
    run.qmp.once("close", () => void this.onQemuGone(e, run));
  }

  private async onQemuGone(e: DomainEntry, run: RunningDomain): Promise<void> {
    for (let i = 0; i < 50 && pidAlive(run.pid); i++) await sleep(100);
    if (pidAlive(run.pid)) process.kill(run.pid, "SIGKILL");
    if (e.running !== run) return;
    e.running = undefined;
    this.removeRuntime(e.name);
    if (!e.persistent && !e.job) this.entries.delete(e.name);
    this.log.info({ domain: e.name, pid: run.pid }, "QEMU exited; domain is shut off");
  }

  /** Refreshes the run state from QEMU (events can be missed across an agent restart). */
  async refresh(e: DomainEntry): Promise<void> {
    if (!e.running) return;
    try {
      e.running.status = (await e.running.qmp.execute("query-status", undefined, { timeoutMs: 2000 })).status;
    } catch {
      /* keep the last known state; exit handling updates it */
    }
  }

  async destroy(name: string): Promise<void> {
    const e = this.running(name);
    if (e.job)
      throw new DomainStateError(
        "E_DOMAIN_BUSY",
        `domain '${name}' has a ${e.job.kind} job; run 'nbdmig domjobabort ${name}' first`,
      );
    await this.kill(e);
    this.log.info({ domain: name }, "domain destroyed");
  }

  /** Stops QEMU: SIGTERM, then SIGKILL after 5 s, and waits until the process is gone. */
  async kill(e: DomainEntry): Promise<void> {
    const run = e.running;
    if (!run) return;
    try {
      process.kill(run.pid, "SIGTERM");
    } catch {
      /* already gone */
    }
    for (let i = 0; i < 50 && pidAlive(run.pid); i++) await sleep(100);
    if (pidAlive(run.pid)) process.kill(run.pid, "SIGKILL");
    for (let i = 0; i < 50 && pidAlive(run.pid); i++) await sleep(100);
    run.qmp.close();
    await run.qmp.closed;
    if (e.running === run) {
      e.running = undefined;
      this.removeRuntime(e.name);
      if (!e.persistent && !e.job) this.entries.delete(e.name);
    }
  }

  async shutdown(name: string): Promise<void> {
    const e = this.running(name);
    this.refuseIfBusy(e);
    await e.running.qmp.execute("system_powerdown");
  }

  async suspend(name: string): Promise<void> {
    const e = this.running(name);
    this.refuseIfBusy(e);
    await e.running.qmp.execute("stop");
    e.running.status = "paused";
  }

  async resume(name: string): Promise<void> {
    const e = this.running(name);
    this.refuseIfBusy(e);
    await e.running.qmp.execute("cont");
    e.running.status = "running";
  }

  refuseIfBusy(e: DomainEntry): void {
    if (e.job) {
      throw new DomainStateError(
        "E_DOMAIN_BUSY",
        `domain '${e.name}' has a ${e.job.kind} job in progress; wait for it or run 'nbdmig domjobabort ${e.name}'`,
      );
    }
  }

  async diskInfo(
    name: string,
    target: string,
  ): Promise<{ capacity: number; allocation: number; physical: number }> {
    const e = this.get(name);
    const def = e.running?.def ?? e.def;
    const d = def.disks.find((x) => x.target === target || x.source === target);
    if (!d) {
      throw new UsageError(
        `domain '${name}' has no disk '${target}'; its disks are: ${def.disks.map((x) => x.target).join(", ")}`,
      );
    }
    if (d.source === undefined) return { capacity: 0, allocation: 0, physical: 0 };
    const info = await imageInfo(d.source, d.format);
    const st = fs.statSync(d.source);
    return {
      capacity: info.virtualSize,
      allocation: info.actualSize,
      physical: d.type === "block" ? info.virtualSize : st.size,
    };
  }

  consoleLog(name: string, maxBytes: number): string {
    this.get(name);
    try {
      const buf = fs.readFileSync(this.state.serialLog(name));
      return buf.subarray(Math.max(0, buf.length - maxBytes)).toString("utf8");
    } catch {
      return "";
    }
  }

  async monitor(name: string, command: string, hmp: boolean): Promise<unknown> {
    const e = this.running(name);
    if (hmp) return e.running.qmp.execute("human-monitor-command", { "command-line": command });
    let parsed: { execute?: string; arguments?: Record<string, unknown> };
    try {
      parsed = JSON.parse(command) as typeof parsed;
    } catch {
      throw new UsageError(
        `'${command}' is not a QMP JSON command; pass {"execute":"query-status"} or use --hmp`,
      );
    }
    if (typeof parsed.execute !== "string") throw new UsageError(`QMP command needs an "execute" member`);
    return e.running.qmp.raw(parsed.execute, parsed.arguments);
  }

  writeRuntime(e: DomainEntry): void {
    const r = e.running;
    if (!r) return;
    const rec: RuntimeRecord = {
      name: e.name,
      id: r.id,
      pid: r.pid,
      accel: r.accel,
      layout: r.layout,
      startedAt: r.startedAt,
      persistent: e.persistent,
      xml: domainToXml(r.def),
    };
    writeFileAtomic(this.state.runtime(e.name), JSON.stringify(rec, null, 2));
  }

  private removeRuntime(name: string): void {
    fs.rmSync(this.state.runtime(name), { force: true });
    fs.rmSync(this.state.qmpSocket(name), { force: true });
  }

  /** Closes QMP connections without touching QEMU (agent shutdown). */
  detachAll(): void {
    for (const e of this.entries.values()) {
      if (e.running) {
        e.running.qmp.removeAllListeners("close");
        e.running.qmp.close();
      }
    }
  }
}

function isQemu(pid: number): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, "utf8").includes("qemu");
  } catch {
    return false;
  }
}
