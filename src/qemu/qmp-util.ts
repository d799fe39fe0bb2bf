/** Small QMP lookups shared by the agent and the migration engine. */
import { QmpError } from "../errors.js";
import { formatNode } from "../domain/qemu-args.js";
import type { BlockInfo } from "./qmp-schema.js";

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
