/** The migration state machines and what each side writes down before it acts (no QEMU needed). */
import assert from "node:assert/strict";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { describe, it } from "node:test";
import pino from "pino";
import { OutgoingRecords, persistPhases, type OutgoingRecord } from "../src/migration/handoff.js";
import { destMachine, sourceMachine } from "../src/migration/phases.js";

const base: Omit<OutgoingRecord, "phase"> = {
  name: "vm1",
  pid: 4242,
  dest: "nbdmig://198.18.0.2:7800",
  id: "c001a21c-a2ec-4645-aa0d-9ffd573f0f4b",
  wasRunning: true,
  stream: false,
  undefineSource: false,
  startedAt: 1,
};

describe("migration phases", () => {
  it("a source writes each phase before the engine acts in it, and removes the record at the end", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-phases-"));
    const records = new OutgoingRecords(dir);
    const m = sourceMachine();
    const seen: string[] = [];
    persistPhases(m, records, () => base);
    const wrap = m.onEnter!;
    m.onEnter = (p) => {
      wrap(p);
      // What is on disk when the machine enters p: p itself (the machine has not moved yet).
      seen.push(`${records.load("vm1")?.phase ?? "none"}@${m.phase}`);
    };
    for (const p of ["prepare", "perform:mirror", "perform:memory", "perform:switchover", "finish"] as const)
      m.advance(p);
    assert.deepEqual(seen, [
      "prepare@begin",
      "perform:mirror@prepare",
      "perform:memory@perform:mirror",
      "perform:switchover@perform:memory",
      "finish@perform:switchover",
    ]);
    m.advance("finish:unknown");
    m.advance("unsettled");
    assert.equal(records.load("vm1")?.phase, "unsettled", "an open outcome keeps its record");
    m.advance("confirm");
    m.advance("completed");
    assert.equal(records.load("vm1"), undefined);
    assert.deepEqual(fs.readdirSync(dir), []);
  });

  it("refuses what the handoff forbids", () => {
    const m = sourceMachine("finish");
    assert.throws(() => m.advance("completed"), /illegal migration transition finish -> completed/);
    const d = destMachine();
    d.advance("prepared");
    d.advance("finish");
    d.advance("resume");
    // A destination that decided to resume never goes back to cleaning up.
    assert.throws(() => d.advance("cleanup"), /illegal migration transition resume -> cleanup/);
  });

  it("skips records it cannot read, and says so", () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-phases-"));
    fs.writeFileSync(path.join(dir, "bad.json"), JSON.stringify({ name: "x", phase: "flying" }));
    const records = new OutgoingRecords(dir);
    records.save({ ...base, phase: "perform:mirror" });
    const logged: unknown[] = [];
    const log = pino({ level: "error" }, { write: (s: string) => void logged.push(JSON.parse(s)) });
    assert.deepEqual(
      records.all(log).map((r) => r.name),
      ["vm1"],
    );
    assert.equal(logged.length, 1);
    assert.match(JSON.stringify(logged[0]), /not an outgoing migration record/);
  });
});
