#!/usr/bin/env node
/** nbdmig: the command line. Verbs follow virsh; each lives in its own file under verbs/. */
import os from "node:os";
import { Command, CommanderError } from "commander";
import { AgentError, MigrationError, NbdmigError, UsageError } from "../errors.js";
import { VERSION } from "../version.js";
import { modulesFor, VERB_MODULES } from "./loader.js";

// File I/O runs on libuv's thread pool, created at the first asynchronous file operation (none happens
// while modules load). Two threads per core: on 2 cores, 16 threads served 1 GiB of reads ~15 % slower
// than 4 (more context switches for the same page-cache copies); below 4, writes queue behind flushes.
process.env.UV_THREADPOOL_SIZE ??= String(Math.max(4, 2 * os.availableParallelism()));

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

// Only the verb's own module: every run pays for what it loads (`nbdmig nbd copy` is often timed, and
// `nbdmig migrate` counts in the migration's time).
const argv = process.argv.slice(2);
const modules = modulesFor(firstWord(argv), argv.includes("-V") || argv.includes("--version"));
for (const m of await Promise.all(modules.map((name) => VERB_MODULES[name]()))) m.register(program);
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

/** The verb: the first word that is neither a global option nor its value. */
function firstWord(args: string[]): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const a = args[i]!;
    if (a === "-c" || a === "--connect" || a === "--token-file") i++;
    else if (!a.startsWith("-")) return a;
  }
  return undefined;
}
