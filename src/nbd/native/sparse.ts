/**
 * Loads the sparse-file helper built by scripts/build-native.sh. When it cannot load, `sparse` is undefined
 * and `sparseLoadError` says why; the file backend then emulates (every range is data, zeros are written).
 */
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

export interface SparseOps {
  /** The next data (hole=0) or hole (hole=1) at or after offset, or -1 when there is none. */
  seek(fd: number, offset: number, hole: 0 | 1): number;
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
}

// dist/src/nbd/native/sparse.js -> dist/native/sparse.node
const addon = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../../native/sparse.node");

export let sparseLoadError: string | undefined;
export const sparse: SparseOps | undefined = (() => {
  if (process.env.NBDMIG_NO_NATIVE) {
    sparseLoadError = "disabled by NBDMIG_NO_NATIVE";
    return undefined;
  }
  try {
    return createRequire(import.meta.url)(addon) as SparseOps;
  } catch (err) {
    sparseLoadError = `${addon}: ${(err as Error).message.split("\n")[0]}`;
    return undefined;
  }
})();
