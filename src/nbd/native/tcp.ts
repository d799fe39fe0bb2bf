/**
 * The TCP helper. Without it `quickAck` does nothing: connections still work, only the handshake with some
 * servers takes longer (see the client).
 */
import type { Socket } from "node:net";
import { loadNative } from "./load.js";

interface TcpOps {
  quickAck(fd: number): boolean;
}

const loaded = loadNative<TcpOps>("tcp");
export const tcp: TcpOps | undefined = loaded.addon;
export const tcpLoadError: string | undefined = loaded.error;

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
