/**
 * Our NBD client and copy engine against real servers: qemu-nbd (raw and qcow2) and nbdkit (memory, file,
 * and its error filter), and our copy beside nbdcopy; plus NBD URI parsing and the CLI verbs.
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { NbdClient } from "../src/nbd/client/client.js";
import { copy, mergeTopExtents } from "../src/nbd/client/copy.js";
import { parseNbdUri } from "../src/nbd/client/uri.js";
import { MemoryBackend } from "../src/nbd/server/backends/memory.js";
import { PassThrough } from "../src/nbd/server/backend.js";
import { errorInjection, requestLog } from "../src/nbd/server/filters.js";
import { NbdServer } from "../src/nbd/server/server.js";
import { ByteQueue } from "../src/nbd/protocol/bytes.js";
import {
  encodeChunkHeader,
  encodeGreeting,
  encodeInfo,
  encodeOptionReply,
  parseClientFlags,
  parseOption,
  RequestParser,
  type Extent,
} from "../src/nbd/protocol/codec.js";
import {
  Chunk,
  Cmd,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  Info,
  Opt,
  Rep,
  RF_DONE,
  STATE_HOLE,
  STATE_ZERO,
} from "../src/nbd/protocol/constants.js";
import { quickAck, tcp, tcpLoadError } from "../src/nbd/native/tcp.js";
import { isZero } from "../src/nbd/zeros.js";
import { waitForPort } from "../src/util/net.js";
import { cli, need } from "./helpers/env.js";
import { patternImage, run, tmpdir } from "./helpers/nbd.js";

const TOOLS = ["qemu-nbd", "nbdkit", "nbdcopy", "qemu-img", "qemu-io"];
const MiB = 1024 * 1024;
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");
/** qemu-nbd's arguments for one writable export "d" on 127.0.0.1, up to 8 connections, persistent. */
const qemuNbd = (format: string, file: string) => (port: number) => [
  "-f",
  format,
  "-p",
  String(port),
  "-b",
  "127.0.0.1",
  "-x",
  "d",
  "-t",
  "-e",
  "8",
  file,
];

/** A free TCP port. */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, "127.0.0.1", r));
  const p = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return p;
}

/** SIGTERM, and the exit. */
async function stopProcess(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const exited = new Promise((r) => p.once("exit", r));
  p.kill("SIGTERM");
  await exited;
}

/** Starts a server process and waits until its port accepts connections. */
async function serve(
  cmd: string,
  args: (port: number) => string[],
): Promise<{ uri: string; proc: ChildProcess; port: number }> {
  const port = await freePort();
  const proc = spawn(cmd, args(port), { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr!.on("data", (b: Buffer) => (err += b.toString()));
  await waitForPort(port, { alive: () => proc.exitCode === null, what: `${cmd}: ${err}` }).catch(() => {
    throw new Error(`${cmd} did not start: ${err}`);
  });
  return { uri: `nbd://127.0.0.1:${port}`, proc, port };
}

describe("NBD URIs", () => {
  it("reads the forms libnbd reads and refuses the rest with the fix", () => {
    assert.deepEqual(parseNbdUri("nbd://example.com/disk%201"), {
      transport: { host: "example.com", port: 10809 },
      exportName: "disk 1",
      tls: false,
      tlsCertificates: undefined,
      tlsVerifyPeer: true,
    });
    assert.deepEqual(parseNbdUri("nbds://[::1]:10900/").transport, { host: "::1", port: 10900 });
    assert.equal(parseNbdUri("nbds://h/x?tls-certificates=/pki&tls-verify-peer=false").tlsVerifyPeer, false);
    assert.deepEqual(parseNbdUri("nbd+unix:///vda?socket=/run/n.sock").transport, { path: "/run/n.sock" });
    assert.throws(() => parseNbdUri("nbd+unix:///vda"), /needs \?socket=PATH/);
    assert.throws(() => parseNbdUri("http://x/y"), /unknown scheme 'http'/);
    assert.throws(() => parseNbdUri("not a uri"), /is not an NBD URI/);
  });
});

describe("the TCP helper", () => {
  it("is built and loaded (CI builds it; elsewhere it may be missing), and acks at once on TCP only", async (t) => {
    if (process.env.CI !== "true" && !tcp) return t.skip(`not loaded: ${tcpLoadError}`);
    assert.ok(tcp, `the native TCP helper did not load: ${tcpLoadError}`);
    const dir = tmpdir("tcp");
    const srv = net.createServer((s) => s.end());
    const sock = path.join(dir, "s.sock");
    try {
      await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
      const port = (srv.address() as net.AddressInfo).port;
      const overTcp = net.connect({ host: "127.0.0.1", port });
      await new Promise((r) => overTcp.once("connect", r));
      assert.equal(quickAck(overTcp), true);
      overTcp.destroy();
      const unixSrv = net.createServer((s) => s.end());
      await new Promise<void>((r) => unixSrv.listen(sock, r));
      const overUnix = net.connect({ path: sock });
      await new Promise((r) => overUnix.once("connect", r));
      assert.equal(quickAck(overUnix), false, "a Unix socket has no TCP_QUICKACK");
      overUnix.destroy();
      await new Promise((r) => unixSrv.close(r));
    } finally {
      await new Promise((r) => srv.close(r));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("our NBD client against qemu-nbd and nbdkit", { timeout: 300_000 }, () => {
  const dir = tmpdir("nbdcli");
  const procs: ChildProcess[] = [];
  const raw = path.join(dir, "disk.raw");
  const qcow = path.join(dir, "disk.qcow2");
  let servers: Record<string, string> = {};

  before(async () => {
    if (!TOOLS.every((t) => spawnable(t)) && process.env.CI !== "true") return;
    await patternImage(raw, 64, [
      [0xab, 1, 2],
      [0xcd, 40, 1],
    ]);
    await run("qemu-img", ["convert", "-O", "qcow2", raw, qcow]);
    const s = {
      "qemu-nbd raw": await serve("qemu-nbd", qemuNbd("raw", path.join(dir, "w.raw"))),
      "qemu-nbd qcow2": await serve("qemu-nbd", qemuNbd("qcow2", qcow)),
      "nbdkit memory": await serve("nbdkit", (p) => [
        "-f",
        "-p",
        String(p),
        "-i",
        "127.0.0.1",
        "--exportname=d",
        "memory",
        "64M",
      ]),
      "nbdkit file": await serve("nbdkit", (p) => [
        "-f",
        "-p",
        String(p),
        "-i",
        "127.0.0.1",
        "file",
        path.join(dir, "k.raw"),
      ]),
      "nbdkit error": await serve("nbdkit", (p) => [
        "-f",
        "-p",
        String(p),
        "-i",
        "127.0.0.1",
        "--filter=error",
        "memory",
        "64M",
        "error=EIO",
        "error-pread-rate=100%",
      ]),
    };
    for (const v of Object.values(s)) procs.push(v.proc);
    servers = Object.fromEntries(Object.entries(s).map(([k, v]) => [k, v.uri]));
  });
  after(() => {
    for (const p of procs) p.kill("SIGKILL");
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // Files the servers write into, made before they start.
  fs.mkdirSync(dir, { recursive: true });
  for (const f of ["w.raw", "k.raw"]) {
    fs.writeFileSync(path.join(dir, f), "");
    fs.truncateSync(path.join(dir, f), 64 * MiB);
  }

  for (const name of ["qemu-nbd raw", "qemu-nbd qcow2", "nbdkit memory", "nbdkit file"]) {
    it(`${name}: handshake, block status, read, write, zero, trim, flush, pipelined`, async (t) => {
      if (!need(t, TOOLS)) return;
      const uri = `${servers[name]}/${name.startsWith("nbdkit file") ? "" : "d"}`;
      const c = await NbdClient.connect(uri);
      try {
        assert.equal(c.size, 64 * MiB);
        assert.equal(c.structured, true, "structured replies");
        assert.ok(c.canBlockStatus, "base:allocation");
        if (name === "qemu-nbd qcow2") {
          const ext = await c.blockStatus(0, 64 * MiB);
          const at = (off: number) => {
            let pos = 0;
            for (const e of ext) {
              if (off < pos + e.length) return e.flags;
              pos += e.length;
            }
            return -1;
          };
          assert.equal(at(1 * MiB) & STATE_HOLE, 0, "data at 1 MiB");
          assert.equal(at(20 * MiB) & STATE_ZERO, STATE_ZERO, "zeros at 20 MiB");
          assert.deepEqual(await c.read(1 * MiB, 8), Buffer.alloc(8, 0xab));
          assert.deepEqual(await c.read(40 * MiB + 4096, 8), Buffer.alloc(8, 0xcd));
          const one = await c.blockStatus(1 * MiB, 8 * MiB, { reqOne: true });
          assert.equal(one.length, 1);
        }
        const data = Buffer.alloc(256 * 1024, 0x42);
        await c.write(data, 4 * MiB, { fua: true });
        assert.deepEqual(await c.read(4 * MiB, data.length), data);
        await c.zero(4 * MiB, 64 * 1024);
        assert.deepEqual(await c.read(4 * MiB, 64 * 1024), Buffer.alloc(64 * 1024));
        await c.trim(30 * MiB, 1 * MiB);
        await c.flush();
        const many = await Promise.all(
          Array.from({ length: 300 }, (_, i) => c.read(4 * MiB + 64 * 1024 + (i % 16) * 4096, 4096)),
        );
        assert.ok(many.every((b) => b.equals(Buffer.alloc(4096, 0x42))));
        await assert.rejects(c.read(64 * MiB, 1), { code: "E_NBD_EINVAL" });
        assert.equal(c.state, "transmission", "an error reply does not end the connection");
      } finally {
        await c.disconnect();
      }
    });
  }

  it("reports a server's errors (nbdkit error filter) as NBD errors, per request", async (t) => {
    if (!need(t, TOOLS)) return;
    const c = await NbdClient.connect(`${servers["nbdkit error"]}/`);
    await assert.rejects(c.read(0, 4096), (e: Error & { code?: string }) => {
      assert.equal(e.code, "E_NBD_EIO");
      return true;
    });
    await c.write(Buffer.alloc(512, 1), 0);
    await c.disconnect();
  });

  it("lists exports and fails clearly on a missing one", async (t) => {
    if (!need(t, TOOLS)) return;
    assert.deepEqual(
      (await NbdClient.list(servers["qemu-nbd qcow2"]!)).map((e) => e.name),
      ["d"],
    );
    await assert.rejects(NbdClient.connect(`${servers["qemu-nbd qcow2"]}/nosuch`), {
      code: "E_NBD_NO_EXPORT",
    });
    await assert.rejects(NbdClient.connect("nbd://127.0.0.1:1/x"), { code: "E_NBD_CONNECT" });
  });

  it("copies like nbdcopy: same bytes, holes as zero requests, to files, NBD and null:", async (t) => {
    if (!need(t, TOOLS)) return;
    const src = `${servers["qemu-nbd qcow2"]}/d`;
    const ours = path.join(dir, "ours.raw");
    const theirs = path.join(dir, "theirs.raw");
    const r = await copy(src, ours, { verify: true });
    await run("nbdcopy", [src, theirs]);
    assert.equal(sha(fs.readFileSync(ours)), sha(fs.readFileSync(theirs)));
    assert.ok(r.dataBytes <= 4 * MiB, `only the data travels as data: ${r.dataBytes}`);
    assert.ok(r.sha256);
    // NBD to NBD over several connections, then back for a check.
    const mem = `${servers["nbdkit memory"]}/d`;
    await copy(raw, mem, { connections: 4 });
    const back = path.join(dir, "back.raw");
    await copy(mem, back);
    assert.equal(sha(fs.readFileSync(back)), sha(fs.readFileSync(raw)));
    // A flush only when asked for, as nbdcopy: seen through our own server's request log.
    const lines: string[] = [];
    const logged = new NbdServer({
      exports: [{ name: "m", backend: requestLog((l) => lines.push(l))(new MemoryBackend(64 * MiB)) }],
    });
    const at = (await logged.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
    // Our server flushes each connection on NBD_CMD_DISC by itself; count once every connection is gone.
    const flushes = async (flush: boolean) => {
      const before = lines.filter((l) => l.startsWith("flush")).length;
      await copy(raw, `nbd://127.0.0.1:${at.port}/m`, { flush });
      while (logged.connections > 0) await new Promise((r) => setTimeout(r, 10));
      return lines.filter((l) => l.startsWith("flush")).length - before;
    };
    try {
      const plain = await flushes(false);
      assert.equal(await flushes(true), plain + 1, "--flush adds one flush: multi-conn makes one enough");
    } finally {
      await logged.close();
    }
    const nul = await copy(src, "null:");
    assert.equal(nul.size, 64 * MiB);
    await assert.rejects(copy(src, "null:", { verify: true }), /null: cannot be read/);
  });

  it("copies only a backing chain's top image (topOnly, through qemu:allocation-depth), zeros over the base included", async (t) => {
    if (!need(t, TOOLS)) return;
    // The base: data in its first 8 MiB; both sides have it. The overlay: 2 MiB of data, 1 MiB written as
    // zeros and a zero cluster, both over the base's data.
    const base = path.join(dir, "chain-base.qcow2");
    await run("qemu-img", ["create", "-q", "-f", "qcow2", base, "64M"]);
    await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x11 0 8M", base]);
    const overlay = (f: string) =>
      run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", f]);
    const top = path.join(dir, "chain-top.qcow2");
    const dst = path.join(dir, "chain-dst.qcow2");
    await overlay(top);
    await overlay(dst);
    for (const c of ["write -P 0x22 32M 2M", "write -P 0 1M 1M", "write -z 4M 64k"])
      await run("qemu-io", ["-f", "qcow2", "-c", c, top]);
    const s = await serve("qemu-nbd", (p) => ["-A", "-r", ...qemuNbd("qcow2", top)(p)]);
    const d = await serve("qemu-nbd", qemuNbd("qcow2", dst));
    procs.push(s.proc, d.proc);
    try {
      await assert.rejects(copy(`${servers["nbdkit memory"]}/d`, `${d.uri}/d`, { topOnly: true }), {
        message: /no qemu:allocation-depth\): serve it with qemu-nbd --allocation-depth/,
      });
      const r = await copy(`${s.uri}/d`, `${d.uri}/d`, {
        topOnly: true,
        destinationIsZero: true,
        flush: true,
      });
      t.diagnostic(`data ${r.dataBytes}, zero ${r.zeroBytes}, below the top ${r.belowTopBytes}`);
      assert.equal(r.dataBytes, 2 * MiB, "only the overlay's data travels");
      assert.equal(r.zeroBytes, MiB + 64 * 1024, "its zeros as zero requests, despite destinationIsZero");
      assert.equal(r.belowTopBytes, 64 * MiB - 3 * MiB - 64 * 1024);
    } finally {
      // qemu-nbd holds the images' locks until it exits.
      await Promise.all([s.proc, d.proc].map(stopProcess));
    }
    await run("qemu-img", ["compare", top, dst]);
    const info = JSON.parse(await run("qemu-img", ["info", "--output=json", dst])) as Record<string, number>;
    assert.ok(
      info["actual-size"]! < 8 * MiB,
      `the destination's overlay stays small: ${info["actual-size"]}`,
    );
  });

  it("lines up two meta contexts' extents cut at different offsets", () => {
    const merged = mergeTopExtents(
      [
        { length: 3, flags: 0 },
        { length: 5, flags: STATE_HOLE | STATE_ZERO },
      ],
      [
        { length: 2, flags: 1 },
        { length: 1, flags: 2 },
        { length: 4, flags: 1 },
      ],
    );
    assert.deepEqual(merged, [
      { length: 2, flags: 0, inTop: true },
      { length: 1, flags: 0, inTop: false },
      { length: 4, flags: STATE_HOLE | STATE_ZERO, inTop: true },
    ]);
  });

  it("refuses a lying server: data outside the read, reads left uncovered, unknown cookies", async () => {
    /**
     * A hand-written server: a plain handshake (structured replies on, no meta contexts, a 1 MiB export),
     * then every READ answered by `lie(cookie, offset, length)`.
     */
    async function liar(lie: (cookie: bigint, offset: number, length: number) => Buffer[]) {
      const srv = net.createServer((s) => {
        const q = new ByteQueue();
        let stage: "flags" | "options" | "transmission" = "flags";
        const parser = new RequestParser(1 << 20);
        s.on("error", () => undefined);
        s.write(encodeGreeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        s.on("data", (b: Buffer) => {
          q.push(b);
          if (stage === "flags") {
            if (parseClientFlags(q) === undefined) return;
            stage = "options";
          }
          // Every option is acknowledged (so: structured replies, no meta contexts); GO opens the export.
          for (let o = stage === "options" ? parseOption(q, 4096) : undefined; o; o = parseOption(q, 4096)) {
            if (o.option !== Opt.GO) {
              s.write(encodeOptionReply(o.option, Rep.ACK));
              continue;
            }
            s.write(
              encodeOptionReply(Opt.GO, Rep.INFO, encodeInfo({ type: Info.EXPORT, size: MiB, flags: 1 })),
            );
            s.write(encodeOptionReply(Opt.GO, Rep.ACK));
            stage = "transmission";
            break;
          }
          if (stage !== "transmission") return;
          for (let r = parser.next(q); r; r = parser.next(q))
            if (r.type === Cmd.READ) for (const part of lie(r.cookie, r.offset, r.length)) s.write(part);
        });
      });
      await new Promise<void>((r) => srv.listen(0, "127.0.0.1", r));
      return { uri: `nbd://127.0.0.1:${(srv.address() as net.AddressInfo).port}/`, srv };
    }
    const data = (cookie: bigint, offset: number, bytes: Buffer, flags = RF_DONE) => {
      const off = Buffer.alloc(8);
      off.writeBigUInt64BE(BigInt(offset));
      return [encodeChunkHeader(flags, Chunk.OFFSET_DATA, cookie, 8 + bytes.length), off, bytes];
    };
    const cases: [string, (c: bigint, o: number, n: number) => Buffer[], RegExp][] = [
      ["data past the read", (c, o, n) => data(c, o + 1, Buffer.alloc(n)), /outside the request/],
      ["half of the read", (c, o, n) => data(c, o, Buffer.alloc(n / 2)), /covered 2048 of 4096 bytes/],
      [
        "the same half twice",
        (c, o, n) => [...data(c, o, Buffer.alloc(n / 2), 0), ...data(c, o, Buffer.alloc(n / 2))],
        /overlap/,
      ],
      ["an unknown cookie", (c, o, n) => data(c + 1000n, o, Buffer.alloc(n)), /unknown cookie/],
    ];
    for (const [what, lie, message] of cases) {
      const { uri, srv } = await liar(lie);
      try {
        const c = await NbdClient.connect(uri);
        await assert.rejects(c.read(0, 4096), (e: Error & { code?: string }) => {
          assert.equal(e.code, "E_NBD_PROTOCOL", what);
          assert.match(e.message, message, what);
          return true;
        });
        // The connection is dead: later calls fail at once with the same kind of error.
        await assert.rejects(c.read(0, 4096), { code: "E_NBD_PROTOCOL" });
        c.destroy();
      } finally {
        srv.close();
      }
    }
  });

  it("copies through a server that maps in small pieces, and fails cleanly when the map fails", async () => {
    // 256 MiB with 1 MiB of data every 32 MiB; the source answers block status one extent of at most
    // 1 MiB at a time (the protocol allows fewer extents than asked), so the map takes many lookups.
    const src = new MemoryBackend(256 * MiB);
    for (let at = 0; at < 256 * MiB; at += 32 * MiB) await src.pwrite(Buffer.alloc(MiB, at / MiB + 1), at);
    class ShortMap extends PassThrough {
      override async extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
        const [first] = await super.extents(offset, Math.min(length, MiB), reqOne);
        return [first!];
      }
    }
    const dst = new MemoryBackend(256 * MiB);
    await dst.pwrite(Buffer.alloc(MiB, 0xff), 100 * MiB); // stale data where the source has a hole
    const failing = errorInjection({ ops: ["extents"], range: { offset: 128 * MiB, length: 128 * MiB } });
    const server = new NbdServer({
      exports: [
        { name: "short", backend: new ShortMap(src) },
        { name: "failing", backend: failing(src) },
        { name: "dst", backend: dst },
      ],
    });
    const a = (await server.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
    const uri = (name: string) => `nbd://127.0.0.1:${a.port}/${name}`;
    try {
      const r = await copy(uri("short"), uri("dst"), { verify: true });
      assert.equal(r.dataBytes, 8 * MiB, "only the data is read and written");
      assert.equal(r.zeroBytes, 248 * MiB);
      const back = Buffer.alloc(MiB);
      await dst.pread(back, 100 * MiB);
      assert.ok(isZero(back), "the hole was zeroed on the destination");
      // Block status fails past 128 MiB: the copy rejects with the server's error, nothing left dangling.
      await assert.rejects(copy(uri("failing"), uri("dst")), { code: "E_NBD_EIO" });
    } finally {
      await server.close();
    }
  });

  it("maps a sparse disk in lookups that grow over holes, and copies it exactly", async () => {
    // 16 GiB of holes with 1 MiB of data at 5 GiB: lookups start at 64 MiB and double while they find
    // little data, so the map takes a handful of lookups rather than 256.
    const size = 16 * 1024 * MiB;
    const src = new MemoryBackend(size);
    await src.pwrite(Buffer.alloc(MiB, 0x5a), 5 * 1024 * MiB);
    const lookups: number[] = [];
    class Counted extends PassThrough {
      override extents(offset: number, length: number, reqOne: boolean): Promise<Extent[]> {
        lookups.push(length);
        return super.extents(offset, length, reqOne);
      }
    }
    const dst = new MemoryBackend(size);
    const server = new NbdServer({
      exports: [
        { name: "src", backend: new Counted(src) },
        { name: "dst", backend: dst },
      ],
    });
    const a = (await server.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
    try {
      const r = await copy(`nbd://127.0.0.1:${a.port}/src`, `nbd://127.0.0.1:${a.port}/dst`);
      assert.equal(r.dataBytes, MiB);
      assert.equal(r.zeroBytes, size - MiB);
      assert.equal(lookups[0], 64 * MiB);
      // Each lookup at least as long as the one before, but the last, which ends at the end of the disk.
      const grow = lookups.slice(0, -1).every((n, i) => i === 0 || n >= lookups[i - 1]!);
      assert.ok(grow, `lookups grow: ${lookups}`);
      assert.equal(Math.max(...lookups), 2048 * MiB, "up to 2 GiB");
      assert.ok(lookups.length < 20, `${lookups.length} lookups`);
      const back = Buffer.alloc(MiB);
      await dst.pread(back, 5 * 1024 * MiB);
      assert.ok(back.every((b) => b === 0x5a));
    } finally {
      await server.close();
    }
  });

  it("the CLI: nbd info (--size, --map, --can, --json) and nbd copy", async (t) => {
    if (!need(t, TOOLS)) return;
    const src = `${servers["qemu-nbd qcow2"]}/d`;
    // The CLI runs in another process, so synchronous spawning is fine here.
    assert.equal(cli(["nbd", "info", "--size", src]).stdout.trim(), String(64 * MiB));
    const map = JSON.parse(cli(["nbd", "info", "--map", "--json", src]).stdout) as {
      offset: number;
      description: string;
    }[];
    assert.ok(map.some((m) => m.offset <= 1 * MiB && m.description === "data"));
    assert.equal(cli(["nbd", "info", "--can", "trim", src]).status, 0);
    assert.equal(cli(["nbd", "info", "--can", "bogus", src]).status, 2);
    const info = JSON.parse(cli(["nbd", "info", "--json", src]).stdout) as {
      size: number;
      can_multi_conn: boolean;
    };
    assert.equal(info.size, 64 * MiB);
    const out = path.join(dir, "cli.raw");
    const c = cli(["nbd", "copy", "--verify", "--json", src, out]);
    assert.equal(c.status, 0, c.stderr);
    const theirs = path.join(dir, "cli-theirs.raw");
    await run("nbdcopy", [src, theirs]);
    assert.equal(sha(fs.readFileSync(out)), sha(fs.readFileSync(theirs)));
    const bad = cli(["nbd", "copy", "-C", "0", src, out]);
    assert.equal(bad.status, 2);
    assert.match(bad.stderr, /--connections takes a positive whole number, not '0'/);
  });
});

function spawnable(tool: string): boolean {
  return (process.env.PATH ?? "").split(":").some((d) => fs.existsSync(path.join(d, tool)));
}
