/** Small QMP lookups shared by the agent and the migration engine. */
import { QmpError } from "../errors.js";
import { formatNode } from "../domain/qemu-args.js";
import type { BlockInfo, MigrationInfo } from "./qmp-schema.js";

/**
 * A disk's entry in a `query-block` answer. Its `qdev` is the device owning the BlockBackend, the `id` that
 * block_set_io_throttle needs (for virtio-blk the `virtio-backend` child, not the PCI device).
 */
export function blockOf(
  blocks: BlockInfo[],
  target: string,
): BlockInfo & { qdev: string; inserted: NonNullable<BlockInfo["inserted"]> } {
  const b = blocks.find((x) => x.inserted?.["node-name"] === formatNode(target));
  if (!b?.inserted || !b.qdev)
    throw new QmpError("GenericError", `disk ${target} is not attached to a device`);
  return b as BlockInfo & { qdev: string; inserted: NonNullable<BlockInfo["inserted"]> };
}

/**
 * `query-migrate` once the migration has completed, with its times. QEMU 7.2 sets `completed` before it
 * has computed `downtime` and `total-time`, which read 0 until then (seen in 5 of 30 benchmark runs): ask
 * again, every 5 ms for up to `waitMs`. Still without them, the answer has no downtime at all rather than
 * a false 0.
 */
export async function completedMigrationInfo(
  ask: () => Promise<MigrationInfo>,
  waitMs = 500,
): Promise<MigrationInfo> {
  const until = Date.now() + waitMs;
  for (;;) {
    const info = await ask();
    if ((info["total-time"] ?? 0) > 0 && (info.downtime ?? 0) > 0) return info;
    if (Date.now() >= until) {
      return { ...info, downtime: undefined };
    }
    await new Promise((r) => setTimeout(r, 5));
  }
}
