/**
 * The copy engine, built like nbdcopy: workers take ranges in turn, ask the source for block status per
 * range (never the whole disk at once), send zero requests for holes instead of zero data, detect zero
 * blocks in what they read, and keep several requests on several connections in flight.
 *
 * Endpoints: an NBD URI, a local file or block device, or `null:` (a destination that discards).
 */
import { createHash } from "node:crypto";
import fs from "node:fs";
import { UsageError } from "../../errors.js";
import type { Extent } from "../protocol/codec.js";
import { STATE_ZERO, TF } from "../protocol/constants.js";
import { FileBackend } from "../server/backends/file.js";
import { isZero, writeZeros } from "../zeros.js";
import { NbdClient, type ClientOptions } from "./client.js";
import { isNbdUri } from "./uri.js";

export interface Endpoint {
  readonly name: string;
  size: number;
  /** Connections this endpoint spreads requests over. */
  readonly lanes: number;
  read(lane: number, offset: number, length: number): Promise<Buffer>;
  write(lane: number, data: Buffer, offset: number): Promise<void>;
  /** Writes zeros (as a hole where the endpoint can). */
  zero(lane: number, offset: number, length: number): Promise<void>;
  /** Allocation of a range, or undefined when the endpoint cannot tell. */
  extents(lane: number, offset: number, length: number): Promise<Extent[] | undefined>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

class NbdEndpoint implements Endpoint {
  constructor(
    readonly name: string,
    private readonly conns: NbdClient[],
  ) {}
  get size(): number {
    return this.conns[0]!.size;
  }
  get lanes(): number {
    return this.conns.length;
  }
  private c(lane: number): NbdClient {
    return this.conns[lane % this.conns.length]!;
  }
  read(lane: number, offset: number, length: number): Promise<Buffer> {
    return this.c(lane).read(offset, length);
  }
  write(lane: number, data: Buffer, offset: number): Promise<void> {
    return this.c(lane).write(data, offset);
  }
  async zero(lane: number, offset: number, length: number): Promise<void> {
    const c = this.c(lane);
    if (c.can(TF.SEND_WRITE_ZEROES)) return c.zero(offset, length);
    await writeZeros((z, at) => c.write(z, at), offset, length);
  }
  async extents(lane: number, offset: number, length: number): Promise<Extent[] | undefined> {
    const c = this.c(lane);
    return c.canBlockStatus ? c.blockStatus(offset, length) : undefined;
  }
  async flush(): Promise<void> {
    await Promise.all(this.conns.filter((c) => c.can(TF.SEND_FLUSH)).map((c) => c.flush()));
  }
  async close(): Promise<void> {
    await Promise.all(this.conns.map((c) => c.disconnect().catch(() => c.destroy())));
  }
}

class FileEndpoint implements Endpoint {
  readonly lanes = 1;
  constructor(
    readonly name: string,
    private readonly f: FileBackend,
  ) {}
  get size(): number {
    return this.f.size();
  }
  async read(_l: number, offset: number, length: number): Promise<Buffer> {
    const b = Buffer.allocUnsafe(length);
    await this.f.pread(b, offset);
    return b;
  }
  write(_l: number, data: Buffer, offset: number): Promise<void> {
    return this.f.pwrite(data, offset, false);
  }
  async zero(_l: number, offset: number, length: number): Promise<void> {
    if (this.f.canZero() === "native")
      return this.f.zero(offset, length, { mayTrim: true, fua: false, fastZero: false });
    await writeZeros((z, at) => this.f.pwrite(z, at, false), offset, length);
  }
  async extents(_l: number, offset: number, length: number): Promise<Extent[] | undefined> {
    return this.f.canExtents() ? this.f.extents(offset, length, false) : undefined;
  }
  flush(): Promise<void> {
    return this.f.flush();
  }
  close(): Promise<void> {
    return this.f.close();
  }
}

class NullEndpoint implements Endpoint {
  readonly name = "null:";
  readonly lanes = 1;
  constructor(public size: number) {}
  async read(_l: number, _o: number, length: number): Promise<Buffer> {
    return Buffer.alloc(length);
  }
  async write(): Promise<void> {}
  async zero(): Promise<void> {}
  async extents(_l: number, _o: number, length: number): Promise<Extent[]> {
    return [{ length, flags: 3 }];
  }
  async flush(): Promise<void> {}
  async close(): Promise<void> {}
}

/** Opens an endpoint: `connections` NBD connections when the server allows multi-conn, else one. */
export async function openEndpoint(
  spec: string,
  role: "source" | "destination",
  opts: { connections: number; client?: ClientOptions; size?: number },
): Promise<Endpoint> {
  if (spec === "null:" || spec === "null://") {
    if (role === "source") throw new UsageError("null: can only be a destination");
    return new NullEndpoint(opts.size ?? 0);
  }
  if (isNbdUri(spec)) {
    const first = await NbdClient.connect(spec, opts.client);
    if (role === "destination" && first.readOnly) {
      first.destroy();
      throw new UsageError(`${spec} is read-only; it cannot be a copy destination`);
    }
    const conns = [first];
    if (first.canMultiConn)
      for (let i = 1; i < opts.connections; i++) conns.push(await NbdClient.connect(spec, opts.client));
    return new NbdEndpoint(spec, conns);
  }
  if (role === "destination" && !fs.existsSync(spec)) {
    fs.writeFileSync(spec, "");
    fs.truncateSync(spec, opts.size ?? 0);
  }
  return new FileEndpoint(spec, await FileBackend.open(spec, { readonly: role === "source" }));
}

export interface CopyOptions {
  /** NBD connections per endpoint (when the server allows multi-conn). */
  connections?: number;
  /** Requests in flight per connection. */
  requests?: number;
  /** Bytes per read/write request. */
  requestSize?: number;
  /** The destination already reads as zeros: holes need no zero requests. */
  destinationIsZero?: boolean;
  /** Compare sha256 of both sides afterwards. */
  verify?: boolean;
  progress?: (done: number, total: number) => void;
  client?: ClientOptions;
}

export interface CopyResult {
  size: number;
  /** Bytes read from the source and written as data. */
  dataBytes: number;
  /** Bytes sent as zero requests (or skipped on a zero destination). */
  zeroBytes: number;
  elapsedMs: number;
  sha256?: string;
}

const RANGE = 64 * 1024 * 1024;

export async function copy(src: string, dst: string, opts: CopyOptions = {}): Promise<CopyResult> {
  const connections = opts.connections ?? 4;
  if (opts.verify && (dst === "null:" || dst === "null://"))
    throw new UsageError("--verify reads the destination back; null: cannot be read");
  const source = await openEndpoint(src, "source", { connections, client: opts.client });
  let dest: Endpoint | undefined;
  try {
    dest = await openEndpoint(dst, "destination", { connections, client: opts.client, size: source.size });
    if (dest instanceof NullEndpoint) dest.size = source.size;
    if (dest.size < source.size)
      throw new UsageError(`${dst} (${dest.size} bytes) is smaller than ${src} (${source.size} bytes)`);
    return await run(source, dest, opts);
  } finally {
    await source.close();
    await dest?.close();
  }
}

async function run(source: Endpoint, dest: Endpoint, opts: CopyOptions): Promise<CopyResult> {
  const t0 = Date.now();
  const size = source.size;
  const reqSize = opts.requestSize ?? 256 * 1024;
  const workers = Math.max(source.lanes, dest.lanes) * (opts.requests ?? 16);
  let nextRange = 0;
  let done = 0;
  let dataBytes = 0;
  let zeroBytes = 0;
  const advance = (n: number) => {
    done += n;
    opts.progress?.(done, size);
  };
  const zero = async (lane: number, offset: number, length: number) => {
    if (!opts.destinationIsZero) await dest.zero(lane, offset, length);
    zeroBytes += length;
    advance(length);
  };
  const data = async (lane: number, offset: number, length: number) => {
    for (let at = offset; at < offset + length; at += reqSize) {
      const n = Math.min(reqSize, offset + length - at);
      const buf = await source.read(lane, at, n);
      if (isZero(buf)) await zero(lane, at, n);
      else {
        await dest.write(lane, buf, at);
        dataBytes += n;
        advance(n);
      }
    }
  };
  // A worker owns a lane and copies one request-sized piece at a time from the range it took.
  const worker = async (lane: number) => {
    for (;;) {
      const start = nextRange;
      if (start >= size) return;
      const len = Math.min(reqSize * 16, size - start);
      nextRange += len;
      const ext = (await source.extents(lane, start, Math.min(len, RANGE))) ?? [{ length: len, flags: 0 }];
      let at = start;
      for (const e of ext) {
        if (at >= start + len) break;
        const n = Math.min(e.length, start + len - at);
        if (e.flags & STATE_ZERO) await zero(lane, at, n);
        else await data(lane, at, n);
        at += n;
      }
      if (at < start + len) await data(lane, at, start + len - at);
    }
  };
  await Promise.all(Array.from({ length: workers }, (_, i) => worker(i)));
  await dest.flush();
  const result: CopyResult = { size, dataBytes, zeroBytes, elapsedMs: Date.now() - t0 };
  if (opts.verify) {
    const [a, b] = await Promise.all([hash(source, size), hash(dest, size)]);
    if (a !== b)
      throw new UsageError(`verification failed: source sha256 ${a}, destination ${b}`, "E_NBD_VERIFY");
    result.sha256 = a;
  }
  return result;
}

async function hash(e: Endpoint, size: number): Promise<string> {
  const h = createHash("sha256");
  const step = 4 * 1024 * 1024;
  for (let at = 0; at < size; at += step) h.update(await e.read(0, at, Math.min(step, size - at)));
  return h.digest("hex");
}
