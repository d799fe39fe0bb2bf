/** Helpers for the NBD tests: async commands (our server runs in the test's own process), images, TLS. */
import { execFile } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { promisify } from "node:util";

const pexec = promisify(execFile);

/** Runs a command without blocking the event loop; rejects with its stderr on failure. */
export async function run(
  cmd: string,
  args: string[],
  opts: { env?: NodeJS.ProcessEnv } = {},
): Promise<string> {
  try {
    const r = await pexec(cmd, args, {
      encoding: "utf8",
      maxBuffer: 64 * 1024 * 1024,
      env: opts.env ?? process.env,
      timeout: 120_000,
    });
    return r.stdout;
  } catch (err) {
    const e = err as { code?: number; stderr?: string; stdout?: string };
    const wrapped = new Error(
      `${cmd} ${args.join(" ")} failed (${e.code}): ${e.stderr ?? ""}${e.stdout ?? ""}`,
    ) as Error & {
      exitCode?: number;
      stderr?: string;
    };
    wrapped.exitCode = e.code;
    wrapped.stderr = e.stderr;
    throw wrapped;
  }
}

/** Exit status of a command (0 on success). */
export async function status(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  try {
    await run(cmd, args);
    return { code: 0, stderr: "" };
  } catch (err) {
    const e = err as { exitCode?: number; stderr?: string };
    return { code: e.exitCode ?? -1, stderr: e.stderr ?? "" };
  }
}

export function tmpdir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `nbdmig-${prefix}-`));
}

/** A raw image of `sizeMiB` with a pattern byte written at the given MiB ranges (qemu-io, so it is exact). */
export async function patternImage(
  file: string,
  sizeMiB: number,
  writes: [pattern: number, atMiB: number, lenMiB: number][],
): Promise<void> {
  await run("qemu-img", ["create", "-q", "-f", "raw", file, `${sizeMiB}M`]);
  for (const [p, at, len] of writes)
    await run("qemu-io", ["-f", "raw", "-c", `write -P ${p} ${at}M ${len}M`, file]);
}

/**
 * A throwaway CA and a server and client certificate for `localhost` and 127.0.0.1, in the file names
 * nbdkit, libnbd and QEMU expect in a certificate directory.
 */
export async function makeCertificates(dir: string): Promise<void> {
  const o = (...a: string[]) => run("openssl", a);
  const p = (f: string) => path.join(dir, f);
  await o(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "2",
    "-subj",
    "/CN=nbdmig test CA",
    "-keyout",
    p("ca-key.pem"),
    "-out",
    p("ca-cert.pem"),
  );
  for (const who of ["server", "client"]) {
    await o(
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      `/CN=${who === "server" ? "localhost" : "nbdmig test client"}`,
      "-keyout",
      p(`${who}-key.pem`),
      "-out",
      p(`${who}.csr`),
    );
    const ext = p(`${who}.ext`);
    fs.writeFileSync(
      ext,
      who === "server"
        ? "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
        : "extendedKeyUsage=clientAuth\n",
    );
    await o(
      "x509",
      "-req",
      "-in",
      p(`${who}.csr`),
      "-CA",
      p("ca-cert.pem"),
      "-CAkey",
      p("ca-key.pem"),
      "-CAcreateserial",
      "-days",
      "2",
      "-extfile",
      ext,
      "-out",
      p(`${who}-cert.pem`),
    );
  }
}
