/**
 * The certificates a host's QEMU uses for TLS on the migration channels (the NBD disk copy and the
 * migration stream), in the layout of libvirt's /etc/pki/qemu and QEMU's `tls-creds-x509 dir=`:
 *
 *   STATE/pki/ca-cert.pem       the cluster's CA (the same file on every host)
 *   STATE/pki/server-cert.pem   this host as a destination: its addresses and names as subjectAltName
 *   STATE/pki/server-key.pem
 *   STATE/pki/client-cert.pem   this host as a source (presented to the destination, which verifies it)
 *   STATE/pki/client-key.pem
 *
 * `nbdmig tls-ca` makes a CA, `nbdmig tls-host` a host's certificates (openssl from Debian). The checks here
 * run before a migration creates anything, so a wrong CA, an expired certificate or a name mismatch is
 * refused naming the file and the fix, rather than failing as a TLS handshake in QEMU half-way through.
 */
import { execFile } from "node:child_process";
import { createPrivateKey, X509Certificate } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { promisify } from "node:util";
import { UsageError } from "../errors.js";
import type { QmpClient } from "./qmp.js";

const run = promisify(execFile);

export const CA_CERT = "ca-cert.pem";
/** Which end of a TLS connection a host's certificate serves. */
export type TlsEndpoint = "server" | "client";
/** `server-cert.pem` or `client-cert.pem` in the layout above. */
export const certFileName = (endpoint: TlsEndpoint): string => `${endpoint}-cert.pem`;
/** `server-key.pem` or `client-key.pem`. */
export const keyFileName = (endpoint: TlsEndpoint): string => `${endpoint}-key.pem`;
/** QEMU's id of the TLS credentials object a migration adds on each side. */
export const TLS_CREDS_ID = "nbdmig-tls";
const CA_KEY = "ca-key.pem";

/**
 * Gives a QEMU this host's credentials for one end of TLS (replacing what an earlier attempt left); both
 * ends verify the peer's certificate against the CA.
 */
export async function addTlsCreds(qmp: QmpClient, dir: string, endpoint: TlsEndpoint): Promise<void> {
  await qmp.execute("object-del", { id: TLS_CREDS_ID }).catch(() => undefined);
  await qmp.execute("object-add", {
    "qom-type": "tls-creds-x509",
    id: TLS_CREDS_ID,
    dir,
    endpoint,
    "verify-peer": true,
  });
}

/** Takes TLS off a source QEMU's migration again (after a rollback), so a later migration starts clean. */
export async function removeTlsCreds(qmp: QmpClient): Promise<void> {
  await qmp.raw("migrate-set-parameters", { "tls-creds": "" }).catch(() => undefined);
  await qmp.execute("object-del", { id: TLS_CREDS_ID }).catch(() => undefined);
}

/** Whether a host has certificates (then TLS is the default for its migrations). */
export function hasPki(dir: string): boolean {
  return fs.existsSync(path.join(dir, CA_CERT));
}

function readCert(file: string, fix: string): X509Certificate {
  let pem: string;
  try {
    pem = fs.readFileSync(file, "utf8");
  } catch (err) {
    throw new UsageError(
      `TLS: cannot read ${file} (${(err as NodeJS.ErrnoException).code}); ${fix}`,
      "E_TLS",
    );
  }
  try {
    return new X509Certificate(pem);
  } catch (err) {
    throw new UsageError(
      `TLS: ${file} is not a PEM certificate (${(err as Error).message}); ${fix}`,
      "E_TLS",
    );
  }
}

/**
 * The subject of this host's client certificate as QEMU's x509 authorization compares it (the DN GnuTLS
 * prints: RFC 4514, most specific first, comma-separated).
 */
export function clientIdentity(dir: string): string {
  const cert = readCert(path.join(dir, certFileName("client")), "issue it with 'nbdmig tls-host'");
  return cert.subject.split("\n").reverse().join(",");
}

/** The CA's SHA-256 fingerprint: both ends of a migration must have the same CA. */
export function caFingerprint(dir: string): string {
  return readCert(path.join(dir, CA_CERT), `copy the cluster's ${CA_CERT} there`).fingerprint256;
}

/**
 * Checks this host's certificates for one end of a TLS connection: the CA and the certificate are
 * readable and valid now, the certificate is signed by the CA and matches its key, and (server) it names
 * every address in `names`. Throws a UsageError naming the file and the fix.
 */
export function checkPki(dir: string, endpoint: TlsEndpoint, names: string[] = []): void {
  const issue = `issue it with 'nbdmig tls-host --ca CA_DIR --out ${dir} NAME...'`;
  const ca = readCert(path.join(dir, CA_CERT), `copy the cluster's ${CA_CERT} there (see 'nbdmig tls-ca')`);
  const certFile = path.join(dir, certFileName(endpoint));
  const keyFile = path.join(dir, keyFileName(endpoint));
  const cert = readCert(certFile, issue);
  const now = Date.now();
  for (const [c, file] of [
    [ca, path.join(dir, CA_CERT)],
    [cert, certFile],
  ] as const) {
    if (Date.parse(c.validTo) < now)
      throw new UsageError(
        `TLS: ${file} expired on ${c.validTo}; ${file === certFile ? issue : "make a new CA"}`,
        "E_TLS",
      );
    if (Date.parse(c.validFrom) > now)
      throw new UsageError(
        `TLS: ${file} is not valid before ${c.validFrom}; check this host's clock`,
        "E_TLS",
      );
  }
  if (!cert.verify(ca.publicKey))
    throw new UsageError(
      `TLS: ${certFile} is not signed by the CA in ${path.join(dir, CA_CERT)} (${ca.subject.replace(/\n/g, ", ")}); ${issue} with that CA`,
      "E_TLS",
    );
  let key;
  try {
    key = createPrivateKey(fs.readFileSync(keyFile));
  } catch (err) {
    throw new UsageError(
      `TLS: cannot read the private key ${keyFile} (${(err as Error).message}); ${issue}`,
      "E_TLS",
    );
  }
  if (!cert.checkPrivateKey(key))
    throw new UsageError(`TLS: ${keyFile} is not the key of ${certFile}; ${issue}`, "E_TLS");
  for (const n of names) {
    const ok = net.isIP(n) ? cert.checkIP(n) : cert.checkHost(n);
    if (!ok)
      throw new UsageError(
        `TLS: ${certFile} does not name ${n} (it names ${cert.subjectAltName ?? "nothing"}), but the source reaches this host as ${n}; ${issue.replace("NAME...", `${n} ...`)}`,
        "E_TLS",
      );
  }
}

/** `nbdmig tls-ca DIR`: a CA for a cluster (kept where only the operator reads it; its key signs hosts). */
export async function createCa(dir: string, name: string, days = 3650): Promise<string> {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const cert = path.join(dir, CA_CERT);
  if (fs.existsSync(cert))
    throw new UsageError(
      `${cert} exists already; nbdmig never replaces a CA (remove it first if you mean to)`,
    );
  await run("openssl", [
    "req",
    "-x509",
    "-newkey",
    "rsa:3072",
    "-nodes",
    "-days",
    String(days),
    "-subj",
    `/CN=${name}`,
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
    "-keyout",
    path.join(dir, CA_KEY),
    "-out",
    cert,
  ]);
  fs.chmodSync(path.join(dir, CA_KEY), 0o600);
  return cert;
}

/**
 * `nbdmig tls-host`: a host's certificates into `out` (its STATE/pki), signed by the CA in `caDir`: one key,
 * a server certificate naming `names` (addresses and DNS names the sources use) and a client certificate.
 */
export async function issueHost(caDir: string, out: string, names: string[], days = 825): Promise<void> {
  if (names.length === 0)
    throw new UsageError("tls-host needs the host's addresses or names (its certificate names them)");
  const caCert = path.join(caDir, CA_CERT);
  const caKey = path.join(caDir, CA_KEY);
  for (const f of [caCert, caKey])
    if (!fs.existsSync(f))
      throw new UsageError(`${f} does not exist; make the CA with 'nbdmig tls-ca ${caDir}'`);
  fs.mkdirSync(out, { recursive: true, mode: 0o700 });
  const tmp = fs.mkdtempSync(path.join(out, ".issue-"));
  try {
    const key = path.join(tmp, "key.pem");
    await run("openssl", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:3072", "-out", key]);
    const san = names.map((n) => (net.isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(",");
    for (const [who, usage] of [
      ["server", "serverAuth"],
      ["client", "clientAuth"],
    ] as const) {
      const csr = path.join(tmp, `${who}.csr`);
      const ext = path.join(tmp, `${who}.ext`);
      await run("openssl", ["req", "-new", "-key", key, "-subj", `/CN=${names[0]}`, "-out", csr]);
      fs.writeFileSync(
        ext,
        `basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=${usage}\nsubjectAltName=${san}\n`,
      );
      await run("openssl", [
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        caCert,
        "-CAkey",
        caKey,
        "-CAcreateserial",
        "-CAserial",
        path.join(tmp, "ca.srl"),
        "-days",
        String(days),
        "-extfile",
        ext,
        "-out",
        path.join(out, certFileName(who)),
      ]);
      fs.copyFileSync(key, path.join(out, keyFileName(who)));
      fs.chmodSync(path.join(out, keyFileName(who)), 0o600);
    }
    fs.copyFileSync(caCert, path.join(out, CA_CERT));
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}
