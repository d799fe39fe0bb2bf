/** tls-ca, tls-host: certificates for TLS on the migration channels and the agent API (layout: src/qemu/pki.ts). */
import os from "node:os";
import path from "node:path";
import type { Command } from "commander";
import { stateDirFromEnv } from "../../agent/client.js";
import { checkPki, createCa, issueHost } from "../../qemu/pki.js";
import { out } from "../context.js";

export function register(program: Command): void {
  program
    .command("tls-ca")
    .description("create a CA for a cluster's migration TLS (keep its directory where only you read it)")
    .argument("<dir>", "where ca-cert.pem and ca-key.pem go")
    .option("--name <cn>", "the CA's common name", "nbdmig CA")
    .option("--days <n>", "validity", "3650")
    .action(async (dir: string, o: { name: string; days: string }) => {
      const cert = await createCa(path.resolve(dir), o.name, Number(o.days));
      out(`CA ${cert}: copy it to every host with its certificates ('nbdmig tls-host')\n`);
    });

  program
    .command("tls-host")
    .description("issue a host's server and client certificates, signed by the CA, into its state dir's pki")
    .argument(
      "<names...>",
      "the addresses and DNS names other hosts reach this host by (the first is its CN)",
    )
    .requiredOption("--ca <dir>", "the CA's directory (from 'nbdmig tls-ca')")
    .option("--out <dir>", "where they go (default: <state dir>/pki of this host)")
    .option("--days <n>", "validity", "825")
    .action(async (names: string[], o: { ca: string; out?: string; days: string }) => {
      const dir = path.resolve(o.out ?? path.join(stateDirFromEnv(), "pki"));
      await issueHost(path.resolve(o.ca), dir, names, Number(o.days));
      checkPki(dir, "server", names);
      checkPki(dir, "client");
      out(
        `certificates for ${names.join(", ")} in ${dir}${os.EOL}migrations from and to this host now use TLS by default (--no-tls to opt out)${os.EOL}`,
      );
    });
}
