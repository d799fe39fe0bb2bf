/**
 * Fault points for the fault tests, named in an agent's environment: `NBDMIG_FAILPOINTS=NAME,...` makes it
 * SIGKILL itself when it reaches `failpoint(NAME)`, as a crash or an OOM kill would, at a place a test can
 * name instead of a moment it must hit; `NAME=sleep:MS` makes `await holdpoint(NAME)` wait that long there
 * (time for a test to cut a link at that point); `NAME=wait:DIR` makes it write `DIR/NAME.reached` and wait
 * until the test creates `DIR/NAME.go` (for a step the test must take at exactly that point, however slow
 * the machine). Unset, as always outside tests, each is a Map lookup.
 */
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

const armed = new Map(
  (process.env.NBDMIG_FAILPOINTS ?? "")
    .split(",")
    .map((s) => s.trim())
    .filter(Boolean)
    .map((s) => {
      const [name, action] = s.split("=", 2);
      return [name!, action ?? "kill"] as const;
    }),
);

export function failpoint(name: string): void {
  if (armed.get(name) !== "kill") return;
  fs.writeSync(2, `nbdmig: failpoint ${name}: SIGKILL\n`);
  process.kill(process.pid, "SIGKILL");
}

export async function holdpoint(name: string): Promise<void> {
  const action = armed.get(name) ?? "";
  const w = /^wait:(.+)$/.exec(action);
  if (w) {
    const [reached, go] = [path.join(w[1]!, `${name}.reached`), path.join(w[1]!, `${name}.go`)];
    fs.writeSync(2, `nbdmig: failpoint ${name}: waiting for ${go}\n`);
    fs.writeFileSync(reached, "");
    while (!fs.existsSync(go)) await sleep(50);
    fs.rmSync(reached, { force: true });
    fs.rmSync(go, { force: true });
    return;
  }
  const m = /^sleep:(\d+)$/.exec(action);
  if (!m) return;
  fs.writeSync(2, `nbdmig: failpoint ${name}: sleeping ${m[1]} ms\n`);
  await sleep(Number(m[1]));
}
