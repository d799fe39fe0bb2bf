/** Test prerequisites: in CI a missing tool fails the test; elsewhere the test is skipped with the reason. */
import { execFileSync, spawnSync } from "node:child_process";
import path from "node:path";
import type { TestContext } from "node:test";
import { fileURLToPath } from "node:url";

export const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const cliPath = path.join(repoRoot, "dist/src/cli/main.js");

function have(tool: string): boolean {
  return spawnSync("sh", ["-c", `command -v ${tool}`]).status === 0;
}

/** Whether a suite's shared set-up can run; in CI it always tries (and its tests then fail loudly). */
export function available(tools: string[], root = false): boolean {
  if (process.env.CI === "true") return true;
  return tools.every(have) && (!root || process.getuid?.() === 0);
}

/** Returns false (after skipping) when a prerequisite is missing outside CI; throws inside CI. */
export function need(t: TestContext, tools: string[], root = false): boolean {
  const missing = tools.filter((x) => !have(x));
  const problems = [...missing.map((m) => `'${m}' is not installed`)];
  if (root && process.getuid?.() !== 0) problems.push("root is needed for network namespaces");
  if (problems.length === 0) return true;
  const msg = `${problems.join("; ")} (bash .ci/run installs everything)`;
  if (process.env.CI === "true") throw new Error(`CI=true and ${msg}`);
  t.skip(msg);
  return false;
}

export interface CliResult {
  status: number;
  stdout: string;
  stderr: string;
}

/** Runs the built CLI with argv (optionally prefixed, e.g. by nsenter into a test host). */
export function cli(
  args: string[],
  opts: { prefix?: string[]; env?: Record<string, string>; input?: string } = {},
): CliResult {
  const argv = [...(opts.prefix ?? []), process.execPath, cliPath, ...args];
  const r = spawnSync(argv[0]!, argv.slice(1), {
    encoding: "utf8",
    env: { ...process.env, ...opts.env },
    input: opts.input,
    timeout: 120_000,
  });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Builds (or reuses) the test guest and returns its kernel and initrd paths. */
export function testGuest(): { kernel: string; initrd: string } {
  execFileSync("bash", [path.join(repoRoot, "scripts/build-test-guest.sh")], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  const dir = process.env.NBDMIG_GUEST_DIR ?? path.join(repoRoot, ".cache/test-guest");
  return { kernel: path.join(dir, "vmlinuz"), initrd: path.join(dir, "initrd.img") };
}
