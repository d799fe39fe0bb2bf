/**
 * The domains of one host: persistent definitions, running QEMU processes, and their lifecycle. QEMU runs in
 * its own session and outlives the agent; on start the registry reattaches to every QEMU still running.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import type { Logger } from "pino";
import { DomainStateError, errorMessage, UsageError } from "../errors.js";
import type { DomainDef } from "../domain/model.js";
import { buildQemuArgs, nicId, throttleArgs, type Accel, type DiskLayout } from "../domain/qemu-args.js";
import { checkForHost, resolveForHost, type HostCaps } from "../domain/resolve.js";
import { domainToXml, parseDomainXml } from "../domain/xml.js";
import { probeQemuFeatures } from "../qemu/features.js";
import { loadFirmwareDescriptors } from "../qemu/firmware.js";
import { imageInfo } from "../qemu/img.js";
import { chooseAccel, launchQemu, pidAlive, processRuns, waitGone } from "../qemu/launcher.js";
import { QmpClient } from "../qemu/qmp.js";
import { blockOf } from "../qemu/qmp-util.js";
import type { RunState } from "../qemu/qmp-schema.js";
import { formatBytes } from "../util/format.js";
import { Mutex } from "../util/mutex.js";
import {
  acquireResources,
  checkNetworks,
  nvramDir,
  reconcileResources,
  releaseResources,
  tpmStateDir,
} from "./resources.js";
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
  /** Arrived by migration and not yet resumed (--suspend): announce its MACs when it is resumed. */
  announceOnResume?: boolean;
  /** Settles when this run's host resources and runtime record are gone (see DomainRegistry.ended). */
  ended?: Promise<void>;
}

export interface DomainEntry {
  name: string;
  /** The persistent definition, or the live one for a transient domain. */
  def: DomainDef;
  persistent: boolean;
  running?: RunningDomain;
  /** Set while a migration job owns the domain; other lifecycle calls are refused. */
  job?: {
    kind: string;
    /** Why the domain cannot be touched, where "wait for the job" is not the answer (a kept copy). */
    refusal?: string;
    describe(): Record<string, unknown>;
    abort(): Promise<void>;
    /** Calls `onPhase` at each new phase of the job, until the function it returns is called. */
    watch?(onPhase: () => void): () => void;
    /**
     * True while the job must not be disturbed: the guest is paused at the switchover, where every CPU
     * millisecond is downtime. Long polls of the job are held then, and answered when it is over.
     */
    quiet?(): boolean;
  };
  lastJob?: Record<string, unknown>;
  /** Why this guest must stay paused (its migration's outcome is unknown): `resume` is refused with it. */
  hold?: string;
  lock: Mutex;
  /**
   * What goes with a transient domain when it is dropped (stops, or is undefined while stopped): its TPM
   * state (the default for transient domains, as in libvirt) and, after `undefine --nvram`, its NVRAM.
   */
  dropWith?: { nvram?: string; tpm: boolean };
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

export interface RegistryOptions {
  accel: "auto" | Accel;
  /** `auto`: `drive` where this QEMU has in-stream block migration, else `blockdev`. */
  layout?: "auto" | DiskLayout;
  /** libvirt network name -> bridge (`daemon --network`, plus default -> virbr0 when it exists). */
  networks?: Record<string, string>;
  /** How errors name this host (e.g. its listen address). */
  hostLabel?: string;
  /** libvirt storage pool name -> directory (`daemon --pool`, plus default -> /var/lib/libvirt/images). */
  pools?: Record<string, string>;
}

export class DomainRegistry {
  private readonly entries = new Map<string, DomainEntry>();
  private nextId = 1;
  private readonly accelChoice: "auto" | Accel;
  private readonly layoutChoice: "auto" | DiskLayout;
  readonly networks: Record<string, string>;
  readonly pools: Record<string, string>;
  readonly hostLabel: string;

  constructor(
    readonly state: StateDir,
    private readonly log: Logger,
    opts: RegistryOptions,
  ) {
    this.accelChoice = opts.accel;
    this.layoutChoice = opts.layout ?? "auto";
    this.networks = opts.networks ?? {};
    this.pools = opts.pools ?? {};
    this.hostLabel = opts.hostLabel ?? "this host";
  }

  /** What this host offers a definition: QEMU's machine types and devices, firmware, swtpm. */
  async hostCaps(): Promise<HostCaps> {
    return {
      qemu: await probeQemuFeatures(),
      firmware: loadFirmwareDescriptors(),
      pools: this.pools,
      nvramDir: nvramDir(this.state),
      swtpm: swtpmInstalled(),
    };
  }

  /** Parses XML and resolves it for this host (machine type, firmware, NVRAM path): what define stores. */
  async resolveXml(xml: string): Promise<{ def: DomainDef; warnings: string[] }> {
    const parsed = parseDomainXml(xml);
    const r = resolveForHost(parsed.def, await this.hostCaps());
    return { def: r.def, warnings: [...parsed.warnings, ...r.warnings] };
  }

  /**
   * Whether this host can run an already resolved definition (a migration's destination): the machine
   * type, firmware files, devices, bridges, networks and links. Chooses nothing; throws naming what lacks.
   */
  async checkHost(def: DomainDef): Promise<void> {
    checkForHost(def, await this.hostCaps());
    checkNetworks(def, { networks: this.networks, hostLabel: this.hostLabel });
    const mem = hostMemoryKiB();
    if (mem !== undefined && def.memoryKiB > mem) {
      throw new UsageError(
        `domain '${def.name}' has ${formatBytes(def.memoryKiB * 1024)} of memory, more than ${this.hostLabel} has (${formatBytes(mem * 1024)} of RAM and swap); give it less <memory> or run it on a larger host`,
        "E_NO_MEMORY",
      );
    }
  }

  /** The disk layout new domains get here. */
  async diskLayout(): Promise<DiskLayout> {
    if (this.layoutChoice !== "auto") return this.layoutChoice;
    return (await probeQemuFeatures()).blockMigration ? "drive" : "blockdev";
  }

  /** Loads definitions and reattaches to QEMU processes that survived an agent restart. */
  async load(): Promise<void> {
    // Whether or not reattaching works, a live QEMU keeps its taps and swtpm: only the dead lose theirs.
    const alive = await this.loadEntries();
    await reconcileResources(this.state, alive, this.log);
  }

  /** Loads definitions and runtime records; answers the names whose QEMU is still alive. */
  private async loadEntries(): Promise<Set<string>> {
    const alive = new Set<string>();
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
      if (!Number.isInteger(rec.pid) || !Number.isInteger(rec.id) || typeof rec.name !== "string") {
        this.log.error({ file }, "not a runtime record; left alone");
        continue;
      }
      this.nextId = Math.max(this.nextId, rec.id + 1);
      if (!pidAlive(rec.pid) || !processRuns(rec.pid, "qemu", true)) {
        this.log.info({ domain: rec.name, pid: rec.pid }, "QEMU exited while the agent was down");
        this.removeRuntime(rec.name);
        continue;
      }
      alive.add(rec.name);
      let qmp: QmpClient | undefined;
      try {
        qmp = await QmpClient.connect(this.state.qmpSocket(rec.name), { waitMs: 2000 });
        const { def } = parseDomainXml(rec.xml);
        let entry = this.entries.get(rec.name);
        if (!entry) {
          // A transient domain's TPM state goes when it stops (an `undefine --nvram` made while it ran,
          // before this restart, is not remembered: its NVRAM stays).
          entry = { name: rec.name, def, persistent: false, lock: new Mutex(), dropWith: { tpm: true } };
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
        // QEMU takes one QMP client: let go of it, so that a later agent can try again.
        qmp?.close();
        this.log.error(
          { domain: rec.name, pid: rec.pid, err: (err as Error).message },
          "cannot reattach to QEMU",
        );
      }
    }
    return alive;
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

  /** Defines (or redefines) a persistent domain, resolved for this host. */
  async define(xml: string): Promise<{ name: string; warnings: string[]; created: boolean }> {
    const { def, warnings } = await this.resolveXml(xml);
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
      existing.dropWith = undefined;
    } else {
      this.entries.set(def.name, { name: def.name, def, persistent: true, lock: new Mutex() });
    }
    this.log.info({ domain: def.name, warnings }, existing ? "domain redefined" : "domain defined");
    return { name: def.name, warnings, created: !existing };
  }

  /**
   * Removes the persistent definition; a running domain stays running as a transient one. As virsh, a
   * domain with an NVRAM needs `nvram`: "remove" or "keep"; its TPM state goes unless `keepTpm`.
   */
  undefine(name: string, opts: { nvram?: "remove" | "keep"; keepTpm?: boolean } = {}): void {
    const e = this.get(name);
    if (!e.persistent)
      throw new DomainStateError(
        "E_DOMAIN_STATE",
        `domain '${name}' is transient; it has no definition to remove`,
      );
    const nvram = e.def.os.firmware.nvram?.path;
    if (nvram && fs.existsSync(nvram) && !opts.nvram) {
      throw new UsageError(
        `domain '${name}' has an NVRAM (${nvram}); add --nvram to remove it with the definition, or --keep-nvram to keep it`,
        "E_HAS_NVRAM",
      );
    }
    fs.rmSync(this.state.definition(name), { force: true });
    e.persistent = false;
    // A running domain goes on as a transient one; what the choices remove goes when it stops.
    e.dropWith = { nvram: opts.nvram === "remove" ? nvram : undefined, tpm: !opts.keepTpm };
    if (!e.running) this.dropTransient(e);
    else this.writeRuntime(e);
    this.log.info({ domain: name }, "domain undefined");
  }

  /** Forgets a transient domain that has stopped, with what goes with it (`dropWith`). */
  private dropTransient(e: DomainEntry): void {
    this.entries.delete(e.name);
    if (e.dropWith?.nvram) fs.rmSync(e.dropWith.nvram, { force: true });
    if (e.dropWith?.tpm && e.def.tpm) this.removeTpmState(e.def);
  }

  /** Removes a domain's swtpm state (its TPM's keys and NVRAM). */
  removeTpmState(def: DomainDef): void {
    fs.rmSync(this.tpmStateDir(def.uuid), { recursive: true, force: true });
  }

  /** Where a domain's swtpm state lives on this host. */
  tpmStateDir(uuid: string): string {
    return tpmStateDir(this.state, uuid);
  }

  /** Where this host keeps NVRAM files by default. */
  get nvramDir(): string {
    return nvramDir(this.state);
  }

  /**
   * Announces a guest's MACs after it has moved, so the bridges and switches learn its new port: QEMU sends
   * a RARP per NIC (and asks a virtio-net guest to send its own gratuitous ARPs), 5 rounds 50, 150, 250 and
   * 350 ms apart. QEMU 7.2 announces once by itself when the incoming migration completes, with the same
   * defaults, but the guest is still paused then: the packets wait in QEMU's queue until the resume, so
   * the announcement is repeated once the guest runs. The guest runs here either way: a failure is logged,
   * never thrown (the caller must not undo a resume because of it).
   */
  async announce(run: RunningDomain): Promise<void> {
    if (!run.def.interfaces.length) return;
    await run.qmp
      .raw("announce-self", { initial: 50, max: 550, rounds: 5, step: 100 })
      .catch((err: unknown) =>
        this.log.warn({ domain: run.def.name, err: errorMessage(err) }, "cannot announce the guest's MACs"),
      );
  }

  /** Adds a transient domain (not yet running), e.g. the destination side of a migration. */
  addTransient(def: DomainDef): DomainEntry {
    if (this.entries.has(def.name)) {
      throw new DomainStateError("E_DOMAIN_EXISTS", `domain '${def.name}' already exists on this host`);
    }
    const e: DomainEntry = {
      name: def.name,
      def,
      persistent: false,
      lock: new Mutex(),
      dropWith: { tpm: true },
    };
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
    e.dropWith = undefined;
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
    await this.checkHost(def);
    const accel = opts.accel ?? (await chooseAccel(this.accelChoice, def.type));
    const layout = opts.layout ?? (await this.diskLayout());
    const res = await acquireResources(
      {
        state: this.state,
        log: this.log,
        networks: this.networks,
        hostLabel: this.hostLabel,
        portsInUse: () => this.displayPortsInUse(),
      },
      def,
      { accel, incoming: opts.incoming === true },
    );
    for (const w of res.warnings) this.log.warn({ domain: name }, w);
    const live = res.live;
    let launched: { pid: number; qmp: QmpClient };
    try {
      const args = buildQemuArgs(live, {
        accel,
        layout,
        qmpSocket: this.state.qmpSocket(name),
        serialLog: this.state.serialLog(name),
        incoming: opts.incoming,
        host: res.host,
      });
      // Start stopped so the domain's I/O limits and link states are in place before the guest runs.
      if (!opts.incoming) args.push("-S");
      fs.appendFileSync(
        this.state.qemuLog(name),
        `${new Date().toISOString()} starting: ${args.join(" ")}\n`,
      );
      launched = await launchQemu(args, this.state.qmpSocket(name), this.state.qemuLog(name), res.passFds);
    } catch (err) {
      res.settle();
      await releaseResources(this.state, name, this.log);
      throw err;
    } finally {
      for (const fd of res.passFds) fs.closeSync(fd);
    }
    const { pid, qmp } = launched;
    const run: RunningDomain = {
      id: this.nextId++,
      pid,
      accel,
      layout,
      qmp,
      startedAt: Date.now(),
      def: live,
      status: "prelaunch",
    };
    this.attach(e, run);
    // QEMU holds the taps now, and the live definition (seen by displayPortsInUse) has the ports.
    res.settle();
    this.writeRuntime(e);
    try {
      await this.configureGuest(run, opts.incoming === true);
      if (!opts.incoming && !opts.paused) await qmp.execute("cont");
      run.status = (await qmp.execute("query-status")).status;
    } catch (err) {
      await this.kill(e);
      throw err;
    }
    this.log.info(
      { domain: name, pid, accel, id: run.id, taps: live.interfaces.map((i) => i.targetDev).filter(Boolean) },
      "domain started",
    );
    return run;
  }

  /** What QEMU's command line cannot say: I/O limits, link states, passwords, the balloon's target. */
  private async configureGuest(run: RunningDomain, incoming: boolean): Promise<void> {
    const { def, qmp } = run;
    const limited = def.disks.filter((d) => d.source !== undefined && d.iotune);
    const blocks = limited.length ? await qmp.execute("query-block") : [];
    for (const d of limited) {
      const t = throttleArgs(d, blockOf(blocks, d.target).qdev);
      if (t) await qmp.raw("block_set_io_throttle", t);
    }
    // A NIC's link state lives in its netdev, which a migration does not carry: set it on both sides.
    for (const [i, nic] of def.interfaces.entries()) {
      if (nic.linkDown) await qmp.raw("set_link", { name: nicId(i), up: false });
    }
    for (const g of def.graphics) {
      if (g.type === "vnc" && g.passwd !== undefined)
        await qmp.raw("set_password", { protocol: "vnc", password: g.passwd });
    }
    if (def.memballoon?.statsPeriod !== undefined) {
      await qmp.raw("qom-set", {
        path: "/machine/peripheral/balloon0",
        property: "guest-stats-polling-interval",
        value: def.memballoon.statsPeriod,
      });
    }
    // The balloon's size travels with a migration; only a fresh start sets it from <currentMemory>.
    if (!incoming && def.memballoon && def.currentMemoryKiB < def.memoryKiB)
      await qmp.raw("balloon", { value: def.currentMemoryKiB * 1024 });
  }

  /** Display ports of running domains, so that two starts never pick the same one. */
  private displayPortsInUse(): Set<number> {
    const ports = new Set<number>();
    for (const e of this.entries.values())
      for (const g of e.running?.def.graphics ?? []) if (g.port !== undefined) ports.add(g.port);
    return ports;
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
    if (!(await waitGone(run.pid, 5000))) process.kill(run.pid, "SIGKILL");
    await this.ended(e, run);
  }

  /**
   * The end of one run, once its QEMU is gone, whoever noticed first (kill, or the QMP connection closing):
   * its taps, macvtaps and swtpm are removed, then its runtime record, and only then does the domain stop
   * counting as running, so that no new start of it can begin before the old one is cleaned up.
   */
  private ended(e: DomainEntry, run: RunningDomain): Promise<void> {
    run.ended ??= (async () => {
      await this.releaseHost(e.name);
      if (e.running !== run) return;
      this.removeRuntime(e.name);
      e.running = undefined;
      e.hold = undefined;
      if (!e.persistent && !e.job) this.dropTransient(e);
      this.log.info({ domain: e.name, pid: run.pid }, "QEMU exited; domain is shut off");
    })();
    return run.ended;
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
    if (e.job?.refusal) this.refuseIfBusy(e);
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
    if (!(await waitGone(run.pid, 5000))) {
      process.kill(run.pid, "SIGKILL");
      await waitGone(run.pid, 5000);
    }
    run.qmp.close();
    await run.qmp.closed;
    await this.ended(e, run);
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
    if (e.hold) throw new DomainStateError("E_DOMAIN_HELD", `domain '${name}' cannot be resumed: ${e.hold}`);
    await e.running.qmp.execute("cont");
    e.running.status = "running";
    if (e.running.announceOnResume) {
      e.running.announceOnResume = false;
      await this.announce(e.running);
    }
  }

  refuseIfBusy(e: DomainEntry): void {
    if (e.job?.refusal) throw new DomainStateError("E_DOMAIN_BUSY", `domain '${e.name}' is ${e.job.refusal}`);
    if (e.job) {
      throw new DomainStateError(
        "E_DOMAIN_BUSY",
        `domain '${e.name}' has ${/^[aeiou]/.test(e.job.kind) ? "an" : "a"} ${e.job.kind} job in progress; wait for it or run 'nbdmig domjobabort ${e.name}'`,
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

  /** Taps, macvtaps and swtpm of a QEMU that has exited, whatever the reason. */
  private async releaseHost(name: string): Promise<void> {
    await releaseResources(this.state, name, this.log).catch((err: unknown) =>
      this.log.error({ domain: name, err: errorMessage(err) }, "cannot release host resources"),
    );
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

let swtpmFound = false;
/** swtpm and swtpm_setup are on the PATH; looked for until found (it may be installed while the agent runs). */
function swtpmInstalled(): boolean {
  swtpmFound ||=
    spawnSync("sh", ["-c", "command -v swtpm && command -v swtpm_setup"], { stdio: "ignore" }).status === 0;
  return swtpmFound;
}

/** RAM plus swap, from /proc/meminfo: more than this cannot be given to a guest. */
function hostMemoryKiB(): number | undefined {
  try {
    const info = fs.readFileSync("/proc/meminfo", "utf8");
    const kib = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(info)?.[1] ?? 0);
    return kib("MemTotal") + kib("SwapTotal") || undefined;
  } catch {
    return undefined;
  }
}
