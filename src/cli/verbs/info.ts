/** list, dominfo, dumpxml, domblklist, domblkinfo, console: read-only views shaped like virsh's. */
import type { Command } from "commander";
import { UsageError } from "../../errors.js";
import { keyValues, table } from "../../util/format.js";
import { agentFrom, enc, out } from "../context.js";

interface IfaceInfo {
  interface: string | null;
  type: string;
  source: string | null;
  model: string;
  mac: string;
}

interface ListEntry {
  id: number | null;
  name: string;
  state: string;
  persistent: boolean;
}

export function register(program: Command): void {
  program
    .command("list")
    .description("list domains (running ones; --all adds inactive ones)")
    .option("--all", "include inactive domains")
    .option("--inactive", "only inactive domains")
    .option("--name", "print names only")
    .action(async (o: { all?: boolean; inactive?: boolean; name?: boolean }, cmd: Command) => {
      const { domains } = await agentFrom(cmd).call<{ domains: ListEntry[] }>("GET", "/v1/domains");
      const shown = domains.filter((d) =>
        o.inactive ? d.state === "shut off" : o.all || d.state !== "shut off",
      );
      if (o.name) {
        out(shown.map((d) => d.name + "\n").join("") + "\n");
        return;
      }
      out(
        table(
          ["Id", "Name", "State"],
          shown.map((d) => [d.id === null ? "-" : String(d.id), d.name, d.state]),
        ) + "\n",
      );
    });

  program
    .command("dominfo")
    .description("show a domain's basic information")
    .argument("<domain>")
    .action(async (name: string, _o, cmd: Command) => {
      const i = await agentFrom(cmd).call<Record<string, unknown>>("GET", `/v1/domains/${enc(name)}`);
      out(
        keyValues([
          ["Id", i.id === null ? "-" : String(i.id)],
          ["Name", String(i.name)],
          ["UUID", String(i.uuid)],
          ["OS Type", "hvm"],
          ["State", String(i.state)],
          ["CPU(s)", String(i.vcpus)],
          ["Max memory", `${String(i.maxMemoryKiB)} KiB`],
          ["Used memory", `${String(i.usedMemoryKiB)} KiB`],
          ["Persistent", i.persistent ? "yes" : "no"],
          ["Autostart", "disable"],
          ["Accelerator", i.accel === null ? "-" : String(i.accel)],
          ["Job", i.job === null ? "none" : String(i.job)],
        ]) + "\n",
      );
    });

  program
    .command("dumpxml")
    .description("print a domain's XML")
    .argument("<domain>")
    .option("--inactive", "the persistent definition rather than the running one")
    .action(async (name: string, o: { inactive?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ xml: string }>(
        "GET",
        `/v1/domains/${enc(name)}/xml${o.inactive ? "?inactive=1" : ""}`,
      );
      out(r.xml);
    });

  program
    .command("domblklist")
    .description("list a domain's disks")
    .argument("<domain>")
    .option("--details", "also show type and device")
    .action(async (name: string, o: { details?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{
        disks: { type: string; device: string; target: string; source: string | null }[];
      }>("GET", `/v1/domains/${enc(name)}/disks`);
      const rows = r.disks.map((d) =>
        o.details ? [d.type, d.device, d.target, d.source ?? "-"] : [d.target, d.source ?? "-"],
      );
      out(table(o.details ? ["Type", "Device", "Target", "Source"] : ["Target", "Source"], rows) + "\n");
    });

  program
    .command("domiflist")
    .description("list a domain's network interfaces (tap, type, source, model, MAC)")
    .argument("<domain>")
    .action(async (name: string, _o, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ interfaces: IfaceInfo[] }>(
        "GET",
        `/v1/domains/${enc(name)}/interfaces`,
      );
      out(
        table(
          ["Interface", "Type", "Source", "Model", "MAC"],
          r.interfaces.map((i) => [i.interface ?? "-", i.type, i.source ?? "-", i.model, i.mac]),
        ) + "\n",
      );
    });

  program
    .command("domdisplay")
    .description("show the URI of a domain's graphical display")
    .argument("<domain>")
    .action(async (name: string, _o, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ graphics: { type: string; listen: string; port?: number }[] }>(
        "GET",
        `/v1/domains/${enc(name)}/interfaces`,
      );
      const g = r.graphics.find((x) => x.port !== undefined && x.listen !== "none");
      if (!g?.port)
        throw new UsageError(`domain '${name}' has no display that is listening (is it running?)`);
      const host = g.listen === "0.0.0.0" || g.listen === "::" ? "localhost" : g.listen;
      out(
        `${g.type}://${host.includes(":") ? `[${host}]` : host}:${g.type === "vnc" ? g.port - 5900 : g.port}\n`,
      );
    });

  program
    .command("domblkinfo")
    .description("show a disk's capacity, allocation and physical size in bytes")
    .argument("<domain>")
    .argument("<disk>", "target (vda) or source path")
    .option("--human", "human-readable sizes")
    .action(async (name: string, disk: string, o: { human?: boolean }, cmd: Command) => {
      const r = await agentFrom(cmd).call<{ capacity: number; allocation: number; physical: number }>(
        "GET",
        `/v1/domains/${enc(name)}/disks/${enc(disk)}`,
      );
      const f = (n: number) => (o.human ? humanSize(n) : String(n));
      out(
        keyValues([
          ["Capacity", f(r.capacity)],
          ["Allocation", f(r.allocation)],
          ["Physical", f(r.physical)],
        ]) + "\n",
      );
    });

  program
    .command("console")
    .description("print the guest's serial console output (non-interactive; the log the agent keeps)")
    .argument("<domain>")
    .option("--bytes <n>", "how much of the end of the log", "65536")
    .action(async (name: string, o: { bytes: string }, cmd: Command) => {
      if (!/^\d+$/.test(o.bytes)) throw new UsageError(`--bytes takes a whole number, not '${o.bytes}'`);
      const r = await agentFrom(cmd).call<{ text: string }>(
        "GET",
        `/v1/domains/${enc(name)}/console?bytes=${o.bytes}`,
      );
      out(r.text);
    });
}

function humanSize(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(3)} ${units[i]}`;
}
