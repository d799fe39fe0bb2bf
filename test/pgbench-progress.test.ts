/** pgbench's progress lines as the database tests, the demo and the benchmark read them. */
import assert from "node:assert/strict";
import { describe, it } from "node:test";
import {
  describeRun,
  failedTransactions,
  longestStall,
  parseProgress,
  tpsBetween,
} from "../src/testbed/db-guest.js";

// As pgbench 15 prints them with -P 1 --progress-timestamp (and a client that lost its connection).
const STDERR = `pgbench (15.18 (Debian 15.18-0+deb12u1))
progress: 1764640001.004 s, 30.0 tps, lat 130.123 ms stddev 20.456, 0 failed
progress: 1764640002.004 s, 0.0 tps, lat 0.000 ms stddev 0.000, 0 failed
progress: 1764640003.004 s, 0.0 tps, lat NaN ms stddev NaN, 0 failed
progress: 1764640004.004 s, 12.0 tps, lat 900.000 ms stddev 10.000, 2 failed
pgbench: error: client 2 aborted in command 4 (SQL) of script 0; perhaps the backend died while processing
progress: 1764640005.004 s, 40.0 tps, lat 100.000 ms stddev 1.000, 0 failed
`;

describe("pgbench progress", () => {
  const p = parseProgress(STDERR);
  it("reads every progress line, with its time, TPS, latency and failures", () => {
    assert.equal(p.length, 5);
    assert.deepEqual(p[0], { at: 1764640001004, tps: 30, latMs: 130.123, failed: 0 });
    assert.ok(Number.isNaN(p[2]!.latMs));
    assert.equal(failedTransactions({ progress: p, aborted: [], stderr: STDERR, ranToTheEnd: true }), 2);
  });
  it("finds the longest run of seconds without a transaction, and the slowest second", () => {
    assert.deepEqual(longestStall(p, 0, Infinity), { seconds: 2, at: 1764640001004, minTps: 0 });
    assert.deepEqual(longestStall(p, 1764640003004, Infinity), { seconds: 0, at: 1764640003004, minTps: 12 });
    assert.ok(Number.isNaN(longestStall(p, 1764640009000, Infinity).minTps), "no seconds: no slowest one");
  });
  it("averages TPS over the seconds that ended inside a window", () => {
    assert.equal(tpsBetween(p, 1764640003004, 1764640005004), 26);
    assert.ok(Number.isNaN(tpsBetween(p, 0, 1)));
    const [line] = describeRun({ progress: p, aborted: [], stderr: "", ranToTheEnd: true }, [
      { name: "during", from: 1764640001004, to: 1764640004004 },
    ]);
    assert.match(
      line!,
      /^during \(3\.0 s\): 4\.0 tps, slowest second 0\.0 tps, worst second's mean latency 900 ms, longest stall 2 s$/,
    );
  });
});
