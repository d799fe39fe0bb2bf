/** The NBD codec alone: every message split at every byte boundary, and random round trips. */
import assert from "node:assert/strict";
import { randomBytes, randomInt } from "node:crypto";
import { describe, it } from "node:test";
import { ALIGN, alignedBuffer, alignedEnd } from "../src/nbd/aligned.js";
import { NbdProtocolError } from "../src/nbd/errors.js";
import { ByteQueue } from "../src/nbd/protocol/bytes.js";
import {
  decodeBlockStatus,
  decodeErrorChunk,
  decodeInfo,
  decodeInfoRequest,
  decodeMetaContextRequest,
  decodeServerReply,
  encodeBlockStatus,
  encodeChunkHeader,
  encodeClientFlags,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfo,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeServerReply,
  encodeSimpleReply,
  parseClientFlags,
  parseExportNameReply,
  parseGreeting,
  parseOption,
  parseOptionReply,
  encodeOffsetHole,
  ReplyDecoder,
  RequestParser,
  type Reply,
  type Request,
} from "../src/nbd/protocol/codec.js";
import { Chunk, Cmd, Info, Opt, Rep, RF_DONE } from "../src/nbd/protocol/constants.js";

/**
 * Feeds `bytes` in two pieces split at every boundary (and once byte by byte), parsing after each push;
 * every split must yield the same messages as the whole.
 */
function everySplit<T>(bytes: Buffer, parser: (q: ByteQueue) => T | undefined): T[];
function everySplit<T>(bytes: Buffer, parser: () => (q: ByteQueue) => T | undefined, fresh: true): T[];
function everySplit<T>(
  bytes: Buffer,
  parser: ((q: ByteQueue) => T | undefined) | (() => (q: ByteQueue) => T | undefined),
  fresh = false,
): T[] {
  const runs: T[][] = [];
  const cuts = [
    ...Array.from({ length: bytes.length + 1 }, (_, i) => [i]),
    Array.from({ length: bytes.length }, (_, i) => i),
  ];
  for (const cut of cuts) {
    const q = new ByteQueue();
    const parse = fresh
      ? (parser as () => (q: ByteQueue) => T | undefined)()
      : (parser as (q: ByteQueue) => T | undefined);
    const got: T[] = [];
    let prev = 0;
    for (const c of [...cut, bytes.length]) {
      q.push(bytes.subarray(prev, c));
      prev = c;
      for (let m = parse(q); m !== undefined; m = parse(q)) got.push(m);
    }
    assert.equal(q.length, 0, "every byte consumed");
    runs.push(got);
  }
  for (const r of runs) assert.deepEqual(r, runs[0]);
  return runs[0]!;
}

describe("NBD codec", () => {
  it("handshake messages survive every split", () => {
    assert.deepEqual(everySplit(encodeGreeting(3), parseGreeting), [{ handshakeFlags: 3 }]);
    assert.deepEqual(everySplit(encodeClientFlags(1), parseClientFlags), [1]);
    const opt = encodeOption(Opt.GO, encodeInfoRequest("disk", [Info.NAME, Info.BLOCK_SIZE]));
    const [o] = everySplit(opt, (q) => parseOption(q, 4096));
    assert.equal(o!.option, Opt.GO);
    assert.deepEqual(decodeInfoRequest(o!.data), { name: "disk", infos: [Info.NAME, Info.BLOCK_SIZE] });
    const two = Buffer.concat([encodeOption(Opt.STRUCTURED_REPLY), encodeOption(Opt.ABORT)]);
    assert.deepEqual(
      everySplit(two, (q) => parseOption(q, 4096)).map((m) => m.option),
      [Opt.STRUCTURED_REPLY, Opt.ABORT],
    );
    const rep = encodeOptionReply(Opt.LIST, Rep.SERVER, encodeServerReply("a", "first disk"));
    const [r] = everySplit(rep, (q) => parseOptionReply(q));
    assert.deepEqual(decodeServerReply(r!.data), { name: "a", description: "first disk" });
    assert.deepEqual(
      everySplit(encodeExportNameReply(1 << 30, 0x1ed, false), (q) => parseExportNameReply(q, false)),
      [{ size: 1 << 30, flags: 0x1ed }],
    );
  });

  it("requests, with and without write payloads, survive every split", () => {
    const w = Buffer.from("hello, world");
    const bytes = Buffer.concat([
      encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 512, length: 4096 }),
      encodeRequest({ flags: 1, type: Cmd.WRITE, cookie: 2n, offset: 7, length: w.length }),
      w,
      encodeRequest({ flags: 0, type: Cmd.FLUSH, cookie: 3n, offset: 0, length: 0 }),
    ]);
    const reqs = everySplit(
      bytes,
      () => {
        const p = new RequestParser(1024);
        return (q: ByteQueue) => p.next(q);
      },
      true,
    );
    assert.deepEqual(
      reqs.map((r) => [r.type, r.cookie, r.offset, r.length, r.data?.toString()]),
      [
        [Cmd.READ, 1n, 512, 4096, undefined],
        [Cmd.WRITE, 2n, 7, w.length, "hello, world"],
        [Cmd.FLUSH, 3n, 0, 0, undefined],
      ],
    );
  });

  it("a write's payload lands in the buffer the allocator gives, at every split", () => {
    const w = randomBytes(300);
    const bytes = Buffer.concat([
      encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 4n, offset: 0, length: w.length }),
      w,
      encodeRequest({ flags: 0, type: Cmd.READ, cookie: 5n, offset: 0, length: 1 }),
    ]);
    const given: Buffer[] = [];
    const reqs = everySplit(
      bytes,
      () => {
        const p = new RequestParser(1024, (n) => {
          const b = Buffer.alloc(n, 0xee);
          given.push(b);
          return b;
        });
        return (q: ByteQueue) => p.next(q);
      },
      true,
    );
    assert.ok(given.includes(reqs[0]!.data!), "the payload is the allocator's buffer, not a copy of it");
    assert.ok(reqs[0]!.data!.equals(w));
    assert.equal(reqs[1]!.cookie, 5n);
    assert.ok(given.every((b) => b.equals(w)));
  });

  it("an oversized write is skipped, not fatal, and the next request parses", () => {
    const big = randomBytes(3000);
    const bytes = Buffer.concat([
      encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 9n, offset: 0, length: big.length }),
      big,
      encodeRequest({ flags: 0, type: Cmd.READ, cookie: 10n, offset: 0, length: 1 }),
    ]);
    // A fresh parser per split: the parser is stateful by design.
    const got = everySplit(
      bytes,
      () => {
        const p = new RequestParser(1000);
        return (q: ByteQueue) => p.next(q);
      },
      true,
    );
    assert.equal(got[0]!.tooLarge, true);
    assert.equal(got[0]!.data, undefined);
    assert.equal(got[1]!.cookie, 10n);
  });

  it("replies, simple with read data and structured chunks, survive every split", () => {
    const data = randomBytes(100);
    const off = Buffer.alloc(8);
    off.writeBigUInt64BE(4096n);
    const bs = encodeBlockStatus(1, [
      { length: 4096, flags: 0 },
      { length: 8192, flags: 3 },
    ]);
    const err = encodeErrorChunk(5, "disk on fire", 4096);
    const bytes = Buffer.concat([
      encodeSimpleReply(0, 1n),
      data,
      encodeSimpleReply(0, 2n),
      encodeChunkHeader(0, Chunk.OFFSET_DATA, 3n, 8 + data.length),
      off,
      data,
      encodeChunkHeader(RF_DONE, Chunk.BLOCK_STATUS, 4n, bs.length),
      bs,
      encodeChunkHeader(RF_DONE, Chunk.ERROR_OFFSET, 5n, err.length),
      err,
    ]);
    // Every split, each piece a buffer the caller reuses (scribbled over) as soon as push returns. The
    // READ's data must land in the buffer the request named, copied once; the chunk with cookie 3 has none.
    const runs: Reply[][] = [];
    const cuts = [
      ...Array.from({ length: bytes.length + 1 }, (_, i) => [i]),
      Array.from({ length: bytes.length }, (_, i) => i),
    ];
    for (const cut of cuts) {
      const target = Buffer.alloc(100);
      const got: Reply[] = [];
      const dec = new ReplyDecoder(
        {
          simpleData: (c) => (c === 1n ? target : undefined),
          chunkData: (c, o, n) => (c === 3n ? undefined : assert.fail(`chunkData(${c}, ${o}, ${n})`)),
        },
        (r) => got.push(r),
      );
      let prev = 0;
      for (const c of [...cut, bytes.length]) {
        const piece = Buffer.from(bytes.subarray(prev, c));
        dec.push(piece);
        piece.fill(0xaa);
        prev = c;
      }
      assert.deepEqual(target, data);
      runs.push(got);
    }
    for (const r of runs) assert.deepEqual(r, runs[0]);
    const got = runs[0]!;
    assert.equal(got.length, 5);
    assert.deepEqual(got[0], { kind: "simple", cookie: 1n, error: 0, data });
    assert.deepEqual(got[1], { kind: "simple", cookie: 2n, error: 0, data: undefined });
    assert.deepEqual(got[2], { kind: "data", cookie: 3n, flags: 0, offset: 4096, data });
    const c4 = got[3] as Extract<Reply, { kind: "chunk" }>;
    assert.equal(c4.flags, RF_DONE);
    assert.deepEqual(decodeBlockStatus(c4.payload).extents, [
      { length: 4096, flags: 0 },
      { length: 8192, flags: 3 },
    ]);
    const c5 = got[4] as Extract<Reply, { kind: "chunk" }>;
    assert.deepEqual(decodeErrorChunk(c5.type, c5.payload), {
      error: 5,
      message: "disk on fire",
      offset: 4096,
    });
  });

  it("round-trips random requests, infos and meta context requests", () => {
    for (let i = 0; i < 500; i++) {
      const r = {
        flags: randomInt(0, 32),
        type: randomInt(0, 8),
        cookie: BigInt(randomInt(0, 2 ** 48 - 1)) * 65536n + BigInt(randomInt(0, 65536)),
        offset: randomInt(0, 2 ** 48 - 1),
        length: randomInt(0, 2048),
      };
      const payload = r.type === Cmd.WRITE ? randomBytes(r.length) : undefined;
      const q = new ByteQueue();
      q.push(encodeRequest(r));
      if (payload) q.push(payload);
      const got = new RequestParser(4096).next(q) as Request;
      assert.deepEqual({ ...got, data: undefined }, { ...r, data: undefined });
      if (payload) assert.deepEqual(got.data, payload);
      const size = randomInt(0, 2 ** 48 - 1);
      assert.deepEqual(decodeInfo(encodeInfo({ type: Info.EXPORT, size, flags: r.flags })), {
        type: Info.EXPORT,
        size,
        flags: r.flags,
      });
      const queries = Array.from({ length: randomInt(0, 4) }, () =>
        randomBytes(randomInt(0, 20)).toString("hex"),
      );
      assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest(`e${i}`, queries)), {
        name: `e${i}`,
        queries,
      });
    }
  });

  it("decodes random reply streams cut in random pieces, pushed or read in place, as they were encoded", () => {
    for (let round = 0; round < 300; round++) {
      // A stream of replies, each with what the decoder must report for it.
      const parts: Buffer[] = [];
      const expected: Reply[] = [];
      const readLength = new Map<bigint, number>();
      for (let i = 0, n = randomInt(1, 20); i < n; i++) {
        const cookie = BigInt(round * 100 + i);
        const flags = randomInt(0, 2) ? RF_DONE : 0;
        switch (randomInt(0, 6)) {
          case 0: {
            // A simple reply: a READ's data follows it, an error or another command's reply is bare.
            const error = randomInt(0, 3) === 0 ? randomInt(1, 100) : 0;
            const data = error ? undefined : randomInt(0, 2) ? randomBytes(randomInt(1, 3000)) : undefined;
            if (data) readLength.set(cookie, data.length);
            parts.push(encodeSimpleReply(error, cookie), ...(data ? [data] : []));
            expected.push({ kind: "simple", cookie, error, data });
            break;
          }
          case 1: {
            const data = randomBytes(randomInt(1, 3000));
            const offset = randomInt(0, 2 ** 40);
            const off = Buffer.alloc(8);
            off.writeBigUInt64BE(BigInt(offset));
            parts.push(encodeChunkHeader(flags, Chunk.OFFSET_DATA, cookie, 8 + data.length), off, data);
            expected.push({ kind: "data", cookie, flags, offset, data });
            break;
          }
          default: {
            // Any other chunk (and one of a type this decoder has never heard of) keeps its payload.
            const [type, payload] = [
              (): [number, Buffer] => [
                Chunk.OFFSET_HOLE,
                encodeOffsetHole(randomInt(0, 2 ** 40), randomInt(1, 2 ** 31)),
              ],
              (): [number, Buffer] => [
                Chunk.BLOCK_STATUS,
                encodeBlockStatus(
                  1,
                  Array.from({ length: randomInt(1, 9) }, () => ({
                    length: randomInt(1, 2 ** 31),
                    flags: randomInt(0, 4),
                  })),
                ),
              ],
              (): [number, Buffer] => [
                Chunk.ERROR,
                encodeErrorChunk(randomInt(1, 100), randomBytes(randomInt(0, 40)).toString("hex")),
              ],
              (): [number, Buffer] => [Chunk.NONE, Buffer.alloc(0)],
              (): [number, Buffer] => [99, randomBytes(randomInt(0, 100))],
            ][randomInt(0, 5)]!();
            parts.push(encodeChunkHeader(flags, type, cookie, payload.length), payload);
            expected.push({ kind: "chunk", cookie, flags, type, payload });
          }
        }
      }
      const bytes = Buffer.concat(parts);
      const got: Reply[] = [];
      const dec = new ReplyDecoder(
        {
          simpleData: (c) => (readLength.has(c) ? Buffer.alloc(readLength.get(c)!) : undefined),
          // Half the time the caller names a buffer, half the time the decoder allocates one.
          chunkData: (_c, _o, n) => (randomInt(0, 2) ? Buffer.alloc(n) : undefined),
        },
        (r) => got.push(r),
      );
      // Random pieces; where the decoder offers its buffer, the bytes are copied straight into it.
      for (let at = 0; at < bytes.length;) {
        const n = Math.min(randomInt(1, 700), bytes.length - at);
        const direct = randomInt(0, 2) ? dec.direct(1) : undefined;
        if (direct) {
          const k = Math.min(n, direct.length);
          bytes.copy(direct, 0, at, at + k);
          dec.advance(k);
          at += k;
        } else {
          const piece = Buffer.from(bytes.subarray(at, at + n));
          dec.push(piece);
          piece.fill(0x55); // the decoder must not keep it
          at += n;
        }
      }
      assert.deepEqual(got, expected, `round ${round}`);
    }
  });

  it("offers a read's buffer so that the bulk of it is received aligned", () => {
    const cookie = 7n;
    const into = alignedBuffer(4096 + ALIGN);
    const data = randomBytes(4096);
    const got: Reply[] = [];
    // The reply's data goes to an offset in the buffer that is 3 bytes short of an aligned point.
    const target = into.subarray(ALIGN - 3, ALIGN - 3 + data.length);
    const dec = new ReplyDecoder({ simpleData: () => target, chunkData: () => target }, (r) => got.push(r));
    const off = Buffer.alloc(8);
    dec.push(Buffer.concat([encodeChunkHeader(RF_DONE, Chunk.OFFSET_DATA, cookie, 8 + data.length), off]));
    const first = dec.direct(1)!;
    assert.equal(first.length, 3, "only up to the aligned point");
    data.copy(first, 0, 0, 3);
    dec.advance(3);
    const rest = dec.direct(1)!;
    assert.equal(rest.byteOffset % ALIGN, 0);
    assert.equal(rest.length, data.length - 3);
    data.copy(rest, 0, 3);
    dec.advance(rest.length);
    assert.equal(got.length, 1);
    assert.ok(target.equals(data));
  });

  it("aligned buffers start on a page of their own memory and do not overlap", () => {
    const bufs = [1, 4096, 5000, 256 * 1024, 8 * 1024 * 1024].map((n) => alignedBuffer(n));
    bufs.forEach((b, i) => {
      assert.equal(b.byteOffset % 4096, 0);
      assert.equal(b.buffer.byteLength % 65536, 0, "carved from WebAssembly memory");
      b.fill(i + 1);
    });
    bufs.forEach((b, i) =>
      assert.ok(
        b.every((x) => x === i + 1),
        `buffer ${i} kept its bytes`,
      ),
    );
    const odd = alignedBuffer(100).subarray(10);
    assert.equal(alignedEnd(odd), ALIGN - 10);
    assert.equal(alignedEnd(alignedBuffer(100)), 100);
    assert.equal(alignedEnd(alignedBuffer(100).subarray(10, 20)), 10);
  });

  it("refuses malformed input with a protocol error", () => {
    const q = (b: Buffer) => {
      const x = new ByteQueue();
      x.push(b);
      return x;
    };
    const bad = encodeRequest({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 0 });
    bad.writeUInt32BE(0xdeadbeef, 0);
    assert.throws(() => new RequestParser(10).next(q(bad)), NbdProtocolError);
    const longOpt = encodeOption(Opt.GO, Buffer.alloc(100));
    assert.throws(() => parseOption(q(longOpt), 50), /too long/);
    assert.throws(() => decodeInfoRequest(Buffer.from([0, 0, 0, 9, 1])), /truncated/);
    assert.throws(
      () => decodeMetaContextRequest(Buffer.from([0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])),
      /truncated/,
    );
    assert.throws(() => parseGreeting(q(Buffer.alloc(18))), /not an NBD server/);
    const hugeOffset = encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0, length: 1 });
    hugeOffset.writeBigUInt64BE(2n ** 63n, 16);
    assert.equal(new RequestParser(10).next(q(hugeOffset))!.offsetOverflow, true);
  });
});
