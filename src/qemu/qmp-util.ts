/** Small QMP lookups shared by the agent and the migration engine. */
import { QmpError } from "../errors.js";
import { formatNode } from "../domain/qemu-args.js";
import type { QmpClient } from "./qmp.js";

/** Disk target -> the qdev path owning its BlockBackend (the `id` that block_set_io_throttle needs). */
export async function qdevByTarget(qmp: QmpClient, targets: string[]): Promise<Map<string, string>> {
  const blocks = await qmp.execute("query-block");
  const out = new Map<string, string>();
  for (const t of targets) {
    const b = blocks.find((x) => x.inserted?.["node-name"] === formatNode(t));
    if (!b?.qdev) throw new QmpError("GenericError", `disk ${t} is not attached to a device`);
    out.set(t, b.qdev);
  }
  return out;
}
