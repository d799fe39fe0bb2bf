import type { Command } from "commander";
import { runDaemon } from "../../agent/daemon.js";
import { DEFAULT_STATE_DIR } from "../../agent/state-dir.js";
import { UsageError } from "../../errors.js";

export function register(program: Command): void {
  program
    .command("daemon")
    .description("run the host agent (owns this host's domains and QEMU processes)")
    .option("--listen <addr:port>", "address and port of the API", "127.0.0.1:7800")
    .option(
      "--state-dir <dir>",
      "definitions, runtime state, logs, token",
      process.env.NBDMIG_STATE_DIR ?? DEFAULT_STATE_DIR,
    )
    .option(
      "--token-file <file>",
      "use this API token (e.g. one shared by a cluster) instead of <state-dir>/token",
    )
    .option("--accel <auto|kvm|tcg>", "accelerator for QEMU: auto = KVM when it works, else TCG", "auto")
    .option("--no-nbd", "never serve NBD for incoming storage copies")
    .option("--log-level <level>", "trace, debug, info, warn, error", "info")
    .action(
      async (o: {
        listen: string;
        stateDir: string;
        tokenFile?: string;
        accel: string;
        nbd: boolean;
        logLevel: string;
      }) => {
        if (!["auto", "kvm", "tcg"].includes(o.accel))
          throw new UsageError(`--accel takes auto, kvm or tcg, not '${o.accel}'`);
        if (!["trace", "debug", "info", "warn", "error"].includes(o.logLevel)) {
          throw new UsageError(`--log-level takes trace, debug, info, warn or error, not '${o.logLevel}'`);
        }
        await runDaemon({
          listen: o.listen,
          stateDir: o.stateDir,
          tokenFile: o.tokenFile,
          accel: o.accel as "auto" | "kvm" | "tcg",
          noNbd: !o.nbd,
          logLevel: o.logLevel,
        });
      },
    );
}
