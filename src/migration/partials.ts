/**
 * Partial copies: what an offline migration with `--keep-partial` had copied when it was cut off (the link
 * down, either agent killed, an abort), kept on the destination for a while so that the same command
 * resumes it. One record per domain name: the images, and per disk the offset below which its content is
 * the source's (written, answered and flushed: the copy's last checkpoint) and the source image's identity
 * then. A later Prepare of the same domain takes the images over whose source has not changed; the rest,
 * and every partial copy whose time is up, is removed.
 */
import fs from "node:fs";
import path from "node:path";
import type { Logger } from "pino";
import { z } from "zod";
import { writeFileAtomic } from "../agent/state-dir.js";
import { errorMessage, UsageError } from "../errors.js";

export const PartialDiskSchema = z.object({
  target: z.string(),
  path: z.string(),
  format: z.string(),
  virtualSize: z.number(),
  /** The source image's identity when it was copied (size, mtime, inode): a change means start again. */
  stamp: z.string().optional(),
  /** Everything below this offset is the source's content. */
  doneTo: z.number(),
});
export type PartialDisk = z.infer<typeof PartialDiskSchema>;

/** Not strict: a newer agent may add fields. */
const PartialRecordSchema = z.object({
  name: z.string(),
  uuid: z.string(),
  /** Epoch ms after which the copy is removed. */
  keptUntil: z.number(),
  /** Why the attempt ended. */
  reason: z.string().default(""),
  disks: z.array(PartialDiskSchema),
  /** Every file the attempt created (its disks, the UEFI variable store): what removing it deletes. */
  files: z.array(z.string()),
});
export type PartialRecord = z.infer<typeof PartialRecordSchema>;

export class PartialCopies {
  private timer?: NodeJS.Timeout;

  constructor(
    private readonly dir: string,
    private readonly log: Logger,
  ) {}

  private file(name: string): string {
    // A domain's name, never a path (the API hands it on as it came).
    if (name.includes("/") || name.startsWith(".")) throw new UsageError(`'${name}' is not a domain name`);
    return path.join(this.dir, `${name}.json`);
  }

  /** The partial copy of `name`, if one is kept and its time is not up (else it is removed). */
  load(name: string): PartialRecord | undefined {
    let rec: PartialRecord;
    try {
      rec = PartialRecordSchema.parse(JSON.parse(fs.readFileSync(this.file(name), "utf8")));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") {
        this.log.error({ domain: name, err: errorMessage(err) }, "unreadable partial copy record; removed");
        fs.rmSync(this.file(name), { force: true });
      }
      return undefined;
    }
    if (rec.keptUntil <= Date.now()) {
      this.discard(rec, "its time is up");
      return undefined;
    }
    return rec;
  }

  all(): PartialRecord[] {
    return fs
      .readdirSync(this.dir)
      .filter((f) => f.endsWith(".json"))
      .flatMap((f) => this.load(f.slice(0, -".json".length)) ?? []);
  }

  save(rec: PartialRecord): void {
    writeFileAtomic(this.file(rec.name), JSON.stringify(rec));
    this.schedule();
  }

  /** The record only: its files belong to whoever took it over. */
  forget(name: string): void {
    fs.rmSync(this.file(name), { force: true });
  }

  /** Removes the partial copy: its files, then its record. */
  discard(rec: PartialRecord, why: string): void {
    this.log.info({ domain: rec.name, files: rec.files, why }, "removing a partial copy");
    for (const f of rec.files) {
      try {
        fs.rmSync(f, { force: true });
      } catch (err) {
        this.log.error({ file: f, err: errorMessage(err) }, "cannot remove a partial copy's file");
      }
    }
    this.forget(rec.name);
  }

  /** Removes the expired copies now, and again when the next one's time is up. */
  schedule(): void {
    clearTimeout(this.timer);
    const next = Math.min(...this.all().map((r) => r.keptUntil));
    if (Number.isFinite(next))
      this.timer = setTimeout(
        () => this.schedule(),
        Math.min(2 ** 31 - 1, Math.max(100, next - Date.now() + 50)),
      ).unref();
  }

  stop(): void {
    clearTimeout(this.timer);
  }
}

/** A file's identity for a resumed copy: the same size, modification time and inode, or it changed. */
export function fileStamp(file: string): string {
  const st = fs.statSync(file, { bigint: true });
  return `${st.size}:${st.mtimeNs}:${st.ino}`;
}
