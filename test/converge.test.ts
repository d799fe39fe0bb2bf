/**
 * Storage convergence: a guest that writes faster than the link copies still migrates with `auto` and
 * `throttle`; the write cap never outlives the job, and a domain's own <iotune> limit survives it.
 */
import assert from "node:assert/strict";
import { after, afterEach, before, describe, it } from "node:test";
import { Testbed } from "../src/testbed/testbed.js";
import { available, need, testGuest } from "./helpers/env.js";
import {
  assertDestClean,
  assertSourceIntact,
  compare,
  destroyAll,
  IMG,
  jobOf,
  makeImage,
  migrateInBackground,
  MIGRATION_TOOLS,
  nbdmig,
  startGuest,
} from "./helpers/migration.js";
import { waitFor } from "./helpers/wait.js";

const MiB = 1024 * 1024;

interface Job {
  phase: string;
  status: string;
  convergence?: { mode: string; writeCapBps: number | null };
}

describe("storage convergence under a guest writing faster than the link", { timeout: 900_000 }, () => {
  let tb: Testbed | undefined;
  let guest: { kernel: string; initrd: string };

  before(async () => {
    if (!available(MIGRATION_TOOLS, true)) return;
    guest = testGuest();
    // 200 Mbit/s (about 24 MiB/s) against a guest writing as fast as it can (30-40 MiB/s under TCG here).
    tb = await Testbed.up({ rate: "200mbit" });
  });
  after(async () => tb?.down());
  afterEach(async () => tb && destroyAll(tb, ["a", "b"]));

  /** The disk's current I/O limits, from query-block on the given host. */
  async function limits(host: "a" | "b", name: string): Promise<{ bps: number; bps_wr: number }> {
    const r = await tb![host]
      .client()
      .call<{ result: { inserted?: { "node-name": string; bps: number; bps_wr: number } }[] }>(
        "POST",
        `/v1/domains/${name}/monitor`,
        { command: '{"execute":"query-block"}' },
      );
    const vda = r.result.find((b) => b.inserted?.["node-name"] === "vda")!.inserted!;
    return { bps: vda.bps, bps_wr: vda.bps_wr };
  }

  async function fastWriter(name: string, writeBps?: number): Promise<number> {
    makeImage(tb!, "a", { name: `${name}.qcow2`, size: "1G", fillMiB: 32 });
    return startGuest(
      tb!,
      { name, rate: 0, span: 256, disks: [{ target: "vda", source: `${IMG}/${name}.qcow2`, writeBps }] },
      guest,
    );
  }

  // (throttle is tested with a domain's own limit, further down.)
  it("completes with --storage-converge auto, data identical, and no cap left on the destination", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const name = "conv-auto";
    await fastWriter(name);
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--storage-converge",
      "auto",
      name,
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(
      compare(`${tb!.a.imagesDir}/${name}.qcow2`, `${tb!.b.imagesDir}/${name}.qcow2`),
      "Images are identical.",
    );
    assert.deepEqual(
      await limits("b", name),
      { bps: 0, bps_wr: 0 },
      "the destination starts with the domain's own (no) limits",
    );
    const job = JSON.parse(nbdmig(tb!, "a", ["domjobinfo", name, "--completed", "--json"]).stdout) as Job & {
      downtimeMs: number;
      elapsedMs: number;
    };
    assert.equal(job.convergence?.mode, "auto");
    t.diagnostic(`auto: total ${job.elapsedMs} ms, downtime ${job.downtimeMs} ms`);
  });

  it("gives the source back exactly its limits after domjobabort mid-throttle, keeping its own <iotune>", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const own = 200 * MiB;
    const pid = await fastWriter("conv-abort", own);
    assert.deepEqual(
      await limits("a", "conv-abort"),
      { bps: 0, bps_wr: own },
      "the domain's own limit is in place",
    );
    const run = migrateInBackground(tb!, [
      "--live",
      "--copy-storage-all",
      "--storage-converge",
      "throttle",
      "conv-abort",
      tb!.b.uri,
    ]);
    await waitFor(
      "the write cap",
      async () => {
        const j = await jobOf<Job>(tb!, "conv-abort");
        return j?.phase === "perform:mirror" && (j.convergence?.writeCapBps ?? 0) > 0;
      },
      120_000,
      200,
    );
    const capped = await limits("a", "conv-abort");
    assert.ok(
      capped.bps_wr > 0 && capped.bps_wr < own,
      `capped below the domain's own limit: ${capped.bps_wr}`,
    );
    assert.equal(nbdmig(tb!, "a", ["domjobabort", "conv-abort"]).status, 0);
    assert.equal((await run.done).status, 1);
    assert.deepEqual(await limits("a", "conv-abort"), { bps: 0, bps_wr: own }, "exactly the original limits");
    await assertSourceIntact(tb!, "conv-abort", pid);
    await assertDestClean(tb!, "conv-abort", ["conv-abort.qcow2"]);
  });

  it("completes with --storage-converge throttle, data identical, and the destination has the domain's own <iotune> limit, not the cap", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    // 200 MiB/s: far above what the guest writes, so the link (24 MiB/s) still needs the cap.
    const own = 200 * MiB;
    await fastWriter("conv-own", own);
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--suspend",
      "--storage-converge",
      "throttle",
      "conv-own",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(
      await limits("b", "conv-own"),
      { bps: 0, bps_wr: own },
      "the destination has the domain's own limit, not the cap",
    );
    assert.equal(
      compare(`${tb!.a.imagesDir}/conv-own.qcow2`, `${tb!.b.imagesDir}/conv-own.qcow2`),
      "Images are identical.",
    );
    const job = JSON.parse(
      nbdmig(tb!, "a", ["domjobinfo", "conv-own", "--completed", "--json"]).stdout,
    ) as Job & { downtimeMs: number; elapsedMs: number };
    assert.equal(job.convergence?.mode, "throttle");
    t.diagnostic(`throttle: total ${job.elapsedMs} ms, downtime ${job.downtimeMs} ms`);
  });

  it("--storage-converge none never converges on its own; --timeout suspends the guest so it does", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    await fastWriter("conv-timeout");
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--storage-converge",
      "none",
      "--timeout",
      "10",
      "--timeout-suspend",
      "conv-timeout",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 0, r.stderr);
    const job = JSON.parse(
      nbdmig(tb!, "a", ["domjobinfo", "conv-timeout", "--completed", "--json"]).stdout,
    ) as { elapsedMs: number; suspendedByTimeout: boolean };
    assert.equal(job.suspendedByTimeout, true);
    assert.ok(job.elapsedMs > 10_000);
    // The guest was running before the migration, so it runs on the destination.
    assert.match(nbdmig(tb!, "b", ["dominfo", "conv-timeout"]).stdout, /State:\s+running/);
  });

  it("explains a bad --storage-converge", async (t) => {
    if (!need(t, MIGRATION_TOOLS, true)) return;
    const r = nbdmig(tb!, "a", [
      "migrate",
      "--live",
      "--copy-storage-all",
      "--storage-converge",
      "magic",
      "x",
      tb!.b.uri,
    ]);
    assert.equal(r.status, 2);
    assert.match(r.stderr, /--storage-converge takes auto, throttle, sync or none, not 'magic'/);
    const both = nbdmig(tb!, "a", [
      "migrate",
      "--copy-storage-all",
      "--storage-converge",
      "none",
      "--copy-storage-synchronous-writes",
      "x",
      tb!.b.uri,
    ]);
    assert.equal(both.status, 2);
    assert.match(both.stderr, /--copy-storage-synchronous-writes means --storage-converge sync/);
  });
});
