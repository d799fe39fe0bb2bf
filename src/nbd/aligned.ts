/**
 * Buffers that start on a page boundary, for the data of reads and writes.
 *
 * Node's Buffers come from malloc, which aligns them to 16 bytes only; the 256 KiB ones start 16 bytes
 * past a page. On this project's CI machines (AMD EPYC) the kernel copies into such a buffer about four
 * times slower than into one aligned to 64 bytes: 1 GiB read from tmpfs in 256 KiB preads took 0.53 s into
 * a Node Buffer, 0.13 s into an aligned one. Socket receives gain less (3 GiB over loopback: 1.41-1.57 s
 * aligned, 1.82-1.92 s not). Where the data comes from does not matter. Node cannot allocate aligned
 * memory, but WebAssembly memory always starts on a page: buffers are carved from slabs of it. A slab is
 * freed by the garbage collector once no buffer carved from it is referenced.
 */

/** The alignment every buffer here has, and the one `alignedEnd` aims for. */
export const ALIGN = 64;
const PAGE = 4096;
const WASM_PAGE = 64 * 1024;
const SLAB = 16 * 1024 * 1024;

let slab: ArrayBuffer | undefined;
let used = 0;
/** Set when WebAssembly memory cannot be had (say, address space limited by ulimit -v). */
let unavailable = false;

function wasmMemory(bytes: number): ArrayBuffer | undefined {
  if (unavailable) return undefined;
  try {
    return new WebAssembly.Memory({ initial: Math.ceil(bytes / WASM_PAGE) }).buffer;
  } catch {
    unavailable = true;
    return undefined;
  }
}

/** `size` bytes (uninitialised) starting on a page boundary, or an ordinary Buffer when that cannot be. */
export function alignedBuffer(size: number): Buffer {
  const span = Math.ceil(size / PAGE) * PAGE || PAGE;
  if (span > SLAB / 4) {
    const own = wasmMemory(span);
    return own ? Buffer.from(own, 0, size) : Buffer.allocUnsafeSlow(size);
  }
  if (!slab || used + span > slab.byteLength) {
    slab = wasmMemory(SLAB);
    used = 0;
    if (!slab) return Buffer.allocUnsafeSlow(size);
  }
  const b = Buffer.from(slab, used, size);
  used += span;
  return b;
}

/**
 * How much of `b` to fill next so that the fill after it starts aligned: up to the next ALIGN boundary
 * (relative to the start of its memory, which for the buffers here is a page), or all of `b` when it
 * already starts on one.
 */
export function alignedEnd(b: Buffer): number {
  const mis = b.byteOffset % ALIGN;
  return mis === 0 ? b.length : Math.min(b.length, ALIGN - mis);
}
