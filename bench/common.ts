/** What both benchmarks need: the CLI inside a test host, the reference image, a median. */
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import type { Testbed } from "../src/testbed/testbed.js";

export function nbdmig(
  tb: Testbed,
  host: "a" | "b",
  args: string[],
): { status: number; stdout: string; stderr: string } {
  return tb[host].cli(args);
}

/** The CLI's output, or an error when it fails. */
export function nbdmigOk(tb: Testbed, host: "a" | "b", args: string[]): string {
  return tb[host].cliOk(args);
}

/** A 2 GiB qcow2 with 512 MiB of random data at its start, in a host's image directory. */
export function referenceImage(tb: Testbed, host: "a" | "b", name: string): string {
  const file = path.join(tb[host].imagesDir, name);
  execFileSync("qemu-img", ["create", "-q", "-f", "qcow2", file, "2G"]);
  const fill = path.join(tb.dir, "fill.bin");
  if (!fs.existsSync(fill)) execFileSync("sh", ["-c", `head -c 512M /dev/urandom > ${fill}`]);
  execFileSync("qemu-io", ["-f", "qcow2", "-c", `write -s ${fill} 0 512M`, file], { stdio: "ignore" });
  return file;
}

export const median = (xs: number[]): number =>
  xs.length ? [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]! : 0;
