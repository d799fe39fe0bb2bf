import type { Command } from "commander";
import { agentFrom, enc, out } from "../context.js";

export function register(program: Command): void {
  program
    .command("qemu-monitor-command")
    .description("send a QMP command (JSON) or, with --hmp, a human monitor command to a domain's QEMU")
    .argument("<domain>")
    .argument("<command...>", 'e.g. \'{"execute":"query-status"}\' or, with --hmp, "info block"')
    .option("--hmp", "the command is HMP text")
    .option("--pretty", "indent JSON output")
    .action(async (name: string, words: string[], o: { hmp?: boolean; pretty?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ result: unknown }>("POST", `/v1/domains/${enc(name)}/monitor`, {
        command: words.join(" "),
        hmp: o.hmp === true,
      });
      if (o.hmp) out(String(r.result));
      else out(JSON.stringify({ return: r.result }, null, o.pretty ? 2 : undefined) + "\n");
    });
}
