/**
 * Offline migration (virsh migrate --offline; with storage, as Proxmox does for a stopped VM): a shut-off
 * domain's disks are copied by nbdmig's copy engine into images the destination precreated and serves over
 * NBD, then the domain is defined there.
 *
 * Begin (select disks, check the destination) -> Prepare (the destination creates the images and serves
 * them: raw ones with nbdmig's NBD server, qcow2 ones through qemu-nbd) -> perform:copy (block status
 * first, holes skipped, zero runs never sent, several connections; a qcow2 source is read through
 * qemu-nbd, so its guest-visible content is what travels) -> Finish (the destination stops serving,
 * flushes, defines the domain) -> Confirm (`--undefinesource` removes the source's definition; its images
 * stay, as virsh leaves them). Nothing on the source changes before Confirm, and the domain cannot be
 * started on either side meanwhile (the job owns it); a failure cancels the destination, which removes
 * what it created.
 */
import fs from "node:fs";
import type { Logger } from "pino";
import type { AgentClient } from "../agent/client.js";
import { parseAgentUri } from "../agent/client.js";
import type { DomainEntry, DomainRegistry } from "../agent/domains.js";
import { DomainStateError, errorMessage, MigrationError, NbdmigError, UsageError } from "../errors.js";
import { NVRAM_TARGET } from "../domain/qemu-args.js";
import { domainToXml } from "../domain/xml.js";
import { copy } from "../nbd/client/copy.js";
import { formatBytes } from "../util/format.js";
import { imageInfo } from "../qemu/img.js";
import { sha256File } from "../util/hash.js";
import { fileStamp } from "./partials.js";
import { cancelOnDestination } from "./handoff.js";
import { readTpmState } from "./tpm-state.js";
import { copyTopOnly, selectDisks, type CookieDisk, type MigrationCookie } from "./cookie.js";
import type { PrepareResult } from "./destination.js";
import {
  asMigrationError,
  failureFields,
  protocolPhase,
  sourceJobStatus,
  sourceMachine,
  type PhaseMachine,
  type SourcePhase,
} from "./phases.js";
import type { MigrateRequest } from "./schemas.js";
import { checkDestination, DestinationWatch, prepareOnDestination } from "./source.js";
import { openSourceImage, verifyDisk, type SourceImage, type Verified } from "./verify.js";

/** NBD connections per disk, as nbdcopy's default. */
const CONNECTIONS = 4;

interface DiskProgress {
  target: string;
  mode: CookieDisk["mode"];
  copied: number;
  total: number;
  /** Bytes sent as data (what crossed the link), once the disk is done. */
  dataBytes?: number;
  startedAt?: number;
  doneAt?: number;
  /** --copy-storage-inc: bytes the top image does not hold, left to the destination's backing chain. */
  belowTop?: number;
  /** A resumed partial copy: the offset this attempt started at. */
  resumedFrom?: number;
  /** With --verify: what the comparison of both sides read, and skipped as zero on both. */
  verified?: Verified;
}

export class OfflineMigration {
  readonly machine: PhaseMachine<SourcePhase> = sourceMachine();
  readonly startedAt = Date.now();
  private prepared?: PrepareResult;
  private watch?: DestinationWatch;
  /** Why the job must stop (domjobabort, the destination lost): the copy and each step throw it. */
  private readonly stop = new AbortController();
  private readonly disks: DiskProgress[];
  private failure?: MigrationError;
  private finishedAt?: number;
  done: Promise<void> = Promise.resolve();

  private constructor(
    private readonly reg: DomainRegistry,
    private readonly entry: DomainEntry,
    readonly req: MigrateRequest,
    private readonly log: Logger,
    private readonly onDone: (m: OfflineMigration) => void,
    readonly cookie: MigrationCookie,
    private readonly peer: AgentClient,
    private readonly tls: boolean,
    readonly notes: string[],
  ) {
    this.disks = cookie.disks.map((d) => ({
      target: d.target,
      mode: d.mode,
      copied: 0,
      total: d.virtualSize,
    }));
  }

  /** Begin: the domain is shut off here and the destination can take it; throws before anything is made. */
  static async begin(
    reg: DomainRegistry,
    name: string,
    req: MigrateRequest,
    ownToken: string,
    log: Logger,
    onDone: (m: OfflineMigration) => void,
  ): Promise<OfflineMigration> {
    parseAgentUri(req.dest);
    const entry = reg.get(name);
    if (entry.running)
      throw new UsageError(
        `domain '${name}' is running: migrate it live (without --offline), or shut it down first`,
      );
    reg.refuseIfBusy(entry);
    if (req.keepPartialMs && req.copyStorage === "none")
      throw new UsageError(
        "--keep-partial keeps copied disks: it goes with --copy-storage-all or --copy-storage-inc",
      );
    if (req.verify && req.copyStorage === "none")
      throw new UsageError(
        "--verify compares copied disks: it goes with --copy-storage-all or --copy-storage-inc",
      );
    const def = entry.def;
    const cookieDisks: CookieDisk[] = [];
    const notes: string[] = [];
    for (const d of req.copyStorage === "none" ? [] : selectDisks(def, req.migrateDisks)) {
      if (d.format !== "raw" && d.format !== "qcow2")
        throw new UsageError(`disk ${d.target}: format ${d.format} cannot be copied (raw and qcow2 can)`);
      const info = await imageInfo(d.source!, d.format).catch((err: unknown) => {
        throw new UsageError(`disk ${d.target}: cannot read ${d.source}: ${errorMessage(err)}`);
      });
      const disk: CookieDisk = {
        target: d.target,
        source: d.source!,
        format: d.format,
        virtualSize: info.virtualSize,
        allocated: info.actualSize,
        mode: "full",
        stamp: fileStamp(d.source!),
      };
      if (req.copyStorage === "inc") await copyTopOnly(disk, req.verifyBacking ?? false, notes);
      cookieDisks.push(disk);
    }
    const loader = def.os.firmware.loader;
    const nvram = loader?.type === "pflash" ? def.os.firmware.nvram : undefined;
    let nvramInfo: MigrationCookie["nvram"];
    if (nvram && fs.existsSync(nvram.path)) {
      const info = await imageInfo(nvram.path, nvram.format ?? "raw");
      nvramInfo = { path: nvram.path, format: nvram.format ?? "raw", virtualSize: info.virtualSize };
      if (req.copyStorage !== "none") {
        cookieDisks.push({
          target: NVRAM_TARGET,
          source: nvram.path,
          format: nvramInfo.format,
          virtualSize: info.virtualSize,
          allocated: info.virtualSize,
          mode: "full",
          stamp: fileStamp(nvram.path),
        });
        notes.push(`UEFI variable store ${nvram.path}: copied like a disk`);
      }
    }
    // The TPM's state lives on this host whatever the storage: it moves even without --copy-storage-*, or
    // the destination would make a new TPM (new keys: what the guest sealed would be lost).
    const tpmState = def.tpm ? readTpmState(reg.tpmStateDir(def.uuid), name) : undefined;
    if (def.tpm)
      notes.push(
        tpmState
          ? `TPM state: ${tpmState.files.map((f) => f.name).join(", ")} copied`
          : "TPM state: none yet (the TPM never ran); it is made at the first start on the destination",
      );
    const { peer, tls } = await checkDestination(reg, def, req, ownToken, notes);
    const firmware =
      loader?.type === "pflash"
        ? { path: loader.path, size: fs.statSync(loader.path).size, sha256: await sha256File(loader.path) }
        : undefined;
    const cookie: MigrationCookie = {
      xml: domainToXml(def),
      name,
      uuid: def.uuid,
      disks: cookieDisks,
      storagePath: cookieDisks.length ? "nbd" : "none",
      ...(nvramInfo ? { nvram: nvramInfo } : {}),
      ...(firmware ? { firmware } : {}),
      ...(tpmState ? { tpmState } : {}),
    };
    const m = new OfflineMigration(reg, entry, req, log, onDone, cookie, peer, tls, notes);
    entry.job = {
      kind: "offline migration",
      describe: () => m.describe(),
      abort: () => m.abort(),
      watch: (fn) => m.machine.listen(fn),
    };
    return m;
  }

  get name(): string {
    return this.entry.name;
  }
  get error(): string | undefined {
    return this.failure?.message;
  }

  start(): void {
    this.done = this.execute();
  }

  /** domjobabort: valid until Finish is sent. */
  abort(): Promise<void> {
    if (!this.machine.is("begin", "prepare", "perform:copy"))
      return Promise.reject(
        new NbdmigError(
          "E_MIGRATION_PHASE",
          `the offline migration of '${this.name}' is in ${this.machine.phase}; it can no longer be aborted`,
        ),
      );
    this.stop.abort(
      new MigrationError(protocolPhase(this.machine.phase), "cancelled by domjobabort", "E_ABORTED"),
    );
    return Promise.resolve();
  }

  private async execute(): Promise<void> {
    try {
      await this.prepare();
      this.machine.advance("perform:copy");
      for (const d of this.cookie.disks) await this.copyDisk(d);
      this.stop.signal.throwIfAborted();
      this.machine.advance("finish");
      await this.peer.call(
        "POST",
        `/v1/migrations/${this.prepared!.id}/finish`,
        { suspend: true, persistent: true },
        60_000,
      );
      this.machine.advance("confirm");
      this.watch?.stop();
      this.entry.job = undefined;
      // The destination has the domain now: what fails here is only logged.
      try {
        if (this.req.undefineSource) this.reg.undefine(this.name, { nvram: "keep" });
      } catch (err) {
        this.log.error({ domain: this.name, err: errorMessage(err) }, "cannot undefine the source's copy");
        this.notes.push(`--undefinesource: ${errorMessage(err)}`);
      }
      this.machine.advance("completed");
      this.log.info({ domain: this.name, dest: this.req.dest }, "offline migration completed");
    } catch (err) {
      await this.rollback(err);
    } finally {
      this.finishedAt = Date.now();
      this.watch?.stop();
      this.entry.job = undefined;
      this.onDone(this);
    }
  }

  private async prepare(): Promise<void> {
    this.machine.advance("prepare");
    this.prepared = await prepareOnDestination(this.peer, this.req.dest, {
      cookie: this.cookie,
      disksPort: this.req.disksPort,
      tls: this.tls,
      offline: true,
      keepPartialMs: this.req.keepPartialMs,
    });
    this.notes.push(...(this.prepared.notes ?? []));
    this.watch = new DestinationWatch(this.peer, this.prepared.id, (why) =>
      this.stop.abort(new MigrationError(protocolPhase(this.machine.phase), why, "E_PEER")),
    );
    this.stop.signal.throwIfAborted();
  }

  /**
   * One disk: read as a file (raw) or through qemu-nbd (qcow2), written to the destination's export. A
   * "top" disk (--copy-storage-inc) sends only what its top image holds, which qemu-nbd's
   * qemu:allocation-depth tells; the destination's overlay reads the rest from its own backing chain.
   */
  private async copyDisk(d: CookieDisk): Promise<void> {
    const p = this.disks.find((x) => x.target === d.target)!;
    p.startedAt = Date.now();
    let reader: SourceImage | undefined;
    try {
      reader = await openSourceImage(d, this.reg.state.outgoingDir, this.name);
      const src = reader.uri;
      let dst = this.prepared!.exports[d.target]!;
      if (this.tls) dst += `?tls-certificates=${encodeURIComponent(this.reg.state.pkiDir)}`;
      const from = this.prepared!.resume?.[d.target] ?? 0;
      if (from > 0) p.resumedFrom = p.copied = from;
      const id = this.prepared!.id;
      const r = await copy(src, dst, {
        connections: CONNECTIONS,
        // A fresh image reads as zeros; a partial one may hold writes past its checkpoint.
        destinationIsZero: from === 0,
        destinationMapped: from > 0,
        from,
        topOnly: d.mode === "top",
        flush: true,
        signal: this.stop.signal,
        progress: (done) => (p.copied = done),
        checkpoint: this.req.keepPartialMs
          ? {
              // A fast link copies a sparse disk's data in well under a second: bytes count too.
              everyMs: 500,
              everyBytes: 32 * 1024 * 1024,
              commit: (doneTo) =>
                this.peer
                  .call("POST", `/v1/migrations/${id}/progress`, { target: d.target, doneTo }, 5000)
                  .then(() => undefined),
            }
          : undefined,
      });
      p.copied = r.size;
      p.dataBytes = r.dataBytes;
      if (d.mode === "top") p.belowTop = r.belowTopBytes;
      p.doneAt = Date.now();
      if (this.req.verify)
        p.verified = await verifyDisk(d.target, src, dst, {
          signal: this.stop.signal,
          outcome: "the copy is not kept",
          notes: this.notes,
        });
    } catch (err) {
      if (this.stop.signal.aborted) throw this.stop.signal.reason;
      if (err instanceof MigrationError) throw err;
      throw new MigrationError("perform", `copy of disk ${d.target}: ${errorMessage(err)}`, "E_COPY");
    } finally {
      await reader?.close();
    }
  }

  /** Nothing changed here: the destination is told to remove what it created (else its watchdog does). */
  private async rollback(err: unknown): Promise<void> {
    this.failure = asMigrationError(err, this.machine.phase);
    this.machine.advance("rollback");
    this.log.warn({ domain: this.name, err: this.failure.message }, "offline migration failed");
    if (this.prepared) {
      // What a failed --verify found on the destination is wrong: never kept.
      const discard = this.failure.code === "E_VERIFY";
      const { kept } = await cancelOnDestination(this.peer, this.prepared.id, this.log, this.name, {
        discard,
      });
      if (kept)
        this.failure = new MigrationError(
          this.failure.phase,
          `${this.failure.message}; the destination keeps the ${formatBytes(kept.bytes)} copied until ${new Date(kept.until).toISOString()}: the same command resumes the copy`,
          this.failure.code,
        );
      else if (this.req.keepPartialMs && !discard)
        this.notes.push(
          "--keep-partial: the destination keeps what its last checkpoint recorded, unless nothing was copied yet",
        );
    }
    this.machine.advance(this.failure.code === "E_ABORTED" ? "cancelled" : "failed");
  }

  describe(): Record<string, unknown> {
    const end = this.finishedAt ?? Date.now();
    const total = this.disks.reduce((s, d) => s + d.total, 0);
    const processed = this.disks.reduce((s, d) => s + d.copied, 0);
    const rate = (d: DiskProgress) =>
      d.startedAt ? d.copied / Math.max(0.001, ((d.doneAt ?? Date.now()) - d.startedAt) / 1000) : 0;
    return {
      type: "outgoing",
      operation: "Offline migration",
      domain: this.name,
      dest: this.req.dest,
      offline: true,
      storagePath: this.cookie.storagePath,
      tls: this.tls,
      copyStorage: this.req.copyStorage,
      notes: this.notes,
      phase: this.machine.phase,
      status: sourceJobStatus(this.machine),
      startedAt: this.startedAt,
      elapsedMs: end - this.startedAt,
      phaseTimes: Object.fromEntries(this.machine.history.map((h) => [h.phase, h.at - this.startedAt])),
      disks: this.disks.map((d) => ({
        target: d.target,
        copied: d.copied,
        total: d.total,
        mode: d.mode,
        belowTop: d.belowTop,
        ready: d.doneAt !== undefined,
        rateBps: Math.round(d.doneAt ? 0 : rate(d)),
        dataBytes: d.dataBytes,
        resumedFrom: d.resumedFrom,
        verified: d.verified,
      })),
      disk: {
        processed,
        remaining: Math.max(0, total - processed),
        total,
        rateBps: Math.round(this.disks.reduce((s, d) => s + (d.doneAt ? 0 : rate(d)), 0)),
      },
      ...failureFields(this.failure),
    };
  }
}

/** The domain is shut off but the request is for a live migration: what to say. */
export function offlineHint(name: string): DomainStateError {
  return new DomainStateError(
    "E_DOMAIN_STATE",
    `domain '${name}' is shut off: add --offline to move it (with --copy-storage-all to copy its disks), or start it first`,
  );
}
