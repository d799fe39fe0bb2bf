/**
 * A shut-off domain's TPM state for an offline migration: the files of swtpm's state directory (a TPM 2.0's
 * `tpm2-00.permall` holds its seeds, keys and NV indices; a few KiB), read on the source into the cookie and
 * written into the destination's fresh state directory. A live migration needs none of this: swtpm's state
 * travels in QEMU's migration stream.
 */
import fs from "node:fs";
import path from "node:path";
import { UsageError } from "../errors.js";
import { formatBytes } from "../util/format.js";
import type { TpmState } from "./schemas.js";
import { MAX_TPM_FILE_BYTES, MAX_TPM_FILES } from "./schemas.js";

/** swtpm's lock file: held by a running swtpm only, never moved. */
const LOCK_FILE = ".lock";

/** The state in `dir`, or undefined when there is none yet (a TPM that never ran is made at its first start). */
export function readTpmState(dir: string, domain: string): TpmState | undefined {
  if (!fs.existsSync(dir)) return undefined;
  const files: TpmState["files"] = [];
  for (const ent of fs.readdirSync(dir, { withFileTypes: true })) {
    if (ent.name === LOCK_FILE) continue;
    const file = path.join(dir, ent.name);
    if (!ent.isFile())
      throw new UsageError(
        `domain '${domain}': the TPM state directory ${dir} holds ${ent.name}, which is not a plain file; swtpm writes only files there: remove it`,
      );
    const size = fs.statSync(file).size;
    if (size > MAX_TPM_FILE_BYTES)
      throw new UsageError(
        `domain '${domain}': TPM state file ${file} has ${formatBytes(size)}, more than the ${formatBytes(MAX_TPM_FILE_BYTES)} swtpm ever writes; check what it is`,
      );
    files.push({ name: ent.name, base64: fs.readFileSync(file).toString("base64") });
  }
  if (files.length > MAX_TPM_FILES)
    throw new UsageError(
      `domain '${domain}': the TPM state directory ${dir} holds ${files.length} files, more than the ${MAX_TPM_FILES} swtpm writes; check what they are`,
    );
  return files.length ? { files } : undefined;
}

/** Writes the state into `dir` (made empty by the caller), each file readable by its owner only, synced. */
export function writeTpmState(dir: string, state: TpmState): void {
  for (const f of state.files) {
    const data = Buffer.from(f.base64, "base64");
    const fd = fs.openSync(path.join(dir, f.name), "wx", 0o600);
    try {
      fs.writeSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
  }
}
