/**
 * A queue of received chunks read with cursors: a view (`subarray`) when the bytes sit in one chunk, a copy
 * only when they span chunks. Never concatenates on every push.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private head = 0;
  length = 0;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.length += b.length;
  }

  /** The next `n` bytes without consuming them (n <= length). */
  peek(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let copied = 0;
    let i = 0;
    let pos = this.head;
    while (copied < n) {
      const c = this.chunks[i]!;
      const take = Math.min(n - copied, c.length - pos);
      c.copy(out, copied, pos, pos + take);
      copied += take;
      i++;
      pos = 0;
    }
    return out;
  }

  /** Consumes `n` bytes and returns them. */
  take(n: number): Buffer {
    const out = this.peek(n);
    this.skip(n);
    return out;
  }

  /** Consumes `out.length` bytes, which must not exceed `length`, by copying them into `out`. */
  takeInto(out: Buffer): Buffer {
    const n = out.length;
    let copied = 0;
    while (copied < n) {
      const c = this.chunks[0]!;
      const take = Math.min(n - copied, c.length - this.head);
      c.copy(out, copied, this.head, this.head + take);
      copied += take;
      this.skip(take);
    }
    return out;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    let left = Math.min(n, this.length);
    const dropped = left;
    while (left > 0) {
      const c = this.chunks[0]!;
      const avail = c.length - this.head;
      if (avail <= left) {
        left -= avail;
        this.chunks.shift();
        this.head = 0;
      } else {
        this.head += left;
        left = 0;
      }
    }
    this.length -= dropped;
    return dropped;
  }
}

/** A u64 as a JS number, or undefined when it does not fit exactly (above 2^53). */
export function u64(b: Buffer, at: number): number | undefined {
  const v = b.readBigUInt64BE(at);
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : undefined;
}
