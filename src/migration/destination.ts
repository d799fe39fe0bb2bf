/**
 * Prepare and Finish on the destination host: precreate the images, start QEMU with `-S -incoming defer`,
 * serve every copied disk over NBD, and accept the migration stream. Any failure, an abort, or losing the
 * source removes exactly what Prepare created: the QEMU process, the images, the transient domain.
 */
import { randomUUID } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import type { Logger } from "pino";
import { z } from "zod";
import { DomainStateError, errorMessage, MigrationError, UsageError } from "../errors.js";
import type { DomainEntry, DomainRegistry, RunningDomain } from "../agent/domains.js";
import { parseDomainXml } from "../domain/xml.js";
import type { DomainDef } from "../domain/model.js";
import { formatNode, NVRAM_TARGET } from "../domain/qemu-args.js";
import { createImage, imageInfo } from "../qemu/img.js";
import { sha256File } from "../util/hash.js";
import { probeKvm } from "../qemu/launcher.js";
import { writeFileAtomic } from "../agent/state-dir.js";
import { formatBytes } from "../util/format.js";
import { pollPause } from "../util/poll.js";
import { writeBehind } from "../util/write-behind.js";
import {
  PrepareRequestSchema,
  type CancelRequest,
  type CancelResult,
  type CookieDisk,
  type PrepareRequest,
} from "./schemas.js";

export type { PrepareRequest } from "./schemas.js";
import { DEST_PHASES, destMachine, requirePhase, type DestPhase, type PhaseMachine } from "./phases.js";
import { failpoint, holdpoint } from "../util/failpoint.js";
import { addTlsCreds, CA_CERT, certFileName, checkPki, keyFileName, TLS_CREDS_ID } from "../qemu/pki.js";
import { bindFromPool, MIGRATION_PORTS, NBD_PORTS } from "./ports.js";
import { NbdServer } from "../nbd/server/server.js";
import { FileBackend } from "../nbd/server/backends/file.js";
import { serveWithQemuNbd, stopQemuNbd } from "../qemu/nbd-export.js";
import type { PartialCopies, PartialRecord } from "./partials.js";
import { writeTpmState } from "./tpm-state.js";

/** QEMU's id of the authorization object that admits only the migration's source. */
const TLS_AUTHZ_ID = "nbdmig-authz";

export interface PrepareResult {
  id: string;
  nbd: { host: string; port: number };
  /** Export name per disk target. */
  exports: Record<string, string>;
  migrateUri: string;
  /** The destination's displays (ports chosen again there), for SPICE clients to follow the guest. */
  graphics?: { type: string; port?: number; listen: string }[];
  /** What the operator should know about the destination (a differing firmware build, say). */
  notes?: string[];
  /** Offline: per disk, the offset a partial copy kept here resumes at (what lies below is copied). */
  resume?: Record<string, number>;
}

/** Without a heartbeat from the source for this long, a prepared migration cleans itself up. */
export const SOURCE_WATCHDOG_MS = Number(process.env.NBDMIG_WATCHDOG_MS ?? 20_000);
/**
 * A held migration (see `held`) waits longer: its source asks with backoff up to 15 s apart, and a held
 * guest is whole here, so a completed migration is not lost to one slow answer.
 */
export const HELD_WATCHDOG_MS = 3 * SOURCE_WATCHDOG_MS;
/** How long a live copy whose --verify failed stays paused here for inspection (see keep). */
export const INSPECT_KEEP_MS = Number(process.env.NBDMIG_INSPECT_KEEP_MS ?? 3_600_000);
/** How often an offline copy's images are written back while it lands (writeBehind). */
const WRITE_BEHIND_MS = 200;

export class IncomingMigration {
  readonly id: string;
  readonly machine: PhaseMachine<DestPhase>;
  readonly startedAt = Date.now();
  /** Images this Prepare created; the only files cleanup ever deletes. */
  readonly created: string[] = [];
  /** Directories this Prepare created (a TPM's state); removed with their contents on cleanup. */
  readonly createdDirs: string[] = [];
  readonly notes: string[] = [];
  lastSeen = Date.now();
  error?: string;
  /** Whether this Prepare started an NBD server (not for storage in the stream, nor without disks). */
  private nbdServing = false;
  private entry?: DomainEntry;
  private watchdog?: NodeJS.Timeout;
  private cleaning?: Promise<void>;
  /** The partial copy this migration left (see keepPartial). */
  private kept?: PartialRecord;
  private finishOpts?: { suspend: boolean; persistent: boolean };
  /** `kept` (a failed --verify): when the paused copy is removed, and the timer that does it. */
  keptUntil?: number;
  private keepTimer?: NodeJS.Timeout;
  /**
   * Offline: what serves the created images to the source, and their write-behind (stopped before Finish
   * defines the domain).
   */
  private readonly serving: (() => Promise<void>)[] = [];
  /** Offline: per disk, the offset below which the copy is done (the source's checkpoints). */
  private readonly done: Record<string, number> = {};

  constructor(
    private readonly reg: DomainRegistry,
    private readonly log: Logger,
    readonly req: PrepareRequest,
    private readonly onDone: (m: IncomingMigration) => void,
    private readonly partials: PartialCopies,
    /** The record of a migration a restarted agent continues, and the phase it continues in. */
    restored?: { rec: IncomingRecord; phase: "held" | "kept" },
  ) {
    this.id = restored?.rec.id ?? randomUUID();
    this.machine = destMachine(restored?.phase);
    if (restored) {
      this.created.push(...restored.rec.created);
      this.createdDirs.push(...restored.rec.createdDirs);
      this.finishOpts = restored.rec.finish;
      this.keptUntil = restored.rec.keptUntil;
    }
    // Each decision is on disk before it is acted on: see recoverIncoming.
    this.machine.onEnter = (phase) => {
      if (phase === "running" || phase === "cleaned") this.removeRecord();
      else this.saveRecord(phase);
    };
  }

  get name(): string {
    return this.req.cookie.name;
  }

  async prepare(): Promise<PrepareResult> {
    requirePhase(this.machine, ["prepare"], "prepare", "prepare");
    try {
      return await this.doPrepare();
    } catch (err) {
      this.error = errorMessage(err);
      await this.cleanup(`prepare failed: ${this.error}`);
      if (err instanceof UsageError || err instanceof DomainStateError) {
        throw new MigrationError("prepare", `on ${this.req.listenHost}: ${err.message}`, err.code);
      }
      throw new MigrationError("prepare", `on ${this.req.listenHost}: ${errorMessage(err)}`, "E_PREPARE", {
        cause: err,
      });
    }
  }

  private async doPrepare(): Promise<PrepareResult> {
    const { cookie } = this.req;
    if (this.reg.has(cookie.name)) {
      const refusal = this.reg.get(cookie.name).job?.refusal;
      throw new DomainStateError(
        "E_DOMAIN_EXISTS",
        refusal
          ? `domain '${cookie.name}' here is ${refusal}`
          : `domain '${cookie.name}' already exists here; undefine it on the destination first`,
      );
    }
    const { def } = parseDomainXml(cookie.xml);
    const copied = new Set(cookie.disks.map((d) => d.target));
    for (const d of def.disks) {
      if (d.source !== undefined && !copied.has(d.target) && !fs.existsSync(d.source)) {
        throw new UsageError(
          `disk ${d.target} is not copied (shared, read-only or not selected) but ${d.source} does not exist here; make it available on the destination or select it with --migrate-disks`,
        );
      }
    }
    const partial = this.matchPartial();
    const ownNvramDir = this.reg.nvramDir;
    for (const d of cookie.disks) {
      const what = d.target === NVRAM_TARGET ? "the UEFI variable store" : `disk ${d.target}`;
      if (partial.held.has(d.target)) continue;
      if (fs.existsSync(d.source)) {
        throw new UsageError(
          `${d.source} (${what}) already exists here; nbdmig never overwrites an image: remove it on the destination first`,
        );
      }
      if (!fs.existsSync(path.dirname(d.source)) && path.dirname(d.source) !== ownNvramDir) {
        throw new UsageError(
          `directory ${path.dirname(d.source)} (${what}) does not exist here; create it on the destination first`,
        );
      }
    }
    // Everything the guest needs from this host, checked before anything is made: machine type, firmware,
    // devices, and the bridge, network or link of every interface.
    await this.reg.checkHost(def);
    await this.checkFirmware(def);
    // The server end: this host's certificate must name the address the source connects to.
    if (this.req.tls) checkPki(this.reg.state.pkiDir, "server", [this.req.listenHost]);
    const tpmDir = def.tpm ? this.reg.tpmStateDir(def.uuid) : undefined;
    if (cookie.tpmState && (!tpmDir || !this.req.offline))
      throw new UsageError(
        "refused: the source sent TPM state for a domain without a TPM, or for a live migration (whose stream carries it); the source's nbdmig is at fault",
      );
    if (tpmDir && fs.existsSync(tpmDir)) {
      throw new UsageError(
        `TPM state ${tpmDir} already exists here (left by an earlier stay of this domain?); remove it on the destination first`,
      );
    }
    for (const d of cookie.disks) if (d.mode === "top") await this.checkChain(d);
    this.checkSpace();
    partial.adopt();
    if (cookie.accel === "kvm" && !this.req.offline) {
      const kvm = await probeKvm();
      if (!kvm.usable)
        throw new UsageError(`the source runs with KVM but KVM is not usable here (${kvm.reason})`);
    }

    const fresh = cookie.disks.filter((d) => !partial.resumed.has(d.target));
    this.created.push(...fresh.map((d) => d.source));
    this.saveRecord();
    for (const d of fresh)
      if (d.target === NVRAM_TARGET) fs.mkdirSync(path.dirname(d.source), { recursive: true, mode: 0o700 });
    // All at once (a qemu-img each, some 10-15 ms here), and all settled before a failure is reported, so
    // that the cleanup it causes comes after the last of them. An incremental copy lands in an overlay on
    // the destination's own copy of the base, which QEMU opens read-only: the base is never written.
    const made = await Promise.allSettled(
      fresh.map((d) =>
        createImage(d.source, d.format, d.virtualSize, d.mode === "top" ? d.backing : undefined),
      ),
    );
    for (const r of made) if (r.status === "rejected") throw r.reason;
    const nvram = cookie.nvram;
    if (nvram && !copied.has(NVRAM_TARGET) && !fs.existsSync(nvram.path)) {
      // Storage is shared but this variable store is not: QEMU brings the flash contents in the migration
      // stream and writes all of them to the file when the guest resumes. The file must exist with the
      // source's size (this host's template might have another).
      this.created.push(nvram.path);
      this.saveRecord();
      fs.mkdirSync(path.dirname(nvram.path), { recursive: true, mode: 0o700 });
      await createImage(nvram.path, nvram.format, nvram.virtualSize);
    }
    if (tpmDir) {
      // A fresh state directory: the source's TPM state arrives in the migration stream, or (offline) in
      // the cookie.
      this.createdDirs.push(tpmDir);
      this.saveRecord();
      fs.mkdirSync(tpmDir, { recursive: true, mode: 0o700 });
      if (cookie.tpmState) writeTpmState(tpmDir, cookie.tpmState);
    }
    this.entry = this.reg.addTransient(def);
    this.entry.job = {
      kind: "incoming migration",
      describe: () => this.describe(),
      abort: () => this.cleanup("aborted on the destination"),
      watch: (fn) => this.machine.listen(fn),
    };
    if (this.req.offline) return this.serveOffline();
    const run = await this.entry.lock.run(() =>
      // Block migration finds each disk by its BlockBackend's name: only the `drive` layout has them.
      this.reg.start(def.name, {
        incoming: true,
        accel: cookie.accel,
        layout: cookie.storagePath === "stream" ? "drive" : undefined,
      }),
    );
    this.cleanUpOnExit(run);
    const qmp = run.qmp;
    await qmp.execute("migrate-set-capabilities", {
      capabilities: [
        { capability: "events", state: true },
        { capability: "late-block-activate", state: true },
      ],
    });
    const host = this.req.listenHost;
    let tlsCreds: Record<string, string> = {};
    if (this.req.tls) {
      // Only a client with a certificate of the same CA gets in, to the disks or the migration stream, and
      // with tls-authz only the source that asked for this Prepare (its certificate's subject).
      await addTlsCreds(qmp, this.reg.state.pkiDir, "server");
      tlsCreds = { "tls-creds": TLS_CREDS_ID };
      if (this.req.tlsIdentity) {
        await qmp.execute("object-add", {
          "qom-type": "authz-simple",
          id: TLS_AUTHZ_ID,
          identity: this.req.tlsIdentity,
        });
        tlsCreds["tls-authz"] = TLS_AUTHZ_ID;
      }
      await qmp.raw("migrate-set-parameters", tlsCreds);
    }
    const nbd = cookie.storagePath !== "stream" && cookie.disks.length > 0;
    const nbdPort = nbd
      ? await bindFromPool(NBD_PORTS, this.req.disksPort, (port) =>
          qmp
            .execute("nbd-server-start", {
              addr: { type: "inet", data: { host, port: String(port) } },
              ...tlsCreds,
            })
            .then(() => undefined),
        )
      : 0;
    this.nbdServing = nbd;
    const exports: Record<string, string> = {};
    for (const d of nbd ? cookie.disks : []) {
      await qmp.execute("block-export-add", {
        type: "nbd",
        id: `nbdmig-export-${d.target}`,
        "node-name": formatNode(d.target),
        name: d.target,
        writable: true,
      });
      exports[d.target] = d.target;
    }
    const migPort = await bindFromPool(MIGRATION_PORTS, undefined, (port) =>
      qmp.execute("migrate-incoming", { uri: `tcp:${host}:${port}` }).then(() => undefined),
    );
    this.machine.advance("prepared");
    const graphics = run.def.graphics.map((g) => ({ type: g.type, port: g.port, listen: g.listen }));
    this.watch("prepared", SOURCE_WATCHDOG_MS);
    this.log.info(
      { domain: def.name, id: this.id, nbdPort, migPort, created: this.created },
      "incoming migration prepared",
    );
    return {
      id: this.id,
      nbd: { host, port: nbdPort },
      exports,
      migrateUri: `tcp:${host}:${migPort}`,
      graphics,
      notes: this.notes,
    };
  }

  /**
   * Offline: no QEMU. The created images are served for the source's copy engine: raw ones by nbdmig's own
   * NBD server (one server, an export per disk), qcow2 ones through qemu-nbd (QEMU's block layer writes
   * the guest-visible content into the image, which stays sparse). With TLS both require the source's
   * client certificate of the same CA. The transient entry (with its job) keeps the name from being taken
   * or started here meanwhile.
   */
  private async serveOffline(): Promise<PrepareResult> {
    const host = this.req.listenHost;
    const pki = this.reg.state.pkiDir;
    const scheme = this.req.tls ? "nbds" : "nbd";
    const hostPart = host.includes(":") ? `[${host}]` : host;
    const exports: Record<string, string> = {};
    const raw = this.req.cookie.disks.filter((d) => d.format === "raw");
    // Our server says EADDRINUSE, qemu-nbd "Address already in use".
    const inUse = (err: unknown) => /EADDRINUSE|Address already in use/.test(errorMessage(err));
    if (raw.length) {
      const server = new NbdServer({
        exports: await Promise.all(
          raw.map(async (d) => ({ name: d.target, backend: await FileBackend.open(d.source) })),
        ),
        tls: this.req.tls
          ? {
              cert: path.join(pki, certFileName("server")),
              key: path.join(pki, keyFileName("server")),
              ca: path.join(pki, CA_CERT),
              require: true,
            }
          : undefined,
      });
      this.serving.push(() => server.close());
      const port = await bindFromPool(
        NBD_PORTS,
        this.req.disksPort,
        async (p) => {
          await server.listen({ host, port: p });
        },
        inUse,
      );
      for (const d of raw) exports[d.target] = `${scheme}://${hostPart}:${port}/${d.target}`;
    }
    for (const d of this.req.cookie.disks.filter((x) => x.format === "qcow2")) {
      let uri = "";
      await bindFromPool(
        NBD_PORTS,
        undefined,
        async (port) => {
          const exp = await serveWithQemuNbd({
            file: d.source,
            format: "qcow2",
            name: d.target,
            at: { host, port },
            readonly: false,
            tlsDir: this.req.tls ? pki : undefined,
            runDir: this.reg.state.migrationsDir,
          });
          this.serving.push(() => exp.close());
          uri = exp.uri;
        },
        inUse,
      );
      exports[d.target] = uri;
    }
    // The copy's data is written back while it lands, not all in its flush at the end.
    this.serving.push(
      writeBehind(
        this.req.cookie.disks.map((d) => d.source),
        WRITE_BEHIND_MS,
        this.log,
      ),
    );
    this.machine.advance("prepared");
    this.watch("prepared", SOURCE_WATCHDOG_MS);
    this.log.info(
      { domain: this.name, id: this.id, exports, created: this.created },
      "offline migration prepared",
    );
    return {
      id: this.id,
      nbd: { host, port: 0 },
      exports,
      migrateUri: "",
      notes: this.notes,
      resume: { ...this.done },
    };
  }

  /**
   * Offline: a partial copy of this domain kept here (`--keep-partial`) is taken over, disk by disk, where
   * the image is the same one at the same path and its source has not changed since (its stamp); those
   * disks resume at their last checkpoint. Returns the disks resumed, those whose image the partial copy
   * holds (to be replaced), and `adopt`, called once Prepare's checks have passed: until then the partial
   * copy stays as it was. `adopt` removes what does not match.
   */
  private matchPartial(): { resumed: Set<string>; held: Set<string>; adopt: () => void } {
    const resumed = new Set<string>();
    const held = new Set<string>();
    const { cookie } = this.req;
    const p = this.req.offline ? this.partials.load(cookie.name) : undefined;
    if (!p) return { resumed, held, adopt: () => undefined };
    if (p.uuid !== cookie.uuid) {
      throw new DomainStateError(
        "E_PARTIAL",
        `a partial copy of another domain named '${cookie.name}' (uuid ${p.uuid}) is kept here until ${new Date(p.keptUntil).toISOString()}; run 'nbdmig partial discard ${cookie.name}' on the destination first`,
      );
    }
    const keep: string[] = [];
    const notes: string[] = [];
    for (const d of cookie.disks) {
      if (p.files.includes(d.source)) held.add(d.target);
      const k = p.disks.find((x) => x.target === d.target);
      if (!k) continue;
      const same =
        k.path === d.source &&
        k.format === d.format &&
        k.virtualSize === d.virtualSize &&
        k.stamp !== undefined &&
        k.stamp === d.stamp &&
        fs.existsSync(k.path);
      if (!same) {
        notes.push(
          `disk ${d.target}: the partial copy kept here does not match the source now; copied again`,
        );
        continue;
      }
      resumed.add(d.target);
      keep.push(k.path);
      this.done[d.target] = k.doneTo;
      notes.push(
        `disk ${d.target}: resuming the partial copy kept here at ${formatBytes(k.doneTo)} of ${formatBytes(d.virtualSize)}`,
      );
    }
    const adopt = () => {
      this.notes.push(...notes);
      this.created.push(...keep);
      // This migration's record owns the kept images before the partial copy's record goes.
      this.saveRecord();
      this.partials.discard(
        { ...p, files: p.files.filter((f) => !keep.includes(f)) },
        "taken over by a new attempt",
      );
    };
    return { resumed, held, adopt };
  }

  /** Offline, with keepPartialMs: the source's checkpoint for one disk. */
  checkpoint(target: string, doneTo: number): void {
    requirePhase(this.machine, ["prepared"], "progress", "perform");
    const d = this.req.cookie.disks.find((x) => x.target === target);
    if (!this.req.offline || !d)
      throw new UsageError(`no disk ${target} is copied offline by migration ${this.id}`, "E_BAD_BODY");
    if (doneTo > d.virtualSize)
      throw new UsageError(`disk ${target} has ${d.virtualSize} bytes, not ${doneTo}`, "E_BAD_BODY");
    this.lastSeen = Date.now();
    if (doneTo <= (this.done[target] ?? 0)) return;
    this.done[target] = doneTo;
    this.saveRecord();
  }

  /**
   * Offline, with keepPartialMs, once copying had made progress: the images copied to stay, recorded as a
   * partial copy, and are no longer this migration's to remove; cleanup removes the rest it created.
   */
  private keepPartial(reason: string): void {
    const rec = partialOf(this.req, this.id, this.created, this.done, reason);
    if (!rec) return;
    this.partials.save(rec);
    this.log.warn(
      { domain: this.name, id: this.id, until: new Date(rec.keptUntil).toISOString(), disks: rec.disks },
      "keeping the partial copy for the same command to resume",
    );
    const rest = this.created.filter((x) => !rec.files.includes(x));
    this.created.splice(0, this.created.length, ...rest);
    this.kept = rec;
  }

  /** Stops what serves the images offline; our server and qemu-nbd both flush as they stop. */
  private async stopServing(): Promise<void> {
    for (const stop of this.serving.splice(0)) await stop();
  }

  /**
   * The destination runs the firmware file the source names (no new automatic choice here). A different
   * build of the same size is allowed, and said: the guest keeps the source's copy, migrated in RAM, until
   * it reboots. A different size cannot work (QEMU refuses the flash's RAM block) and is refused.
   */
  private async checkFirmware(def: DomainDef): Promise<void> {
    const fw = this.req.cookie.firmware;
    if (!fw) return;
    const size = fs.statSync(fw.path).size;
    if (size !== fw.size) {
      throw new UsageError(
        `firmware ${fw.path} is ${size} bytes here but ${fw.size} on the source; install the same firmware (Debian: the same ovmf version) on both hosts`,
        "E_FIRMWARE",
      );
    }
    const here = await sha256File(fw.path);
    if (here !== fw.sha256) {
      this.notes.push(
        `firmware ${fw.path} differs here from the source's (sha256 ${here.slice(0, 12)} vs ${fw.sha256.slice(0, 12)}): '${def.name}' runs the source's copy until it reboots, then this host's`,
      );
    }
  }

  /** --copy-storage-inc: the destination must already hold the same backing chain at the same paths. */
  private async checkChain(d: CookieDisk): Promise<void> {
    const fix = "copy it there first, or use --copy-storage-all";
    for (const c of d.chain ?? []) {
      if (!fs.existsSync(c.path)) {
        throw new UsageError(
          `disk ${d.target}: backing file ${c.path} does not exist here; ${fix}`,
          "E_BACKING",
        );
      }
      const info = await imageInfo(c.path);
      if (info.format !== c.format) {
        throw new UsageError(
          `disk ${d.target}: backing file ${c.path} is ${info.format} here but ${c.format} on the source; ${fix}`,
          "E_BACKING",
        );
      }
      if (info.virtualSize !== c.virtualSize) {
        throw new UsageError(
          `disk ${d.target}: backing file ${c.path} has virtual size ${info.virtualSize} here but ${c.virtualSize} on the source; ${fix}`,
          "E_BACKING",
        );
      }
      if (c.sha256 && (await sha256File(c.path)) !== c.sha256) {
        throw new UsageError(
          `disk ${d.target}: backing file ${c.path} differs in content from the source's (sha256); ${fix}`,
          "E_BACKING",
        );
      }
    }
  }

  private checkSpace(): void {
    const need = new Map<number, { dir: string; bytes: number; avail: number }>();
    for (const d of this.req.cookie.disks) {
      // The NVRAM's directory may not exist yet (Prepare makes it): count the filesystem it will be on.
      let dir = path.dirname(d.source);
      while (!fs.existsSync(dir)) dir = path.dirname(dir);
      const st = fs.statSync(dir);
      const fsInfo = fs.statfsSync(dir);
      const e = need.get(st.dev) ?? { dir, bytes: 0, avail: fsInfo.bavail * fsInfo.bsize };
      // The allocated data plus a margin for image metadata; a partial copy kept here holds some already.
      const have = this.done[d.target] !== undefined ? fs.statSync(d.source).blocks * 512 : 0;
      e.bytes += Math.max(0, Math.ceil(d.allocated * 1.02) - have) + 16 * 1024 * 1024;
      need.set(st.dev, e);
    }
    for (const e of need.values()) {
      if (e.bytes > e.avail) {
        throw new UsageError(
          `not enough space in ${e.dir}: need ${formatBytes(e.bytes)}, have ${formatBytes(e.avail)}`,
          "E_NO_SPACE",
        );
      }
    }
  }

  /** Finish: the migration stream is complete; stop serving NBD and hand the domain over. */
  async finish(opts: { suspend: boolean; persistent: boolean }): Promise<void> {
    requirePhase(this.machine, ["prepared"], "finish", "finish");
    this.finishOpts = opts;
    this.machine.advance("finish");
    clearInterval(this.watchdog);
    if (this.req.offline) return this.finishOffline();
    const run = this.entry!.running;
    try {
      if (!run) throw new Error(this.error ?? "the destination QEMU is not running");
      const qmp = run.qmp;
      const begun = Date.now();
      for (;;) {
        const st = (await qmp.execute("query-migrate")).status;
        if (st === "completed") break;
        if (st === "failed" || st === "cancelled") throw new Error(`incoming migration ${st}`);
        if (Date.now() - begun > 30_000) throw new Error(`incoming migration still '${st}' after 30 s`);
        // The stream's last bytes are usually still on the link when the source reports completed (tens of
        // ms at 1 Gbit/s), and the guest is paused until then: look often at first.
        await pollPause(begun);
      }
      // The order matters: resuming while an export still holds the image fails on permissions.
      if (this.nbdServing) await qmp.execute("nbd-server-stop");
      // Once Confirm stops the source, these images are the only copy, and what the guest had flushed there
      // must be on disk here too. `stop` on a paused VM drains and flushes every disk (QEMU's do_vm_stop);
      // block migration in particular leaves its writes in QEMU's caches.
      await qmp.execute("stop");
      failpoint("dest:finish");
      await holdpoint("dest:before-resume");
    } catch (err) {
      this.error = errorMessage(err);
      await this.cleanup(`finish failed: ${this.error}`);
      throw new MigrationError("finish", `on ${this.req.listenHost}: ${this.error}`, "E_FINISH");
    }
    // The QEMU exiting meanwhile has cleaned up.
    if (!this.machine.is("finish"))
      throw new MigrationError("finish", `on ${this.req.listenHost}: ${this.error}`, "E_FINISH");
    await this.handOver(run!, opts);
  }

  /** Offline: the copy is complete; the images are flushed and the domain is defined here (persistent). */
  private async finishOffline(): Promise<void> {
    try {
      await this.stopServing();
    } catch (err) {
      this.error = errorMessage(err);
      await this.cleanup(`finish failed: ${this.error}`);
      throw new MigrationError("finish", `on ${this.req.listenHost}: ${this.error}`, "E_FINISH");
    }
    // From here on the domain is this host's: decided (and written down) before it is defined.
    this.machine.advance("resume");
    this.handedOver(true);
  }

  /**
   * The source's word for a held migration: it has not resumed its copy and never will (it holds it paused
   * after the stream, or it has stopped it), so the guest runs here as Finish asked.
   */
  async resume(): Promise<void> {
    requirePhase(this.machine, ["held"], "resume", "finish");
    const run = this.entry?.running;
    if (!run)
      throw new MigrationError("finish", `on this host: ${this.error ?? "the QEMU is gone"}`, "E_FINISH");
    this.log.info({ domain: this.name, id: this.id }, "the source says resume: handing over the held guest");
    await this.handOver(run, this.finishOpts!);
  }

  /**
   * From here on this copy is the guest: the decision is persisted before the `cont`, so that a restarted
   * agent keeps it too. It is never killed, and the hand-over reports success (the source then stops its
   * copy); what fails after the decision is only logged.
   */
  private async handOver(run: RunningDomain, opts: { suspend: boolean; persistent: boolean }): Promise<void> {
    clearInterval(this.watchdog);
    this.machine.advance("resume");
    try {
      if (!opts.suspend) {
        await run.qmp.execute("cont");
        failpoint("dest:resumed");
        await holdpoint("dest:after-resume");
        await this.reg.announce(run);
      } else {
        run.announceOnResume = true;
      }
    } catch (err) {
      this.log.error({ domain: this.name, err: errorMessage(err) }, "after the resume on the destination");
    }
    this.handedOver(opts.persistent);
  }

  /** Cleans up when the source stays silent for `ms` while the migration is in `phase`. */
  private watch(phase: "prepared" | "held", ms: number): void {
    this.lastSeen = Date.now();
    this.watchdog = setInterval(() => {
      if (Date.now() - this.lastSeen > ms && this.machine.is(phase)) {
        this.error = `no word from the source for ${ms / 1000} s`;
        void this.cleanup(this.error);
      }
    }, 1000);
  }

  /** A QEMU that exits before the guest was handed over takes the migration with it. */
  private cleanUpOnExit(run: RunningDomain): void {
    run.qmp.once("close", () => {
      if (this.machine.is("prepare", "prepared", "finish", "held", "kept")) {
        this.error = "the destination QEMU exited";
        void this.cleanup(this.error);
      }
    });
  }

  /**
   * A migration an agent restart interrupted in Finish, after the stream had completed: the guest is whole
   * here, paused and flushed. It runs only on the source's word (`resume`); the source's cancel, the QEMU
   * exiting or HELD_WATCHDOG_MS without a call from the source remove it as Prepare's cleanup does.
   */
  static held(
    reg: DomainRegistry,
    log: Logger,
    rec: IncomingRecord & { req: PrepareRequest; finish: { suspend: boolean; persistent: boolean } },
    entry: DomainEntry,
    onDone: (m: IncomingMigration) => void,
    partials: PartialCopies,
  ): IncomingMigration {
    const m = new IncomingMigration(reg, log, rec.req, onDone, partials, { rec, phase: "held" });
    m.entry = entry;
    m.saveRecord("held");
    entry.job = {
      kind: "incoming migration",
      describe: () => m.describe(),
      abort: () => m.cleanup("aborted on the destination"),
      watch: (fn) => m.machine.listen(fn),
    };
    m.cleanUpOnExit(entry.running!);
    m.watch("held", HELD_WATCHDOG_MS);
    m.notes.push(
      "continued by a restarted agent: the guest is held paused here until the source says resume",
    );
    return m;
  }

  /** A copy an agent restart found `kept` (a failed --verify), paused, its time not up: kept on. */
  static kept(
    reg: DomainRegistry,
    log: Logger,
    rec: IncomingRecord & { req: PrepareRequest },
    entry: DomainEntry,
    onDone: (m: IncomingMigration) => void,
    partials: PartialCopies,
  ): IncomingMigration {
    const m = new IncomingMigration(reg, log, rec.req, onDone, partials, { rec, phase: "kept" });
    m.entry = entry;
    m.holdKept();
    m.cleanUpOnExit(entry.running!);
    return m;
  }

  /** The domain is this host's now (running, or paused for --suspend). */
  private handedOver(persistent: boolean): void {
    this.entry!.job = undefined;
    if (persistent) {
      try {
        this.reg.persist(this.name);
      } catch (err) {
        this.log.error({ domain: this.name, err: errorMessage(err) }, "cannot make the domain persistent");
      }
    }
    if (!this.machine.is("running")) this.machine.advance("running");
    this.log.info({ domain: this.name, id: this.id }, "incoming migration finished");
    this.onDone(this);
  }

  /**
   * The source's cancel: refused while Finish runs, which may be resuming the guest here. `discard`: what
   * was copied is not to be kept (an offline --verify failed); `inspect`: a live copy whose --verify
   * failed stays here paused (see keep).
   */
  async cancel(opts: CancelRequest = {}): Promise<CancelResult> {
    if (this.machine.is("finish", "resume"))
      throw new DomainStateError(
        "E_MIGRATION_PHASE",
        `the incoming migration of '${this.name}' is finishing (the guest may be resuming here); ask again`,
      );
    if (this.machine.is("kept") || (opts.inspect && (await this.keep())))
      return { inspect: { until: this.keptUntil! } };
    await this.cleanup("cancelled by the source", opts);
    const k = this.kept;
    return k ? { kept: { bytes: k.disks.reduce((s, d) => s + d.doneTo, 0), until: k.keptUntil } } : {};
  }

  /**
   * A live copy whose --verify failed (the source's cancel with `inspect`): the stream has completed, so
   * the guest is whole here, but its disks differ from the source's. It stays paused with its images as
   * they are, for INSPECT_KEEP_MS or until the operator discards it (`partial discard`, `domjobabort`), and
   * is then removed as Prepare's cleanup does. It never resumes: nothing leaves `kept` but cleanup, and
   * the domain's job refuses resume, start and destroy. False, with nothing kept, where there is no such
   * copy (offline, or the stream had not completed).
   */
  private async keep(): Promise<boolean> {
    const run = this.entry?.running;
    if (this.req.offline || !run || !this.machine.is("prepared")) return false;
    try {
      if ((await run.qmp.execute("query-migrate")).status !== "completed") return false;
      // As Finish would: no export left on the images, every disk flushed, so what is inspected is on disk.
      if (this.nbdServing) await run.qmp.execute("nbd-server-stop");
      await run.qmp.execute("stop");
    } catch (err) {
      this.log.error({ domain: this.name, err: errorMessage(err) }, "cannot keep the copy for inspection");
      return false;
    }
    // The QEMU exiting, or a watchdog, may have cleaned up meanwhile.
    if (!this.machine.is("prepared")) return false;
    this.keptUntil = Date.now() + INSPECT_KEEP_MS;
    this.machine.advance("kept");
    this.holdKept();
    this.log.warn(
      { domain: this.name, id: this.id, until: new Date(this.keptUntil).toISOString() },
      "keeping the copy that failed --verify paused for inspection",
    );
    return true;
  }

  /** In `kept`: the domain's job says why it cannot run, and the copy goes when its time is up. */
  private holdKept(): void {
    clearInterval(this.watchdog);
    const until = new Date(this.keptUntil!).toISOString();
    this.error = `its --verify failed on the source: this copy is kept paused for inspection until ${until}, never to run here`;
    this.entry!.job = {
      kind: "incoming migration",
      refusal: `a copy whose --verify failed, kept paused for inspection until ${until}; it never runs here (the guest runs on the source): remove it with 'nbdmig partial discard ${this.name}'`,
      describe: () => this.describe(),
      abort: () => this.cleanup("discarded on the destination"),
      watch: (fn) => this.machine.listen(fn),
    };
    this.keepTimer = setTimeout(
      () => void this.cleanup("its time for inspection is up"),
      Math.min(2 ** 31 - 1, Math.max(0, this.keptUntil! - Date.now())),
    ).unref();
  }

  /**
   * Removes what Prepare created (an offline copy with keepPartialMs keeps its images, see keepPartial).
   * Safe to call more than once and from any phase before `running`.
   */
  cleanup(reason: string, opts: { discard?: boolean } = {}): Promise<void> {
    if (this.machine.is("resume", "running")) return Promise.resolve();
    this.cleaning ??= (async () => {
      this.machine.advance("cleanup");
      clearInterval(this.watchdog);
      clearTimeout(this.keepTimer);
      this.log.warn({ domain: this.name, id: this.id, reason }, "cleaning up incoming migration");
      await this.stopServing().catch((err: unknown) =>
        this.log.error({ err: errorMessage(err) }, "cannot stop serving the images"),
      );
      const e = this.entry;
      if (e) {
        await this.reg
          .kill(e)
          .catch((err: unknown) =>
            this.log.error({ err: errorMessage(err) }, "cannot stop destination QEMU"),
          );
        e.job = undefined;
        this.reg.forgetTransient(e.name);
      }
      if (!opts.discard) this.keepPartial(reason);
      for (const f of [...this.created, ...this.createdDirs]) {
        try {
          fs.rmSync(f, { force: true, recursive: this.createdDirs.includes(f) });
        } catch (err) {
          this.log.error({ file: f, err: errorMessage(err) }, "cannot remove what this migration created");
        }
      }
      this.machine.advance("cleaned");
      this.onDone(this);
    })();
    return this.cleaning;
  }

  private get recordFile(): string {
    return path.join(this.reg.state.migrationsDir, `${this.id}.json`);
  }

  /** Persists what this migration created and its phase, for a restarted agent (see recoverIncoming). */
  private saveRecord(phase: DestPhase = this.machine.phase): void {
    const rec: IncomingRecord = {
      id: this.id,
      name: this.name,
      phase,
      created: this.created,
      createdDirs: this.createdDirs,
      finish: this.finishOpts,
      keptUntil: this.keptUntil,
      req: this.req,
      done: this.done,
    };
    writeFileAtomic(this.recordFile, JSON.stringify(rec));
  }

  private removeRecord(): void {
    fs.rmSync(this.recordFile, { force: true });
  }

  describe(): Record<string, unknown> {
    return {
      id: this.id,
      type: "incoming",
      operation: "Incoming migration",
      domain: this.name,
      phase: this.machine.phase,
      status: this.machine.is("resume", "running")
        ? "completed"
        : this.machine.is("cleaned", "cleanup", "kept")
          ? "failed"
          : "active",
      keptUntil: this.keptUntil,
      startedAt: this.startedAt,
      elapsedMs: Date.now() - this.startedAt,
      error: this.error,
      disks: this.req.cookie.disks.map((d) => ({
        target: d.target,
        total: d.virtualSize,
        // Offline with keepPartialMs: the copy's last checkpoint (what a cut-off attempt would keep).
        doneTo: this.done[d.target],
      })),
    };
  }
}

/**
 * The partial copy an offline migration with keepPartialMs leaves: its disks whose copy had made progress
 * (their images; the other images it created are removed). Undefined when there is nothing to keep.
 */
function partialOf(
  req: PrepareRequest,
  id: string,
  created: string[],
  done: Record<string, number>,
  reason: string,
): PartialRecord | undefined {
  if (!req.offline || !req.keepPartialMs) return undefined;
  const disks = req.cookie.disks
    .filter((d) => (done[d.target] ?? 0) > 0 && created.includes(d.source))
    .map((d) => ({
      target: d.target,
      path: d.source,
      format: d.format,
      virtualSize: d.virtualSize,
      stamp: d.stamp,
      doneTo: done[d.target]!,
    }));
  if (!disks.length) return undefined;
  return {
    name: req.cookie.name,
    uuid: req.cookie.uuid,
    keptUntil: Date.now() + req.keepPartialMs,
    reason: `migration ${id}: ${reason}`,
    disks,
    files: disks.map((d) => d.path),
  };
}

/** What a destination persists per incoming migration. Not strict: a newer agent may add fields. */
const IncomingRecordSchema = z.object({
  id: z.string(),
  name: z.string(),
  /** Absent in records of agents before the phase was kept: they never got as far as `resume`. */
  phase: z.enum(DEST_PHASES).default("prepare"),
  created: z.array(z.string()),
  createdDirs: z.array(z.string()).default([]),
  finish: z.object({ suspend: z.boolean(), persistent: z.boolean() }).optional(),
  /** `kept`: when the copy that failed --verify is removed. */
  keptUntil: z.number().optional(),
  /** The Prepare request, for a restarted agent that holds the migration (records of older agents lack it). */
  req: PrepareRequestSchema.optional(),
  /** Offline: per disk, the offset below which the copy is done. */
  done: z.record(z.string(), z.number()).default({}),
});
type IncomingRecord = z.infer<typeof IncomingRecordSchema>;

/**
 * At agent start, for each incoming migration its predecessor left. In Finish with the stream completed,
 * the guest is whole here: it is held (paused) for the source's word, returned for the manager to serve.
 * Otherwise before `resume` it cannot complete: its source finds the migration gone and rolls back (or
 * has), so its QEMU is stopped and exactly what it created is removed. From `resume` on the guest is this
 * host's: it is kept, resumed if the agent died before the `cont`, made persistent if Finish asked; its
 * images are never removed. A QEMU found running is kept whatever the record says (a guest that ran here is
 * never killed).
 */
export async function recoverIncoming(
  reg: DomainRegistry,
  log: Logger,
  onDone: (m: IncomingMigration) => void,
  partials: PartialCopies,
): Promise<IncomingMigration[]> {
  const held: IncomingMigration[] = [];
  // qemu-nbd processes serving an offline migration's images outlive the agent that started them.
  for (const f of fs.readdirSync(reg.state.migrationsDir).filter((x) => /^qemu-nbd-.*\.pid$/.test(x))) {
    const file = path.join(reg.state.migrationsDir, f);
    // qemu-nbd flushes the image as it exits on SIGTERM (a partial copy may be kept).
    await stopQemuNbd(Number(fs.readFileSync(file, "utf8").trim()), file);
  }
  for (const f of fs.readdirSync(reg.state.migrationsDir).filter((x) => x.endsWith(".json"))) {
    const file = path.join(reg.state.migrationsDir, f);
    let rec: IncomingRecord;
    try {
      rec = IncomingRecordSchema.parse(JSON.parse(fs.readFileSync(file, "utf8")));
    } catch {
      fs.rmSync(file, { force: true });
      continue;
    }
    const e = reg.has(rec.name) ? reg.get(rec.name) : undefined;
    const run = e?.running;
    if (run && (rec.phase === "resume" || rec.phase === "running" || run.status === "running")) {
      log.warn(
        { domain: rec.name, id: rec.id, phase: rec.phase },
        "keeping an incoming guest handed over before an agent restart",
      );
      try {
        if (run.status !== "running" && !rec.finish?.suspend) {
          await run.qmp.execute("cont");
          run.status = "running";
          await reg.announce(run);
        }
        if (rec.finish?.persistent) reg.persist(rec.name);
      } catch (err) {
        log.error({ domain: rec.name, err: errorMessage(err) }, "after the handover, on restart");
      }
      fs.rmSync(file, { force: true });
      continue;
    }
    if (rec.phase === "resume" || rec.phase === "running") {
      // Its QEMU died after the handover: the images are the guest's only disks now.
      log.error(
        { domain: rec.name, id: rec.id },
        "an incoming guest handed over before an agent restart is gone; its images are kept",
      );
      fs.rmSync(file, { force: true });
      continue;
    }
    const { req, finish } = rec;
    if (e && run && req && rec.phase === "kept" && (rec.keptUntil ?? 0) > Date.now()) {
      // Paused since the failed --verify (a restart leaves QEMU as it was): never resumed, kept on.
      held.push(IncomingMigration.kept(reg, log, { ...rec, req }, e, onDone, partials));
      log.warn(
        { domain: rec.name, id: rec.id },
        "keeping the copy that failed --verify paused for inspection",
      );
      continue;
    }
    if (e && run && req && finish && (rec.phase === "finish" || rec.phase === "held")) {
      try {
        if ((await run.qmp.execute("query-migrate")).status === "completed") {
          // As Finish would have: no export left on the images, and every disk flushed.
          await run.qmp.execute("nbd-server-stop").catch(() => undefined);
          await run.qmp.execute("stop");
          held.push(IncomingMigration.held(reg, log, { ...rec, req, finish }, e, onDone, partials));
          log.warn(
            { domain: rec.name, id: rec.id },
            "holding an incoming guest whose Finish an agent restart interrupted, paused until the source says resume",
          );
          continue;
        }
      } catch (err) {
        log.error({ domain: rec.name, err: errorMessage(err) }, "cannot hold the incoming guest");
      }
    }
    log.warn(
      { domain: rec.name, id: rec.id, phase: rec.phase, created: rec.created },
      rec.phase === "kept"
        ? "removing a copy kept for inspection: its time is up"
        : "removing an incoming migration interrupted by an agent restart",
    );
    if (e && !e.persistent) {
      await reg.kill(e);
      reg.forgetTransient(rec.name);
    }
    // An offline copy with --keep-partial keeps what its checkpoints say is done.
    const partial = req && partialOf(req, rec.id, rec.created, rec.done, "the destination's agent restarted");
    if (partial) {
      partials.save(partial);
      log.warn(
        { domain: rec.name, disks: partial.disks },
        "keeping the partial copy of an interrupted offline migration",
      );
    }
    for (const img of rec.created.filter((f) => !partial?.files.includes(f))) fs.rmSync(img, { force: true });
    for (const dir of rec.createdDirs) fs.rmSync(dir, { force: true, recursive: true });
    fs.rmSync(file, { force: true });
  }
  return held;
}
