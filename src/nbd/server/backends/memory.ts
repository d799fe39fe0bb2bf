/** A sparse RAM disk: pages are allocated on first non-zero write and dropped by trim and zero. */
import type { Extent } from "../../protocol/codec.js";
import { STATE_HOLE, STATE_ZERO } from "../../protocol/constants.js";
import { isZero } from "../../zeros.js";
import type { Backend, BlockSize, Support, ZeroFlags } from "../backend.js";

const PAGE = 64 * 1024;

export class MemoryBackend implements Backend {
  private readonly pages = new Map<number, Buffer>();

  constructor(
    private readonly bytes: number,
    private readonly writable = true,
  ) {}

  get description(): string {
    return `memory (${this.bytes} bytes)`;
  }
  size(): number {
    return this.bytes;
  }
  canWrite(): boolean {
    return this.writable;
  }
  canFlush(): boolean {
    return true;
  }
  canTrim(): boolean {
    return this.writable;
  }
  canZero(): Support {
    return this.writable ? "native" : "none";
  }
  canFastZero(): boolean {
    return this.writable;
  }
  canFua(): Support {
    return this.writable ? "native" : "none";
  }
  canCache(): Support {
    return "native";
  }
  canExtents(): boolean {
    return true;
  }
  canMultiConn(): boolean {
    return true;
  }
  isRotational(): boolean {
    return false;
  }
  blockSize(): BlockSize | undefined {
    return undefined;
  }

  /** Bytes of pages allocated (for tests: trim and zero must free them). */
  get allocated(): number {
    return this.pages.size * PAGE;
  }

  /** The pieces of [offset, offset+length) that fall in each page: page index, offset in it, length. */
  private *spans(
    offset: number,
    length: number,
  ): Generator<{ page: number; within: number; n: number; done: number }> {
    for (let done = 0; done < length;) {
      const at = offset + done;
      const page = Math.floor(at / PAGE);
      const within = at - page * PAGE;
      const n = Math.min(PAGE - within, length - done);
      yield { page, within, n, done };
      done += n;
    }
  }

  async pread(buf: Buffer, offset: number): Promise<void> {
    for (const { page, within, n, done } of this.spans(offset, buf.length)) {
      const p = this.pages.get(page);
      if (p) p.copy(buf, done, within, within + n);
      else buf.fill(0, done, done + n);
    }
  }

  async pwrite(buf: Buffer, offset: number): Promise<void> {
    for (const { page, within, n, done } of this.spans(offset, buf.length)) {
      let p = this.pages.get(page);
      if (!p) {
        if (isZero(buf.subarray(done, done + n))) continue;
        p = Buffer.alloc(Math.min(PAGE, this.bytes - page * PAGE));
        this.pages.set(page, p);
      }
      buf.copy(p, within, done, done + n);
    }
  }

  async flush(): Promise<void> {}

  async trim(offset: number, length: number): Promise<void> {
    await this.zero(offset, length, { mayTrim: true, fua: false, fastZero: false });
  }

  async zero(offset: number, length: number, _flags: ZeroFlags): Promise<void> {
    for (const { page, within, n } of this.spans(offset, length)) {
      const p = this.pages.get(page);
      if (!p) continue;
      if (within === 0 && n >= p.length) this.pages.delete(page);
      else p.fill(0, within, within + n);
    }
  }

  async extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = Math.min(offset + length, this.bytes);
    for (let at = offset; at < end;) {
      const page = Math.floor(at / PAGE);
      const n = Math.min((page + 1) * PAGE, end) - at;
      const flags = this.pages.has(page) ? 0 : STATE_HOLE | STATE_ZERO;
      const last = out.at(-1);
      if (last && last.flags === flags) last.length += n;
      else {
        if (reqOne && last) break;
        out.push({ length: n, flags });
      }
      at += n;
    }
    return out;
  }

  async cache(): Promise<void> {}

  async close(): Promise<void> {
    this.pages.clear();
  }
}
