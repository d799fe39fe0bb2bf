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
  /** Bytes allocated in the source image (the top image for "top"): what the destination needs room for. */
  allocated: number;
  /** "full" copies the whole disk; "top" (--copy-storage-inc) only the top image of its backing chain. */
  mode: "full" | "top";
  /** For "top": the backing as written in the top image's header, to precreate the overlay the same way. */
  backing?: { file: string; format: string };
  /** For "top": the chain below the top image, which the destination must already hold. */
  chain?: { path: string; format: string; virtualSize: number; sha256?: string }[];
}

/** How the disks travel: NBD mirrors, inside the migration stream (QEMU block migration), or not at all. */
export type StoragePath = "nbd" | "stream" | "none";

export interface MigrationCookie {
  /** The running definition, as domain XML. */
  xml: string;
  name: string;
  uuid: string;
  accel: Accel;
  disks: CookieDisk[];
  storagePath: StoragePath;
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
