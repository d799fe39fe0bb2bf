/** start, destroy, shutdown, suspend, resume, undefine: one call each, virsh's wording. */
import type { Command } from "commander";
import { UsageError } from "../../errors.js";
import { agentFrom, enc, out } from "../context.js";

const VERBS: { verb: string; method: string; path: string; done: string; help: string }[] = [
  { verb: "start", method: "POST", path: "start", done: "started", help: "start a defined domain" },
  {
    verb: "destroy",
    method: "POST",
    path: "destroy",
    done: "destroyed",
    help: "stop a domain at once (kills QEMU)",
  },
  {
    verb: "shutdown",
    method: "POST",
    path: "shutdown",
    done: "is being shutdown",
    help: "ask the guest to power off (ACPI)",
  },
  { verb: "suspend", method: "POST", path: "suspend", done: "suspended", help: "pause a running domain" },
  { verb: "resume", method: "POST", path: "resume", done: "resumed", help: "resume a paused domain" },
  {
    verb: "undefine",
    method: "DELETE",
    path: "",
    done: "has been undefined",
    help: "remove a domain's persistent definition",
  },
];

export function register(program: Command): void {
  for (const v of VERBS) {
    const c = program
      .command(v.verb)
      .description(v.help)
      .argument("<domain>", "domain name")
      .action(
        async (
          name: string,
          o: { paused?: boolean; nvram?: boolean; keepNvram?: boolean; keepTpm?: boolean },
          cmd: Command,
        ) => {
          if (o.nvram && o.keepNvram) throw new UsageError("--nvram and --keep-nvram exclude each other");
          const body =
            v.verb === "start"
              ? { paused: o.paused === true }
              : v.verb === "undefine"
                ? {
                    nvram: o.nvram ? "remove" : o.keepNvram ? "keep" : undefined,
                    keepTpm: o.keepTpm === true,
                  }
                : {};
          await agentFrom(cmd).call(v.method, `/v1/domains/${enc(name)}${v.path ? `/${v.path}` : ""}`, body);
          out(`Domain '${name}' ${v.done}\n\n`);
        },
      );
    if (v.verb === "start") c.option("--paused", "leave the guest paused after start");
    if (v.verb === "undefine") {
      c.option("--nvram", "also remove the domain's UEFI NVRAM file");
      c.option("--keep-nvram", "keep the domain's UEFI NVRAM file");
      c.option("--keep-tpm", "keep the domain's TPM state");
    }
  }
}
