/**
 * The sparse-file helper. When it cannot load, `sparse` is undefined and `sparseLoadError` says why; the
 * file backend then emulates (every range is data, zeros are written).
 */
import { loadNative } from "./load.js";

export interface SparseOps {
  /** The next data (hole=0) or hole (hole=1) at or after offset, or -1 when there is none. */
  seek(fd: number, offset: number, hole: 0 | 1): number;
  punchHole(fd: number, offset: number, length: number): void;
  zeroRange(fd: number, offset: number, length: number): void;
}

const loaded = loadNative<SparseOps>("sparse");
export const sparse: SparseOps | undefined = loaded.addon;
export const sparseLoadError: string | undefined = loaded.error;
