/**
 * NBD URIs (NetworkBlockDevice/nbd doc/uri.md, as libnbd reads them):
 *   nbd://HOST[:PORT]/[EXPORT]          nbds://...  (TLS required)
 *   nbd+unix:///[EXPORT]?socket=PATH    nbds+unix:///...
 * Query parameters: `socket`, and for TLS `tls-certificates=DIR` (ca-cert.pem, client-cert.pem,
 * client-key.pem, as libnbd and nbdkit name them) and `tls-verify-peer=false`.
 */
import { UsageError } from "../../errors.js";

export interface NbdUri {
  transport: { host: string; port: number } | { path: string };
  exportName: string;
  tls: boolean;
  tlsCertificates?: string;
  tlsVerifyPeer: boolean;
}

export const NBD_PORT = 10809;

export function isNbdUri(s: string): boolean {
  return /^nbds?(\+unix)?:\/\//.test(s);
}

export function parseNbdUri(s: string): NbdUri {
  let u: URL;
  try {
    u = new URL(s);
  } catch {
    throw new UsageError(
      `'${s}' is not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)`,
    );
  }
  const scheme = u.protocol.slice(0, -1);
  if (!["nbd", "nbds", "nbd+unix", "nbds+unix"].includes(scheme))
    throw new UsageError(`'${s}': unknown scheme '${scheme}'; use nbd, nbds, nbd+unix or nbds+unix`);
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ""));
  const tls = scheme.startsWith("nbds");
  const verify = u.searchParams.get("tls-verify-peer");
  const common = {
    exportName,
    tls,
    tlsCertificates: u.searchParams.get("tls-certificates") ?? undefined,
    tlsVerifyPeer: verify === null ? true : !["false", "0", "no"].includes(verify),
  };
  if (scheme.endsWith("+unix")) {
    const path = u.searchParams.get("socket");
    if (!path) throw new UsageError(`'${s}': a Unix socket URI needs ?socket=PATH`);
    if (u.host)
      throw new UsageError(`'${s}': a Unix socket URI has no host (nbd+unix:///EXPORT?socket=PATH)`);
    return { transport: { path }, ...common };
  }
  if (!u.hostname) throw new UsageError(`'${s}': no host`);
  const port = u.port ? Number(u.port) : NBD_PORT;
  const host = u.hostname.replace(/^\[(.*)\]$/, "$1");
  return { transport: { host, port }, ...common };
}
