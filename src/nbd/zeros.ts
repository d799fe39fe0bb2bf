/** Zero blocks: detecting them in data read, and writing zeros where nothing can zero natively. */

const CHUNK = 1024 * 1024;
const ZEROS = Buffer.alloc(CHUNK);

/** Whether every byte of `b` is zero. */
export function isZero(b: Buffer): boolean {
  for (let at = 0; at < b.length; at += CHUNK) {
    const n = Math.min(CHUNK, b.length - at);
    if (!b.subarray(at, at + n).equals(ZEROS.subarray(0, n))) return false;
  }
  return true;
}

/** Writes zeros over [offset, offset+length) with `write`, a megabyte at a time. */
export async function writeZeros(
  write: (buf: Buffer, offset: number) => Promise<void>,
  offset: number,
  length: number,
): Promise<void> {
  for (let at = offset; at < offset + length; at += CHUNK)
    await write(ZEROS.subarray(0, Math.min(CHUNK, offset + length - at)), at);
}
