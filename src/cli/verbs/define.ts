import fs from "node:fs";
import type { Command } from "commander";
import { UsageError } from "../../errors.js";
import { agentFrom, out } from "../context.js";

function readXml(file: string): string {
  try {
    return fs.readFileSync(file === "-" ? 0 : file, "utf8");
  } catch (err) {
    throw new UsageError(
      `cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
}

function printWarnings(warnings: string[]): void {
  for (const w of warnings) process.stderr.write(`warning: ${w}\n`);
}

export function register(program: Command): void {
  program
    .command("define")
    .description("define a persistent domain from libvirt domain XML")
    .argument("<file>", "domain XML file ('-' for standard input)")
    .action(async (file: string, _o, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ name: string; warnings: string[] }>("POST", "/v1/domains", {
        xml: readXml(file),
      });
      printWarnings(r.warnings);
      out(`Domain '${r.name}' defined from ${file}\n\n`);
    });
  program
    .command("create")
    .description("start a transient domain from libvirt domain XML")
    .argument("<file>", "domain XML file ('-' for standard input)")
    .option("--paused", "leave the guest paused")
    .action(async (file: string, o: { paused?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ name: string; warnings: string[] }>(
        "POST",
        "/v1/domains/create",
        {
          xml: readXml(file),
          paused: o.paused === true,
        },
      );
      printWarnings(r.warnings);
      out(`Domain '${r.name}' created from ${file}\n\n`);
    });
}
