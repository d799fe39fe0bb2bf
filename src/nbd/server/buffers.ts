import { alignedBuffer } from "../aligned.js";

/**
 * Read buffers reused across requests. A fresh 256 KiB buffer per read costs an mmap, page faults and
 * garbage collection; the server instead takes one from here and gives it back once the reply has been
 * handed to the socket. Backends fill every byte of a read buffer (the Backend contract), so no data of
 * an earlier read survives into a reply.
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
