/**
 * `--verify`: proof that a disk's copy on the destination equals the source's image, block by block over
 * NBD (what both sides report as zero is not read). Offline it runs after each disk's copy; live, with
 * `--suspend`, once the stream has completed and both copies are paused, before Finish.
 *
 * The source's image is read as a file (raw) or through a read-only qemu-nbd (qcow2, whose guest-visible
 * content is what counts; with its backing chain, so a `--copy-storage-inc` overlay is compared as the guest
 * sees it on both sides).
 */
import path from "node:path";
import { MigrationError } from "../errors.js";
import { compareImages } from "../nbd/client/copy.js";
import { serveWithQemuNbd } from "../qemu/nbd-export.js";
import { formatBytes } from "../util/format.js";
import { holdpoint } from "../util/failpoint.js";
import type { CookieDisk } from "./schemas.js";

/** A source image opened for reading by the copy engine: its NBD URI or file path, and how to close it. */
export interface SourceImage {
  uri: string;
  close(): Promise<void>;
}

/**
 * Opens a source disk for reading: a raw image as its file, a qcow2 one through qemu-nbd on a Unix socket
 * in `dir` (with qemu:allocation-depth for a "top" disk, whose top image alone is copied).
 */
export async function openSourceImage(d: CookieDisk, dir: string, domain: string): Promise<SourceImage> {
  if (d.format !== "qcow2") return { uri: d.source, close: () => Promise.resolve() };
  return serveWithQemuNbd({
    file: d.source,
    format: "qcow2",
    name: d.target,
    at: { socket: path.join(dir, `${domain}-${d.target}.sock`) },
    readonly: true,
    allocationDepth: d.mode === "top",
    runDir: dir,
  });
}

export interface Verified {
  comparedBytes: number;
  skippedBytes: number;
}

/**
 * Compares disk `target` at `src` (the source) with `dst` (the destination's export); a difference throws
 * E_VERIFY, `outcome` saying what becomes of the copy. `notes` gets the result.
 */
export async function verifyDisk(
  target: string,
  src: string,
  dst: string,
  opts: { signal?: AbortSignal; outcome: string; notes: string[] },
): Promise<Verified> {
  await holdpoint("source:before-verify");
  const c = await compareImages(src, dst, { signal: opts.signal });
  if (c.mismatchAt !== undefined)
    throw new MigrationError(
      "perform",
      `verify: disk ${target} differs on the destination from the source at offset ${c.mismatchAt} (the 1 MiB block there); ${opts.outcome}`,
      "E_VERIFY",
    );
  opts.notes.push(
    `disk ${target} verified: equal on both sides (${formatBytes(c.comparedBytes)} compared, ${formatBytes(c.skippedBytes)} zero on both)`,
  );
  return { comparedBytes: c.comparedBytes, skippedBytes: c.skippedBytes };
}
