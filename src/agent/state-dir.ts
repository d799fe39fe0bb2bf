/** The agent's state directory: definitions, runtime records, sockets, logs and the API token. */
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

export const DEFAULT_STATE_DIR = "/var/lib/nbdmig";

export class StateDir {
  constructor(readonly root: string) {}
  get domainsDir(): string {
    return path.join(this.root, "domains");
  }
  get runDir(): string {
    return path.join(this.root, "run");
  }
  get logDir(): string {
    return path.join(this.root, "log");
  }
  /** What each start made on the host (taps, swtpm): `NAME.json`, removed when its QEMU exits. */
  get resourcesDir(): string {
    return path.join(this.runDir, "resources");
  }
  /** Records of incoming migrations in progress: what to remove if the agent dies before they end. */
  get migrationsDir(): string {
    return path.join(this.root, "migrations");
  }
  /** Records of outgoing migrations: each source's last phase decision, so a restarted agent continues. */
  get outgoingDir(): string {
    return path.join(this.migrationsDir, "outgoing");
  }
  /** Partial copies kept by offline migrations with --keep-partial: `NAME.json` (see partials.ts). */
  get partialsDir(): string {
    return path.join(this.migrationsDir, "partial");
  }
  /** This host's TLS certificates for the migration channels (see src/qemu/pki.ts). */
  get pkiDir(): string {
    return path.join(this.root, "pki");
  }
  get tokenFile(): string {
    return path.join(this.root, "token");
  }
  /** Written at start so that a local CLI finds the agent without -c. */
  get agentFile(): string {
    return path.join(this.root, "agent.json");
  }
  definition(name: string): string {
    return path.join(this.domainsDir, `${name}.xml`);
  }
  runtime(name: string): string {
    return path.join(this.runDir, `${name}.json`);
  }
  qmpSocket(name: string): string {
    return path.join(this.runDir, `${name}.qmp`);
  }
  serialLog(name: string): string {
    return path.join(this.logDir, `${name}.serial.log`);
  }
  qemuLog(name: string): string {
    return path.join(this.logDir, `${name}.qemu.log`);
  }

  init(): void {
    for (const d of [
      this.root,
      this.domainsDir,
      this.runDir,
      this.resourcesDir,
      this.logDir,
      this.migrationsDir,
      this.outgoingDir,
      this.partialsDir,
    ])
      fs.mkdirSync(d, { recursive: true, mode: 0o700 });
  }

  /** The bearer token, created (mode 0600) on first start. */
  ensureToken(): string {
    try {
      return fs.readFileSync(this.tokenFile, "utf8").trim();
    } catch {
      const token = randomBytes(32).toString("hex");
      fs.writeFileSync(this.tokenFile, token + "\n", { mode: 0o600, flag: "wx" });
      return token;
    }
  }
}

/** Writes a file atomically (rename), so a crash never leaves half a definition. */
export function writeFileAtomic(file: string, data: string, mode = 0o600): void {
  const tmp = `${file}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, data, { mode });
  fs.renameSync(tmp, file);
}
