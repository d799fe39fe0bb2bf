/**
 * The NBD wire format without I/O: encoders return Buffers, parsers consume a ByteQueue and return one
 * message or undefined when more bytes are needed. A malformed message throws NbdProtocolError; the
 * connection layer decides what that means (disconnect, mostly).
 */
import { alignedEnd } from "../aligned.js";
import { NbdProtocolError } from "../errors.js";
import { ByteQueue, u64 } from "./bytes.js";
import {
  Chunk,
  Cmd,
  IHAVEOPT,
  Info,
  MAX_STRING,
  NBDMAGIC,
  OPT_REPLY_MAGIC,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
} from "./constants.js";

// ---------------------------------------------------------------- handshake

export const GREETING_LENGTH = 18;

export function encodeGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.alloc(GREETING_LENGTH);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

/** The server's greeting, as a client reads it. Oldstyle servers are refused. */
export function parseGreeting(q: ByteQueue): { handshakeFlags: number } | undefined {
  if (q.length < GREETING_LENGTH) return undefined;
  const b = q.take(GREETING_LENGTH);
  if (b.readBigUInt64BE(0) !== NBDMAGIC) throw new NbdProtocolError("not an NBD server (bad magic)");
  if (b.readBigUInt64BE(8) !== IHAVEOPT)
    throw new NbdProtocolError("the server speaks oldstyle NBD, which is not supported");
  return { handshakeFlags: b.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags, 0);
  return b;
}

export function parseClientFlags(q: ByteQueue): number | undefined {
  if (q.length < 4) return undefined;
  return q.take(4).readUInt32BE(0);
}

export interface OptionMsg {
  option: number;
  data: Buffer;
}

export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** An option from the client. Data longer than `maxLength` is refused (the handshake then ends). */
export function parseOption(q: ByteQueue, maxLength: number): OptionMsg | undefined {
  if (q.length < 16) return undefined;
  const h = q.peek(16);
  if (h.readBigUInt64BE(0) !== IHAVEOPT) throw new NbdProtocolError("bad option magic");
  const len = h.readUInt32BE(12);
  if (len > maxLength) throw new NbdProtocolError(`option data of ${len} bytes is too long`);
  if (q.length < 16 + len) return undefined;
  q.skip(16);
  return { option: h.readUInt32BE(8), data: q.take(len) };
}

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(20 + data.length);
  b.writeBigUInt64BE(OPT_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export function parseOptionReply(q: ByteQueue, maxLength = 1024 * 1024): OptionReply | undefined {
  if (q.length < 20) return undefined;
  const h = q.peek(20);
  if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new NbdProtocolError("bad option reply magic");
  const len = h.readUInt32BE(16);
  if (len > maxLength) throw new NbdProtocolError(`option reply of ${len} bytes is too long`);
  if (q.length < 20 + len) return undefined;
  q.skip(20);
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: q.take(len) };
}

/** The reply to NBD_OPT_EXPORT_NAME: size and flags, plus 124 zero bytes unless NO_ZEROES was agreed. */
export function encodeExportNameReply(size: number, flags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(flags, 8);
  return b;
}

export function parseExportNameReply(
  q: ByteQueue,
  noZeroes: boolean,
): { size: number; flags: number } | undefined {
  const n = noZeroes ? 10 : 134;
  if (q.length < n) return undefined;
  const b = q.take(n);
  const size = u64(b, 0);
  if (size === undefined) throw new NbdProtocolError("export size above 2^53 is not supported");
  return { size, flags: b.readUInt16BE(8) };
}

// ---------------------------------------------------------------- option payloads

/** A u32-length-prefixed string, bounded. */
function readString(b: Buffer, at: number, what: string): { value: string; next: number } {
  if (at + 4 > b.length) throw new NbdProtocolError(`${what}: truncated length`);
  const len = b.readUInt32BE(at);
  if (len > MAX_STRING) throw new NbdProtocolError(`${what}: ${len} bytes is too long`);
  if (at + 4 + len > b.length) throw new NbdProtocolError(`${what}: truncated`);
  return { value: b.toString("utf8", at + 4, at + 4 + len), next: at + 4 + len };
}

function stringBuf(s: string): Buffer {
  const body = Buffer.from(s, "utf8");
  const b = Buffer.alloc(4 + body.length);
  b.writeUInt32BE(body.length, 0);
  body.copy(b, 4);
  return b;
}

/** NBD_OPT_INFO / NBD_OPT_GO: export name, then the NBD_INFO_* items the client asks for. */
export function encodeInfoRequest(name: string, infos: number[]): Buffer {
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((t, i) => tail.writeUInt16BE(t, 2 + 2 * i));
  return Buffer.concat([stringBuf(name), tail]);
}

export function decodeInfoRequest(b: Buffer): { name: string; infos: number[] } {
  const { value: name, next } = readString(b, 0, "export name");
  if (next + 2 > b.length) throw new NbdProtocolError("info request: truncated count");
  const n = b.readUInt16BE(next);
  if (next + 2 + 2 * n !== b.length) throw new NbdProtocolError("info request: wrong length");
  const infos: number[] = [];
  for (let i = 0; i < n; i++) infos.push(b.readUInt16BE(next + 2 + 2 * i));
  return { name, infos };
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT: export name and queries. */
export function encodeMetaContextRequest(name: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([stringBuf(name), count, ...queries.map(stringBuf)]);
}

export function decodeMetaContextRequest(b: Buffer): { name: string; queries: string[] } {
  const { value: name, next } = readString(b, 0, "export name");
  if (next + 4 > b.length) throw new NbdProtocolError("meta context request: truncated count");
  const n = b.readUInt32BE(next);
  let at = next + 4;
  const queries: string[] = [];
  for (let i = 0; i < n; i++) {
    const q = readString(b, at, "meta context query");
    queries.push(q.value);
    at = q.next;
  }
  if (at !== b.length) throw new NbdProtocolError("meta context request: trailing bytes");
  return { name, queries };
}

export function encodeMetaContextReply(id: number, name: string): Buffer {
  const body = Buffer.from(name, "utf8");
  const b = Buffer.alloc(4 + body.length);
  b.writeUInt32BE(id, 0);
  body.copy(b, 4);
  return b;
}

export function decodeMetaContextReply(b: Buffer): { id: number; name: string } {
  if (b.length < 4) throw new NbdProtocolError("meta context reply: truncated");
  return { id: b.readUInt32BE(0), name: b.toString("utf8", 4) };
}

/** NBD_REP_SERVER (a reply to NBD_OPT_LIST): the name, then the description. */
export function encodeServerReply(name: string, description: string): Buffer {
  return Buffer.concat([stringBuf(name), Buffer.from(description, "utf8")]);
}

export function decodeServerReply(b: Buffer): { name: string; description: string } {
  const { value, next } = readString(b, 0, "export name");
  return { name: value, description: b.toString("utf8", next) };
}

export type InfoItem =
  | { type: typeof Info.EXPORT; size: number; flags: number }
  | { type: typeof Info.NAME; name: string }
  | { type: typeof Info.DESCRIPTION; description: string }
  | { type: typeof Info.BLOCK_SIZE; minimum: number; preferred: number; maximum: number }
  | { type: number; raw: Buffer };

export function encodeInfo(item: InfoItem): Buffer {
  switch (item.type) {
    case Info.EXPORT: {
      const it = item as { size: number; flags: number };
      const b = Buffer.alloc(12);
      b.writeUInt16BE(Info.EXPORT, 0);
      b.writeBigUInt64BE(BigInt(it.size), 2);
      b.writeUInt16BE(it.flags, 10);
      return b;
    }
    case Info.NAME:
    case Info.DESCRIPTION: {
      const text = "name" in item ? item.name : (item as { description: string }).description;
      const body = Buffer.from(text, "utf8");
      const b = Buffer.alloc(2 + body.length);
      b.writeUInt16BE(item.type, 0);
      body.copy(b, 2);
      return b;
    }
    case Info.BLOCK_SIZE: {
      const it = item as { minimum: number; preferred: number; maximum: number };
      const b = Buffer.alloc(14);
      b.writeUInt16BE(Info.BLOCK_SIZE, 0);
      b.writeUInt32BE(it.minimum, 2);
      b.writeUInt32BE(it.preferred, 6);
      b.writeUInt32BE(it.maximum, 10);
      return b;
    }
    default:
      throw new NbdProtocolError(`cannot encode info type ${item.type}`);
  }
}

export function decodeInfo(b: Buffer): InfoItem {
  if (b.length < 2) throw new NbdProtocolError("info reply: truncated");
  const type = b.readUInt16BE(0);
  switch (type) {
    case Info.EXPORT: {
      if (b.length !== 12) throw new NbdProtocolError("NBD_INFO_EXPORT: wrong length");
      const size = u64(b, 2);
      if (size === undefined) throw new NbdProtocolError("export size above 2^53 is not supported");
      return { type, size, flags: b.readUInt16BE(10) };
    }
    case Info.NAME:
      return { type, name: b.toString("utf8", 2) };
    case Info.DESCRIPTION:
      return { type, description: b.toString("utf8", 2) };
    case Info.BLOCK_SIZE:
      if (b.length !== 14) throw new NbdProtocolError("NBD_INFO_BLOCK_SIZE: wrong length");
      return { type, minimum: b.readUInt32BE(2), preferred: b.readUInt32BE(6), maximum: b.readUInt32BE(10) };
    default:
      return { type, raw: b.subarray(2) };
  }
}

// ---------------------------------------------------------------- transmission

export interface Request {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  /** WRITE: the data (absent when the parser discarded an oversized payload). */
  data?: Buffer;
  /** The offset did not fit in 2^53 (treated as out of range). */
  offsetOverflow?: boolean;
  /** WRITE longer than the parser's limit: its data was discarded. */
  tooLarge?: boolean;
}

export const REQUEST_HEADER = 28;

export function encodeRequest(r: {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(r.flags, 4);
  b.writeUInt16BE(r.type, 6);
  b.writeBigUInt64BE(r.cookie, 8);
  b.writeBigUInt64BE(BigInt(r.offset), 16);
  b.writeUInt32BE(r.length, 24);
  return b;
}

/**
 * Server side: requests, each WRITE with its payload. A WRITE longer than `maxPayload` still has to be
 * read off the wire to stay in step; its bytes are dropped as they arrive and the request is returned
 * with `tooLarge`, so the server can answer it with an error instead of losing the connection.
 */
export class RequestParser {
  private pending?: Request;
  private skipping = 0;

  /**
   * `alloc` gives the buffer a write's payload is copied into (a pool's, say); without it the payload is
   * a fresh buffer, or a view of the received bytes when they arrived in one piece.
   */
  constructor(
    private readonly maxPayload: number,
    private readonly alloc?: (length: number) => Buffer,
  ) {}

  next(q: ByteQueue): Request | undefined {
    if (this.skipping > 0) {
      this.skipping -= q.skip(this.skipping);
      if (this.skipping > 0) return undefined;
      const r = this.pending!;
      this.pending = undefined;
      return r;
    }
    if (!this.pending) {
      if (q.length < REQUEST_HEADER) return undefined;
      const h = q.take(REQUEST_HEADER);
      if (h.readUInt32BE(0) !== REQUEST_MAGIC) throw new NbdProtocolError("bad request magic");
      const offset = u64(h, 16);
      const r: Request = {
        flags: h.readUInt16BE(4),
        type: h.readUInt16BE(6),
        cookie: h.readBigUInt64BE(8),
        offset: offset ?? Number.MAX_SAFE_INTEGER,
        length: h.readUInt32BE(24),
      };
      if (offset === undefined) r.offsetOverflow = true;
      if (r.type !== Cmd.WRITE) return r;
      if (r.length > this.maxPayload) {
        r.tooLarge = true;
        this.pending = r;
        this.skipping = r.length;
        return this.next(q);
      }
      this.pending = r;
    }
    const r = this.pending;
    if (q.length < r.length) return undefined;
    r.data = this.alloc ? q.takeInto(this.alloc(r.length)) : q.take(r.length);
    this.pending = undefined;
    return r;
  }
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export function encodeChunkHeader(flags: number, type: number, cookie: bigint, length: number): Buffer {
  const b = Buffer.alloc(20);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeBigUInt64BE(cookie, 8);
  b.writeUInt32BE(length, 16);
  return b;
}

export function encodeOffsetHole(offset: number, length: number): Buffer {
  const b = Buffer.alloc(12);
  b.writeBigUInt64BE(BigInt(offset), 0);
  b.writeUInt32BE(length, 8);
  return b;
}

export function encodeErrorChunk(error: number, message: string, offset?: number): Buffer {
  const msg = Buffer.from(message.slice(0, 4096), "utf8");
  const b = Buffer.alloc(6 + msg.length + (offset === undefined ? 0 : 8));
  b.writeUInt32BE(error, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  if (offset !== undefined) b.writeBigUInt64BE(BigInt(offset), 6 + msg.length);
  return b;
}

export interface Extent {
  length: number;
  flags: number;
}

export function encodeBlockStatus(contextId: number, extents: Extent[]): Buffer {
  const b = Buffer.alloc(4 + 8 * extents.length);
  b.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 4 + 8 * i);
    b.writeUInt32BE(e.flags, 8 + 8 * i);
  });
  return b;
}

/**
 * Client side: one reply. `simple` (its data, for a READ, already in the request's buffer), `data` (an
 * OFFSET_DATA chunk, its data already in place), or any other structured `chunk` with its payload.
 */
export type Reply =
  | { kind: "simple"; cookie: bigint; error: number; data?: Buffer }
  | { kind: "data"; cookie: bigint; flags: number; offset: number; data: Buffer }
  | { kind: "chunk"; cookie: bigint; flags: number; type: number; payload: Buffer };

/** Where read data lands. Both may return undefined: the decoder then allocates. */
export interface ReplyTargets {
  /**
   * The buffer for the data after a successful simple reply: for a READ, as long as the read; undefined or
   * empty for every other command (a simple reply carries no length of its own).
   */
  simpleData(cookie: bigint): Buffer | undefined;
  /** The buffer for an OFFSET_DATA chunk's `length` bytes at `offset`; throws when the chunk is invalid. */
  chunkData(cookie: bigint, offset: number, length: number): Buffer | undefined;
}

const enum RS {
  Magic,
  Simple,
  Chunk,
  ChunkOffset,
  Payload,
}

/**
 * Client side replies, decoded as bytes arrive, in any pieces. Read data is copied once, straight from the
 * received bytes into the buffer `targets` names (the request's own), and nothing keeps a reference to a
 * pushed buffer: a caller may reuse it as soon as `push` returns.
 */
export class ReplyDecoder {
  private readonly head = Buffer.alloc(28);
  private have = 0;
  private state = RS.Magic;
  private need = 4;
  private payload?: Buffer;
  private filled = 0;
  private reply?: Reply;

  constructor(
    private readonly targets: ReplyTargets,
    private readonly onReply: (r: Reply) => void,
    private readonly maxChunk = 64 * 1024 * 1024,
  ) {}

  push(b: Buffer): void {
    let at = 0;
    while (at < b.length) {
      if (this.state === RS.Payload) {
        const p = this.payload!;
        const n = Math.min(p.length - this.filled, b.length - at);
        b.copy(p, this.filled, at, at + n);
        this.filled += n;
        at += n;
        if (this.filled === p.length) this.emit();
        continue;
      }
      const n = Math.min(this.need - this.have, b.length - at);
      b.copy(this.head, this.have, at, at + n);
      this.have += n;
      at += n;
      if (this.have === this.need) this.header();
    }
  }

  /**
   * Where the next received bytes may go directly: the unfilled rest of the data being received, when
   * large enough to be worth its own read. The caller reads into it and reports the count to `advance`.
   */
  direct(min = 64 * 1024): Buffer | undefined {
    if (this.state !== RS.Payload || this.payload!.length - this.filled < min) return undefined;
    // Filled only up to the next aligned point when short of one, so that the bulk lands aligned.
    const rest = this.payload!.subarray(this.filled);
    return rest.subarray(0, alignedEnd(rest));
  }

  /** `n` bytes were received straight into the buffer `direct` returned. */
  advance(n: number): void {
    if (this.state !== RS.Payload || this.filled + n > this.payload!.length)
      throw new RangeError("advance: no payload is being received directly");
    this.filled += n;
    if (this.filled === this.payload!.length) this.emit();
  }

  private header(): void {
    const h = this.head;
    if (this.state === RS.Magic) {
      const magic = h.readUInt32BE(0);
      if (magic === SIMPLE_REPLY_MAGIC) [this.state, this.need] = [RS.Simple, 16];
      else if (magic === STRUCTURED_REPLY_MAGIC) [this.state, this.need] = [RS.Chunk, 20];
      else throw new NbdProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      return;
    }
    if (this.state === RS.Simple) {
      const cookie = h.readBigUInt64BE(8);
      const error = h.readUInt32BE(4);
      const data = error === 0 ? this.targets.simpleData(cookie) : undefined;
      this.reply = { kind: "simple", cookie, error, data: data?.length ? data : undefined };
      return this.expect(data?.length ? data : undefined);
    }
    const len = h.readUInt32BE(16);
    if (len > this.maxChunk) throw new NbdProtocolError(`reply chunk of ${len} bytes is too long`);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const cookie = h.readBigUInt64BE(8);
    if (this.state === RS.Chunk && type === Chunk.OFFSET_DATA) {
      if (len < 9) throw new NbdProtocolError("OFFSET_DATA chunk: too short");
      [this.state, this.need] = [RS.ChunkOffset, 28];
      return;
    }
    if (this.state === RS.ChunkOffset) {
      const offset = u64(h, 20);
      if (offset === undefined) throw new NbdProtocolError("OFFSET_DATA chunk: offset out of range");
      const data = this.targets.chunkData(cookie, offset, len - 8) ?? Buffer.allocUnsafe(len - 8);
      this.reply = { kind: "data", cookie, flags, offset, data };
      return this.expect(data);
    }
    const payload = Buffer.allocUnsafe(len);
    this.reply = { kind: "chunk", cookie, flags, type, payload };
    this.expect(payload.length ? payload : undefined);
  }

  private expect(payload: Buffer | undefined): void {
    this.have = 0;
    if (!payload) return this.emit();
    this.payload = payload;
    this.filled = 0;
    this.state = RS.Payload;
  }

  private emit(): void {
    const r = this.reply!;
    this.reply = this.payload = undefined;
    this.state = RS.Magic;
    this.need = 4;
    this.have = 0;
    this.onReply(r);
  }
}

/** Decoders for structured reply payloads. */
export function decodeOffsetHole(p: Buffer): { offset: number; length: number } {
  if (p.length !== 12) throw new NbdProtocolError("OFFSET_HOLE chunk: wrong length");
  const offset = u64(p, 0);
  if (offset === undefined) throw new NbdProtocolError("OFFSET_HOLE chunk: offset out of range");
  return { offset, length: p.readUInt32BE(8) };
}

export function decodeErrorChunk(
  type: number,
  p: Buffer,
): { error: number; message: string; offset?: number } {
  if (p.length < 6) throw new NbdProtocolError("error chunk: too short");
  const mlen = p.readUInt16BE(4);
  if (6 + mlen > p.length) throw new NbdProtocolError("error chunk: message truncated");
  const out: { error: number; message: string; offset?: number } = {
    error: p.readUInt32BE(0),
    message: p.toString("utf8", 6, 6 + mlen),
  };
  if (type === Chunk.ERROR_OFFSET) {
    if (p.length !== 6 + mlen + 8) throw new NbdProtocolError("ERROR_OFFSET chunk: wrong length");
    out.offset = u64(p, 6 + mlen);
  }
  return out;
}

export function decodeBlockStatus(p: Buffer): { contextId: number; extents: Extent[] } {
  if (p.length < 12 || (p.length - 4) % 8 !== 0) throw new NbdProtocolError("BLOCK_STATUS chunk: bad length");
  const extents: Extent[] = [];
  for (let at = 4; at < p.length; at += 8)
    extents.push({ length: p.readUInt32BE(at), flags: p.readUInt32BE(at + 4) });
  return { contextId: p.readUInt32BE(0), extents };
}
