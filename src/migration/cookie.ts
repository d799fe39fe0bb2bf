/**
 * Begin: which disks move, and the cookie that tells the destination what to prepare. A disk is copied
 * unless it is shareable, read-only or has no source; `--migrate-disks` picks exactly the listed ones.
 */
import { UsageError } from "../errors.js";
import { isMigratableDisk, type DiskDef, type DomainDef } from "../domain/model.js";
import type { Accel } from "../domain/qemu-args.js";

export interface CookieDisk {
  target: string;
  source: string;
  format: "raw" | "qcow2";
  virtualSize: number;
  /** Bytes allocated in the source image: what the destination needs room for. */
  allocated: number;
}

export interface MigrationCookie {
  /** The running definition, as domain XML. */
  xml: string;
  name: string;
  uuid: string;
  accel: Accel;
  disks: CookieDisk[];
}

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
