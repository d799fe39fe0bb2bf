import { alignedBuffer } from "../aligned.js";

/**
 * Buffers for reads and for write payloads, reused across requests and aligned to a page (../aligned.ts).
 * A fresh 256 KiB buffer per request costs an mmap, page faults and garbage collection; the server instead
 * takes one from here and gives it back once the reply has been handed to the socket, or the write has
 * reached the backend. Every byte of a buffer is overwritten before use (backends fill a read buffer
 * completely, the Backend contract; a payload is copied in whole), so no data of an earlier request leaks.
 */
export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooled = 0;

  constructor(private readonly maxBytes = 64 * 1024 * 1024) {}

  get(length: number): Buffer {
    const b = this.free.get(length)?.pop();
    if (!b) return alignedBuffer(length);
    this.pooled -= length;
    return b;
  }

  put(b: Buffer): void {
    if (this.pooled + b.length > this.maxBytes) return;
    const list = this.free.get(b.length);
    if (list) list.push(b);
    else this.free.set(b.length, [b]);
    this.pooled += b.length;
  }
}
