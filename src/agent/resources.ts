/**
 * What a guest needs from its host besides QEMU, made before QEMU starts and released when it exits:
 * taps and macvtaps, the swtpm process, the NVRAM file (created from its template at first start, and kept),
 * display ports. Each start writes `<run>/resources/NAME.json` *before* creating anything, so an agent that
 * dies at any point leaves a record of exactly what to remove (see `reconcileResources`).
 */
import { execFile, spawn } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import type { Logger } from "pino";
import { assert, DomainXmlError, errorMessage, UsageError } from "../errors.js";
import { hostNic, type DomainDef } from "../domain/model.js";
import type { Accel, HostResources, NicBackend } from "../domain/qemu-args.js";
import { pidAlive, processRuns } from "../qemu/launcher.js";
import {
  attachmentOf,
  chooseNicName,
  createMacvtap,
  createTap,
  deleteLink,
  HostNetworkError,
  openVhostFds,
  vhostNetUsable,
} from "./network.js";
import { writeFileAtomic, type StateDir } from "./state-dir.js";

const run = promisify(execFile);

/** The record of one start's host resources. */
export interface ResourceRecord {
  name: string;
  nics: { name: string; kind: "tap" | "macvtap"; node?: string }[];
  swtpm?: { pidFile: string; socket: string };
}

export interface Acquired {
  /** Ends this start's claim on tap names and ports: call once QEMU holds them (or failed to start). */
  settle(): void;
  host: HostResources;
  /** The definition as it runs: tap names and display ports filled in. */
  live: DomainDef;
  /** Descriptors QEMU inherits (3, 4, ...); closed here once QEMU has them. */
  passFds: number[];
  warnings: string[];
}

export interface ResourceContext {
  state: StateDir;
  log: Logger;
  /** libvirt network name -> bridge on this host. */
  networks: Record<string, string>;
  /** This host's name for error messages (the agent's listen address). */
  hostLabel: string;
  /** Display ports in use by other running domains of this agent. */
  portsInUse: () => Set<number>;
}

const recordFile = (state: StateDir, name: string) => path.join(state.resourcesDir, `${name}.json`);

/**
 * Tap names and display ports that a start has chosen but QEMU does not hold yet. Two domains starting at
 * the same time (or a start beside a migration's Prepare) would otherwise both see `vnet0` or port 5900 free.
 */
const claimedNames = new Set<string>();
const claimedPorts = new Set<number>();

/** The swtpm state of a domain: one directory per UUID, as libvirt keeps it. */
export const tpmStateDir = (state: StateDir, uuid: string): string => path.join(state.root, "swtpm", uuid);
export const nvramDir = (state: StateDir): string => path.join(state.root, "nvram");

/**
 * Checks that this host has every bridge, network and link `def` needs, without creating anything (Begin's
 * and Prepare's check of a destination).
 */
export function checkNetworks(def: DomainDef, ctx: Pick<ResourceContext, "networks" | "hostLabel">): void {
  for (const nic of def.interfaces) attachmentOf(nic, ctx.networks, ctx.hostLabel);
}

export async function acquireResources(
  ctx: ResourceContext,
  def: DomainDef,
  opts: { accel: Accel; incoming: boolean },
): Promise<Acquired> {
  const live = structuredClone(def);
  const record: ResourceRecord = { name: def.name, nics: [] };
  const passFds: number[] = [];
  const warnings: string[] = [];
  const nics: NicBackend[] = [];
  const save = () => writeFileAtomic(recordFile(ctx.state, def.name), JSON.stringify(record, null, 2));
  const names: string[] = [];
  const ports: number[] = [];
  const settle = () => {
    for (const n of names) claimedNames.delete(n);
    for (const p of ports) claimedPorts.delete(p);
  };
  save();
  try {
    checkNetworks(def, ctx);
    const vhost = opts.accel === "kvm" && vhostNetUsable();
    for (const [i, nic] of def.interfaces.entries()) {
      if (!hostNic(nic)) {
        nics.push({ kind: "user" });
        continue;
      }
      // As libvirt: an explicit vhost is required of a guest running under KVM; under TCG none gets it.
      if (nic.driver === "vhost" && !vhost && opts.accel === "kvm") {
        throw new HostNetworkError(
          `interface ${nic.mac}: <driver name='vhost'> needs vhost-net, which is not usable on ${ctx.hostLabel} (/dev/vhost-net); remove the driver element or use name='qemu'`,
        );
      }
      if (nic.driver === "vhost" && opts.accel === "tcg")
        warnings.push(`interface ${nic.mac}: runs without vhost-net under TCG`);
      const useVhost = vhost && nic.driver !== "qemu";
      const at = attachmentOf(nic, ctx.networks, ctx.hostLabel);
      const name = chooseNicName(nic, claimedNames);
      claimedNames.add(name);
      names.push(name);
      live.interfaces[i]!.targetDev = name;
      if (at.kind === "bridge") {
        record.nics.push({ name, kind: "tap" });
        save();
        await createTap(name, at.bridge, { owner: def.name, mtu: nic.mtu, queues: nic.queues });
        nics.push({ kind: "tap", ifname: name, vhost: useVhost });
      } else if (at.kind === "direct") {
        const node = path.join(ctx.state.runDir, `${name}.tap`);
        record.nics.push({ name, kind: "macvtap", node });
        save();
        const { fds } = await createMacvtap(name, at.link, {
          owner: def.name,
          mac: nic.mac,
          mtu: nic.mtu,
          queues: nic.queues,
          nodeDir: ctx.state.runDir,
        });
        const first = 3 + passFds.length;
        passFds.push(...fds);
        const vhostFds = useVhost ? openVhostFds(fds.length) : [];
        const vFirst = 3 + passFds.length;
        passFds.push(...vhostFds);
        nics.push({
          kind: "fds",
          fds: fds.map((_, k) => first + k),
          ...(vhostFds.length ? { vhostFds: vhostFds.map((_, k) => vFirst + k) } : {}),
        });
      }
    }
    if (def.features.hyperv && opts.accel === "tcg")
      warnings.push(
        "features/hyperv: Hyper-V enlightenments need KVM; this start runs under TCG without them",
      );

    ports.push(...(await choosePorts(live, new Set([...ctx.portsInUse(), ...claimedPorts]))));
    for (const p of ports) claimedPorts.add(p);

    const fw = def.os.firmware;
    if (fw.nvram?.path && !fs.existsSync(fw.nvram.path)) {
      assert(!opts.incoming, `Prepare creates the NVRAM ${fw.nvram.path} of an incoming migration`);
      if (!fw.nvram.template)
        throw new DomainXmlError(
          "domain/os/nvram",
          `${fw.nvram.path} does not exist and the definition names no template to create it from; add <nvram template='...'> (e.g. /usr/share/OVMF/OVMF_VARS_4M.fd) or restore the file`,
        );
      fs.mkdirSync(path.dirname(fw.nvram.path), { recursive: true, mode: 0o700 });
      // The first start creates the variable store from its template; it is kept like a disk afterwards.
      fs.copyFileSync(fw.nvram.template, `${fw.nvram.path}.tmp`);
      fs.chmodSync(`${fw.nvram.path}.tmp`, 0o600);
      fs.renameSync(`${fw.nvram.path}.tmp`, fw.nvram.path);
    }

    let tpmSocket: string | undefined;
    if (def.tpm) {
      const socket = path.join(ctx.state.runDir, `${def.name}.swtpm.sock`);
      const pidFile = path.join(ctx.state.runDir, `${def.name}.swtpm.pid`);
      record.swtpm = { pidFile, socket };
      save();
      await startSwtpm(ctx.state, def, { socket, pidFile, incoming: opts.incoming });
      tpmSocket = socket;
    }

    const host: HostResources = {
      nics,
      tpmSocket,
      channelSocket: (ch) => path.join(ctx.state.runDir, `${def.name}.${ch}.sock`),
      consoleLog: (port) => path.join(ctx.state.logDir, `${def.name}.console${port}.log`),
    };
    return { settle, host, live, passFds, warnings };
  } catch (err) {
    settle();
    for (const fd of passFds) fs.closeSync(fd);
    await releaseResources(ctx.state, def.name, ctx.log);
    throw err;
  }
}

/** Picks a free port, 5900 and up, for every display with autoport; answers the ports it picked. */
async function choosePorts(live: DomainDef, inUse: Set<number>): Promise<number[]> {
  const picked: number[] = [];
  for (const g of live.graphics) {
    if (g.listen === "none") continue;
    if (!g.autoport) {
      const why = await portTaken(g.listen, g.port!);
      if (why === "EADDRNOTAVAIL") throw notHere(g.type, g.listen);
      if (why)
        throw new UsageError(
          `${g.type} port ${g.port} on ${g.listen} is in use here; pick another or use autoport='yes'`,
        );
      continue;
    }
    let p = 5900;
    for (; p <= 65535; p++) {
      if (inUse.has(p) || live.graphics.some((o) => o !== g && o.port === p)) continue;
      const why = await portTaken(g.listen, p);
      if (why === "EADDRNOTAVAIL") throw notHere(g.type, g.listen);
      if (!why) break;
    }
    if (p > 65535) throw new UsageError(`no free port from 5900 up on ${g.listen} for the ${g.type} display`);
    g.port = p;
    inUse.add(p);
    picked.push(p);
  }
  return picked;
}

/** Why `port` cannot be bound on `host` (an errno code such as EADDRINUSE), or undefined when it can. */
function portTaken(host: string, port: number): Promise<string | undefined> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.once("error", (err: NodeJS.ErrnoException) => resolve(err.code ?? "error"));
    s.listen({ host, port, exclusive: true }, () => s.close(() => resolve(undefined)));
  });
}

function notHere(type: string, listen: string): UsageError {
  return new DomainXmlError(
    "domain/devices/graphics/@listen",
    `the ${type} display listens on ${listen}, which is not an address of this host; use 0.0.0.0 (every address), 127.0.0.1, or an address every host of the cluster has`,
  );
}

async function startSwtpm(
  state: StateDir,
  def: DomainDef,
  p: { socket: string; pidFile: string; incoming: boolean },
): Promise<void> {
  const dir = tpmStateDir(state, def.uuid);
  const tpm2 = def.tpm!.version === "2.0";
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const manufactured = fs.readdirSync(dir).some((f) => f.endsWith(".permall"));
  // A new TPM is manufactured once (EK created, PCR banks chosen), as libvirt does with swtpm_setup. The
  // destination of a migration gets its state from the source instead, through QEMU's migration stream.
  if (!manufactured && !p.incoming) {
    try {
      await run("swtpm_setup", [
        ...(tpm2 ? ["--tpm2"] : []),
        "--tpmstate",
        dir,
        "--createek",
        ...(def.tpm!.pcrBanks ? ["--pcr-banks", def.tpm!.pcrBanks.join(",")] : []),
        "--not-overwrite",
      ]);
    } catch (err) {
      throw new UsageError(
        `swtpm_setup for ${def.name}'s TPM failed: ${(err as { stderr?: string }).stderr ?? errorMessage(err)}`,
      );
    }
  }
  fs.rmSync(p.socket, { force: true });
  fs.rmSync(p.pidFile, { force: true });
  const log = path.join(state.logDir, `${def.name}.swtpm.log`);
  const args = [
    "socket",
    ...(tpm2 ? ["--tpm2"] : []),
    "--tpmstate",
    `dir=${dir},mode=0600`,
    "--ctrl",
    `type=unixio,path=${p.socket},mode=0600`,
    "--log",
    `file=${log},level=1`,
    "--pid",
    `file=${p.pidFile}`,
    // Ends with QEMU: it closes the control channel when it exits, whatever the reason.
    "--terminate",
  ];
  const child = spawn("swtpm", args, { detached: true, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  let spawnError: Error | undefined;
  child.once("error", (err) => (spawnError = err));
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  child.unref();
  const deadline = Date.now() + 10_000;
  while (!fs.existsSync(p.socket)) {
    if (spawnError) throw new UsageError(`cannot run swtpm for ${def.name}: ${spawnError.message}`);
    if (child.exitCode !== null || child.signalCode !== null)
      throw new UsageError(`swtpm for ${def.name} exited: ${stderr.trim() || "see " + log}`);
    if (Date.now() > deadline) throw new UsageError(`swtpm for ${def.name} did not create ${p.socket}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  child.stderr.destroy();
}

/** Removes what a start made for `name` (taps, macvtaps, device nodes, a swtpm still running). */
export async function releaseResources(state: StateDir, name: string, log: Logger): Promise<void> {
  const file = recordFile(state, name);
  let rec: ResourceRecord;
  try {
    rec = JSON.parse(fs.readFileSync(file, "utf8")) as ResourceRecord;
  } catch {
    return;
  }
  for (const n of rec.nics) {
    const foreign = await deleteLink(n.name, { node: n.node, owner: name }).catch((err: unknown) => {
      log.error({ domain: name, link: n.name, err: errorMessage(err) }, "cannot remove a tap");
      return false;
    });
    if (foreign) log.warn({ domain: name, link: n.name }, "left a link of that name: nbdmig did not make it");
  }
  if (rec.swtpm) {
    const pid = readPid(rec.swtpm.pidFile);
    if (pid && pidAlive(pid) && processRuns(pid, "swtpm")) {
      // swtpm ends by itself with QEMU (--terminate), so it may be gone by the time it is signalled.
      signal(pid, "SIGTERM");
      for (let i = 0; i < 30 && pidAlive(pid); i++) await new Promise((r) => setTimeout(r, 50));
      if (pidAlive(pid)) signal(pid, "SIGKILL");
    }
    fs.rmSync(rec.swtpm.pidFile, { force: true });
    fs.rmSync(rec.swtpm.socket, { force: true });
  }
  fs.rmSync(file, { force: true });
  if (rec.nics.length)
    log.info({ domain: name, removed: rec.nics.map((n) => n.name) }, "host interfaces removed");
}

/** At agent start: releases the resources of every domain whose QEMU is no longer running. */
export async function reconcileResources(state: StateDir, running: Set<string>, log: Logger): Promise<void> {
  for (const f of fs.readdirSync(state.resourcesDir).filter((x) => x.endsWith(".json"))) {
    const name = f.slice(0, -".json".length);
    if (running.has(name)) continue;
    log.warn({ domain: name }, "removing host resources left by a QEMU that exited while the agent was down");
    await releaseResources(state, name, log);
  }
}

function signal(pid: number, sig: NodeJS.Signals): void {
  try {
    process.kill(pid, sig);
  } catch {
    /* already gone */
  }
}

function readPid(file: string): number | undefined {
  try {
    const n = Number(fs.readFileSync(file, "utf8").trim());
    return Number.isInteger(n) && n > 0 ? n : undefined;
  } catch {
    return undefined;
  }
}
