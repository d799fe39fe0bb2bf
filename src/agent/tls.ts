/**
 * TLS on the agent API. A host that has certificates (STATE/pki, see src/qemu/pki.ts) speaks HTTPS only,
 * as a server and as a client:
 *
 * - The agent presents its server certificate and asks for a client certificate. A client certificate the
 *   CA signed authenticates the call by itself: an agent calls its migration peer that way and sends no
 *   token, so one host's token opens no other host. Without one, the call needs the bearer token (the
 *   local CLI sends both), which then only ever travels encrypted.
 * - A client checks the agent's certificate against the CA and the name it connects to, or, for the agent
 *   of its own host (found through agent.json, perhaps listening on 0.0.0.0), that it is that host's own
 *   server certificate.
 *
 * The agent reads the certificates again when their files change, so `nbdmig tls-host` takes effect
 * without a restart; one port serves both (the first byte of a connection tells a TLS handshake from HTTP),
 * so a plain call to a TLS agent gets an answer that says what to do rather than a reset.
 */
import { X509Certificate } from "node:crypto";
import fs from "node:fs";
import http from "node:http";
import net from "node:net";
import path from "node:path";
import tls from "node:tls";
import type { Logger } from "pino";
import { UsageError } from "../errors.js";
import { CA_CERT, certFileName, hasPki, keyFileName } from "../qemu/pki.js";

/** What a client needs to call an agent over TLS. */
export interface AgentTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** The SHA-256 fingerprint the agent's certificate must have (its own host's), instead of a name check. */
  pin?: string;
  /** For messages: where these came from. */
  dir: string;
}

/**
 * This host's client credentials for the agent API, or none when it has no certificates. `pinLocal`: the
 * agent called is this host's own, which must present this host's server certificate.
 */
export function agentClientTls(pkiDir: string, pinLocal = false): AgentTls | undefined {
  if (!hasPki(pkiDir)) return undefined;
  const read = (f: string) => {
    try {
      return fs.readFileSync(path.join(pkiDir, f));
    } catch (err) {
      throw new UsageError(
        `TLS: this host has a CA in ${pkiDir} but cannot read ${path.join(pkiDir, f)} (${(err as NodeJS.ErrnoException).code}); issue its certificates with 'nbdmig tls-host --ca CA_DIR --out ${pkiDir} NAME...'`,
        "E_TLS",
      );
    }
  };
  return {
    ca: read(CA_CERT),
    cert: read(certFileName("client")),
    key: read(keyFileName("client")),
    pin: pinLocal ? new X509Certificate(read(certFileName("server"))).fingerprint256 : undefined,
    dir: pkiDir,
  };
}

/** TLS options for one request (node:https), with the pin in place of the name check when there is one. */
export function requestTlsOptions(t: AgentTls): tls.ConnectionOptions {
  return {
    ca: t.ca,
    cert: t.cert,
    key: t.key,
    checkServerIdentity: t.pin
      ? (_host, cert) =>
          cert.fingerprint256 === t.pin
            ? undefined
            : Object.assign(
                new Error(
                  `the local agent presents a certificate (sha256 ${cert.fingerprint256.slice(0, 23)}...) other than this host's ${path.join(t.dir, certFileName("server"))}`,
                ),
                { code: "E_TLS_PIN" },
              )
      : tls.checkServerIdentity,
  };
}

/** Why a TLS connection to an agent failed, and what fixes it; undefined for errors that are not TLS's. */
export function explainTlsFailure(err: NodeJS.ErrnoException, uri: string, t: AgentTls): string | undefined {
  const code = err.code ?? "";
  const ours = path.join(t.dir, CA_CERT);
  if (code === "ERR_SSL_WRONG_VERSION_NUMBER" || code === "EPROTO" || code === "ECONNRESET")
    return `the agent at ${uri} did not take a TLS connection (${code}); this host has certificates (${t.dir}), so it calls agents over HTTPS only: give that host certificates of the same CA with 'nbdmig tls-host' and copy ${CA_CERT} there`;
  if (
    code === "UNABLE_TO_VERIFY_LEAF_SIGNATURE" ||
    code === "SELF_SIGNED_CERT_IN_CHAIN" ||
    code === "DEPTH_ZERO_SELF_SIGNED_CERT" ||
    code === "UNABLE_TO_GET_ISSUER_CERT_LOCALLY" ||
    code === "CERT_SIGNATURE_FAILURE"
  )
    return `the agent at ${uri} presents a certificate that the CA in ${ours} did not sign (${code}): that host trusts another CA; both hosts need the same ${CA_CERT} and certificates it signed ('nbdmig tls-host')`;
  if (code === "CERT_HAS_EXPIRED" || code === "CERT_NOT_YET_VALID")
    return `the agent at ${uri} presents a certificate that is not valid now (${code}); issue that host a new one with 'nbdmig tls-host', and check both clocks`;
  if (code === "ERR_TLS_CERT_ALTNAME_INVALID")
    return `the agent at ${uri} presents a certificate that does not name the address used (${err.message}); issue that host's certificate naming it with 'nbdmig tls-host', or use an address it names`;
  if (code === "E_TLS_PIN") return `${err.message}; restart 'nbdmig daemon' after issuing certificates`;
  return undefined;
}

/** The agent's server credentials, reloaded when their files change; undefined while it has none. */
class ServerCredentials {
  private stamp = "";
  private ctx?: tls.SecureContextOptions;
  constructor(
    private readonly dir: string,
    private readonly log: Logger,
  ) {}

  current(): tls.SecureContextOptions | undefined {
    const files = [CA_CERT, certFileName("server"), keyFileName("server")].map((f) => path.join(this.dir, f));
    let stamp: string;
    try {
      stamp = files.map((f) => `${fs.statSync(f).mtimeMs}`).join("/");
    } catch {
      this.stamp = "";
      this.ctx = undefined;
      return undefined;
    }
    if (stamp !== this.stamp) {
      const [ca, cert, key] = files.map((f) => fs.readFileSync(f));
      this.ctx = { ca, cert, key };
      this.stamp = stamp;
      this.log.info({ dir: this.dir }, "agent API: TLS with this host's certificates");
    }
    return this.ctx;
  }
}

/**
 * Who called, by the client certificate: `caller` (the certificate's CN, for the log) when the CA signed
 * it, so the call needs no token; `refused` with the reason when it presented one the CA did not sign.
 */
export function peerCertificate(socket: net.Socket): { caller?: string; refused?: string } {
  if (!(socket instanceof tls.TLSSocket)) return {};
  const cert = socket.getPeerCertificate();
  if (!cert || !Object.keys(cert).length) return {};
  if (socket.authorized) return { caller: String(cert.subject?.CN ?? cert.fingerprint256) };
  return { refused: String(socket.authorizationError) };
}

/**
 * One port for the agent's API: TLS connections go through the host's certificates to `api`, plain ones
 * straight to it. `api` answers a plain call with 426 while the host has certificates (Router does that).
 */
export function agentListener(api: http.Server, pkiDir: string, log: Logger): net.Server {
  const creds = new ServerCredentials(pkiDir, log);
  const tlsServer = tls.createServer({ requestCert: true, rejectUnauthorized: false });
  let applied: tls.SecureContextOptions | undefined;
  tlsServer.on("secureConnection", (s: tls.TLSSocket) => api.emit("connection", s));
  tlsServer.on("tlsClientError", (err, s) => {
    log.warn({ err: err.message, from: s.remoteAddress }, "agent API: TLS handshake failed");
    s.destroy();
  });
  const route = (socket: net.Socket) => {
    const first = socket.read(1) as Buffer | null;
    if (first === null) {
      socket.once("readable", () => route(socket));
      return;
    }
    socket.unshift(first);
    if (first[0] !== 0x16) {
      api.emit("connection", socket);
      return;
    }
    const ctx = creds.current();
    if (!ctx) {
      log.warn({ from: socket.remoteAddress }, "agent API: a TLS call, but this host has no certificates");
      socket.destroy();
      return;
    }
    if (ctx !== applied) {
      tlsServer.setSecureContext(ctx);
      applied = ctx;
    }
    tlsServer.emit("connection", socket);
  };
  return net.createServer((socket) => {
    socket.on("error", () => socket.destroy());
    route(socket);
  });
}
