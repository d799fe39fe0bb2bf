/**
 * One client connection to the NBD server: the fixed newstyle handshake as an explicit state machine, then
 * the transmission loop (validate -> handle -> reply), with bounded requests and bytes in flight.
 *
 *   greeting --client flags--> options --STARTTLS--> (TLS) options --GO/EXPORT_NAME--> transmission
 *   any state --ABORT, DISC, protocol error, shutdown--> closed
 */
import type { Socket } from "node:net";
import tls from "node:tls";
import { NbdProtocolError, NbdRequestError, toNbdErrno } from "../errors.js";
import { ByteQueue } from "../protocol/bytes.js";
import {
  decodeInfoRequest,
  decodeMetaContextRequest,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfo,
  encodeMetaContextReply,
  encodeOffsetHole,
  encodeOptionReply,
  encodeServerReply,
  encodeSimpleReply,
  parseClientFlags,
  parseOption,
  RequestParser,
  type Extent,
  type OptionMsg,
  type Request,
} from "../protocol/codec.js";
import {
  BASE_ALLOCATION,
  CF,
  Chunk,
  Cmd,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  Info,
  MAX_OPTION_LENGTH,
  NbdErrno,
  Opt,
  Rep,
  RF_DONE,
  TF,
} from "../protocol/constants.js";
import { isZero, writeZeros } from "../zeros.js";
import type { Backend } from "./backend.js";
import type { ExportSpec, NbdServer } from "./server.js";

export type ConnState = "greeting" | "options" | "transmission" | "closed";

const BASE_ALLOCATION_ID = 1;
/** Which command flags each command accepts (others are EINVAL). */
const ALLOWED_FLAGS: Record<number, number> = {
  [Cmd.READ]: CF.DF,
  [Cmd.WRITE]: CF.FUA,
  [Cmd.DISC]: 0,
  [Cmd.FLUSH]: 0,
  [Cmd.TRIM]: CF.FUA,
  [Cmd.CACHE]: 0,
  [Cmd.WRITE_ZEROES]: CF.FUA | CF.NO_HOLE | CF.FAST_ZERO,
  [Cmd.BLOCK_STATUS]: CF.REQ_ONE,
};

export class ServerConnection {
  state: ConnState = "greeting";
  private socket: Socket;
  private readonly q = new ByteQueue();
  private noZeroes = false;
  private structured = false;
  private tlsActive = false;
  private metaContext = false;
  private exp?: ExportSpec;
  private backend?: Backend;
  private flags = 0;
  private parser?: RequestParser;
  private inFlight = 0;
  private inFlightBytes = 0;
  private paused = false;
  private draining = false;
  private idle?: () => void;
  private corked = false;

  constructor(
    socket: Socket,
    private readonly server: NbdServer,
  ) {
    this.socket = socket;
    this.attach(socket);
    socket.write(encodeGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
  }

  private attach(s: Socket): void {
    s.on("data", (b: Buffer) => {
      this.q.push(b);
      this.pump();
    });
    s.on("error", () => this.close());
    s.on("close", () => this.close());
  }

  /** Parses what has arrived, as far as the current state allows. */
  private pump(): void {
    try {
      while (this.state !== "closed") {
        if (this.state === "greeting") {
          const f = parseClientFlags(this.q);
          if (f === undefined) return;
          if (!(f & FLAG_C_FIXED_NEWSTYLE))
            throw new NbdProtocolError("client does not speak fixed newstyle");
          if (f & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES))
            throw new NbdProtocolError("unknown client flags");
          this.noZeroes = (f & FLAG_C_NO_ZEROES) !== 0;
          this.state = "options";
        } else if (this.state === "options") {
          const opt = parseOption(this.q, MAX_OPTION_LENGTH);
          if (!opt) return;
          if (this.handleOption(opt) === "wait") return;
        } else {
          if (this.paused || this.draining) return;
          const r = this.parser!.next(this.q);
          if (!r) return;
          this.handleRequest(r);
        }
      }
    } catch (err) {
      this.server.log(`connection closed: ${(err as Error).message}`);
      this.close();
    }
  }

  private reply(opt: number, type: number, data?: Buffer): void {
    this.socket.write(encodeOptionReply(opt, type, data));
  }

  private errorReply(opt: number, type: number, message: string): void {
    this.reply(opt, type, Buffer.from(message, "utf8"));
  }

  /** One option; "wait" when the connection must not parse on (TLS upgrade, closing). */
  private handleOption({ option, data }: OptionMsg): "next" | "wait" {
    const s = this.server;
    if (s.tlsRequired && !this.tlsActive && option !== Opt.STARTTLS && option !== Opt.ABORT) {
      if (option === Opt.EXPORT_NAME) {
        this.close();
        return "wait";
      }
      this.errorReply(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
      return "next";
    }
    switch (option) {
      case Opt.ABORT:
        this.reply(option, Rep.ACK);
        this.socket.end();
        this.state = "closed";
        return "wait";
      case Opt.LIST:
        if (data.length) return this.invalid(option, "NBD_OPT_LIST takes no data");
        for (const e of s.exports.values())
          this.reply(option, Rep.SERVER, encodeServerReply(e.name, e.description ?? ""));
        this.reply(option, Rep.ACK);
        return "next";
      case Opt.STARTTLS:
        if (!s.tls) {
          this.errorReply(option, Rep.ERR_UNSUP, "this server has no TLS certificate");
          return "next";
        }
        if (this.tlsActive || data.length)
          return this.invalid(option, "TLS is already on, or STARTTLS had data");
        this.reply(option, Rep.ACK);
        if (this.q.length) throw new NbdProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake");
        this.upgrade();
        return "wait";
      case Opt.STRUCTURED_REPLY:
        if (data.length || this.structured)
          return this.invalid(option, "structured replies already on, or data sent");
        this.structured = true;
        this.reply(option, Rep.ACK);
        return "next";
      case Opt.LIST_META_CONTEXT:
      case Opt.SET_META_CONTEXT:
        return this.metaContextOption(option, data);
      case Opt.INFO:
      case Opt.GO:
        return this.infoOption(option, data);
      case Opt.EXPORT_NAME: {
        const e = s.findExport(data.toString("utf8"));
        if (!e) {
          // EXPORT_NAME has no error reply: the spec's only answer is to disconnect.
          this.close();
          return "wait";
        }
        this.enter(e);
        this.socket.write(encodeExportNameReply(e.backend.size(), this.flags, this.noZeroes));
        return "next";
      }
      default:
        this.errorReply(option, Rep.ERR_UNSUP, `option ${option} is not supported`);
        return "next";
    }
  }

  private invalid(option: number, message: string): "next" {
    this.errorReply(option, Rep.ERR_INVALID, message);
    return "next";
  }

  private infoOption(option: number, data: Buffer): "next" | "wait" {
    let req: { name: string; infos: number[] };
    try {
      req = decodeInfoRequest(data);
    } catch (err) {
      return this.invalid(option, (err as Error).message);
    }
    const e = this.server.findExport(req.name);
    if (!e) {
      this.errorReply(option, Rep.ERR_UNKNOWN, `no export named '${req.name}'`);
      return "next";
    }
    const flags = this.transmissionFlags(e.backend);
    this.reply(option, Rep.INFO, encodeInfo({ type: Info.EXPORT, size: e.backend.size(), flags }));
    if (req.infos.includes(Info.NAME))
      this.reply(option, Rep.INFO, encodeInfo({ type: Info.NAME, name: e.name }));
    if (req.infos.includes(Info.DESCRIPTION) && e.description)
      this.reply(option, Rep.INFO, encodeInfo({ type: Info.DESCRIPTION, description: e.description }));
    const bs = this.blockSize(e.backend);
    this.reply(option, Rep.INFO, encodeInfo({ type: Info.BLOCK_SIZE, ...bs }));
    this.reply(option, Rep.ACK);
    if (option === Opt.GO) this.enter(e);
    return "next";
  }

  private metaContextOption(option: number, data: Buffer): "next" {
    if (option === Opt.SET_META_CONTEXT && !this.structured)
      return this.invalid(option, "NBD_OPT_SET_META_CONTEXT needs structured replies first");
    let req: { name: string; queries: string[] };
    try {
      req = decodeMetaContextRequest(data);
    } catch (err) {
      return this.invalid(option, (err as Error).message);
    }
    if (!this.server.findExport(req.name)) {
      this.errorReply(option, Rep.ERR_UNKNOWN, `no export named '${req.name}'`);
      return "next";
    }
    const list = option === Opt.LIST_META_CONTEXT;
    const match =
      (list && req.queries.length === 0) ||
      req.queries.some((q) => q === BASE_ALLOCATION || (list && q === "base:"));
    if (option === Opt.SET_META_CONTEXT) this.metaContext = match;
    if (match)
      this.reply(option, Rep.META_CONTEXT, encodeMetaContextReply(BASE_ALLOCATION_ID, BASE_ALLOCATION));
    this.reply(option, Rep.ACK);
    return "next";
  }

  private upgrade(): void {
    const raw = this.socket;
    raw.removeAllListeners("data");
    raw.removeAllListeners("error");
    raw.removeAllListeners("close");
    const secure = new tls.TLSSocket(raw, { isServer: true, secureContext: this.server.tls! });
    this.socket = secure;
    secure.once("secure", () => {
      this.tlsActive = true;
      this.pump();
    });
    this.attach(secure);
  }

  private blockSize(b: Backend): { minimum: number; preferred: number; maximum: number } {
    const own = b.blockSize();
    return {
      minimum: own?.minimum ?? 1,
      preferred: own?.preferred ?? 4096,
      maximum: Math.min(own?.maximum ?? Infinity, this.server.maxPayload),
    };
  }

  private transmissionFlags(b: Backend): number {
    let f = TF.HAS_FLAGS;
    if (!b.canWrite()) f |= TF.READ_ONLY;
    if (b.canFlush()) f |= TF.SEND_FLUSH;
    if (b.canWrite() && b.canFua() !== "none") f |= TF.SEND_FUA;
    if (b.canWrite() && b.canTrim()) f |= TF.SEND_TRIM;
    if (b.canWrite() && b.canZero() !== "none") {
      f |= TF.SEND_WRITE_ZEROES;
      if (b.canFastZero()) f |= TF.SEND_FAST_ZERO;
    }
    if (this.structured) f |= TF.SEND_DF;
    if (b.canMultiConn()) f |= TF.CAN_MULTI_CONN;
    if (b.canCache() !== "none") f |= TF.SEND_CACHE;
    if (b.isRotational()) f |= TF.ROTATIONAL;
    return f;
  }

  private enter(e: ExportSpec): void {
    this.exp = e;
    this.backend = e.backend;
    this.flags = this.transmissionFlags(e.backend);
    const pool = this.server.buffers;
    this.parser = new RequestParser(this.server.maxPayload, (n) => pool.get(n));
    this.state = "transmission";
    this.server.log(`client entered transmission on export '${e.name}'`);
  }

  // ------------------------------------------------------------ transmission

  /** The errno a request must fail with before it reaches the backend, or 0 when it is valid. */
  private validate(r: Request): number {
    const b = this.backend!;
    const allowed = ALLOWED_FLAGS[r.type];
    if (allowed === undefined) return NbdErrno.EINVAL;
    if (r.flags & ~allowed) return NbdErrno.EINVAL;
    if (r.flags & CF.DF && !this.structured) return NbdErrno.EINVAL;
    const writes = r.type === Cmd.WRITE || r.type === Cmd.TRIM || r.type === Cmd.WRITE_ZEROES;
    if (writes && !b.canWrite()) return NbdErrno.EPERM;
    if (r.type === Cmd.TRIM && !b.canTrim()) return NbdErrno.EINVAL;
    if (r.type === Cmd.WRITE_ZEROES && b.canZero() === "none") return NbdErrno.EINVAL;
    if (r.type === Cmd.CACHE && b.canCache() === "none") return NbdErrno.EINVAL;
    if (r.type === Cmd.FLUSH && !b.canFlush()) return NbdErrno.EINVAL;
    if (r.type === Cmd.BLOCK_STATUS && !this.metaContext) return NbdErrno.EINVAL;
    if (r.type === Cmd.FLUSH || r.type === Cmd.DISC) return 0;
    if (r.tooLarge || (r.type === Cmd.READ && r.length > this.server.maxPayload))
      return r.flags & CF.DF ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL;
    const size = b.size();
    if (r.offsetOverflow || r.offset + r.length > size) return writes ? NbdErrno.ENOSPC : NbdErrno.EINVAL;
    if (r.type === Cmd.BLOCK_STATUS && r.length === 0) return NbdErrno.EINVAL;
    const min = this.blockSize(b).minimum;
    if (min > 1 && (r.offset % min || r.length % min)) return NbdErrno.EINVAL;
    return 0;
  }

  private handleRequest(r: Request): void {
    if (r.type === Cmd.DISC) {
      this.draining = true;
      void this.disconnect();
      return;
    }
    const err = this.validate(r);
    if (err) {
      this.sendError(r, err, "invalid request");
      return;
    }
    const bytes = r.type === Cmd.READ || r.type === Cmd.WRITE ? r.length : 0;
    this.inFlight++;
    this.inFlightBytes += bytes;
    if (this.inFlight >= this.server.maxInFlight || this.inFlightBytes >= this.server.maxInFlightBytes) {
      this.paused = true;
      this.socket.pause();
    }
    this.execute(r)
      .catch((e: unknown) => this.sendError(r, toNbdErrno(e), (e as Error).message ?? "error"))
      .finally(() => {
        this.inFlight--;
        this.inFlightBytes -= bytes;
        if (
          this.paused &&
          this.inFlight < this.server.maxInFlight &&
          this.inFlightBytes < this.server.maxInFlightBytes
        ) {
          this.paused = false;
          this.socket.resume();
          this.pump();
        }
        if (this.inFlight === 0) this.idle?.();
      });
  }

  private async execute(r: Request): Promise<void> {
    const b = this.backend!;
    const fua = (r.flags & CF.FUA) !== 0;
    switch (r.type) {
      case Cmd.READ: {
        const pool = this.server.buffers;
        const buf = pool.get(r.length);
        try {
          await b.pread(buf, r.offset);
        } catch (err) {
          pool.put(buf);
          throw err;
        }
        this.sendRead(r, buf, () => pool.put(buf));
        return;
      }
      case Cmd.WRITE:
        try {
          await b.pwrite(r.data!, r.offset, fua && b.canFua() === "native");
        } finally {
          this.server.buffers.put(r.data!);
        }
        if (fua && b.canFua() === "emulate") await b.flush();
        break;
      case Cmd.FLUSH:
        await b.flush();
        break;
      case Cmd.TRIM:
        await b.trim(r.offset, r.length, fua);
        break;
      case Cmd.WRITE_ZEROES: {
        const fast = (r.flags & CF.FAST_ZERO) !== 0;
        if (b.canZero() === "emulate") {
          if (fast) throw new NbdRequestError(NbdErrno.ENOTSUP, "zeroing would be slow");
          await writeZeros((z, at) => b.pwrite(z, at, false), r.offset, r.length);
          if (fua) await b.flush();
        } else {
          await b.zero(r.offset, r.length, { mayTrim: (r.flags & CF.NO_HOLE) === 0, fua, fastZero: fast });
        }
        break;
      }
      case Cmd.CACHE:
        if (b.canCache() === "emulate") {
          const buf = Buffer.allocUnsafe(Math.min(r.length, 4 * 1024 * 1024));
          for (let at = r.offset; at < r.offset + r.length; at += buf.length)
            await b.pread(buf.subarray(0, Math.min(buf.length, r.offset + r.length - at)), at);
        } else await b.cache(r.offset, r.length);
        break;
      case Cmd.BLOCK_STATUS: {
        const reqOne = (r.flags & CF.REQ_ONE) !== 0;
        let ext: Extent[] = b.canExtents()
          ? await b.extents(r.offset, r.length, reqOne)
          : [{ length: r.length, flags: 0 }];
        ext = clip(ext, r.length, reqOne);
        const payload = encodeBlockStatus(BASE_ALLOCATION_ID, ext);
        this.write([encodeChunkHeader(RF_DONE, Chunk.BLOCK_STATUS, r.cookie, payload.length), payload]);
        return;
      }
    }
    this.write([encodeSimpleReply(0, r.cookie)]);
  }

  /** Replies with `buf`; `done` runs once the socket no longer needs it. */
  private sendRead(r: Request, buf: Buffer, done: () => void): void {
    if (!this.structured) {
      this.write([encodeSimpleReply(0, r.cookie), buf], done);
      return;
    }
    // A read of nothing but zeros travels as a hole (12 bytes), unless the client forbade fragments (DF
    // still allows one OFFSET_HOLE chunk covering the whole read).
    if (r.length >= 4096 && isZero(buf)) {
      const p = encodeOffsetHole(r.offset, r.length);
      this.write([encodeChunkHeader(RF_DONE, Chunk.OFFSET_HOLE, r.cookie, p.length), p]);
      done();
      return;
    }
    const off = Buffer.alloc(8);
    off.writeBigUInt64BE(BigInt(r.offset));
    this.write([encodeChunkHeader(RF_DONE, Chunk.OFFSET_DATA, r.cookie, 8 + buf.length), off, buf], done);
  }

  private sendError(r: Request, errno: number, message: string): void {
    if (this.state === "closed") return;
    if (this.structured && (r.type === Cmd.READ || r.type === Cmd.BLOCK_STATUS)) {
      const p = encodeErrorChunk(errno, message);
      this.write([encodeChunkHeader(RF_DONE, Chunk.ERROR, r.cookie, p.length), p]);
    } else this.write([encodeSimpleReply(errno, r.cookie)]);
  }

  /**
   * One reply as one write, so replies to concurrent requests never interleave. `done` runs when the
   * socket has handed the bytes to the kernel (or failed): only then may the parts be reused.
   */
  private write(parts: Buffer[], done?: () => void): void {
    if (this.state === "closed" || this.socket.destroyed) {
      done?.();
      return;
    }
    // Corked writes go out together, in order, without copying the data into one buffer, and no other
    // reply can slip between the parts. The socket stays corked until the end of this turn of the event
    // loop, so replies whose reads finished together leave in one writev: fewer system calls, and no
    // small TCP segment at the tail of every read reply (measured: 1 GiB of reads ~12 % faster).
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      setImmediate(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    parts.forEach((p, i) => this.socket.write(p, i === parts.length - 1 ? done : undefined));
  }

  /** NBD_CMD_DISC or server shutdown: finish what is in flight, flush, close. */
  async disconnect(): Promise<void> {
    this.draining = true;
    if (this.state !== "transmission") {
      this.close();
      return;
    }
    if (this.inFlight > 0) await new Promise<void>((resolve) => (this.idle = resolve));
    if (this.backend?.canFlush() && this.backend.canWrite())
      await this.backend.flush().catch(() => undefined);
    this.socket.end();
    this.close();
  }

  close(): void {
    if (this.state === "closed" && this.socket.destroyed) return;
    this.state = "closed";
    if (!this.socket.writableEnded) this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
    this.server.forget(this);
  }

  get exportName(): string | undefined {
    return this.exp?.name;
  }
}

/** Extents cover at most the request; with REQ_ONE exactly one. Lengths are clipped, never zero. */
function clip(ext: Extent[], length: number, reqOne: boolean): Extent[] {
  const out: Extent[] = [];
  let total = 0;
  for (const e of ext) {
    if (total >= length || e.length === 0) break;
    const n = Math.min(e.length, length - total);
    out.push({ length: n, flags: e.flags });
    total += n;
    if (reqOne) break;
  }
  if (out.length === 0) out.push({ length, flags: 0 });
  return out;
}
