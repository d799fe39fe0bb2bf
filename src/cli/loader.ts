/**
 * Which verb module registers which top-level command, so that a run loads only the module of the verb it
 * runs: `nbdmig migrate` then starts without the agent, the NBD server or the domain XML code (each module
 * pulls in its own). Help, an unknown verb (commander's suggestions) and no verb load them all.
 * test/cli.test.ts checks this table against what each module registers.
 */
import type { Command } from "commander";

export interface VerbModule {
  register(program: Command): void;
}

export const VERB_MODULES = {
  daemon: () => import("./verbs/daemon.js"),
  define: () => import("./verbs/define.js"),
  lifecycle: () => import("./verbs/lifecycle.js"),
  info: () => import("./verbs/info.js"),
  migrate: () => import("./verbs/migrate.js"),
  monitor: () => import("./verbs/monitor.js"),
  nbd: () => import("./verbs/nbd.js"),
  tls: () => import("./verbs/tls.js"),
} satisfies Record<string, () => Promise<VerbModule>>;

export type VerbModuleName = keyof typeof VERB_MODULES;

/** Each top-level command and the module that registers it. */
export const COMMANDS: Record<string, VerbModuleName> = {
  daemon: "daemon",
  create: "define",
  define: "define",
  start: "lifecycle",
  destroy: "lifecycle",
  shutdown: "lifecycle",
  suspend: "lifecycle",
  resume: "lifecycle",
  undefine: "lifecycle",
  console: "info",
  domblkinfo: "info",
  domblklist: "info",
  domdisplay: "info",
  domiflist: "info",
  dominfo: "info",
  dumpxml: "info",
  list: "info",
  migrate: "migrate",
  domjobabort: "migrate",
  domjobinfo: "migrate",
  partial: "migrate",
  "qemu-monitor-command": "monitor",
  nbd: "nbd",
  "tls-ca": "tls",
  "tls-host": "tls",
};

/**
 * The modules a run with this verb needs: its own, or all of them; none for `nbdmig --version` (no verb),
 * which scripts run to learn what is installed.
 */
export function modulesFor(verb: string | undefined, version = false): VerbModuleName[] {
  if (verb === undefined && version) return [];
  const own = verb !== undefined && Object.hasOwn(COMMANDS, verb) ? COMMANDS[verb] : undefined;
  return own ? [own] : (Object.keys(VERB_MODULES) as VerbModuleName[]);
}
