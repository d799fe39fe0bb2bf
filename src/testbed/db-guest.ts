/**
 * The database guest (scripts/build-db-guest.sh: Debian 12, systemd, PostgreSQL 15 with data checksums,
 * qemu-guest-agent) on the test bed's VM network, and its client: pgbench run from the client namespace,
 * and the checks after a migration (pgbench's invariant, pg_amcheck, the connections pgbench opened, and
 * e2fsck on an image after a clean shutdown). Shared by the tests, the demo and the benchmark.
 */
import { execFileSync, spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import type { Testbed } from "./testbed.js";
import { NbdmigError } from "../errors.js";

const repo = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");

/** What the guest's PostgreSQL serves (baked into the image). */
export const PG = { user: "nbdmig", password: "nbdmig", database: "bench", port: 5432 } as const;
/** PostgreSQL 15's client programs (postgresql-client-15; Debian links only some of them into /usr/bin). */
export const PG_BIN = "/usr/lib/postgresql/15/bin";
const pg = (tool: string) => path.join(PG_BIN, tool);
/** The client programs the checks use. */
export const PG_TOOLS = ["psql", "pg_isready", "pgbench", "pg_amcheck"].map(pg);
/** The console line the guest prints once PostgreSQL accepts connections. */
export const DB_READY = "nbdmig-db-ready";

export interface DbGuestBuild {
  kernel: string;
  postgresql: string;
  pgbenchScale: number;
  mmdebstrapSeconds: number;
  totalSeconds: number;
  allocatedBytes: number;
}

export interface DbGuestImage {
  kernel: string;
  initrd: string;
  /** The built root disk (qcow2); copy it for each guest, never run it in place. */
  image: string;
  build: DbGuestBuild;
  /** Whether this call built it (false: reused from the cache). */
  built: boolean;
}

/** Builds the guest, or reuses the cached build; `log` receives the builder's output (stderr by default). */
export function buildDbGuest(log: "inherit" | "ignore" = "inherit"): DbGuestImage {
  const dir = process.env.NBDMIG_DB_GUEST_DIR ?? path.join(repo, ".cache/db-guest");
  const stamp = path.join(dir, "stamp");
  const before = fs.existsSync(stamp) ? fs.statSync(stamp).mtimeMs : 0;
  execFileSync("bash", [path.join(repo, "scripts/build-db-guest.sh")], { stdio: ["ignore", log, log] });
  return {
    kernel: path.join(dir, "vmlinuz"),
    initrd: path.join(dir, "initrd.img"),
    image: path.join(dir, "root.qcow2"),
    build: JSON.parse(fs.readFileSync(path.join(dir, "build.json"), "utf8")) as DbGuestBuild,
    built: fs.statSync(stamp).mtimeMs !== before,
  };
}

export interface DbGuestSpec {
  name: string;
  /** The disk's path inside the host, e.g. /var/lib/nbdmig/images/pg.qcow2. */
  disk: string;
  /** The guest's address on the VM network (guestAddress(n)). */
  addr: string;
  memoryMiB?: number;
  mac?: string;
}

/** Domain XML of a database guest: direct kernel boot, its disk on virtio, a bridged virtio NIC, the agent channel. */
export function dbGuestXml(img: DbGuestImage, g: DbGuestSpec): string {
  return `<domain type='kvm'>
  <name>${g.name}</name>
  <memory unit='MiB'>${g.memoryMiB ?? 512}</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${img.kernel}</kernel>
    <initrd>${img.initrd}</initrd>
    <cmdline>root=/dev/vda rw console=ttyS0 quiet nbdmig.ip=${g.addr}/24</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='${g.disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>${g.mac ? `<mac address='${g.mac}'/>` : ""}
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <serial type='pty'><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console>
  </devices>
</domain>
`;
}

/** The environment that points libpq's tools at the guest. */
function pgEnv(addr: string): NodeJS.ProcessEnv {
  return {
    ...process.env,
    PGHOST: addr,
    PGPORT: String(PG.port),
    PGUSER: PG.user,
    PGPASSWORD: PG.password,
    PGDATABASE: PG.database,
    // A connection forks a backend and runs SCRAM in a TCG guest under pgbench's load: 1.1-3.4 s measured
    // here, and 5 s once ran out in CI while the guest served pgbench normally.
    PGCONNECT_TIMEOUT: "30",
  };
}

/** Runs SQL on the guest from the client namespace; answers psql's unaligned output (throws on error). */
export function psql(tb: Testbed, addr: string, sql: string): string {
  const argv = tb.clientArgv([pg("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]);
  return execFileSync(argv[0]!, argv.slice(1), {
    encoding: "utf8",
    env: pgEnv(addr),
    timeout: 60_000,
  }).trim();
}

/** Whether PostgreSQL on the guest accepts connections from the client. */
export function pgReady(tb: Testbed, addr: string): boolean {
  const argv = tb.clientArgv([pg("pg_isready"), "-q", "-t", "2"]);
  return spawnSync(argv[0]!, argv.slice(1), { env: pgEnv(addr) }).status === 0;
}

/** One `-P 1` line of pgbench: the interval that ended at `at` (epoch ms). */
export interface PgbenchProgress {
  at: number;
  tps: number;
  latMs: number;
  failed: number;
}

export interface PgbenchOutcome {
  progress: PgbenchProgress[];
  /** pgbench's own complaints: a client that lost its connection says "client N aborted ...". */
  aborted: string[];
  stderr: string;
  /** Whether pgbench was still running when stopped (it exits early when every client has aborted). */
  ranToTheEnd: boolean;
}

export interface Pgbench {
  progress(): PgbenchProgress[];
  /** Waits until pgbench has reported `n` seconds of progress after `since` (epoch ms); throws after n + 60 s. */
  waitSeconds(n: number, since: number): Promise<void>;
  /** Ends pgbench (SIGINT: it has no graceful stop; everything judged here comes from its progress lines). */
  stop(): Promise<PgbenchOutcome>;
}

/**
 * Starts pgbench's TPC-B-like script from the client namespace against the guest: `clients` connections
 * opened once (pgbench never reconnects without -C: a lost connection aborts its client), progress every
 * second with absolute timestamps. It runs until stop().
 */
export function startPgbench(tb: Testbed, addr: string, clients = 4): Pgbench {
  const argv = tb.clientArgv([
    pg("pgbench"),
    "-n",
    "-c",
    String(clients),
    "-j",
    String(clients),
    "-T",
    "86400",
    "-P",
    "1",
    "--progress-timestamp",
  ]);
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ["ignore", "ignore", "pipe"], env: pgEnv(addr) });
  let stderr = "";
  let exited = false;
  child.stderr.on("data", (b: Buffer) => (stderr += b.toString()));
  const closed = new Promise<void>((resolve) =>
    child.on("close", () => {
      exited = true;
      resolve();
    }),
  );
  const progress = () => parseProgress(stderr);
  return {
    progress,
    waitSeconds: async (n, since) => {
      const deadline = Date.now() + (n + 60) * 1000;
      while (progress().filter((p) => p.at > since).length < n) {
        if (Date.now() > deadline)
          throw new Error(
            `pgbench reported fewer than ${n} s of progress within ${n + 60} s:\n${stderr.slice(-1000)}`,
          );
        await new Promise((r) => setTimeout(r, 250));
      }
    },
    stop: async () => {
      const ranToTheEnd = !exited;
      child.kill("SIGINT");
      await closed;
      return {
        progress: progress(),
        aborted: stderr.split("\n").filter((l) => /\baborted\b|connection .* failed|FATAL|ERROR/.test(l)),
        stderr,
        ranToTheEnd,
      };
    },
  };
}

/** pgbench 15's `progress: <epoch> s, <tps> tps, lat <ms> ms stddev <ms>, <n> failed` lines. */
export function parseProgress(stderr: string): PgbenchProgress[] {
  const out: PgbenchProgress[] = [];
  for (const m of stderr.matchAll(
    /^progress: ([\d.]+) s, ([\d.]+) tps, lat ([\d.]+|NaN) ms stddev (?:[\d.]+|NaN)(?:, (\d+) failed)?/gm,
  )) {
    out.push({
      at: Math.round(Number(m[1]) * 1000),
      tps: Number(m[2]),
      latMs: Number(m[3]),
      failed: Number(m[4] ?? 0),
    });
  }
  return out;
}

/** Mean TPS over the progress intervals that ended within [from, to] (epoch ms). */
export function tpsBetween(p: PgbenchProgress[], from: number, to: number): number {
  const inside = p.filter((x) => x.at > from && x.at <= to);
  return inside.length ? inside.reduce((s, x) => s + x.tps, 0) / inside.length : NaN;
}

/**
 * The longest stall within [from, to]: the longest run of one-second intervals without a single completed
 * transaction (0 s when every second completed some), and the slowest second's TPS.
 */
export function longestStall(
  p: PgbenchProgress[],
  from: number,
  to: number,
): { seconds: number; at: number; minTps: number } {
  let best = { seconds: 0, at: from, minTps: Infinity };
  let run = 0;
  for (const x of p.filter((y) => y.at > from && y.at <= to)) {
    best.minTps = Math.min(best.minTps, x.tps);
    run = x.tps === 0 ? run + 1 : 0;
    if (run > best.seconds) best = { ...best, seconds: run, at: x.at - run * 1000 };
  }
  if (best.minTps === Infinity) best.minTps = NaN;
  return best;
}

export interface DbCheck {
  /** Sums of balances in accounts, tellers and branches, and of the deltas in history: all equal. */
  sums: { accounts: number; tellers: number; branches: number; history: number };
  invariantHolds: boolean;
  /** pg_amcheck's output (empty when it found nothing) and exit status. */
  amcheck: { status: number; output: string };
  /** Whether PostgreSQL reports data checksums on. */
  checksums: boolean;
}

/**
 * pgbench's server sessions (backend pid and start time, as the guest's PostgreSQL reports them): the same
 * list before and after a migration means no client reconnected.
 */
export function pgbenchSessions(tb: Testbed, addr: string): string[] {
  return psql(
    tb,
    addr,
    "SELECT pid || '@' || backend_start FROM pg_stat_activity WHERE application_name = 'pgbench' ORDER BY pid",
  )
    .split("\n")
    .filter(Boolean);
}

/** The checks after a migration (pgbench stopped), run from the client against the guest wherever it runs. */
export function checkDb(tb: Testbed, addr: string): DbCheck {
  const [accounts, tellers, branches, history] = psql(
    tb,
    addr,
    "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), " +
      "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history)",
  )
    .split("|")
    .map(Number) as [number, number, number, number];
  const checksums = psql(tb, addr, "SHOW data_checksums") === "on";
  const argv = tb.clientArgv([pg("pg_amcheck"), "--all", "--install-missing", "--heapallindexed"]);
  // Only warnings and worse: --install-missing's NOTICE for an extension that is already there is no finding.
  const env = { ...pgEnv(addr), PGOPTIONS: "-c client_min_messages=warning" };
  const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", env, timeout: 300_000 });
  return {
    sums: { accounts, tellers, branches, history },
    invariantHolds: accounts === tellers && tellers === branches && branches === history,
    amcheck: { status: r.status ?? -1, output: `${r.stdout}${r.stderr}`.trim() },
    checksums,
  };
}

/** e2fsck -fn on the ext4 filesystem of a qcow2 or raw image (read through a raw copy): status and output. */
export function fsckImage(image: string, scratchDir: string): { status: number; output: string } {
  const raw = path.join(scratchDir, `${path.basename(image)}.fsck.raw`);
  try {
    execFileSync("qemu-img", ["convert", "-U", "-O", "raw", image, raw]);
    const r = spawnSync("e2fsck", ["-fn", raw], { encoding: "utf8" });
    // stderr first: e2fsck prints its version there, and its verdict last on stdout.
    return { status: r.status ?? -1, output: `${r.stderr}${r.stdout}`.trim() };
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

/** The CLI on a host, for the short calls here (define, start, console, shutdown). */
const cliOk = (tb: Testbed, host: "a" | "b", args: string[]) => tb[host].cliOk(args, 120_000);

/**
 * Copies the built image into a host's image directory as `${name}.qcow2`, defines and starts the guest
 * there and waits until its PostgreSQL answers the client. Answers the boot time (start to first answer)
 * and the image's path as the root namespace sees it.
 */
export async function startDbGuest(
  tb: Testbed,
  host: "a" | "b",
  img: DbGuestImage,
  g: Omit<DbGuestSpec, "disk">,
  timeoutMs = 300_000,
): Promise<{ bootMs: number; image: string }> {
  const image = path.join(tb[host].imagesDir, `${g.name}.qcow2`);
  execFileSync("cp", ["--sparse=always", img.image, image]);
  fs.writeFileSync(
    path.join(tb[host].dir, `${g.name}.xml`),
    dbGuestXml(img, { ...g, disk: `/var/lib/nbdmig/images/${g.name}.qcow2` }),
  );
  cliOk(tb, host, ["define", `/var/lib/nbdmig/${g.name}.xml`]);
  const t0 = Date.now();
  cliOk(tb, host, ["start", g.name]);
  for (;;) {
    if (tb[host].consoleLog(g.name).includes(DB_READY) && pgReady(tb, g.addr))
      return { bootMs: Date.now() - t0, image };
    if (Date.now() - t0 > timeoutMs) {
      const tail = tb[host].consoleLog(g.name).split("\n").slice(-15).join("\n");
      throw new Error(
        `guest ${g.name} did not answer on ${g.addr}:${PG.port} within ${timeoutMs} ms; console:\n${tail}`,
      );
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** Shuts the guest down through ACPI (systemd stops PostgreSQL cleanly) and waits until it is off. */
export async function shutdownDbGuest(
  tb: Testbed,
  host: "a" | "b",
  name: string,
  timeoutMs = 180_000,
): Promise<number> {
  const t0 = Date.now();
  cliOk(tb, host, ["shutdown", name]);
  // A transient domain (as a migration leaves it) is gone once off; a persistent one says "shut off".
  const off = async () => {
    try {
      const d = await tb[host]
        .client()
        .call<{ state: string }>("GET", `/v1/domains/${encodeURIComponent(name)}`);
      return d.state === "shut off";
    } catch (err) {
      if (err instanceof NbdmigError && err.code === "E_NO_DOMAIN") return true;
      throw err;
    }
  };
  while (!(await off())) {
    if (Date.now() - t0 > timeoutMs)
      throw new Error(`guest ${name} on host ${host} did not shut down within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 250));
  }
  return Date.now() - t0;
}

export interface PgbenchWindow {
  name: string;
  from: number;
  to: number;
}

/** TPS per window and the longest stall, in one line per window (for test diagnostics, the demo and the bench). */
export function describeRun(o: PgbenchOutcome, windows: PgbenchWindow[]): string[] {
  return windows.map((w) => {
    const s = longestStall(o.progress, w.from, w.to);
    // A second without transactions has no latency (pgbench prints 0 or NaN).
    const lats = o.progress.filter((p) => p.at > w.from && p.at <= w.to && p.tps > 0).map((p) => p.latMs);
    const lat = lats.length ? `${Math.max(...lats).toFixed(0)} ms` : "-";
    return `${w.name} (${((w.to - w.from) / 1000).toFixed(1)} s): ${tpsBetween(o.progress, w.from, w.to).toFixed(1)} tps, slowest second ${s.minTps.toFixed(1)} tps, worst second's mean latency ${lat}, longest stall ${s.seconds} s`;
  });
}

/** Transactions pgbench counted as failed, over the whole run. */
export function failedTransactions(o: PgbenchOutcome): number {
  return o.progress.reduce((n, p) => n + p.failed, 0);
}
