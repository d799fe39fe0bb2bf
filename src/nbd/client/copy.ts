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
import { ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_ZERO, TF } from "../protocol/constants.js";
import { FileBackend } from "../server/backends/file.js";
import { alignedBuffer } from "../aligned.js";
import { isZero, writeZeros } from "../zeros.js";
import { NbdClient, type ClientOptions } from "./client.js";
import { isNbdUri } from "./uri.js";

export interface Endpoint {
  readonly name: string;
  size: number;
  /** Connections this endpoint spreads requests over. */
  readonly lanes: number;
  /** Reads into `into` when given (the first `length` bytes of it), else into a new buffer. */
  read(lane: number, offset: number, length: number, into?: Buffer): Promise<Buffer>;
  write(lane: number, data: Buffer, offset: number): Promise<void>;
  /** Writes zeros (as a hole where the endpoint can). */
  zero(lane: number, offset: number, length: number): Promise<void>;
  /** Allocation of a range, or undefined when the endpoint cannot tell. */
  extents(lane: number, offset: number, length: number): Promise<Extent[] | undefined>;
  /**
   * Allocation of a range together with whether the top image of the endpoint's backing chain holds it;
   * only an NBD endpoint that offers qemu:allocation-depth can tell.
   */
  topExtents?(lane: number, offset: number, length: number): Promise<TopExtent[]>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

/** A base:allocation extent, and whether the top image holds it (qemu:allocation-depth 1). */
export interface TopExtent extends Extent {
  inTop: boolean;
}

/**
 * Both contexts' extents side by side: each answer starts at the same offset but may be cut elsewhere, so
 * the result is cut wherever either is, and ends where the shorter one does.
 */
export function mergeTopExtents(alloc: Extent[], depth: Extent[]): TopExtent[] {
  const out: TopExtent[] = [];
  let [i, j, usedA, usedD] = [0, 0, 0, 0];
  while (i < alloc.length && j < depth.length) {
    const a = alloc[i]!;
    const d = depth[j]!;
    const n = Math.min(a.length - usedA, d.length - usedD);
    const inTop = d.flags === 1;
    const last = out.at(-1);
    if (last && last.flags === a.flags && last.inTop === inTop) last.length += n;
    else if (n > 0) out.push({ length: n, flags: a.flags, inTop });
    usedA += n;
    usedD += n;
    if (usedA === a.length) [i, usedA] = [i + 1, 0];
    if (usedD === d.length) [j, usedD] = [j + 1, 0];
  }
  return out;
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
  get offersDepth(): boolean {
    return this.conns.every((c) => c.contexts.has(ALLOCATION_DEPTH));
  }
  private c(lane: number): NbdClient {
    return this.conns[lane % this.conns.length]!;
  }
  read(lane: number, offset: number, length: number, into?: Buffer): Promise<Buffer> {
    return this.c(lane).read(offset, length, { into });
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
  async topExtents(lane: number, offset: number, length: number): Promise<TopExtent[]> {
    const [alloc, depth] = await this.c(lane).blockStatusOf(
      [BASE_ALLOCATION, ALLOCATION_DEPTH],
      offset,
      length,
    );
    return mergeTopExtents(alloc!, depth!);
  }
  async flush(): Promise<void> {
    // Several connections exist only with multi-conn, where one flush covers what every connection wrote.
    const c = this.conns[0]!;
    if (c.can(TF.SEND_FLUSH)) await c.flush();
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
  async read(_l: number, offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const b = into ? into.subarray(0, length) : alignedBuffer(length);
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

/** `null:` (or `null://`), the destination that discards, as nbdcopy names it. */
function isNull(spec: string): boolean {
  return spec === "null:" || spec === "null://";
}

/** Opens an endpoint: `connections` NBD connections when the server allows multi-conn, else one. */
export async function openEndpoint(
  spec: string,
  role: "source" | "destination",
  opts: { connections: number; client?: ClientOptions; size?: number },
): Promise<Endpoint> {
  if (isNull(spec)) {
    if (role === "source") throw new UsageError("null: can only be a destination");
    return new NullEndpoint(opts.size ?? 0);
  }
  if (isNbdUri(spec)) {
    const first = await NbdClient.connect(spec, opts.client);
    if (role === "destination" && first.readOnly) {
      first.destroy();
      throw new UsageError(`${spec} is read-only; it cannot be a copy destination`);
    }
    // The rest at once: each handshake costs several round trips.
    const more = first.canMultiConn ? opts.connections - 1 : 0;
    const rest = await Promise.allSettled(
      Array.from({ length: more }, () => NbdClient.connect(spec, opts.client)),
    );
    const conns = [first, ...rest.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []))];
    const failed = rest.find((r) => r.status === "rejected");
    if (failed) {
      for (const c of conns) c.destroy();
      throw failed.reason;
    }
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
  /**
   * The destination is zero except where its block status says otherwise (a partial copy being resumed,
   * with writes past the resume point that may have landed): holes are zeroed only where it holds data.
   */
  destinationMapped?: boolean;
  /** Copy from this offset on (a resumed copy: what lies before it is on the destination already). */
  from?: number;
  /**
   * Copy only what the source's top image holds (`--copy-storage-inc`; the source must offer
   * qemu:allocation-depth, as `qemu-nbd -A` does): the rest comes from the destination's own copy of the
   * backing chain, so it is neither sent nor zeroed. Zeros inside the top image hide what the backing
   * holds: they are always written, as zero requests.
   */
  topOnly?: boolean;
  /**
   * Every `everyMs`, and after every `everyBytes` written as data, the offset below which everything is
   * written to the destination (all those writes answered and then flushed), handed to `commit` when it
   * has moved on; once more at the end with the size. What `commit` throws fails the copy.
   */
  checkpoint?: { everyMs: number; everyBytes?: number; commit: (doneTo: number) => Promise<void> };
  /**
   * Flush the destination at the end, as `nbdcopy --flush` does. Without it the data may still sit in the
   * destination's cache when the copy returns (nbdcopy's default too).
   */
  flush?: boolean;
  /** Compare sha256 of both sides afterwards. */
  verify?: boolean;
  progress?: (done: number, total: number) => void;
  /** Stops the copy: each worker throws the signal's reason before its next request. */
  signal?: AbortSignal;
  client?: ClientOptions;
}

export interface CopyResult {
  size: number;
  /** Bytes read from the source and written as data (from `from` on). */
  dataBytes: number;
  /** Bytes sent as zero requests (or skipped on a zero destination). */
  zeroBytes: number;
  /** With `topOnly`: bytes the top image does not hold, left to the destination's backing chain. */
  belowTopBytes: number;
  elapsedMs: number;
  sha256?: string;
}

/**
 * How much of the disk one block status lookup covers: 64 MiB at first, doubled (up to 2 GiB) whenever a
 * lookup leaves fewer data pieces waiting than there are workers. A lookup waits behind the reads queued
 * on its connection, so mapping a sparse disk 64 MiB at a time kept the workers idle: reading 8 GiB that
 * hold 100 MiB of data to null: took 240-330 ms that way, 130-165 ms with 1 GiB lookups.
 */
const RANGE_MIN = 64 * 1024 * 1024;
const RANGE_MAX = 2 * 1024 * 1024 * 1024;

export async function copy(src: string, dst: string, opts: CopyOptions = {}): Promise<CopyResult> {
  const connections = opts.connections ?? 4;
  if (opts.verify && isNull(dst))
    throw new UsageError("--verify reads the destination back; null: cannot be read");
  // Both ends open at once, unless a destination file to create needs the source's size first.
  const dstOpts = { connections, client: opts.client };
  const together = isNbdUri(dst) || isNull(dst);
  const srcClient = opts.topOnly
    ? { ...opts.client, metaContexts: [BASE_ALLOCATION, ALLOCATION_DEPTH] }
    : opts.client;
  const [s, d] = await Promise.allSettled([
    openEndpoint(src, "source", { connections, client: srcClient }),
    together ? openEndpoint(dst, "destination", dstOpts) : undefined,
  ]);
  if (s.status === "rejected" || d.status === "rejected") {
    if (s.status === "fulfilled") await s.value.close();
    if (d.status === "fulfilled") await d.value?.close();
    throw s.status === "rejected" ? s.reason : (d as PromiseRejectedResult).reason;
  }
  const source = s.value;
  let dest = d.value;
  try {
    dest ??= await openEndpoint(dst, "destination", { ...dstOpts, size: source.size });
    if (dest instanceof NullEndpoint) dest.size = source.size;
    if (dest.size < source.size)
      throw new UsageError(`${dst} (${dest.size} bytes) is smaller than ${src} (${source.size} bytes)`);
    if (opts.topOnly && !(source instanceof NbdEndpoint && source.offersDepth))
      throw new UsageError(
        `${src} does not tell which blocks its top image holds (no ${ALLOCATION_DEPTH}): serve it with qemu-nbd --allocation-depth`,
      );
    return await run(source, dest, opts);
  } finally {
    await source.close();
    await dest?.close();
  }
}

/**
 * One piece of work: a request-sized piece of data to read and write, a run of zeros, or (with topOnly) a
 * run the top image does not hold.
 */
interface Work {
  kind: "data" | "zero" | "below";
  offset: number;
  length: number;
}

/**
 * The largest zero request sent at once. The protocol allows just under 4 GiB, but nbdcopy never sends
 * more than its 128 MiB work unit, so no server needs to take more from us either.
 */
const MAX_ZERO = 128 * 1024 * 1024;

/**
 * The disk's map, read ahead of the workers: block status for RANGE_MIN to RANGE_MAX bytes at a time,
 * turned into request-sized data pieces and zero runs. One lookup is under way at a time; the next starts
 * once no more pieces are left than there are workers, so they rarely wait for it.
 */
class WorkList {
  private items: Work[] = [];
  private head = 0;
  private pos: number;
  private lookup?: Promise<void>;
  private failed?: Error;
  private lane = 0;
  private range = RANGE_MIN;

  constructor(
    private readonly source: Endpoint,
    private readonly size: number,
    private readonly reqSize: number,
    private readonly lowWater: number,
    from: number,
    private readonly topOnly: boolean,
  ) {
    this.pos = from;
  }

  /** Where the next piece handed out starts (the size once all are). */
  get nextOffset(): number {
    return this.head < this.items.length ? this.items[this.head]!.offset : this.pos;
  }

  async next(): Promise<Work | undefined> {
    for (;;) {
      if (this.failed) throw this.failed;
      if (this.items.length - this.head <= this.lowWater && this.pos < this.size) this.fill();
      if (this.head < this.items.length) return this.items[this.head++];
      if (!this.lookup) return undefined;
      await this.lookup;
    }
  }

  private fill(): void {
    // A failed lookup is kept and thrown to every worker that asks for more (never left unhandled).
    this.lookup ??= this.map()
      .catch((e: Error) => void (this.failed = e))
      .finally(() => (this.lookup = undefined));
  }

  private async map(): Promise<void> {
    const start = this.pos;
    const len = Math.min(this.range, this.size - start);
    const lane = this.lane++;
    const ext: (Extent & { inTop?: boolean })[] = this.topOnly
      ? await this.source.topExtents!(lane, start, len)
      : ((await this.source.extents(lane, start, len)) ?? []);
    if (this.head > 4096) [this.items, this.head] = [this.items.slice(this.head), 0];
    let at = start;
    for (const e of ext) {
      const n = Math.min(e.length, start + len - at);
      if (n <= 0) break;
      this.push(e.inTop === false ? "below" : e.flags & STATE_ZERO ? "zero" : "data", at, n);
      at += n;
    }
    // A server that answers less than asked (or nothing) leaves the rest to be read as data.
    if (at === start) {
      this.push("data", at, len);
      at += len;
    }
    this.pos = at;
    let data = 0;
    for (let i = this.head; i < this.items.length && data < this.lowWater; i++)
      if (this.items[i]!.kind === "data") data++;
    if (data < this.lowWater) this.range = Math.min(this.range * 2, RANGE_MAX);
  }

  private push(kind: Work["kind"], offset: number, length: number): void {
    const step = kind === "data" ? this.reqSize : MAX_ZERO;
    // A run that continues across a lookup's end joins the last one, if no worker has taken it yet.
    const last = this.head < this.items.length ? this.items.at(-1) : undefined;
    if (
      kind !== "data" &&
      last?.kind === kind &&
      last.offset + last.length === offset &&
      last.length + length <= step
    ) {
      last.length += length;
      return;
    }
    for (let at = offset; at < offset + length; at += step)
      this.items.push({ kind, offset: at, length: Math.min(step, offset + length - at) });
  }
}

async function run(source: Endpoint, dest: Endpoint, opts: CopyOptions): Promise<CopyResult> {
  const t0 = Date.now();
  const size = source.size;
  const from = Math.min(opts.from ?? 0, size);
  const reqSize = opts.requestSize ?? 256 * 1024;
  const workers = Math.max(source.lanes, dest.lanes) * (opts.requests ?? 16);
  const work = new WorkList(source, size, reqSize, workers, from, opts.topOnly ?? false);
  let done = from;
  let dataBytes = 0;
  let zeroBytes = 0;
  let belowTopBytes = 0;
  /** Offsets of the pieces taken and not yet answered (pieces are handed out in order). */
  const inFlight = new Set<number>();
  const committer = opts.checkpoint ? new Committer(dest, opts.checkpoint, from) : undefined;
  const advance = (n: number) => {
    done += n;
    opts.progress?.(done, size);
  };
  // Under a top image, the destination reads what its backing holds: zeros there are never "already" zero.
  const assumeZero = opts.destinationIsZero && !opts.topOnly;
  const zero = async (lane: number, offset: number, length: number) => {
    if (opts.destinationMapped) {
      for (const [at, n] of await dataRanges(dest, lane, offset, length)) await dest.zero(lane, at, n);
    } else if (!assumeZero) await dest.zero(lane, offset, length);
    zeroBytes += length;
    advance(length);
  };
  // A worker owns a lane and a buffer: it reads a piece into the buffer and reuses it once the write of
  // it has been answered.
  const worker = async (lane: number) => {
    const own = alignedBuffer(reqSize);
    for (let w = await work.next(); w; w = await work.next()) {
      let sent = 0;
      opts.signal?.throwIfAborted();
      committer?.throwIfFailed();
      inFlight.add(w.offset);
      if (w.kind === "below") {
        belowTopBytes += w.length;
        advance(w.length);
      } else if (w.kind === "zero") await zero(lane, w.offset, w.length);
      else {
        const buf = await source.read(lane, w.offset, w.length, own);
        if (isZero(buf)) await zero(lane, w.offset, w.length);
        else {
          await dest.write(lane, buf, w.offset);
          dataBytes += w.length;
          advance(w.length);
          sent = w.length;
        }
      }
      inFlight.delete(w.offset);
      if (sent) committer?.wrote(sent);
    }
  };
  committer?.start(() => (inFlight.size ? Math.min(...inFlight) : work.nextOffset));
  try {
    await Promise.all(Array.from({ length: workers }, (_, i) => worker(i)));
  } catch (err) {
    await committer?.stop().catch(() => undefined);
    throw err;
  }
  await committer?.stop();
  if (opts.flush || committer) await dest.flush();
  await committer?.commit(size);
  const result: CopyResult = { size, dataBytes, zeroBytes, belowTopBytes, elapsedMs: Date.now() - t0 };
  if (opts.verify) {
    const [a, b] = await Promise.all([hash(source, size), hash(dest, size)]);
    if (a !== b)
      throw new UsageError(`verification failed: source sha256 ${a}, destination ${b}`, "E_NBD_VERIFY");
    result.sha256 = a;
  }
  return result;
}

/** The parts of [offset, offset+length) that `e` does not report as zero (all of it when it cannot tell). */
async function dataRanges(
  e: Endpoint,
  lane: number,
  offset: number,
  length: number,
): Promise<[number, number][]> {
  const ext = await e.extents(lane, offset, length);
  if (!ext) return [[offset, length]];
  const out: [number, number][] = [];
  let at = offset;
  for (const x of ext) {
    const n = Math.min(x.length, offset + length - at);
    if (n <= 0) break;
    if (!(x.flags & STATE_ZERO)) out.push([at, n]);
    at += n;
  }
  if (at < offset + length) out.push([at, offset + length - at]);
  return out;
}

/**
 * Checkpoints of a copy: every `everyMs` (and `everyBytes` of data), the offset below which every piece has
 * been answered is flushed on the destination and then committed, one checkpoint at a time. A failed
 * commit stops the workers.
 */
class Committer {
  private timer?: NodeJS.Timeout;
  private busy: Promise<void> = Promise.resolve();
  private failed?: unknown;
  private committed: number;
  private sinceTick = 0;
  private watermark: () => number = () => 0;

  constructor(
    private readonly dest: Endpoint,
    private readonly cp: NonNullable<CopyOptions["checkpoint"]>,
    from: number,
  ) {
    this.committed = from;
  }

  start(watermark: () => number): void {
    this.watermark = watermark;
    this.timer = setInterval(() => this.tick(), this.cp.everyMs);
  }

  /** Data written: every `everyBytes` of it a checkpoint is due, whatever the time. */
  wrote(n: number): void {
    if (!this.cp.everyBytes) return;
    this.sinceTick += n;
    if (this.sinceTick >= this.cp.everyBytes) this.tick();
  }

  private tick(): void {
    this.sinceTick = 0;
    // The offset is taken before the flush: a flush covers the writes answered before it was sent.
    const w = this.watermark();
    if (w <= this.committed) return;
    this.busy = this.busy.then(async () => {
      if (this.failed !== undefined || w <= this.committed) return;
      try {
        await this.dest.flush();
        await this.commit(w);
      } catch (err) {
        this.failed = err;
      }
    });
  }

  throwIfFailed(): void {
    if (this.failed !== undefined) throw this.failed;
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.busy;
    this.throwIfFailed();
  }

  async commit(w: number): Promise<void> {
    await this.cp.commit(w);
    this.committed = w;
  }
}

async function hash(e: Endpoint, size: number): Promise<string> {
  const h = createHash("sha256");
  const step = 4 * 1024 * 1024;
  for (let at = 0; at < size; at += step) h.update(await e.read(0, at, Math.min(step, size - at)));
  return h.digest("hex");
}

export interface CompareResult {
  size: number;
  /** Bytes read from both sides and compared. */
  comparedBytes: number;
  /** Bytes both sides report as zero (holes or zero runs), not read. */
  skippedBytes: number;
  /** The first offset (a block's start) where the two sides differ, if they do. */
  mismatchAt?: number;
  elapsedMs: number;
}

/** Bytes per block the comparison reads from each side at once. */
const COMPARE_BLOCK = 1024 * 1024;

/**
 * Proves that `b` holds what `a` holds: block by block, in parallel on both sides, skipping what both
 * report as zero (block status), reading and comparing the rest. Sizes must be equal.
 */
export async function compareImages(
  a: string,
  b: string,
  opts: { connections?: number; client?: ClientOptions; signal?: AbortSignal } = {},
): Promise<CompareResult> {
  const connections = opts.connections ?? 4;
  const t0 = Date.now();
  const [x, y] = await Promise.all([
    openEndpoint(a, "source", { connections, client: opts.client }),
    openEndpoint(b, "source", { connections, client: opts.client }),
  ]);
  try {
    if (x.size !== y.size) throw new UsageError(`${a} is ${x.size} bytes but ${b} is ${y.size}`);
    const size = x.size;
    /** The ranges of [at, at+len) that are zero according to `e`'s block status. */
    const zeros = async (e: Endpoint, at: number, len: number): Promise<[number, number][]> => {
      const ext = (await e.extents(0, at, len)) ?? [];
      const out: [number, number][] = [];
      let pos = at;
      for (const x of ext) {
        const n = Math.min(x.length, at + len - pos);
        if (n <= 0) break;
        if (x.flags & STATE_ZERO) out.push([pos, pos + n]);
        pos += n;
      }
      return out;
    };
    const covered = (list: [number, number][], from: number, to: number) =>
      list.some(([s, e]) => s <= from && e >= to);
    let comparedBytes = 0;
    let skippedBytes = 0;
    let mismatchAt: number | undefined;
    let next = 0;
    const span = 64 * 1024 * 1024;
    const worker = async (lane: number) => {
      const bufA = alignedBuffer(COMPARE_BLOCK);
      const bufB = alignedBuffer(COMPARE_BLOCK);
      while (next < size && mismatchAt === undefined) {
        const at = next;
        const len = Math.min(span, size - at);
        next += len;
        const [za, zb] = await Promise.all([zeros(x, at, len), zeros(y, at, len)]);
        for (let off = at; off < at + len && mismatchAt === undefined; off += COMPARE_BLOCK) {
          opts.signal?.throwIfAborted();
          const n = Math.min(COMPARE_BLOCK, at + len - off);
          if (covered(za, off, off + n) && covered(zb, off, off + n)) {
            skippedBytes += n;
            continue;
          }
          const [ra, rb] = await Promise.all([x.read(lane, off, n, bufA), y.read(lane, off, n, bufB)]);
          comparedBytes += n;
          if (!ra.subarray(0, n).equals(rb.subarray(0, n))) mismatchAt = Math.min(mismatchAt ?? off, off);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.max(x.lanes, y.lanes) }, (_, i) => worker(i)));
    return { size, comparedBytes, skippedBytes, mismatchAt, elapsedMs: Date.now() - t0 };
  } finally {
    await Promise.all([x.close(), y.close()]);
  }
}
