/** `nbdmig daemon`: the host agent process. */
import fs from "node:fs";
import os from "node:os";
import type { AddressInfo } from "node:net";
import { pino } from "pino";
import { UsageError } from "../errors.js";
import type { Accel, DiskLayout } from "../domain/qemu-args.js";
import { probeQemuFeatures } from "../qemu/features.js";
import { probeKvm } from "../qemu/launcher.js";
import { domainRoutes } from "./api.js";
import { parseAgentUri, readToken } from "./client.js";
import { DomainRegistry } from "./domains.js";
import { hostNetworks, hostPools } from "./network.js";
import { Router } from "./http.js";
import { agentListener } from "./tls.js";
import { StateDir, writeFileAtomic } from "./state-dir.js";
import { migrationRoutes, MigrationManager } from "../migration/manager.js";

export interface DaemonOptions {
  listen: string;
  stateDir: string;
  tokenFile?: string;
  accel: "auto" | Accel;
  logLevel: string;
  /** Refuse to serve NBD for incoming storage copies (hosts where only the migration port is open). */
  noNbd: boolean;
  diskLayout: "auto" | DiskLayout;
  /** `--network NAME=BRIDGE` flags. */
  networks: string[];
  /** `--pool NAME=DIR` flags. */
  pools: string[];
}

export async function runDaemon(opts: DaemonOptions): Promise<void> {
  const addr = parseAgentUri(opts.listen, true);
  const log = pino({ level: opts.logLevel, base: { agent: opts.listen } });
  const state = new StateDir(opts.stateDir);
  try {
    state.init();
  } catch (err) {
    throw new UsageError(`cannot create the state directory ${opts.stateDir}: ${(err as Error).message}`);
  }
  const token = opts.tokenFile ? readToken(opts.tokenFile) : state.ensureToken();
  const networks = hostNetworks(opts.networks);
  const reg = new DomainRegistry(state, log, {
    accel: opts.accel,
    layout: opts.diskLayout,
    networks,
    pools: hostPools(opts.pools),
    hostLabel: addr.host === "0.0.0.0" || addr.host === "::" ? os.hostname() : addr.host,
  });
  await reg.load();
  const migrations = new MigrationManager(reg, log, { token, noNbd: opts.noNbd });
  await migrations.recover();
  // What GET /v1/host reports (a migration's Begin asks it of the destination) comes from throwaway QEMUs,
  // probed once per agent: before it serves, rather than in the first migration (0.13 s of its Begin when
  // measured), and so that no probe QEMU runs beside the guests once the agent answers.
  await Promise.all([probeQemuFeatures(), probeKvm()]).catch(() => undefined);
  const router = new Router();
  domainRoutes(router, reg, { listen: opts.listen, accel: opts.accel, nbd: !opts.noNbd });
  migrationRoutes(router, migrations);
  const api = router.server(token, log, state.pkiDir);
  const server = agentListener(api, state.pkiDir, log);
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err: NodeJS.ErrnoException) =>
      reject(new UsageError(`cannot listen on ${opts.listen}: ${err.code ?? err.message}`, "E_LISTEN")),
    );
    server.listen(addr.port, addr.host, () => resolve());
  });
  const bound = server.address() as AddressInfo;
  writeFileAtomic(
    state.agentFile,
    JSON.stringify({ listen: { host: addr.host, port: bound.port }, pid: process.pid }),
    0o644,
  );
  log.info(
    { listen: `${addr.host}:${bound.port}`, stateDir: opts.stateDir, pid: process.pid },
    "agent listening",
  );

  const stop = (sig: string) => {
    log.info({ signal: sig }, "agent stopping; QEMU processes keep running");
    server.close();
    api.closeAllConnections();
    reg.detachAll();
    fs.rmSync(state.agentFile, { force: true });
    process.exit(0);
  };
  process.on("SIGTERM", () => stop("SIGTERM"));
  process.on("SIGINT", () => stop("SIGINT"));
}
