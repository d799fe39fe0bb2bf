/**
 * `npm run bench`: benchmarks that compare nbdmig with real peers measured in the same run. Needs root (the
 * namespace test bed). `--only migration`, `--runs N` (default 3).
 */
import { migrationBench, type MigrationRow } from "./migration.js";

const args = process.argv.slice(2);
const runs = Number(args[args.indexOf("--runs") + 1] ?? 3) || 3;

function table(headers: string[], rows: string[][]): string {
  const w = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (c: string[]) => "| " + c.map((x, i) => x.padEnd(w[i]!)).join(" | ") + " |";
  return [line(headers), "|" + w.map((n) => "-".repeat(n + 2)).join("|") + "|", ...rows.map(line)].join("\n");
}

const f = (n: number | undefined, d = 1) => (n === undefined ? "-" : n.toFixed(d));

const rows: MigrationRow[] = await migrationBench(runs);
console.log(
  "\nMigration: reference VM (256 MiB RAM, 2 GiB qcow2 with 512 MiB random data, guest writing 20 MiB/s, one shareable disk not copied)\n",
);
console.log(
  table(
    [
      "link",
      "what",
      "total s",
      "to READY s",
      "downtime ms",
      "disk MiB",
      "RAM MiB",
      "on the wire MiB",
      "copy MiB/s",
      "note",
    ],
    rows.map((r) => [
      r.link,
      r.what,
      f(r.totalS, 2),
      f(r.readyS, 2),
      f(r.downtimeMs, 0),
      f(r.diskMiB, 0),
      f(r.ramMiB, 0),
      f(r.wireMiB, 0),
      f(r.rateMiBs, 0),
      r.note ?? "",
    ]),
  ),
);
console.log(`
"copy MiB/s" is the disks' virtual size over the time to READY for nbdmig (zero regions travel as NBD
WRITE_ZEROES, so it can exceed the link), the image size over the copy time for nbdcopy, bytes over time for
TCP. Not measured in this run (libvirt 9.0 on this machine kind, medians of 3, from shared/notes): unshaped
4.7 s total, 162 ms downtime; tbf 1 Gbit/s 9.7 s, 194 ms.`);
