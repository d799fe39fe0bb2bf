#!/usr/bin/env node
/**
 * The test bed as a command: `up` creates two hosts and waits (Ctrl-C tears them down), `reap` removes
 * every test bed left behind by killed runs.
 */
import { reapStale, Testbed } from "./testbed.js";

const [verb, ...rest] = process.argv.slice(2);
if (verb === "reap") {
  const gone = reapStale(rest.includes("--all"));
  console.log(gone.length ? `removed: ${gone.join(" ")}` : "nothing to remove");
} else if (verb === "up") {
  const rateIdx = rest.indexOf("--rate");
  const tb = await Testbed.up({ rate: rateIdx >= 0 ? rest[rateIdx + 1] : undefined });
  for (const h of tb.hosts) {
    console.log(`host ${h.name}: link ${h.addr}, agent ${h.mgmtUri} (peer URI ${h.uri}), files in ${h.dir}`);
    console.log(`  shell: ${h.execPrefix().join(" ")} bash`);
  }
  console.log(`token file: ${tb.tokenFile}`);
  console.log("Ctrl-C tears everything down.");
  const stop = () => {
    tb.downSync();
    process.exit(0);
  };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
  setInterval(() => undefined, 1 << 30);
} else {
  console.error("usage: node dist/src/testbed/cli.js up [--rate 1gbit] | reap [--all]");
  process.exitCode = 2;
}
