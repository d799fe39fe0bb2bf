/**
 * The source side of a live migration with NBD storage copy, after libvirt's design:
 * Begin (select disks, cookie) -> Prepare (on the destination agent) -> Perform (mirror every disk to the
 * destination's NBD exports, wait until all are READY, migrate RAM, cancel the mirrors at pre-switchover)
 * -> Finish (destination resumes) -> Confirm (source QEMU stops). Any failure rolls back: the migration and
 * mirrors are cancelled, the source guest keeps (or resumes) running, the destination removes what it made.
 */
import fs from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import type { Logger } from "pino";
import type { NetworkFacts, StorageCapabilities } from "../agent/api.js";
import { AgentClient, parseAgentUri, peerClient } from "../agent/client.js";
import type { DomainEntry, DomainRegistry, RunningDomain } from "../agent/domains.js";
import { errorMessage, MigrationError, NbdmigError, UsageError } from "../errors.js";
import { domainToXml } from "../domain/xml.js";
import type { DomainDef } from "../domain/model.js";
import { formatNode, NVRAM_TARGET } from "../domain/qemu-args.js";
import type { QmpClient, QmpEvent } from "../qemu/qmp.js";
import type { MigrationStats } from "../qemu/qmp-schema.js";
import { completedMigrationInfo } from "../qemu/qmp-util.js";
import { probeQemuFeatures, type QemuFeatures } from "../qemu/features.js";
import { sha256File } from "../util/hash.js";
import {
  copyTopOnly,
  destinationLacks,
  selectDisks,
  type CookieDisk,
  type MigrationCookie,
  type StoragePath,
} from "./cookie.js";
import type { PrepareResult } from "./destination.js";
import { openSourceImage, verifyDisk, type Verified } from "./verify.js";
import type { MigrateRequest, PrepareRequestInput } from "./schemas.js";
import { Mirrors } from "./mirror.js";
import { StorageConverger } from "./converge.js";
import { tcpBytesAcked } from "./wire.js";
import {
  asMigrationError,
  failureFields,
  PhaseMachine,
  protocolPhase,
  sourceJobStatus,
  sourceMachine,
  type SourcePhase,
} from "./phases.js";
import {
  cancelOnDestination,
  cancelQemuMigration,
  FINISH_SETTLE_MS,
  holdReason,
  persistPhases,
  restoreSource,
  settle,
  stopSourceCopy,
  type OutgoingRecord,
  type OutgoingRecords,
} from "./handoff.js";
import { failpoint, holdpoint } from "../util/failpoint.js";
import { writeBackFile } from "../util/write-behind.js";
import { addTlsCreds, caFingerprint, checkPki, clientIdentity, hasPki, TLS_CREDS_ID } from "../qemu/pki.js";

export type { MigrateRequest } from "./schemas.js";

/**
 * How the disks travel: NBD mirrors when the destination can serve NBD; else inside the migration stream
 * (QEMU's block migration) when both QEMUs still have it, the domain's disks are named BlockBackends, and
 * no writable disk would be sent that must not be (QEMU's block migration sends every writable disk).
 * Otherwise Begin refuses, naming what each side lacks.
 */
export function chooseStoragePath(
  run: RunningDomain,
  copied: CookieDisk[],
  dest: StorageCapabilities,
  src: QemuFeatures,
): "nbd" | "stream" {
  if (dest.nbd) return "nbd";
  const lacks: string[] = [];
  if (!src.blockMigration)
    lacks.push(`the source QEMU ${src.version} has no in-stream block migration (QEMU removed it in 9.1)`);
  if (!dest.stream)
    lacks.push(`the destination QEMU ${dest.qemu} has no in-stream block migration (QEMU removed it in 9.1)`);
  if (run.layout !== "drive")
    lacks.push(
      `domain '${run.def.name}' runs with the blockdev disk layout, whose nameless disks the stream cannot address; restart it under an agent with --disk-layout drive (or auto)`,
    );
  for (const d of run.def.disks) {
    if (d.source === undefined || d.readonly || copied.some((c) => c.target === d.target)) continue;
    lacks.push(
      `disk ${d.target} is writable but must not be copied (${d.shareable ? "shareable" : "left out by --migrate-disks"}), and QEMU's in-stream migration sends every writable disk; make it <readonly/> or detach it for the migration`,
    );
  }
  if (lacks.length === 0) return "stream";
  throw new MigrationError(
    "begin",
    `the disks cannot be copied: the destination cannot serve NBD (${dest.nbdWhyNot}), and storage cannot travel in the migration stream because ${lacks.join("; ")}`,
    "E_NO_STORAGE_PATH",
  );
}

/** What Begin reads from the destination agent (`GET /v1/host`). */
export interface DestinationFacts {
  storage?: StorageCapabilities;
  network?: NetworkFacts;
  machines?: string[];
  tls?: { caSha256: string };
}

/**
 * Begin's questions to the destination, before anything is created anywhere: can it run the domain (its
 * networks, links, machine type), and TLS (on by --tls or when this host has certificates: both hosts need
 * certificates of the same CA). Adds what the operator should know to `notes`.
 */
export async function checkDestination(
  reg: DomainRegistry,
  def: DomainDef,
  req: { dest: string; destToken?: string; tls?: boolean },
  ownToken: string,
  notes: string[],
): Promise<{ peer: AgentClient; host: DestinationFacts; tls: boolean }> {
  const destAddr = parseAgentUri(req.dest);
  const name = def.name;
  const peer = peerClient(destAddr, reg.state.pkiDir, req.destToken, ownToken, 60_000);
  const host = await peer
    .call<DestinationFacts>("GET", "/v1/host", undefined, 10_000)
    .catch((err: unknown) => {
      throw new MigrationError(
        "begin",
        `on ${destAddr.host}: ${errorMessage(err)}`,
        (err as NbdmigError).code,
      );
    });
  // Refuse before anything is created anywhere: a guest whose network or machine type the destination
  // lacks would start there without its network, or not at all.
  const lacks = destinationLacks(def, host);
  if (lacks.length) {
    throw new MigrationError(
      "begin",
      `the destination ${destAddr.host} cannot run '${name}': ${lacks.join("; ")}`,
      "E_DEST_LACKS",
    );
  }
  const pki = reg.state.pkiDir;
  const tls = req.tls ?? hasPki(pki);
  if (tls) {
    if (!hasPki(pki))
      throw new UsageError(
        `--tls needs this host's certificates in ${pki} (ca-cert.pem, client-cert.pem, client-key.pem); make them with 'nbdmig tls-host', or migrate without --tls`,
        "E_TLS",
      );
    checkPki(pki, "client");
    if (!host.tls)
      throw new MigrationError(
        "begin",
        `the destination ${destAddr.host} has no TLS certificates (its /var/lib/nbdmig/pki, or its --state-dir's pki); give it some with 'nbdmig tls-host' there, or migrate with --no-tls`,
        "E_TLS",
      );
    const ours = caFingerprint(pki);
    if (host.tls.caSha256 !== ours)
      throw new MigrationError(
        "begin",
        `the destination ${destAddr.host} trusts another CA (sha256 ${host.tls.caSha256.slice(0, 23)}...) than this host (${ours.slice(0, 23)}... in ${pki}/ca-cert.pem): both hosts need the same ca-cert.pem and certificates it signed`,
        "E_TLS",
      );
    notes.push(
      `TLS: the disk copy and the migration stream are encrypted, both ends authenticated by certificates of the CA ${ours.slice(0, 23)}...`,
    );
  }
  return { peer, host, tls };
}

/**
 * Prepare on the destination agent (it listens where the source reached it). Its own refusal keeps its
 * phase and code; a call that fails becomes Prepare's error.
 */
export async function prepareOnDestination(
  peer: AgentClient,
  dest: string,
  body: Omit<PrepareRequestInput, "listenHost">,
): Promise<PrepareResult> {
  const { host } = parseAgentUri(dest);
  const res = await peer
    .call<{ prepared: PrepareResult }>("POST", "/v1/migrations/prepare", { ...body, listenHost: host })
    .catch((err: unknown) => {
      if (err instanceof MigrationError) throw err;
      throw new MigrationError(
        "prepare",
        `on ${host}: ${errorMessage(err)}`,
        (err as NbdmigError).code ?? "E_PREPARE",
      );
    });
  return res.prepared;
}

/** Without an answer from the destination agent for this long, the migration is rolled back. */
const PEER_TIMEOUT_MS = Number(process.env.NBDMIG_PEER_TIMEOUT_MS ?? 10_000);
/** Whether a failed call may still have been carried out by the peer: no answer, or none we could read. */
function outcomeUnknown(err: unknown): boolean {
  return (
    err instanceof NbdmigError && (err.code === "E_AGENT_UNREACHABLE" || err.code === "E_AGENT_PROTOCOL")
  );
}
/** How long Finish may take before its outcome counts as unknown (the destination waits up to 30 s itself). */
const FINISH_TIMEOUT_MS = Number(process.env.NBDMIG_FINISH_TIMEOUT_MS ?? 60_000);
/** QEMU's migration bandwidth cap is 128 MiB/s by default; "unlimited" lifts it as libvirt does. */
const UNLIMITED_BPS = 2 ** 40;

/** What a source job has measured so far, for domjobinfo. */
interface Progress {
  memory?: MigrationStats;
  memoryRateBps: number;
  /** Block migration's progress, when the disks ride in the migration stream. */
  streamDisk?: { transferred: number; remaining: number; total: number };
  downtimeMs?: number;
  readyAt?: number;
  finishedAt?: number;
}

/**
 * The source's heartbeat to the destination while the job runs: the incoming migration is asked for every
 * second. `onLost` hears once why the destination is gone: it gave up, forgot the migration, or stayed
 * silent for PEER_TIMEOUT_MS (`silent`).
 */
export class DestinationWatch {
  private lost = false;
  private lastOk = Date.now();
  private readonly timer: NodeJS.Timeout;
  constructor(
    private readonly peer: AgentClient,
    private readonly id: string,
    private readonly onLost: (why: string, silent: boolean) => void | Promise<void>,
  ) {
    this.timer = setInterval(() => void this.beat(), 1000);
  }
  stop(): void {
    clearInterval(this.timer);
  }
  private async beat(): Promise<void> {
    if (this.lost) return;
    let why: string | undefined;
    let silent = false;
    try {
      const r = await this.peer.call<{ phase: string; error?: string }>(
        "GET",
        `/v1/migrations/${this.id}`,
        undefined,
        2000,
      );
      this.lastOk = Date.now();
      if (r.phase === "cleanup" || r.phase === "cleaned")
        why = `destination gave up: ${r.error ?? "cleaned up"}`;
    } catch (err) {
      if (err instanceof NbdmigError && err.code === "E_NO_MIGRATION")
        why = "destination no longer knows this migration";
      else if (Date.now() - this.lastOk > PEER_TIMEOUT_MS) {
        why = `lost contact with the destination agent for ${PEER_TIMEOUT_MS / 1000} s (${errorMessage(err)})`;
        silent = true;
      }
    }
    if (why === undefined || this.lost) return;
    this.lost = true;
    await this.onLost(why, silent);
  }
}

/**
 * One outgoing migration. Its phase machine is the state (persisted, and what each call checks); besides it
 * the job keeps what Begin decided (cookie, TLS, the guest's run state before), what Prepare answered, the
 * engines of the phases (mirrors, converger, heartbeat), what it measured, and how it failed.
 */
export class OutgoingMigration {
  readonly machine: PhaseMachine<SourcePhase> = sourceMachine();
  readonly startedAt = Date.now();
  private readonly run: RunningDomain;
  private readonly wasRunning: boolean;
  private prepared?: PrepareResult;
  private mirrors?: Mirrors;
  /** From pre-switchover until the stream has ended: the guest is paused, followers wait (job.quiet). */
  switching = false;
  private converger?: StorageConverger;
  private watch?: DestinationWatch;
  private timeoutTimer?: NodeJS.Timeout;
  /**
   * Why the job must stop, as the error it fails with: domjobabort, or the destination lost. The first
   * reason wins; each step's check throws it.
   */
  private readonly stop = new AbortController();
  private suspendedByTimeout = false;
  /** --verify: what the comparison of each disk read, and skipped as zero on both sides. */
  private readonly verified: Record<string, Verified> = {};
  private readonly progress: Progress = { memoryRateBps: 0 };
  /** What the operator should know about this job (which disks are copied how). */
  readonly notes: string[];
  /** Why the job failed, or why its outcome is unknown: domjobinfo's error fields. */
  private failure?: MigrationError;
  done: Promise<void> = Promise.resolve();

  /** Begin: validates and builds the cookie; throws before anything is created anywhere. */
  private constructor(
    private readonly reg: DomainRegistry,
    private readonly entry: DomainEntry & { running: RunningDomain },
    readonly req: MigrateRequest,
    private readonly log: Logger,
    private readonly onDone: (m: OutgoingMigration) => void,
    readonly cookie: MigrationCookie,
    private readonly peer: AgentClient,
    private readonly records: OutgoingRecords,
    /** TLS on the NBD copy and the migration stream (Begin decides: --tls, --no-tls, or certificates here). */
    private readonly tls: boolean,
    notes: string[],
  ) {
    this.notes = notes;
    this.run = entry.running;
    this.wasRunning = entry.running.status === "running";
    persistPhases(this.machine, records, () => this.record());
  }

  /** What a restarted agent needs to continue this migration (see handoff.ts). */
  private record(): Omit<OutgoingRecord, "phase"> {
    return {
      name: this.name,
      pid: this.run.pid,
      dest: this.req.dest,
      destToken: this.req.destToken,
      id: this.prepared?.id,
      wasRunning: this.wasRunning,
      stream: this.cookie.storagePath === "stream",
      undefineSource: this.req.undefineSource,
      startedAt: this.startedAt,
    };
  }

  static async begin(
    reg: DomainRegistry,
    name: string,
    req: MigrateRequest,
    ownToken: string,
    log: Logger,
    records: OutgoingRecords,
    onDone: (m: OutgoingMigration) => void,
  ): Promise<OutgoingMigration> {
    parseAgentUri(req.dest); // a malformed DEST_URI is refused first
    if (req.verify && !(req.suspend && req.copyStorage !== "none"))
      throw new UsageError(
        "--verify on a live migration needs --suspend and --copy-storage-all or -inc: the disks keep changing until the switchover, and only copies that both stay paused after it can be compared (or migrate it shut off, with --offline)",
      );
    if (req.bandwidthMiB !== undefined && !(Number.isInteger(req.bandwidthMiB) && req.bandwidthMiB > 0)) {
      throw new UsageError(`--bandwidth takes a positive whole number of MiB/s, not '${req.bandwidthMiB}'`);
    }
    if (req.timeoutSec !== undefined && !(Number.isInteger(req.timeoutSec) && req.timeoutSec > 0)) {
      throw new UsageError(`--timeout takes a positive whole number of seconds, not '${req.timeoutSec}'`);
    }
    if (
      req.disksPort !== undefined &&
      !(Number.isInteger(req.disksPort) && req.disksPort > 0 && req.disksPort < 65536)
    ) {
      throw new UsageError(`--disks-port takes a port number (1-65535), not '${req.disksPort}'`);
    }
    if (req.migrateDisks && req.copyStorage === "none") {
      throw new UsageError(
        "--migrate-disks needs --copy-storage-all or --copy-storage-inc (it picks which disks are copied)",
      );
    }
    const entry = reg.running(name);
    reg.refuseIfBusy(entry);
    await reg.refresh(entry);
    const run = entry.running;
    // prelaunch: started paused and never resumed (`start --paused`), which is paused too.
    if (!["running", "paused", "prelaunch"].includes(run.status)) {
      throw new UsageError(
        `domain '${name}' is ${run.status}; only a running or paused domain can be migrated`,
      );
    }
    const disks = req.copyStorage === "none" ? [] : selectDisks(run.def, req.migrateDisks);
    const blocks = await run.qmp.execute("query-block");
    const notes: string[] = [];
    const cookieDisks: CookieDisk[] = [];
    for (const d of disks) {
      const b = blocks.find((x) => x.inserted?.["node-name"] === formatNode(d.target));
      if (!b?.inserted) throw new MigrationError("begin", `disk ${d.target} is not attached in QEMU`);
      const disk: CookieDisk = {
        target: d.target,
        source: d.source!,
        format: d.format,
        virtualSize: b.inserted.image["virtual-size"],
        allocated: b.inserted.image["actual-size"] ?? b.inserted.image["virtual-size"],
        mode: "full",
      };
      if (req.copyStorage === "inc") await copyTopOnly(disk, req.verifyBacking ?? false, notes);
      cookieDisks.push(disk);
    }
    const def = run.def;
    const nvram = def.os.firmware.loader?.type === "pflash" ? def.os.firmware.nvram : undefined;
    let nvramInfo: MigrationCookie["nvram"];
    if (nvram) {
      const b = blocks.find((x) => x.inserted?.["node-name"] === formatNode(NVRAM_TARGET));
      if (!b?.inserted) throw new MigrationError("begin", "the UEFI variable store is not attached in QEMU");
      nvramInfo = {
        path: nvram.path,
        format: nvram.format ?? "raw",
        virtualSize: b.inserted.image["virtual-size"],
      };
    }
    if (nvramInfo && req.copyStorage !== "none") {
      // The UEFI variable store is writable guest state on local storage: it moves like a disk.
      cookieDisks.push({
        target: NVRAM_TARGET,
        source: nvramInfo.path,
        format: nvramInfo.format,
        virtualSize: nvramInfo.virtualSize,
        allocated: nvramInfo.virtualSize,
        mode: "full",
      });
    }
    const { peer, host, tls } = await checkDestination(reg, def, req, ownToken, notes);
    let storagePath: StoragePath = "none";
    if (cookieDisks.length > 0) {
      if (!host.storage) {
        throw new MigrationError(
          "begin",
          `the agent at ${req.dest} does not report its storage capabilities; upgrade it to this nbdmig version`,
          "E_PEER_VERSION",
        );
      }
      storagePath = chooseStoragePath(run, cookieDisks, host.storage, await probeQemuFeatures());
      if (storagePath === "stream") {
        notes.push(
          `storage path: in the migration stream (QEMU block migration${req.copyStorage === "inc" ? ", incremental" : ""}): the destination cannot serve NBD (${host.storage.nbdWhyNot})`,
        );
        if (req.storageConverge !== "none" && req.storageConverge !== "auto")
          notes.push(
            `--storage-converge ${req.storageConverge} applies to NBD mirrors; in the stream, storage converges with memory (auto-converge, --timeout)`,
          );
        if (req.disksPort !== undefined) notes.push("--disks-port is not used: no NBD connection is made");
        if (req.verify)
          throw new UsageError(
            `--verify reads the destination's disks over NBD, which it cannot serve (${host.storage.nbdWhyNot}): migrate without --verify`,
          );
      }
    }
    if (nvram)
      notes.push(
        `UEFI variable store ${nvram.path}: ${req.copyStorage !== "none" ? "copied like a disk" : "carried by QEMU in the migration stream (flash contents) and written at resume"}`,
      );
    const loader = def.os.firmware.loader;
    const firmware =
      loader?.type === "pflash"
        ? { path: loader.path, size: fs.statSync(loader.path).size, sha256: await sha256File(loader.path) }
        : undefined;
    const cookie: MigrationCookie = {
      xml: domainToXml(run.def),
      name,
      uuid: run.def.uuid,
      accel: run.accel,
      disks: cookieDisks,
      storagePath,
      ...(nvramInfo ? { nvram: nvramInfo } : {}),
      ...(firmware ? { firmware } : {}),
    };
    const m = new OutgoingMigration(reg, entry, req, log, onDone, cookie, peer, records, tls, notes);
    entry.job = {
      kind: "outgoing migration",
      describe: () => m.describe(),
      abort: () => m.abort(),
      watch: (fn) => m.machine.listen(fn),
      quiet: () => m.switching,
    };
    return m;
  }

  get name(): string {
    return this.entry.name;
  }
  private get qmp(): QmpClient {
    return this.run.qmp;
  }
  /** The failure's message (phase: detail), if the job failed or its outcome is unknown. */
  get error(): string | undefined {
    return this.failure?.message;
  }
  /** QEMU's outgoing migration was started (the RAM phase was reached). */
  private get migrationStarted(): boolean {
    return this.machine.reachedAt("perform:memory") !== undefined;
  }
  private stopWith(detail: string, code: string): void {
    this.stop.abort(new MigrationError(protocolPhase(this.machine.phase), detail, code));
  }
  private stopTimers(): void {
    this.watch?.stop();
    clearTimeout(this.timeoutTimer);
  }

  /** Runs Prepare..Confirm in the background; `done` settles when the job has ended either way. */
  start(): void {
    this.done = this.execute();
  }

  private async execute(): Promise<void> {
    try {
      await this.prepare();
      if (this.cookie.storagePath === "nbd") await this.mirror();
      else await this.setupMigration();
      await this.migrateMemory();
      if (this.req.verify) await this.verifyDisks();
      await this.finishRemote();
      failpoint("source:finished");
      await this.confirm();
    } catch (err) {
      if (this.machine.is("finish") && outcomeUnknown(err)) await this.settleFinish(err);
      else await this.rollback(err);
    } finally {
      this.progress.finishedAt = Date.now();
      this.stopTimers();
      this.onDone(this);
    }
  }

  /** domjobabort: valid until the switchover starts; after that the migration can only complete. */
  async abort(): Promise<void> {
    if (this.machine.is("completed", "failed", "cancelled", "rollback", "unsettled")) {
      throw new NbdmigError("E_NO_JOB", `domain '${this.name}' has no active job to abort`);
    }
    if (this.machine.is("perform:switchover", "finish", "finish:unknown", "confirm")) {
      throw new NbdmigError(
        "E_MIGRATION_PHASE",
        `the migration of '${this.name}' is switching over (${this.machine.phase}); it can no longer be aborted`,
      );
    }
    this.stopWith("cancelled by domjobabort", "E_ABORTED");
    if (this.migrationStarted) await this.qmp.execute("migrate_cancel").catch(() => undefined);
  }

  /** Throws if the job must stop: abort, a lost or failed destination, a failed mirror, QEMU gone. */
  private check(): void {
    this.stop.signal.throwIfAborted();
    if (this.qmp.isClosed)
      throw new MigrationError(protocolPhase(this.machine.phase), "the source QEMU exited", "E_SOURCE_QEMU");
    const f = this.mirrors?.failure;
    if (f) throw new MigrationError("perform", f, "E_MIRROR");
  }

  private async prepare(): Promise<void> {
    this.machine.advance("prepare");
    this.prepared = await prepareOnDestination(this.peer, this.req.dest, {
      cookie: this.cookie,
      disksPort: this.req.disksPort,
      tls: this.tls,
      tlsIdentity: this.tls ? clientIdentity(this.reg.state.pkiDir) : undefined,
    });
    // The destination's id, before anything else happens: a restarted agent can then ask it or cancel it.
    this.records.save({ ...this.record(), phase: this.machine.phase });
    this.notes.push(...(this.prepared.notes ?? []));
    this.log.info(
      { domain: this.name, dest: this.req.dest, prepared: this.prepared },
      "destination prepared",
    );
    this.watch = new DestinationWatch(this.peer, this.prepared.id, async (why, silent) => {
      this.stopWith(why, "E_PEER");
      if (silent) await this.cutConnections();
    });
    this.check();
  }

  /**
   * The destination is lost and the migration will roll back: its NBD and migration connections are cut
   * first (out of band), so that nothing QEMU does meanwhile waits on the dead link (see Mirrors.yank).
   */
  private async cutConnections(): Promise<void> {
    if (this.machine.is("perform:switchover", "finish", "finish:unknown", "unsettled", "confirm")) return;
    this.log.warn({ domain: this.name }, "destination lost: cutting the NBD and migration connections");
    await this.mirrors?.yank();
    if (this.migrationStarted)
      await this.qmp
        .execute("yank", { instances: [{ type: "migration" }] }, { oob: true, timeoutMs: 5000 })
        .catch(() => undefined);
  }

  private async mirror(): Promise<void> {
    this.machine.advance("perform:mirror");
    const p = this.prepared!;
    const targets = this.cookie.disks.map((d) => d.target);
    const qemuPid = this.run.pid;
    this.converger = new StorageConverger(this.qmp, targets, this.req.storageConverge, this.log, () =>
      tcpBytesAcked(qemuPid, p.nbd.port),
    );
    await this.converger.init();
    await this.setupMigration();
    this.mirrors = new Mirrors(this.qmp, targets, this.log);
    const sync = Object.fromEntries(
      this.cookie.disks.map((d) => [d.target, d.mode === "top" ? "top" : "full"] as const),
    );
    await this.mirrors.start(
      p.nbd,
      p.exports,
      this.req.bandwidthMiB ? this.req.bandwidthMiB * 1024 * 1024 : undefined,
      sync,
      this.converger.initialCopyMode,
      this.tls ? TLS_CREDS_ID : undefined,
    );
    failpoint("source:mirror");
    while (!this.mirrors.allReady) {
      this.check();
      await this.mirrors.poll();
      this.check();
      await this.converger.tick(this.mirrors.jobs, "mirror");
      if (this.mirrors.allReady) break;
      await this.mirrors.settle(250);
    }
    await this.mirrors.poll();
    await this.converger.onReady(this.mirrors.jobs);
    this.progress.readyAt = Date.now();
    this.log.info({ domain: this.name, ms: this.progress.readyAt - this.startedAt }, "all mirrors ready");
    this.writeBack();
  }

  /**
   * At READY, while the guest still runs and memory is being copied: has the kernel write back what this
   * host's page cache holds unwritten of the copied disks' images (a guest's writes since they were last
   * flushed, up to dirty_expire_centisecs of them). QEMU flushes every disk when it stops the guest for the
   * switchover, inside the downtime; after this it finds only what was written since. Not awaited, and
   * nothing depends on it: a failure is only logged.
   */
  private writeBack(): void {
    const t0 = Date.now();
    void Promise.all(this.cookie.disks.map((d) => writeBackFile(d.source))).then(
      () => this.log.info({ domain: this.name, ms: Date.now() - t0 }, "copied disks written back at READY"),
      (err: unknown) =>
        this.log.warn({ domain: this.name, err: errorMessage(err) }, "cannot write back the copied disks"),
    );
  }

  /**
   * Migration capabilities and parameters, --offline pause, --timeout. With the "stream" storage path the
   * disks ride in the migration stream: QEMU's block migration copies every writable disk (Begin made sure
   * that is exactly the selected ones), bulk first, then dirty blocks, the rest while the guest is paused at
   * the switchover; `block-incremental` sends only what the top image holds (--copy-storage-inc).
   */
  private async setupMigration(): Promise<void> {
    const stream = this.cookie.storagePath === "stream";
    const throttling = this.req.storageConverge === "auto" || this.req.storageConverge === "throttle";
    await this.qmp.execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "events", state: true },
        { capability: "pause-before-switchover", state: true },
        // RAM converges too: QEMU slows the vCPUs only if dirty memory keeps it from finishing.
        { capability: "auto-converge", state: throttling },
        ...(stream
          ? [
              { capability: "block", state: true },
              { capability: "zero-blocks", state: true },
            ]
          : []),
      ],
    });
    const bps = this.req.bandwidthMiB ? this.req.bandwidthMiB * 1024 * 1024 : UNLIMITED_BPS;
    const params: Record<string, unknown> = { "max-bandwidth": bps };
    if (this.tls) {
      // The client end: presents this host's client certificate, checks the destination's against the CA
      // and the address it connects to (QEMU takes the host of the URI as the name to check).
      await addTlsCreds(this.qmp, this.reg.state.pkiDir, "client");
      params["tls-creds"] = TLS_CREDS_ID;
    } else {
      params["tls-creds"] = ""; // what an earlier TLS attempt on this QEMU may have left
    }
    if (stream) params["block-incremental"] = this.req.copyStorage === "inc";
    await this.qmp.raw("migrate-set-parameters", params);
    if (!this.req.live && this.run.status === "running") await this.qmp.execute("stop");
    if (this.req.timeoutSec) {
      this.timeoutTimer = setTimeout(() => void this.suspendForTimeout(), this.req.timeoutSec * 1000);
    }
  }

  private async suspendForTimeout(): Promise<void> {
    if (!this.machine.is("perform:mirror", "perform:memory") || this.run.status !== "running") return;
    this.log.warn(
      { domain: this.name, timeoutSec: this.req.timeoutSec },
      "migration timeout: suspending the guest so it converges",
    );
    await this.qmp.execute("stop").catch(() => undefined);
    this.suspendedByTimeout = true;
  }

  private async migrateMemory(): Promise<void> {
    this.machine.advance("perform:memory");
    this.check();
    await this.pointSpiceClients();
    let status = await this.migrationStatus(async () => {
      await this.qmp.execute("migrate", { uri: this.prepared!.migrateUri });
    }, ["pre-switchover", "completed", "failed", "cancelled"]);
    if (status !== "pre-switchover") throw await this.migrationFailure(status);
    this.machine.advance("perform:switchover");
    this.switching = true;
    try {
      failpoint("source:pre-switchover");
      await holdpoint("source:pre-switchover");
      // The guest is paused: no cap is needed any more, and the destination starts with the domain's own.
      await this.converger?.restore();
      // The guest is stopped now. End the mirrors without pivoting, so no write is left in flight when
      // the migration completes (QEMU aborts on a write to an inactivated image otherwise).
      await this.mirrors?.endForSwitchover();
      status = await this.migrationStatus(async () => {
        await this.qmp.execute("migrate-continue", { state: "pre-switchover" });
      }, ["completed", "failed", "cancelled"]);
    } finally {
      this.switching = false;
    }
    if (status !== "completed") throw await this.migrationFailure(status);
    const info = await completedMigrationInfo(() => this.qmp.execute("query-migrate"));
    this.progress.memory = info.ram ?? this.progress.memory;
    this.progress.downtimeMs = info.downtime;
    this.log.info(
      { domain: this.name, downtimeMs: info.downtime, totalMs: info["total-time"] },
      "migration stream completed",
    );
  }

  /**
   * --verify (with --suspend): the stream has completed, so both copies are paused and the source's images
   * hold the guest's final state (QEMU has flushed them and let go of their locks). Each is compared with
   * the destination's copy, read through the destination QEMU's NBD export, which stays until Finish. A
   * difference rolls back: the guest stays here, running again if it ran before, and the destination keeps
   * its copy paused for inspection, never to run (see cancelDestination).
   */
  private async verifyDisks(): Promise<void> {
    const p = this.prepared!;
    const host = p.nbd.host.includes(":") ? `[${p.nbd.host}]` : p.nbd.host;
    const tls = this.tls ? `?tls-certificates=${encodeURIComponent(this.reg.state.pkiDir)}` : "";
    for (const d of this.cookie.disks) {
      const dst = `${this.tls ? "nbds" : "nbd"}://${host}:${p.nbd.port}/${p.exports[d.target]}${tls}`;
      const src = await openSourceImage(d, this.reg.state.outgoingDir, this.name);
      try {
        this.verified[d.target] = await verifyDisk(d.target, src.uri, dst, {
          signal: this.stop.signal,
          outcome: "the guest stays here",
          notes: this.notes,
        });
      } catch (err) {
        if (err instanceof MigrationError) throw err;
        throw new MigrationError("perform", `verify: disk ${d.target}: ${errorMessage(err)}`, "E_VERIFY_IO");
      } finally {
        await src.close();
      }
    }
  }

  /** Connected SPICE clients follow the guest to the destination's display (seamless migration). */
  private async pointSpiceClients(): Promise<void> {
    const spice = this.prepared?.graphics?.find((g) => g.type === "spice");
    if (!spice?.port || !this.run.def.graphics.some((g) => g.type === "spice")) return;
    const { host } = parseAgentUri(this.req.dest);
    await this.qmp
      .raw("client_migrate_info", { protocol: "spice", hostname: host, port: spice.port })
      .catch((err: unknown) =>
        this.log.warn({ err: errorMessage(err) }, "SPICE clients will not follow the guest"),
      );
  }

  private async migrationFailure(status: string): Promise<MigrationError> {
    const info = await this.qmp.execute("query-migrate").catch(() => ({ "error-desc": undefined }));
    this.check();
    return new MigrationError(
      "perform",
      `migration ${status}${info["error-desc"] ? `: ${info["error-desc"]}` : ""}`,
      "E_MIGRATE",
    );
  }

  /**
   * Runs `kick`, then waits for one of `statuses` (the event wakes us at once; polling gives progress).
   * The event is kept as a promise, so that one arriving while a poll is still under way ends the pause
   * after it too (a wake-up that was lost that way cost 200 ms of downtime in about one run of ten).
   */
  private async migrationStatus(kick: () => Promise<void>, statuses: string[]): Promise<string> {
    let seen: string | undefined;
    let wake!: () => void;
    const arrived = new Promise<void>((resolve) => (wake = resolve));
    const onEvent = (ev: QmpEvent) => {
      if (ev.event === "MIGRATION" && statuses.includes(String(ev.data.status))) {
        seen ??= String(ev.data.status);
        wake();
      }
    };
    this.qmp.on("event", onEvent);
    try {
      await kick();
      let lastAt = Date.now();
      let lastTransferred = this.progress.memory?.transferred ?? 0;
      for (;;) {
        if (seen) return seen;
        const info = await this.qmp.execute("query-migrate");
        if (info.disk) this.progress.streamDisk = info.disk;
        if (info.ram) {
          const now = Date.now();
          const inst = Math.max(0, info.ram.transferred - lastTransferred) / ((now - lastAt) / 1000 || 1);
          const p = this.progress;
          p.memoryRateBps = p.memoryRateBps ? p.memoryRateBps * 0.6 + inst * 0.4 : inst;
          lastAt = now;
          lastTransferred = info.ram.transferred;
          this.progress.memory = info.ram;
        }
        if (seen) return seen;
        if (info.status && statuses.includes(info.status)) return info.status;
        if (this.machine.is("perform:memory")) {
          this.check();
          if (this.mirrors) {
            await this.mirrors.poll();
            await this.converger?.tick(this.mirrors.jobs, "memory");
          }
        }
        if (seen) return seen;
        let timer: NodeJS.Timeout | undefined;
        await Promise.race([arrived, new Promise<void>((resolve) => (timer = setTimeout(resolve, 200)))]);
        clearTimeout(timer);
      }
    } finally {
      this.qmp.off("event", onEvent);
    }
  }

  private async finishRemote(): Promise<void> {
    this.machine.advance("finish");
    failpoint("source:finish");
    await holdpoint("source:before-finish");
    await this.peer
      .call(
        "POST",
        `/v1/migrations/${this.prepared!.id}/finish`,
        {
          // A guest paused on the source stays paused on the destination, as with libvirt.
          suspend: this.req.suspend || !this.wasRunning,
          persistent: this.req.persistent,
        },
        FINISH_TIMEOUT_MS,
      )
      .catch((err: unknown) => {
        // No answer: kept as it is, so that execute() settles the outcome instead of rolling back.
        if (err instanceof MigrationError || outcomeUnknown(err)) throw err;
        throw new MigrationError("finish", errorMessage(err), "E_FINISH");
      });
  }

  /**
   * Finish went out and no answer came back: the destination may have resumed the guest, so the source must
   * not. Its guest stays paused (the stream completed, so QEMU keeps it so) while the destination is asked,
   * with backoff, whether it runs the guest: yes -> Confirm; no, and it never will -> rollback, which
   * resumes it here; no answer for FINISH_SETTLE_MS -> the job fails with the guest still paused and the
   * outcome reported as unknown, for the operator to decide.
   */
  private async settleFinish(err: unknown): Promise<void> {
    this.machine.advance("finish:unknown");
    clearTimeout(this.timeoutTimer); // --timeout acts on a running migration; this one has switched over
    const why = errorMessage(err);
    this.log.warn({ domain: this.name, err: why }, "Finish unanswered; asking the destination, guest paused");
    this.notes.push(
      `Finish went unanswered (${why}); the guest stays paused here until the destination says whether it runs it`,
    );
    let last = why;
    const verdict = await settle(
      this.peer,
      this.prepared!.id,
      this.name,
      Date.now() + FINISH_SETTLE_MS,
      (miss) => (last = miss),
    );
    if (verdict === "runs") {
      this.notes.push("the destination confirmed that it runs the guest: migration completed");
      await this.confirm();
      return;
    }
    if (verdict === "never") {
      await this.rollback(
        new MigrationError(
          "finish",
          `${why}; the destination confirmed that it does not run the guest`,
          "E_FINISH",
        ),
      );
      return;
    }
    // (execute()'s finally stops the heartbeat.) The record stays: a restarted agent, or the operator's
    // `migrate --recover`, settles it.
    this.failure = new MigrationError(
      "finish",
      `no answer from the destination for ${Math.round(FINISH_SETTLE_MS / 1000)} s (last: ${last}); the guest is paused here so that two copies never run. See on ${this.req.dest} whether '${this.name}' runs there ('nbdmig list'), then decide: 'nbdmig migrate --recover destination ${this.name}' here if it does (the copy here stops), 'nbdmig migrate --recover source ${this.name}' if it does not (the guest resumes here)`,
      "E_OUTCOME_UNKNOWN",
    );
    this.log.error({ domain: this.name, err: this.error }, "migration outcome unknown");
    this.entry.job = undefined;
    this.entry.hold = holdReason(this.name, this.req.dest);
    this.machine.advance("unsettled");
  }

  /** Why the destination gave up, if it has (asked for up to about a second, as it may be cleaning up). */
  private async destinationsReason(): Promise<string | undefined> {
    if (!this.prepared) return undefined;
    for (let i = 0; i < 5; i++) {
      const r = await this.peer
        .call<{ phase: string; error?: string }>("GET", `/v1/migrations/${this.prepared.id}`, undefined, 1000)
        .catch(() => undefined);
      if (!r) return undefined;
      if (r.error && (r.phase === "cleanup" || r.phase === "cleaned")) return r.error;
      await sleep(200);
    }
    return undefined;
  }

  private async confirm(): Promise<void> {
    this.machine.advance("confirm");
    this.stopTimers();
    this.entry.job = undefined;
    await stopSourceCopy(this.reg, this.entry, this.req.undefineSource);
    this.machine.advance("completed");
    this.log.info(
      {
        domain: this.name,
        dest: this.req.dest,
        ms: Date.now() - this.startedAt,
        downtimeMs: this.progress.downtimeMs,
      },
      "migration completed",
    );
  }

  private async rollback(err: unknown): Promise<void> {
    const failedIn = this.machine.phase;
    this.failure = asMigrationError(err, failedIn);
    // A mirror fails with QEMU's bare errno ("Input/output error") when the other end goes away: the
    // destination usually knows why.
    if (this.failure.code === "E_MIRROR") {
      const why = await this.destinationsReason();
      if (why) this.addToFailure(` (the destination: ${why})`);
    }
    this.machine.advance("rollback");
    this.stopTimers();
    this.log.warn({ domain: this.name, phase: failedIn, err: this.error }, "migration failed; rolling back");
    const alive = !this.qmp.isClosed;
    if (alive) {
      try {
        if (this.migrationStarted) await cancelQemuMigration(this.qmp);
        await this.mirrors?.abort();
        await this.converger?.restore();
        await restoreSource(this.run, {
          wasRunning: this.wasRunning,
          stream: this.cookie.storagePath === "stream",
        });
      } catch (e) {
        this.log.error({ domain: this.name, err: errorMessage(e) }, "rollback on the source was incomplete");
        this.addToFailure(`; rollback on the source was incomplete: ${errorMessage(e)}`);
      }
    }
    if (this.prepared) await this.cancelDestination();
    this.entry.job = undefined;
    const reason = this.stop.signal.reason as NbdmigError | undefined;
    this.machine.advance(reason?.code === "E_ABORTED" ? "cancelled" : "failed");
  }

  /**
   * Rollback on the destination: it removes what Prepare created, except for a copy whose --verify failed,
   * which it keeps paused for inspection (it never runs there; the guest is here).
   */
  private async cancelDestination(): Promise<void> {
    const inspect = this.failure?.code === "E_VERIFY";
    const r = await cancelOnDestination(this.peer, this.prepared!.id, this.log, this.name, { inspect });
    if (!inspect) return;
    const { host } = parseAgentUri(this.req.dest);
    this.addToFailure(
      r.inspect
        ? `; the destination keeps its copy paused for inspection until ${new Date(r.inspect.until).toISOString()} (it never runs there): 'nbdmig -c ${this.req.dest} partial discard ${this.name}' removes it sooner`
        : `; ${host} did not keep its copy (see its log), so nothing of the attempt is left there`,
    );
  }

  private addToFailure(more: string): void {
    const f = this.failure!;
    this.failure = new MigrationError(f.phase, f.detail + more, f.code);
  }

  describe(): Record<string, unknown> {
    const disks = (this.mirrors?.jobs ?? []).map((j) => ({
      target: j.target,
      copied: j.offset,
      mode: this.cookie.disks.find((d) => d.target === j.target)?.mode,
      total: j.len,
      ready: j.ready,
      rateBps: Math.round(j.rateBps),
      verified: this.verified[j.target],
    }));
    const { streamDisk: sd, memory: m, readyAt, downtimeMs } = this.progress;
    const diskTotal = sd ? sd.total : disks.reduce((s, d) => s + d.total, 0);
    const diskDone = sd ? sd.total - sd.remaining : disks.reduce((s, d) => s + d.copied, 0);
    const end = this.progress.finishedAt ?? Date.now();
    return {
      type: "outgoing",
      operation: "Outgoing migration",
      domain: this.name,
      dest: this.req.dest,
      storagePath: this.cookie.storagePath,
      tls: this.tls,
      streamDisk: sd ? { ...sd, targets: this.cookie.disks.map((d) => d.target) } : undefined,
      nbd: this.cookie.storagePath === "nbd" ? this.prepared?.nbd : undefined,
      suspendedByTimeout: this.suspendedByTimeout,
      copyStorage: this.req.copyStorage,
      convergence: this.converger?.describe() ?? { mode: this.req.storageConverge },
      notes: this.notes,
      ramBytes: this.run.def.memoryKiB * 1024,
      phase: this.machine.phase,
      status: sourceJobStatus(this.machine),
      startedAt: this.startedAt,
      elapsedMs: end - this.startedAt,
      timeToReadyMs: readyAt ? readyAt - this.startedAt : undefined,
      /** When each phase began, in ms since the job started. */
      phaseTimes: Object.fromEntries(this.machine.history.map((h) => [h.phase, h.at - this.startedAt])),
      downtimeMs,
      disks,
      disk: {
        processed: diskDone,
        remaining: Math.max(0, diskTotal - diskDone),
        total: diskTotal,
        rateBps: Math.round(disks.reduce((s, d) => s + d.rateBps, 0)),
      },
      memory: m
        ? {
            processed: m.transferred,
            remaining: m.remaining,
            total: m.total,
            rateBps: Math.round(this.progress.memoryRateBps),
            dirtyPagesRate: m["dirty-pages-rate"],
            iterations: m["dirty-sync-count"],
          }
        : undefined,
      ...failureFields(this.failure),
    };
  }
}
