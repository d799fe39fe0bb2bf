/**
 * Write-behind for files that something else is filling (an offline copy landing in its images): every
 * `everyMs`, one file after another, `fdatasync` in the thread pool, so that the kernel writes the data
 * back while the copy goes on. The copy's own flush at its end then finds little left: on these hosts
 * a 512 MiB copy otherwise spent 0.27 s in that flush after the last write. Only a speed-up: a failure
 * is logged and the files are left to the copy's flush.
 */
import fs from "node:fs";
import type { Logger } from "pino";
import { errorMessage } from "../errors.js";

/**
 * Has the kernel write back what the page cache holds unwritten of `file`, whoever wrote it (fdatasync acts
 * on the file, not on one descriptor); in the thread pool.
 */
export async function writeBackFile(file: string): Promise<void> {
  const h = await fs.promises.open(file, "r");
  try {
    await h.datasync();
  } finally {
    await h.close();
  }
}

export function writeBehind(files: string[], everyMs: number, log: Logger): () => Promise<void> {
  let stopped = false;
  let busy: Promise<void> = Promise.resolve();
  const tick = async () => {
    for (const f of files) {
      if (stopped) return;
      await writeBackFile(f);
    }
  };
  let running = false;
  // A tick that takes longer than `everyMs` is not queued behind: the next starts at the first interval after.
  const timer = setInterval(() => {
    if (running || stopped) return;
    running = true;
    busy = tick()
      .catch((err: unknown) => {
        clearInterval(timer);
        log.warn({ files, err: errorMessage(err) }, "write-behind stopped");
      })
      .finally(() => (running = false));
  }, everyMs);
  timer.unref();
  return async () => {
    stopped = true;
    clearInterval(timer);
    await busy;
  };
}
