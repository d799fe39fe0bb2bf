/**
 * The corpus of ordinary libvirt guests (test/fixtures/domains, see its README) defined and started on a real
 * host: every file is either accepted and starts under QEMU, or refused with an error that names the element
 * and the fix. The host is set up as a real one would be: the bridges, libvirt networks and host links the
 * guests name exist, and their disks (files, LVM-like block devices, backing chains) exist at host paths.
 * The acceptance rate is printed by category (the README's target: at least 90 % of ordinary guests).
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { parseDomainXml } from "../src/domain/xml.js";
import { errorMessage, UsageError } from "../src/errors.js";
import type { DomainDef } from "../src/domain/model.js";
import { Testbed } from "../src/testbed/testbed.js";
import { available, need, repoRoot } from "./helpers/env.js";
import { MIGRATION_TOOLS } from "./helpers/migration.js";

const TOOLS = [...MIGRATION_TOOLS, "losetup", "swtpm", "bridge"];
const DIR = path.join(repoRoot, "test/fixtures/domains");
const FILES = fs
  .readdirSync(DIR)
  .filter((f) => f.endsWith(".xml"))
  .sort();
/** The README's "less ordinary" guests (passthrough, shared filesystems, network disks...), by number. */
const UNUSUAL = new Set(["57", "58", "59", "60", "61", "62", "63"]);

interface Outcome {
  file: string;
  /** "host too small": accepted, but this machine has less memory than the guest (not the definition's fault). */
  result: "started" | "refused" | "host too small" | "failed to start";
  why?: string;
}

/** Every bridge, network and host link the corpus names, so the test host can offer them. */
function corpusNetworks(): {
  bridges: Set<string>;
  networks: Set<string>;
  links: Set<string>;
  pools: Set<string>;
} {
  const bridges = new Set<string>(["virbr0"]);
  const networks = new Set<string>();
  const links = new Set<string>();
  const pools = new Set<string>();
  for (const f of FILES) {
    let def: DomainDef;
    try {
      def = parseDomainXml(fs.readFileSync(path.join(DIR, f), "utf8")).def;
    } catch {
      continue;
    }
    for (const i of def.interfaces) {
      if (i.type === "bridge") bridges.add(i.source!);
      if (i.type === "network") networks.add(i.source!);
      if (i.type === "direct") links.add(i.source!);
    }
    for (const d of def.disks) if (d.volume) pools.add(d.volume.pool);
  }
  return { bridges, networks, links, pools };
}

/** Where the test host keeps libvirt storage pool `p` (a directory pool). */
const poolDir = (p: string) => `/var/lib/nbdmig/pools/${p}`;
/** A bridge name (at most 15 characters) for libvirt network `n`. */
const bridgeFor = (n: string) => (n === "default" ? "virbr0" : `nb-${n}`.slice(0, 15));

describe("the domain XML corpus on a real host", { timeout: 600_000 }, () => {
  let tb: Testbed | undefined;
  const env = corpusNetworks();
  const loops: string[] = [];

  before(async () => {
    if (!available(TOOLS, true)) return;
    const flags = [
      ...[...env.networks].flatMap((n) => ["--network", `${n}=${bridgeFor(n)}`]),
      ...[...env.pools].flatMap((p) => ["--pool", `${p}=${poolDir(p)}`]),
    ];
    tb = await Testbed.up({ agentArgs: { a: flags } });
    for (const p of env.pools) fs.mkdirSync(tb.a.hostPath(poolDir(p)), { recursive: true });
    const ip = (...a: string[]) => execFileSync("ip", ["-n", tb!.a.netns, ...a]);
    for (const br of new Set([...env.bridges, ...[...env.networks].map(bridgeFor)])) {
      if (br === "br0") continue; // the test bed's own
      ip("link", "add", br, "type", "bridge");
      ip("link", "set", br, "up");
    }
    for (const l of env.links) {
      ip("link", "add", l, "type", "veth", "peer", "name", `${l}-peer`.slice(0, 15));
      ip("link", "set", l, "up");
    }
  });
  after(async () => {
    for (const l of loops) execFileSync("losetup", ["-d", l]);
    await tb?.down();
  });

  /**
   * The file as it would be on a host whose disks are where it says: disk images, block devices (loop
   * devices), backing files, NVRAM and channel paths are made under the test host's directories, and the
   * XML's paths point there. Nothing else changes.
   */
  function placeOnHost(f: string, def: DomainDef, xml: string): string {
    const n = f.slice(0, 2);
    const paths = new Map<string, string>();
    const img = (p: string) => `/var/lib/nbdmig/images/c${n}-${path.basename(p)}`;
    for (const d of def.disks) {
      if (d.volume) {
        const vol = tb!.a.hostPath(`${poolDir(d.volume.pool)}/${d.volume.name}`);
        execFileSync("qemu-img", ["create", "-q", "-f", d.format, vol, "64M"]);
      }
      if (d.source === undefined) continue;
      const chain = [...d.backingChain].reverse();
      for (const [i, b] of chain.entries()) {
        const to = img(b.source);
        const below = chain[i - 1];
        execFileSync("qemu-img", [
          "create",
          "-q",
          "-f",
          b.format,
          ...(below ? ["-b", tb!.a.hostPath(img(below.source)), "-F", below.format] : []),
          tb!.a.hostPath(to),
          "64M",
        ]);
        paths.set(b.source, to);
      }
      const top = chain.at(-1);
      const file = tb!.a.hostPath(img(d.source));
      execFileSync("qemu-img", [
        "create",
        "-q",
        "-f",
        d.format,
        ...(top ? ["-b", tb!.a.hostPath(img(top.source)), "-F", top.format] : []),
        file,
        "64M",
      ]);
      if (d.type === "block") {
        const loop = execFileSync("losetup", ["-f", "--show", file], { encoding: "utf8" }).trim();
        loops.push(loop);
        paths.set(d.source, loop);
      } else paths.set(d.source, img(d.source));
    }
    const nv = def.os.firmware.nvram?.path;
    if (nv) paths.set(nv, `/var/lib/nbdmig/nvram/c${n}-${path.basename(nv)}`);
    for (const c of def.channels)
      if (c.path) paths.set(c.path, `/var/lib/nbdmig/run/c${n}-${path.basename(c.path)}`);
    let out = xml;
    for (const [from, to] of [...paths].sort((x, y) => y[0].length - x[0].length)) {
      for (const q of ["'", '"']) out = out.replaceAll(`${q}${from}${q}`, `${q}${to}${q}`);
      out = out.replaceAll(`>${from}<`, `>${to}<`);
    }
    return out;
  }

  it("accepts and starts ordinary guests, and refuses the rest naming the element", async (t) => {
    if (!need(t, TOOLS, true)) return;
    const outcomes: Outcome[] = [];
    for (const f of FILES) {
      const xml = fs.readFileSync(path.join(DIR, f), "utf8");
      let def: DomainDef;
      try {
        def = parseDomainXml(xml).def;
      } catch (err) {
        outcomes.push({ file: f, result: "refused", why: (err as Error).message });
        continue;
      }
      // The API the CLI's define, start, destroy and undefine call, in-process: 280 CLI processes took
      // most of this test's time.
      const api = tb!.a.client();
      const dom = `/v1/domains/${encodeURIComponent(def.name)}`;
      try {
        await api.call("POST", "/v1/domains", { xml: placeOnHost(f, def, xml) });
      } catch (err) {
        assert.ok(err instanceof UsageError, `${f}: a refusal is a usage error: ${String(err)}`);
        outcomes.push({ file: f, result: "refused", why: err.message });
        continue;
      }
      const started = await api.call("POST", `${dom}/start`, { paused: true }).then(
        () => undefined,
        (err: unknown) => errorMessage(err),
      );
      outcomes.push(
        started === undefined
          ? { file: f, result: "started" }
          : /more than .* has \(.* of RAM and swap\)/.test(started)
            ? { file: f, result: "host too small", why: started }
            : { file: f, result: "failed to start", why: started },
      );
      if (started === undefined) await api.call("POST", `${dom}/destroy`, {});
      await api.call("DELETE", dom, { nvram: "remove", keepTpm: false });
    }

    const machineRefusal = (o: Outcome) =>
      /machine type '[^']+' is not supported by this host's QEMU/.test(o.why ?? "");
    const rate = (list: Outcome[]) => {
      const ok = list.filter((o) => o.result === "started" || o.result === "host too small").length;
      return `${ok}/${list.length} (${((100 * ok) / Math.max(1, list.length)).toFixed(0)} %)`;
    };
    const ordinary = outcomes.filter((o) => !UNUSUAL.has(o.file.slice(0, 2)));
    const here = ordinary.filter((o) => !machineRefusal(o));
    for (const o of outcomes)
      t.diagnostic(`${o.result.padEnd(15)} ${o.file}${o.why ? `: ${o.why.slice(0, 240)}` : ""}`);
    t.diagnostic(
      `all ${rate(outcomes)}; ordinary ${rate(ordinary)}; ordinary with a machine type this QEMU has ${rate(here)}`,
    );

    for (const o of outcomes.filter((x) => x.result === "refused")) {
      // A refusal names the element (domain/...) or, for a host that lacks something, what and where.
      assert.match(o.why!, /^(domain\/|domain |XML)|interface |bridge |network /, `${o.file}: ${o.why}`);
    }
    const failed = outcomes.filter((o) => o.result === "failed to start");
    assert.deepEqual(failed, [], "every definition that is accepted starts");
    // The README's target, kept as a guard: at least 90 % of the ordinary guests this QEMU could run.
    const accepted = here.filter((o) => o.result !== "refused").length;
    assert.ok(accepted / here.length >= 0.9, `ordinary guests accepted: ${rate(here)}`);
  });
});
