/**
 * The agent's remote API (documented in the README). Every route answers JSON; errors are
 * `{ "error": { "code", "message", ... } }` with a 4xx/5xx status.
 */
import os from "node:os";
import { caFingerprint, hasPki } from "../qemu/pki.js";
import { UsageError } from "../errors.js";
import { domainToXml } from "../domain/xml.js";
import type { DiskLayout } from "../domain/qemu-args.js";
import { probeQemuFeatures } from "../qemu/features.js";
import { probeKvm } from "../qemu/launcher.js";
import type { DomainRegistry } from "./domains.js";
import { listBridges, listLinks } from "./network.js";
import { Router } from "./http.js";
import { CreateSchema, DefineSchema, MonitorSchema, StartSchema, UndefineSchema } from "./schemas.js";

import { VERSION } from "../version.js";

export { VERSION };

export interface HostFacts {
  listen: string;
  accel: string;
  nbd: boolean;
}

/** What a guest's interfaces can attach to here; Begin checks a destination's answer. */
export interface NetworkFacts {
  bridges: string[];
  /** libvirt network name -> bridge. */
  networks: Record<string, string>;
  links: string[];
}

/** What this host can offer a storage migration; Begin asks it of the destination. */
export interface StorageCapabilities {
  qemu: string;
  /** It can receive disks over NBD: its QEMU has the NBD server and the agent does not run with --no-nbd. */
  nbd: boolean;
  /** Why not, when it cannot. */
  nbdWhyNot?: string;
  /** Its QEMU can carry disks inside the migration stream (block migration). */
  stream: boolean;
  /** The disk layout its new domains get (in-stream migration needs `drive`). */
  diskLayout: DiskLayout;
}

export async function storageCapabilities(
  reg: DomainRegistry,
  nbdAllowed: boolean,
): Promise<StorageCapabilities> {
  const f = await probeQemuFeatures();
  const nbd = nbdAllowed && f.nbdServer;
  return {
    qemu: f.version,
    nbd,
    nbdWhyNot: nbd
      ? undefined
      : !nbdAllowed
        ? "its agent runs with --no-nbd"
        : `its QEMU ${f.version} has no NBD server${f.error ? ` (${f.error})` : ""}`,
    stream: f.blockMigration,
    diskLayout: await reg.diskLayout(),
  };
}

export function domainRoutes(router: Router, reg: DomainRegistry, host: HostFacts): Router {
  const info = async (name: string) => {
    const e = reg.get(name);
    await reg.refresh(e);
    const def = e.running?.def ?? e.def;
    return {
      id: e.running?.id ?? null,
      name: e.name,
      uuid: def.uuid,
      osType: "hvm",
      state: reg.stateOf(e),
      vcpus: def.vcpus,
      maxMemoryKiB: def.memoryKiB,
      usedMemoryKiB: e.running ? def.memoryKiB : 0,
      persistent: e.persistent,
      autostart: false,
      accel: e.running?.accel ?? null,
      pid: e.running?.pid ?? null,
      job: e.job ? e.job.kind : null,
    };
  };
  return router
    .add("GET", "/v1/host", async () => ({
      hostname: os.hostname(),
      version: VERSION,
      listen: host.listen,
      accel: host.accel,
      kvm: await probeKvm(),
      nbd: host.nbd,
      storage: await storageCapabilities(reg, host.nbd),
      network: { bridges: listBridges(), networks: reg.networks, links: listLinks() } satisfies NetworkFacts,
      machines: (await probeQemuFeatures()).machines.map((m) => m.name),
      // Whether this host can take TLS migrations, and with which CA (the source's must be the same).
      tls: hasPki(reg.state.pkiDir) ? { caSha256: caFingerprint(reg.state.pkiDir) } : undefined,
    }))
    .add("GET", "/v1/domains", async () => {
      const out = [];
      for (const e of reg.list()) {
        await reg.refresh(e);
        out.push({
          id: e.running?.id ?? null,
          name: e.name,
          state: reg.stateOf(e),
          persistent: e.persistent,
        });
      }
      return { domains: out };
    })
    .add("POST", "/v1/domains", DefineSchema, (r) => reg.define(r.body.xml))
    .add("POST", "/v1/domains/create", CreateSchema, async (r) => {
      const { def, warnings } = await reg.resolveXml(r.body.xml);
      const e = reg.addTransient(def);
      try {
        await e.lock.run(() => reg.start(def.name, { paused: r.body.paused === true }));
      } catch (err) {
        reg.forgetTransient(def.name);
        throw err;
      }
      return { name: def.name, warnings };
    })
    .add("GET", "/v1/domains/:name", (r) => info(r.params.name!))
    .add("DELETE", "/v1/domains/:name", UndefineSchema, (r) => {
      const nvram = r.body.nvram;
      const e = reg.get(r.params.name!);
      reg.refuseIfBusy(e);
      return e.lock.run(async () =>
        reg.undefine(r.params.name!, { nvram, keepTpm: r.body.keepTpm === true }),
      );
    })
    .add("GET", "/v1/domains/:name/xml", (r) => {
      const e = reg.get(r.params.name!);
      const inactive = r.query.get("inactive") === "1";
      return { xml: domainToXml(inactive ? e.def : (e.running?.def ?? e.def)) };
    })
    .add("POST", "/v1/domains/:name/start", StartSchema, async (r) => {
      const e = reg.get(r.params.name!);
      // An offline migration owns the shut-off domain (or the destination reserves its name) meanwhile.
      reg.refuseIfBusy(e);
      const run = await e.lock.run(() => reg.start(e.name, { paused: r.body.paused === true }));
      return { id: run.id, pid: run.pid, accel: run.accel };
    })
    .add("POST", "/v1/domains/:name/destroy", (r) =>
      reg.get(r.params.name!).lock.run(() => reg.destroy(r.params.name!)),
    )
    .add("POST", "/v1/domains/:name/shutdown", (r) => reg.shutdown(r.params.name!))
    .add("POST", "/v1/domains/:name/suspend", (r) => reg.suspend(r.params.name!))
    .add("POST", "/v1/domains/:name/resume", (r) => reg.resume(r.params.name!))
    .add("GET", "/v1/domains/:name/disks", (r) => {
      const e = reg.get(r.params.name!);
      const def = e.running?.def ?? e.def;
      return {
        disks: def.disks.map((d) => ({
          type: d.type,
          device: d.device,
          target: d.target,
          bus: d.bus,
          format: d.format,
          source: d.source ?? null,
          readonly: d.readonly,
          shareable: d.shareable,
        })),
      };
    })
    .add("GET", "/v1/domains/:name/interfaces", (r) => {
      const e = reg.get(r.params.name!);
      const def = e.running?.def ?? e.def;
      return {
        interfaces: def.interfaces.map((i) => ({
          interface: e.running ? (i.targetDev ?? null) : null,
          type: i.type,
          source:
            i.type === "network"
              ? `${i.source} (${reg.networks[i.source!] ?? "unmapped"})`
              : (i.source ?? null),
          model: i.model,
          mac: i.mac,
        })),
        graphics: e.running
          ? def.graphics.map((g) => ({ type: g.type, listen: g.listen, port: g.port }))
          : [],
      };
    })
    .add("GET", "/v1/domains/:name/disks/:target", (r) => reg.diskInfo(r.params.name!, r.params.target!))
    .add("GET", "/v1/domains/:name/console", (r) => {
      const bytes = Number(r.query.get("bytes") ?? 65536);
      if (!Number.isInteger(bytes) || bytes < 1)
        throw new UsageError("bytes must be a positive whole number");
      return { text: reg.consoleLog(r.params.name!, bytes) };
    })
    .add("POST", "/v1/domains/:name/monitor", MonitorSchema, async (r) => ({
      result: await reg.monitor(r.params.name!, r.body.command, r.body.hmp === true),
    }));
}
