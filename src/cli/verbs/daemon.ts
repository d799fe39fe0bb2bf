import { DISK_LAYOUTS, type DiskLayout } from "../../domain/qemu-args.js";
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
    .option(
      "--no-nbd",
      "never serve NBD for incoming storage copies (disks then travel in the migration stream, where QEMU can)",
    )
    .option(
      "--disk-layout <auto|drive|blockdev>",
      "how QEMU attaches disks: drive = named BlockBackends (needed for in-stream storage migration), blockdev = -blockdev only; auto = drive where this QEMU has block migration",
      "auto",
    )
    .option(
      "--network <name=bridge>",
      "map a libvirt network name to a host bridge (repeatable); 'default' maps to virbr0 when that bridge exists",
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option(
      "--pool <name=dir>",
      "a libvirt directory storage pool for <disk type='volume'> (repeatable); 'default' is /var/lib/libvirt/images when it exists",
      (v: string, prev: string[]) => [...prev, v],
      [] as string[],
    )
    .option("--log-level <level>", "trace, debug, info, warn, error", "info")
    .action(
      async (
        o: {
          listen: string;
          stateDir: string;
          accel: string;
          nbd: boolean;
          diskLayout: string;
          logLevel: string;
          network: string[];
          pool: string[];
        },
        cmd: Command,
      ) => {
        if (!["auto", "kvm", "tcg"].includes(o.accel))
          throw new UsageError(`--accel takes auto, kvm or tcg, not '${o.accel}'`);
        if (!["auto", ...DISK_LAYOUTS].includes(o.diskLayout))
          throw new UsageError(`--disk-layout takes auto, drive or blockdev, not '${o.diskLayout}'`);
        if (!["trace", "debug", "info", "warn", "error"].includes(o.logLevel)) {
          throw new UsageError(`--log-level takes trace, debug, info, warn or error, not '${o.logLevel}'`);
        }
        await runDaemon({
          listen: o.listen,
          stateDir: o.stateDir,
          // The program-level --token-file (the CLI's) has the same name and takes the option wherever it
          // stands, so the daemon's own comes through the merged options.
          tokenFile: (cmd.optsWithGlobals() as { tokenFile?: string }).tokenFile,
          accel: o.accel as "auto" | "kvm" | "tcg",
          noNbd: !o.nbd,
          diskLayout: o.diskLayout as "auto" | DiskLayout,
          logLevel: o.logLevel,
          networks: o.network,
          pools: o.pool,
        });
      },
    );
}
