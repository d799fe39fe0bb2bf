/**
 * Begin: which disks move, and the cookie that tells the destination what to prepare. A disk is copied
 * unless it is shareable, read-only or has no source; `--migrate-disks` picks exactly the listed ones.
 */
import { UsageError } from "../errors.js";
import { isMigratableDisk, type DiskDef, type DomainDef } from "../domain/model.js";
import { backingChain } from "../qemu/img.js";
import { sha256File } from "../util/hash.js";
import type { CookieDisk } from "./schemas.js";

export type { CookieDisk, MigrationCookie, StoragePath } from "./schemas.js";

export function selectDisks(def: DomainDef, migrateDisks?: string[]): DiskDef[] {
  if (!migrateDisks) return def.disks.filter(isMigratableDisk);
  const out: DiskDef[] = [];
  for (const t of migrateDisks) {
    const d = def.disks.find((x) => x.target === t);
    if (!d) {
      throw new UsageError(
        `--migrate-disks: domain '${def.name}' has no disk '${t}'; its disks are: ${def.disks.map((x) => x.target).join(", ")}`,
      );
    }
    if (!isMigratableDisk(d)) {
      const why = d.source === undefined ? "has no source" : d.shareable ? "is shareable" : "is read-only";
      throw new UsageError(
        `--migrate-disks: disk '${t}' ${why}; such disks are never copied (leave it out of the list)`,
      );
    }
    if (out.includes(d)) throw new UsageError(`--migrate-disks: disk '${t}' is listed twice`);
    out.push(d);
  }
  return out;
}

/**
 * --copy-storage-inc: a disk whose image has a backing chain moves as its top image only ("top" mode),
 * the destination needing the same chain at the same paths (with `verifyBacking`, of the same content by
 * sha256); a disk without one is copied whole.
 */
export async function copyTopOnly(disk: CookieDisk, verifyBacking: boolean, notes: string[]): Promise<void> {
  const chain = await backingChain(disk.source);
  const top = chain[0]!;
  if (!(chain.length > 1 && top.backingFilename && top.backingFormat)) {
    notes.push(`disk ${disk.target}: no backing chain, copied whole`);
    return;
  }
  disk.mode = "top";
  disk.allocated = top.actualSize;
  disk.backing = { file: top.backingFilename, format: top.backingFormat };
  disk.chain = [];
  for (const c of chain.slice(1)) {
    disk.chain.push({
      path: c.filename,
      format: c.format,
      virtualSize: c.virtualSize,
      sha256: verifyBacking ? await sha256File(c.filename) : undefined,
    });
  }
  notes.push(
    `disk ${disk.target}: copying only the top image; ${chain.length - 1} backing file(s) must be on the destination`,
  );
}

/** What a destination's facts lack for these interfaces and this machine type (Begin's early refusal). */
export function destinationLacks(
  def: DomainDef,
  facts: {
    network?: { bridges: string[]; networks: Record<string, string>; links: string[] };
    machines?: string[];
  },
): string[] {
  const lacks: string[] = [];
  const n = facts.network;
  if (n) {
    for (const i of def.interfaces) {
      if (i.type === "bridge" && !n.bridges.includes(i.source!))
        lacks.push(`interface ${i.mac}: bridge '${i.source}' does not exist there (create it there first)`);
      else if (i.type === "network") {
        const br = n.networks[i.source!];
        if (!br)
          lacks.push(
            `interface ${i.mac}: network '${i.source}' is not known there (its agent needs --network ${i.source}=BRIDGE)`,
          );
        else if (!n.bridges.includes(br))
          lacks.push(
            `interface ${i.mac}: network '${i.source}' maps to bridge '${br}', which does not exist there (create it, or map the network to another bridge there)`,
          );
      } else if (i.type === "direct" && !n.links.includes(i.source!))
        lacks.push(
          `interface ${i.mac}: host link '${i.source}' (macvtap) does not exist there (a direct interface needs a link of the same name on every host)`,
        );
    }
  }
  if (facts.machines && def.os.machine && !facts.machines.includes(def.os.machine))
    lacks.push(
      `its QEMU has no machine type ${def.os.machine}, which the guest runs with (migrate to a host whose QEMU has it; a guest keeps its machine type while it runs)`,
    );
  return lacks;
}
