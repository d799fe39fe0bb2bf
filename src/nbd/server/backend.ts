/**
 * What an export reads and writes, after nbdkit's plugin API: a flat set of optional operations plus
 * capability answers. A capability is `none`, `emulate` (the server does it with other operations: zero by
 * writing zero buffers, FUA by a flush, cache by reading) or `native`. Filters wrap a backend.
 */
import type { Extent } from "../protocol/codec.js";

export type Support = "none" | "emulate" | "native";

export interface ZeroFlags {
  /** The backend may punch a hole instead of writing zeros (the client did not send NO_HOLE). */
  mayTrim: boolean;
  fua: boolean;
  /** Fail with ENOTSUP rather than zero slowly (NBD_CMD_FLAG_FAST_ZERO). */
  fastZero: boolean;
}

export interface BlockSize {
  minimum: number;
  preferred: number;
  maximum: number;
}

export interface Backend {
  /** For logs and errors: what this backend serves. */
  readonly description: string;
  size(): number;
  canWrite(): boolean;
  canFlush(): boolean;
  canTrim(): boolean;
  canZero(): Support;
  canFastZero(): boolean;
  canFua(): Support;
  canCache(): Support;
  canExtents(): boolean;
  canMultiConn(): boolean;
  isRotational(): boolean;
  blockSize(): BlockSize | undefined;
  pread(buf: Buffer, offset: number): Promise<void>;
  pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number, fua: boolean): Promise<void>;
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  /** Allocation of [offset, offset+length): contiguous extents starting at offset, covering at least one byte. */
  extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]>;
  cache(offset: number, length: number): Promise<void>;
  close(): Promise<void>;
}

/** A filter is a function of the backend below it (nbdkit's `next`). */
export type Filter = (next: Backend) => Backend;

/** Passes every call through; filters extend it and override what they change. */
export class PassThrough implements Backend {
  constructor(protected readonly next: Backend) {}
  get description(): string {
    return this.next.description;
  }
  size(): number {
    return this.next.size();
  }
  canWrite(): boolean {
    return this.next.canWrite();
  }
  canFlush(): boolean {
    return this.next.canFlush();
  }
  canTrim(): boolean {
    return this.next.canTrim();
  }
  canZero(): Support {
    return this.next.canZero();
  }
  canFastZero(): boolean {
    return this.next.canFastZero();
  }
  canFua(): Support {
    return this.next.canFua();
  }
  canCache(): Support {
    return this.next.canCache();
  }
  canExtents(): boolean {
    return this.next.canExtents();
  }
  canMultiConn(): boolean {
    return this.next.canMultiConn();
  }
  isRotational(): boolean {
    return this.next.isRotational();
  }
  blockSize(): BlockSize | undefined {
    return this.next.blockSize();
  }
  pread(buf: Buffer, offset: number): Promise<void> {
    return this.next.pread(buf, offset);
  }
  pwrite(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    return this.next.pwrite(buf, offset, fua);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  trim(offset: number, length: number, fua: boolean): Promise<void> {
    return this.next.trim(offset, length, fua);
  }
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.zero(offset, length, flags);
  }
  extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
    return this.next.extents(offset, length, reqOne);
  }
  cache(offset: number, length: number): Promise<void> {
    return this.next.cache(offset, length);
  }
  close(): Promise<void> {
    return this.next.close();
  }
}
