#!/usr/bin/env node
/** nbdmig: the command line. Verbs follow virsh; each lives in its own file under verbs/. */
// File I/O runs on libuv's thread pool (4 threads by default); an NBD server with dozens of requests in
// flight needs more. It must be set before the first asynchronous file operation.
process.env.UV_THREADPOOL_SIZE ??= "16";
import { Command, CommanderError } from "commander";
import { AgentError, MigrationError, NbdmigError, UsageError } from "../errors.js";
import { VERSION } from "../agent/api.js";
import * as daemon from "./verbs/daemon.js";
import * as define from "./verbs/define.js";
import * as info from "./verbs/info.js";
import * as lifecycle from "./verbs/lifecycle.js";
import * as migrate from "./verbs/migrate.js";
import * as monitor from "./verbs/monitor.js";
import * as nbd from "./verbs/nbd.js";

const program = new Command();
program
  .name("nbdmig")
  .description("Live migration of QEMU/KVM virtual machines with local disks, copied over NBD")
  .version(VERSION)
  .option("-c, --connect <uri>", "agent to talk to: nbdmig://HOST:PORT (default: the local agent)")
  .option("--token-file <file>", "API token file (default: <state dir>/token)")
  .exitOverride()
  .configureOutput({ writeErr: (s) => process.stderr.write(s) })
  .showSuggestionAfterError(true);

for (const m of [daemon, define, lifecycle, info, migrate, monitor, nbd]) m.register(program);
for (const c of program.commands) c.exitOverride();

try {
  if (process.argv.length <= 2) {
    program.outputHelp({ error: true });
    throw new UsageError("no verb given; see the list above");
  }
  await program.parseAsync(process.argv);
} catch (err) {
  process.exitCode = exitCodeFor(err);
}

function exitCodeFor(err: unknown): number {
  if (err instanceof CommanderError) {
    if (
      err.code === "commander.helpDisplayed" ||
      err.code === "commander.version" ||
      err.code === "commander.help"
    )
      return 0;
    // commander already printed the message; add where to look.
    process.stderr.write("(run 'nbdmig --help' or 'nbdmig VERB --help' for usage)\n");
    return 2;
  }
  if (err instanceof UsageError) {
    process.stderr.write(`error: ${err.message}\n`);
    return 2;
  }
  if (err instanceof MigrationError || err instanceof AgentError || err instanceof NbdmigError) {
    process.stderr.write(`error: ${err.message}\n`);
    return 1;
  }
  process.stderr.write(`error: ${(err as Error)?.stack ?? String(err)}\n`);
  return 1;
}
