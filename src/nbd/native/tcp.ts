/**
 * Loads the TCP helper built by scripts/build-native.sh. Without it `quickAck` does nothing: connections
 * still work, only the handshake with some servers takes longer (see the client).
 */
import { createRequire } from "node:module";
import type { Socket } from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";

interface TcpOps {
  quickAck(fd: number): boolean;
}

// dist/src/nbd/native/tcp.js -> dist/native/tcp.node
const addon = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../native/tcp.node");

export let tcpLoadError: string | undefined;
export const tcp: TcpOps | undefined = (() => {
  if (process.env.NBDMIG_NO_NATIVE) {
    tcpLoadError = "disabled by NBDMIG_NO_NATIVE";
    return undefined;
  }
  try {
    return createRequire(import.meta.url)(addon) as TcpOps;
  } catch (err) {
    tcpLoadError = `${addon}: ${(err as Error).message.split("\n")[0]}`;
    return undefined;
  }
})();

/**
 * Asks the kernel to acknowledge what arrives on `socket` at once rather than after its delayed-ACK timer
 * (40 ms), until it next decides to delay. True when that was done. Node does not expose the descriptor;
 * its TCP handles carry it as `fd` (undocumented, stable on Unix for many releases), and anything else
 * (TLS, Unix sockets, a Node without it) is left alone.
 */
export function quickAck(socket: Socket): boolean {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return tcp !== undefined && typeof fd === "number" && fd >= 0 && tcp.quickAck(fd);
}
