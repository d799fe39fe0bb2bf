/** Port pools, as libvirt keeps them: QEMU binds, and a port in use moves us to the next one. */
import { QmpError } from "../errors.js";

export const MIGRATION_PORTS = { first: 49152, last: 49183 };
export const NBD_PORTS = { first: 49184, last: 49215 };

/** QEMU's answer when a port is taken. */
const qemuPortInUse = (err: unknown): boolean => err instanceof QmpError && /in use/i.test(err.desc);

/**
 * Calls `bind(port)` on each port of the pool (or only `fixed`) until one is not in use; `inUse` tells
 * that failure from others (by default QEMU's; a listener of our own or qemu-nbd says it differently).
 */
export async function bindFromPool(
  pool: { first: number; last: number },
  fixed: number | undefined,
  bind: (port: number) => Promise<void>,
  inUse: (err: unknown) => boolean = qemuPortInUse,
): Promise<number> {
  const ports =
    fixed !== undefined
      ? [fixed]
      : Array.from({ length: pool.last - pool.first + 1 }, (_, i) => pool.first + i);
  let lastErr: unknown;
  for (const port of ports) {
    try {
      await bind(port);
      return port;
    } catch (err) {
      lastErr = err;
      if (!inUse(err)) throw err;
    }
  }
  throw lastErr;
}
