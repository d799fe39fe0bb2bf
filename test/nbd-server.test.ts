/**
 * Our NBD server driven by the real NBD world: nbdinfo, nbdcopy, nbdsh (libnbd), qemu-img and qemu-io, QEMU
 * itself mirroring onto it, TLS, and hostile clients that must not crash it or write outside an export.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { NbdClient } from "../src/nbd/client/client.js";
import { ByteQueue } from "../src/nbd/protocol/bytes.js";
import {
  encodeClientFlags,
  encodeInfoRequest,
  encodeOption,
  encodeRequest,
  parseGreeting,
  parseOptionReply,
  ReplyDecoder,
  type Reply,
} from "../src/nbd/protocol/codec.js";
import { Cmd, FLAG_C_FIXED_NEWSTYLE, NbdErrno, Opt, Rep } from "../src/nbd/protocol/constants.js";
import { sparse, sparseLoadError } from "../src/nbd/native/sparse.js";
import { FileBackend } from "../src/nbd/server/backends/file.js";
import { MemoryBackend } from "../src/nbd/server/backends/memory.js";
import { readOnly } from "../src/nbd/server/filters.js";
import { NbdServer } from "../src/nbd/server/server.js";
import { launchQemu } from "../src/qemu/launcher.js";
import { need } from "./helpers/env.js";
import { makeCertificates, patternImage, run, status, tmpdir } from "./helpers/nbd.js";

const TOOLS = ["nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "qemu-io", "qemu-system-x86_64", "openssl"];
const MiB = 1024 * 1024;
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

describe(
  "our NBD server against nbdinfo, nbdcopy, nbdsh, qemu-img, qemu-io and QEMU",
  { timeout: 300_000 },
  () => {
    const dir = tmpdir("nbdsrv");
    const diskFile = path.join(dir, "disk.img");
    const roFile = path.join(dir, "ro.img");
    let server: NbdServer;
    let ram: MemoryBackend;
    let base = "";
    let port = 0;

    before(async () => {
      await patternImage(diskFile, 64, [
        [0xab, 1, 2],
        [0xcd, 10, 1],
      ]);
      await patternImage(roFile, 8, [[0x11, 0, 1]]);
      ram = new MemoryBackend(64 * MiB);
      server = new NbdServer({
        exports: [
          { name: "disk", description: "a file", backend: await FileBackend.open(diskFile) },
          { name: "ram", backend: ram },
          {
            name: "ro",
            description: "read-only",
            backend: readOnly(await FileBackend.open(roFile, { readonly: true })),
          },
        ],
        maxPayload: 4 * MiB,
      });
      const a = (await server.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
      port = a.port;
      base = `nbd://127.0.0.1:${port}`;
    });
    after(async () => {
      await server?.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it("the sparse helper is built and loaded (CI builds it; elsewhere it may be missing)", (t) => {
      if (process.env.CI !== "true" && !sparse) return t.skip(`not loaded: ${sparseLoadError}`);
      assert.ok(sparse, `the native sparse helper did not load: ${sparseLoadError}`);
    });

    it("nbdinfo lists the exports, maps allocation and answers --can / --is", async (t) => {
      if (!need(t, TOOLS)) return;
      const list = JSON.parse(await run("nbdinfo", ["--list", "--json", base])) as {
        exports: {
          "export-name": string;
          description?: string;
          "export-size": number;
          is_read_only: boolean;
          can_trim: boolean;
          contexts: string[];
        }[];
      };
      const byName = Object.fromEntries(list.exports.map((e) => [e["export-name"], e]));
      assert.deepEqual(Object.keys(byName).sort(), ["disk", "ram", "ro"]);
      assert.equal(byName.disk!["export-size"], 64 * MiB);
      assert.equal(byName.disk!.description, "a file");
      assert.equal(byName.ro!.is_read_only, true);
      assert.equal(byName.ram!.can_trim, true);
      assert.ok(byName.disk!.contexts.includes("base:allocation"));
      if (sparse) {
        const map = JSON.parse(await run("nbdinfo", ["--map", "--json", `${base}/disk`])) as {
          offset: number;
          length: number;
          type: number;
        }[];
        const typeAt = (off: number) => map.find((e) => e.offset <= off && off < e.offset + e.length)!.type;
        assert.equal(typeAt(1 * MiB), 0, "data at 1 MiB");
        assert.equal(typeAt(2 * MiB + 5), 0);
        assert.equal(typeAt(5 * MiB), 3, "a hole at 5 MiB");
        assert.equal(typeAt(10 * MiB), 0);
        assert.equal(typeAt(40 * MiB), 3);
      }
      assert.equal((await status("nbdinfo", ["--can", "trim", `${base}/disk`])).code, 0);
      assert.equal((await status("nbdinfo", ["--can", "trim", `${base}/ro`])).code, 2);
      assert.equal((await status("nbdinfo", ["--is", "read-only", `${base}/ro`])).code, 0);
      assert.notEqual((await status("nbdinfo", ["--can", "connect", `${base}/nosuch`])).code, 0);
    });

    it("nbdcopy copies into it and out of it, over several connections", async (t) => {
      if (!need(t, TOOLS)) return;
      await run("nbdcopy", ["--connections=4", diskFile, `${base}/ram`]);
      const back = path.join(dir, "back.img");
      await run("nbdcopy", ["--connections=4", `${base}/ram`, back]);
      assert.equal(sha(fs.readFileSync(back)), sha(fs.readFileSync(diskFile)));
      // Holes stay holes in RAM: 3 MiB of data copied, not 64.
      assert.ok(ram.allocated <= 4 * MiB, `${ram.allocated} bytes allocated`);
    });

    it("qemu-img and qemu-io read, write, zero and discard through it", async (t) => {
      if (!need(t, TOOLS)) return;
      assert.match(await run("qemu-img", ["info", `${base}/disk`]), /virtual size: 64 MiB/);
      const q = path.join(dir, "conv.qcow2");
      await run("qemu-img", ["convert", "-O", "qcow2", `${base}/disk`, q]);
      assert.match(await run("qemu-img", ["compare", q, diskFile]), /Images are identical/);
      const out = await run("qemu-io", [
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 20M 1M",
        "-c",
        "read -P 0x5a 20M 1M",
        "-c",
        "write -z 20M 64k",
        "-c",
        "read -P 0 20M 64k",
        "-c",
        "discard 30M 1M",
        "-c",
        "read -P 0 30M 1M",
        "-c",
        "flush",
        `${base}/ram`,
      ]);
      assert.doesNotMatch(out, /fail|error/i);
      const c = await NbdClient.connect(`${base}/ram`);
      assert.deepEqual(await c.read(20 * MiB + 64 * 1024, 4), Buffer.alloc(4, 0x5a));
      await c.disconnect();
    });

    it("nbdsh (libnbd) sees the right errors, zeroes fast, and gets one extent with REQ_ONE", async (t) => {
      if (!need(t, TOOLS)) return;
      const script = `
import errno
h.connect_uri("${base}/ro")
try:
    h.pwrite(b"x" * 512, 0)
    print("write-ok")
except nbd.Error as e:
    print("write", errno.errorcode.get(e.errno, e.errno))
try:
    h.pread(512, h.get_size())
except nbd.Error as e:
    print("past-end", errno.errorcode.get(e.errno, e.errno))
h.shutdown()
h2 = nbd.NBD()
h2.add_meta_context("base:allocation")
h2.connect_uri("${base}/disk")
h2.zero(65536, 4 * 1048576, nbd.CMD_FLAG_FAST_ZERO)
print("fast-zero", h2.pread(4, 4 * 1048576 + 10) == b"\\0" * 4)
seen = []
def cb(ctx, off, entries, err):
    seen.append(len(entries))
    return 0
h2.block_status(8 * 1048576, 0, cb, nbd.CMD_FLAG_REQ_ONE)
print("req-one", seen)
h2.cache(1048576, 0)
print("can-cache", h2.can_cache(), "multi-conn", h2.can_multi_conn())
h2.shutdown()
`;
      // nbdsh runs the python3 first on PATH; Debian's has python3-libnbd's module.
      const out = await run("nbdsh", ["-c", script], {
        env: { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH}` },
      });
      assert.match(out, /write EPERM/);
      assert.match(out, /past-end EINVAL/);
      if (sparse) assert.match(out, /fast-zero True/);
      assert.match(out, /req-one \[2\]/, "one extent: length and flags");
      assert.match(out, /can-cache True multi-conn True/);
    });

    /** Test certificates (CA, server, client), made once for the TLS tests. */
    let pki: Promise<string> | undefined;
    const certificates = () =>
      (pki ??= (async () => {
        const certs = path.join(dir, "pki");
        fs.mkdirSync(certs);
        await makeCertificates(certs);
        return certs;
      })());

    /** QEMU, as a migration source does, mirrors a disk onto our server; with `tls`, over mutual TLS. */
    async function qemuMirror(tls: boolean): Promise<void> {
      const certs = tls ? await certificates() : undefined;
      const src = path.join(dir, tls ? "vm-tls.img" : "vm.img");
      await patternImage(src, 32, [
        [0x77, 0, 4],
        [0x99, 20, 3],
      ]);
      const target = new MemoryBackend(32 * MiB);
      const s2 = new NbdServer({
        exports: [{ name: "vda", backend: target }],
        // The CA makes the server ask for, and verify, QEMU's client certificate.
        ...(certs && {
          tls: {
            cert: path.join(certs, "server-cert.pem"),
            key: path.join(certs, "server-key.pem"),
            ca: path.join(certs, "ca-cert.pem"),
            require: true,
          },
        }),
      });
      const a = (await s2.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
      const sock = path.join(dir, tls ? "qmp-tls.sock" : "qmp.sock");
      const { pid, qmp } = await launchQemu(
        [
          "-machine",
          "none",
          "-nodefaults",
          "-display",
          "none",
          "-chardev",
          `socket,id=qmp,path=${sock},server=on,wait=off`,
          "-mon",
          "chardev=qmp,mode=control",
          ...(certs ? ["-object", `tls-creds-x509,id=tls0,dir=${certs},endpoint=client`] : []),
          "-blockdev",
          JSON.stringify({ driver: "raw", "node-name": "src", file: { driver: "file", filename: src } }),
        ],
        sock,
        path.join(dir, tls ? "qemu-tls.log" : "qemu.log"),
      );
      try {
        await qmp.raw("blockdev-add", {
          driver: "nbd",
          "node-name": "dst",
          server: { type: "inet", host: tls ? "localhost" : "127.0.0.1", port: String(a.port) },
          export: "vda",
          ...(tls && { "tls-creds": "tls0" }),
        });
        await qmp.raw("blockdev-mirror", { "job-id": "m", device: "src", target: "dst", sync: "full" });
        for (let i = 0; ; i++) {
          const jobs = (await qmp.raw("query-block-jobs", {})) as { device: string; ready: boolean }[];
          if (jobs.find((j) => j.device === "m")?.ready) break;
          assert.ok(i < 200, "the mirror became READY");
          await new Promise((r) => setTimeout(r, 50));
        }
        await qmp.raw("block-job-cancel", { device: "m" });
        for (let i = 0; i < 200; i++) {
          const jobs = (await qmp.raw("query-block-jobs", {})) as unknown[];
          if (jobs.length === 0) break;
          await new Promise((r) => setTimeout(r, 50));
        }
        await qmp.raw("blockdev-del", { "node-name": "dst" });
        const got = Buffer.alloc(32 * MiB);
        await target.pread(got, 0);
        assert.equal(sha(got), sha(fs.readFileSync(src)), "the mirror's target holds the disk");
        assert.ok(target.allocated <= 8 * MiB, "zero regions arrived as zeroes, not data");
      } finally {
        qmp.close();
        process.kill(pid, "SIGKILL");
        await s2.close();
      }
    }

    it("QEMU mirrors a disk onto it (blockdev-add nbd + blockdev-mirror)", async (t) => {
      if (!need(t, TOOLS)) return;
      await qemuMirror(false);
    });

    it("QEMU mirrors a disk onto it over TLS, with client certificates", async (t) => {
      if (!need(t, TOOLS)) return;
      await qemuMirror(true);
    });

    it("TLS: required by the server, used by nbdinfo, qemu-img and our client", async (t) => {
      if (!need(t, TOOLS)) return;
      const certs = await certificates();
      const s3 = new NbdServer({
        exports: [{ name: "disk", backend: await FileBackend.open(diskFile, { readonly: true }) }],
        tls: {
          cert: path.join(certs, "server-cert.pem"),
          key: path.join(certs, "server-key.pem"),
          require: true,
        },
      });
      const a = (await s3.listen({ host: "127.0.0.1", port: 0 })) as net.AddressInfo;
      try {
        const info = JSON.parse(
          await run("nbdinfo", ["--json", `nbds://localhost:${a.port}/disk?tls-certificates=${certs}`]),
        ) as {
          protocol: string;
          TLS: boolean;
          exports: { "export-size": number }[];
        };
        assert.equal(info.TLS, true);
        assert.equal(info.exports[0]!["export-size"], 64 * MiB);
        const plain = await status("nbdinfo", [`nbd://localhost:${a.port}/disk`]);
        assert.notEqual(plain.code, 0, "without TLS the server refuses");
        // The server answers NBD_REP_ERR_TLS_REQD; libnbd words it as "not supported".
        assert.match(plain.stderr, /TLS|not supported/);
        assert.match(
          await run("qemu-img", [
            "info",
            "--object",
            `tls-creds-x509,id=tls0,dir=${certs},endpoint=client`,
            "--image-opts",
            `driver=nbd,host=localhost,port=${a.port},export=disk,tls-creds=tls0`,
          ]),
          /virtual size: 64 MiB/,
        );
        const c = await NbdClient.connect(`nbds://localhost:${a.port}/disk?tls-certificates=${certs}`);
        assert.equal(c.tlsActive, true);
        assert.deepEqual(await c.read(1 * MiB, 4), Buffer.alloc(4, 0xab));
        await c.disconnect();
        await assert.rejects(NbdClient.connect(`nbd://localhost:${a.port}/disk`), {
          code: "E_NBD_TLS_REQUIRED",
        });
      } finally {
        await s3.close();
      }
    });

    describe("hostile clients", () => {
      /** A hand-driven client: handshake to `name` with GO, then raw requests. */
      async function raw(name: string, structured = false) {
        const s = net.connect(port, "127.0.0.1");
        const q = new ByteQueue();
        let wake: (() => void) | undefined;
        let closed = false;
        s.on("data", (b) => {
          q.push(b);
          wake?.();
        });
        s.on("close", () => {
          closed = true;
          wake?.();
        });
        s.on("error", () => undefined);
        const recv = async <T>(parse: (q: ByteQueue) => T | undefined): Promise<T | "closed"> => {
          for (;;) {
            const m = parse(q);
            if (m !== undefined) return m;
            if (closed) return "closed";
            await new Promise<void>((r) => (wake = r));
          }
        };
        await recv(parseGreeting);
        s.write(encodeClientFlags(FLAG_C_FIXED_NEWSTYLE));
        if (structured) {
          s.write(encodeOption(Opt.STRUCTURED_REPLY));
          await recv((x) => parseOptionReply(x));
        }
        s.write(encodeOption(Opt.GO, encodeInfoRequest(name, [])));
        for (;;) {
          const r = await recv((x) => parseOptionReply(x));
          if (r === "closed" || r.type === Rep.ACK) break;
        }
        // A simple reply to a READ carries data: the decoder must know how long the read was.
        const readLength = new Map<bigint, number>();
        const got: Reply[] = [];
        const replies = new ReplyDecoder(
          {
            simpleData: (cookie) => Buffer.alloc(readLength.get(cookie) ?? 0),
            chunkData: () => undefined,
          },
          (r) => got.push(r),
        );
        const next = (x: ByteQueue) => {
          if (x.length) replies.push(x.take(x.length));
          return got.shift();
        };
        return {
          s,
          write: (b: Buffer) => {
            if (b.length >= 28 && b.readUInt16BE(6) === Cmd.READ)
              readLength.set(b.readBigUInt64BE(8), b.readUInt32BE(24));
            return s.write(b);
          },
          reply: () => recv(next),
          closedSoon: async () => {
            for (let i = 0; i < 100 && !closed; i++) await new Promise((r) => setTimeout(r, 20));
            return closed;
          },
        };
      }
      const req = (type: number, offset: number | bigint, length: number, flags = 0, cookie = 7n) => {
        const b = encodeRequest({ flags, type, cookie, offset: 0, length });
        b.writeBigUInt64BE(BigInt(offset), 16);
        return b;
      };
      const errOf = (r: Reply | "closed") =>
        r !== "closed" && r.kind === "simple" ? r.error : r === "closed" ? "closed" : -1;

      it("answers bad requests with the right NBD error and keeps the connection", async () => {
        const c = await raw("disk");
        c.write(req(Cmd.READ, 64 * MiB - 1, 2));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "read past the end");
        c.write(Buffer.concat([req(Cmd.WRITE, 64 * MiB - 1, 2), Buffer.alloc(2, 0xee)]));
        assert.equal(errOf(await c.reply()), NbdErrno.ENOSPC, "write past the end");
        c.write(req(Cmd.READ, 2n ** 63n, 1));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "offset beyond 2^53");
        c.write(req(Cmd.READ, 0, 5 * MiB));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "read above the maximum payload");
        c.write(Buffer.concat([req(Cmd.WRITE, 0, 5 * MiB), Buffer.alloc(5 * MiB, 0xee)]));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "write above the maximum payload, skipped");
        c.write(req(99, 0, 1));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "unknown command");
        c.write(req(Cmd.READ, 0, 1, 0x8000));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "unknown flag");
        c.write(req(Cmd.BLOCK_STATUS, 0, 4096));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "block status without a meta context");
        c.write(req(Cmd.READ, 0, 1, 4 /* DF */));
        assert.equal(errOf(await c.reply()), NbdErrno.EINVAL, "DF without structured replies");
        c.write(req(Cmd.READ, 1 * MiB, 4));
        assert.equal(errOf(await c.reply()), 0, "still serving");
        c.s.destroy();
        const ro = await raw("ro");
        ro.write(Buffer.concat([req(Cmd.WRITE, 0, 4), Buffer.alloc(4)]));
        assert.equal(errOf(await ro.reply()), NbdErrno.EPERM, "write to a read-only export");
        ro.write(req(Cmd.TRIM, 0, 4096));
        assert.equal(errOf(await ro.reply()), NbdErrno.EPERM);
        ro.s.destroy();
      });

      it("drops connections that break the protocol, and goes on serving", async () => {
        const sizeBefore = fs.statSync(diskFile).size;
        const hashBefore = sha(fs.readFileSync(diskFile));
        // Garbage instead of client flags.
        const g = net.connect(port, "127.0.0.1");
        g.on("error", () => undefined);
        g.resume(); // read the greeting, or 'close' never comes
        g.write(Buffer.from("GET / HTTP/1.1\r\n\r\n"));
        await new Promise((r) => g.once("close", r));
        // An option claiming 4 GiB of data.
        const o = net.connect(port, "127.0.0.1");
        o.on("error", () => undefined);
        o.resume();
        const huge = encodeOption(Opt.GO);
        huge.writeUInt32BE(0xffffffff, 12);
        o.write(Buffer.concat([encodeClientFlags(FLAG_C_FIXED_NEWSTYLE), huge]));
        await new Promise((r) => o.once("close", r));
        // A request with a bad magic, then a truncated one and an abrupt close.
        const c = await raw("disk");
        const bad = req(Cmd.WRITE, 0, 4);
        bad.writeUInt32BE(0x12345678, 0);
        c.write(bad);
        assert.ok(await c.closedSoon(), "bad magic closes the connection");
        const d = await raw("disk");
        d.write(req(Cmd.WRITE, 0, 1 * MiB).subarray(0, 20));
        d.s.destroy();
        const e = await raw("disk");
        e.write(Buffer.concat([req(Cmd.WRITE, 0, 1 * MiB), Buffer.alloc(1000, 0xee)]));
        e.s.destroy();
        await new Promise((r) => setTimeout(r, 200));
        // Unknown option: ERR_UNSUP, the handshake goes on.
        const u = await NbdClient.connect(`${base}/disk`);
        assert.deepEqual(await u.read(1 * MiB, 2), Buffer.alloc(2, 0xab));
        await u.disconnect();
        assert.equal(fs.statSync(diskFile).size, sizeBefore, "the file never grew");
        assert.equal(sha(fs.readFileSync(diskFile)), hashBefore, "nothing was written");
      });

      it("answers an unknown option with ERR_UNSUP and a GO for a missing export with ERR_UNKNOWN", async () => {
        const s = net.connect(port, "127.0.0.1");
        const q = new ByteQueue();
        let wake: (() => void) | undefined;
        s.on("data", (b) => {
          q.push(b);
          wake?.();
        });
        const recv = async <T>(parse: (q: ByteQueue) => T | undefined): Promise<T> => {
          for (;;) {
            const m = parse(q);
            if (m !== undefined) return m;
            await new Promise<void>((r) => (wake = r));
          }
        };
        await recv(parseGreeting);
        s.write(
          Buffer.concat([encodeClientFlags(FLAG_C_FIXED_NEWSTYLE), encodeOption(4242, Buffer.from("x"))]),
        );
        assert.equal((await recv((x) => parseOptionReply(x))).type, Rep.ERR_UNSUP);
        s.write(encodeOption(Opt.GO, encodeInfoRequest("nosuch", [])));
        assert.equal((await recv((x) => parseOptionReply(x))).type, Rep.ERR_UNKNOWN);
        s.write(encodeOption(Opt.SET_META_CONTEXT, Buffer.alloc(0)));
        assert.equal(
          (await recv((x) => parseOptionReply(x))).type,
          Rep.ERR_INVALID,
          "meta context before structured replies",
        );
        s.write(encodeOption(Opt.ABORT));
        assert.equal((await recv((x) => parseOptionReply(x))).type, Rep.ACK);
        s.destroy();
      });

      it("serves many pipelined requests on one connection with bounded work", async () => {
        const c = await NbdClient.connect(`${base}/disk`, { maxInFlight: 256 });
        const reads = await Promise.all(
          Array.from({ length: 500 }, (_, i) => c.read(((i * 7) % 60) * MiB, 4096)),
        );
        assert.equal(reads.length, 500);
        assert.deepEqual(reads[0]!.subarray(0, 1), Buffer.alloc(1));
        await c.disconnect();
      });
    });
  },
);
