/**
 * NBD benchmark: our server beside qemu-nbd and nbdkit on the same file, and our copy engine beside
 * nbdcopy between the same servers, all in one run on loopback. Every server runs as its own process.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { waitForPort } from "../src/util/net.js";
import { median } from "./common.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const cli = path.join(repo, "dist/src/cli/main.js");
const GiB = 1024 ** 3;
const MiB = 1024 ** 2;

export interface NbdServerRow {
  server: string;
  readMiBs: number;
  writeMiBs: number;
  latencyUs: number;
}

export interface NbdCopyRow {
  what: string;
  tool: string;
  seconds: number;
  loopbackMiB: number;
}

// Below Linux's ephemeral range (32768 up), so that no client connection of this run holds the port.
let port = 20000 + Math.floor(Math.random() * 10000);

/** Starts a server on a fresh port; a server that exits at once is retried once on the next port. */
async function start(
  kind: string,
  file: string,
  readonly = false,
): Promise<{ uri: string; stop: () => Promise<void> }> {
  try {
    return await startOnce(kind, file, readonly);
  } catch (err) {
    process.stderr.write(`nbd bench: ${(err as Error).message}; retrying on another port\n`);
    return startOnce(kind, file, readonly);
  }
}

async function startOnce(
  kind: string,
  file: string,
  readonly = false,
): Promise<{ uri: string; stop: () => Promise<void> }> {
  const p = port++;
  let proc: ChildProcess;
  if (kind === "nbdmig")
    proc = spawn(
      process.execPath,
      [cli, "nbd", "serve", "-p", String(p), ...(readonly ? ["-r"] : []), `d=${file}`],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
  else if (kind === "qemu-nbd")
    proc = spawn(
      "qemu-nbd",
      [
        "-f",
        "raw",
        "-p",
        String(p),
        "-b",
        "127.0.0.1",
        "-x",
        "d",
        "-t",
        "-e",
        "16",
        "--cache=writeback",
        ...(readonly ? ["-r"] : []),
        file,
      ],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
  else
    proc = spawn(
      "nbdkit",
      ["-f", "-p", String(p), "-i", "127.0.0.1", "--exportname=d", ...(readonly ? ["-r"] : []), "file", file],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
  let stderr = "";
  proc.stderr!.on("data", (b: Buffer) => (stderr = (stderr + b.toString()).slice(-2000)));
  try {
    await waitForPort(p, { alive: () => proc.exitCode === null, what: `${kind} on port ${p}` });
  } catch (err) {
    proc.kill("SIGKILL");
    throw new Error(`${(err as Error).message}: ${stderr.trim() || "(nothing on stderr)"}`, { cause: err });
  }
  return {
    uri: `nbd://127.0.0.1:${p}/d`,
    stop: async () => {
      proc.kill("SIGTERM");
      await new Promise((r) => (proc.exitCode !== null ? r(null) : proc.once("exit", r)));
    },
  };
}

function timed(cmd: string, args: string[]): number {
  const t0 = process.hrtime.bigint();
  execFileSync(cmd, args, {
    stdio: ["ignore", "ignore", "inherit"],
    env: { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH}` },
  });
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function loBytes(): number {
  const line = fs
    .readFileSync("/proc/net/dev", "utf8")
    .split("\n")
    .find((l) => l.trim().startsWith("lo:"))!;
  return Number(line.split(":")[1]!.trim().split(/\s+/)[0]);
}

/** Mean latency of serial 4 KiB random reads, measured by libnbd (nbdsh), the same client for every server. */
function latencyUs(uri: string): number {
  const script = `
import random, time
h.connect_uri("${uri}")
size = h.get_size()
random.seed(1)
offs = [random.randrange(0, size // 4096) * 4096 for _ in range(3000)]
t0 = time.perf_counter()
for o in offs:
    h.pread(4096, o)
print((time.perf_counter() - t0) / len(offs) * 1e6)
h.shutdown()
`;
  return Number(
    execFileSync("nbdsh", ["-c", script], {
      encoding: "utf8",
      env: { ...process.env, PATH: `/usr/bin:/bin:${process.env.PATH}` },
    }).trim(),
  );
}

/**
 * Where the images live: tmpfs when it has room, so that the figures measure the NBD implementations and
 * not the disk (a shared virtual disk varied by 3x between runs here).
 */
function imageDir(): { dir: string; where: string } {
  const need = 4 * GiB;
  try {
    const st = fs.statfsSync("/dev/shm");
    if (st.bavail * st.bsize >= need)
      return { dir: fs.mkdtempSync("/dev/shm/nbdmig-bench-nbd-"), where: "tmpfs" };
  } catch {
    // no /dev/shm: use the disk
  }
  return { dir: fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-bench-nbd-")), where: "disk" };
}

export async function nbdBench(
  runs: number,
): Promise<{ servers: NbdServerRow[]; copies: NbdCopyRow[]; where: string }> {
  const { dir, where } = imageDir();
  try {
    const data = path.join(dir, "data.img");
    execFileSync("sh", ["-c", `head -c 1G /dev/urandom > ${data}`]);
    // Every timed run starts with nothing dirty in the page cache: otherwise the write-back of the file
    // just made (or of the last run's target) lands on whichever server is measured next.
    execFileSync("sync");
    // Rounds, each measuring every server in turn, so that drift on a shared machine touches all alike.
    // Every server overwrites the same 1 GiB target, whose pages exist from the start. A fresh file per
    // run made each server pay for allocating (on this VM: first touching) a gigabyte of tmpfs pages, which
    // added up to 2 s to some runs and swamped the servers' own differences.
    const target = path.join(dir, "target.img");
    fs.copyFileSync(data, target);
    const kinds = ["nbdmig", "qemu-nbd", "nbdkit"];
    const m = new Map(
      kinds.map((k) => [k, { reads: [] as number[], writes: [] as number[], lat: [] as number[] }]),
    );
    for (let r = 0; r < runs; r++) {
      for (const kind of kinds) {
        const got = m.get(kind)!;
        const ro = await start(kind, data, true);
        got.reads.push(GiB / MiB / timed("nbdcopy", ["--connections=4", "--requests=16", ro.uri, "null:"]));
        got.lat.push(latencyUs(ro.uri));
        await ro.stop();
        execFileSync("sync");
        const rw = await start(kind, target);
        got.writes.push(
          GiB / MiB / timed("nbdcopy", ["--connections=4", "--requests=16", "--flush", data, rw.uri]),
        );
        await rw.stop();
        process.stderr.write(
          `nbd bench: round ${r + 1}/${runs}: ${kind} server: read ${got.reads.at(-1)!.toFixed(0)} MiB/s, ` +
            `write ${got.writes.at(-1)!.toFixed(0)} MiB/s, latency ${got.lat.at(-1)!.toFixed(0)} us\n`,
        );
      }
    }
    const servers: NbdServerRow[] = kinds.map((kind) => {
      const got = m.get(kind)!;
      return {
        server: kind,
        readMiBs: median(got.reads),
        writeMiBs: median(got.writes),
        latencyUs: median(got.lat),
      };
    });

    const copies: NbdCopyRow[] = [];
    const sparse = path.join(dir, "sparse.img");
    execFileSync("truncate", ["-s", "8G", sparse]);
    execFileSync("sh", [
      "-c",
      `for i in 0 1 2 3 4 5 6 7 8 9; do dd if=${data} of=${sparse} bs=1M count=10 seek=$((i*800)) skip=$((i*10)) conv=notrunc status=none; done; sync`,
    ]);
    const cases: [string, string][] = [
      ["1 GiB of data, qemu-nbd to qemu-nbd", data],
      ["8 GiB sparse, 100 MiB of data, qemu-nbd to qemu-nbd", sparse],
    ];
    const tools = ["nbdmig nbd copy", "nbdcopy"];
    for (const [what, file] of cases) {
      const secs = new Map(tools.map((t) => [t, [] as number[]]));
      const bytes = new Map(tools.map((t) => [t, [] as number[]]));
      for (let r = 0; r < runs; r++) {
        for (const tool of tools) {
          const src = await start("qemu-nbd", file, true);
          // The dense copy overwrites the target the server benchmark wrote (pages already there, as
          // above); the sparse copy goes to a fresh sparse file, so that its holes stay holes.
          const into = file === sparse ? path.join(dir, "copy-target.img") : target;
          if (into !== target) {
            fs.rmSync(into, { force: true });
            execFileSync("truncate", ["-s", String(fs.statSync(file).size), into]);
          }
          execFileSync("sync");
          const dst = await start("qemu-nbd", into);
          const lo0 = loBytes();
          const t =
            tool === "nbdcopy"
              ? timed("nbdcopy", ["--connections=4", "--requests=16", src.uri, dst.uri])
              : timed(process.execPath, [cli, "nbd", "copy", "-C", "4", "-R", "16", src.uri, dst.uri]);
          secs.get(tool)!.push(t);
          bytes.get(tool)!.push((loBytes() - lo0) / MiB);
          process.stderr.write(`nbd bench: round ${r + 1}/${runs}: ${tool}: ${what}: ${t.toFixed(2)} s\n`);
          await src.stop();
          await dst.stop();
        }
      }
      for (const tool of tools)
        copies.push({ what, tool, seconds: median(secs.get(tool)!), loopbackMiB: median(bytes.get(tool)!) });
    }
    return { servers, copies, where };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
