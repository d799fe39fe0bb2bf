/**
 * Two hosts on one machine: each a network namespace plus a private mount namespace, joined by a veth pair
 * on 198.18.0.0/15 (the benchmark range), optionally shaped with tbf. In each host the same absolute path
 * /var/lib/nbdmig names a different directory, as on real hosts. A management veth per host lets the
 * root namespace (tests, the demo) reach each agent's API. Everything is torn down by PID and name, also
 * after a crashed run (stale test beds whose owner died are reaped on the next start).
 *
 * The VM network: each host has a bridge `br0` (no address), the two bridges are joined by a second veth
 * pair (`TestHost.bridgeLink` on each side), and a client namespace (`Testbed.clientNetns`, 10.77.0.100/24)
 * hangs off host a's br0 (`Testbed.clientLink`). A guest tapped into br0 on either host with an address from
 * `guestAddress(10..99)` is reachable from the client, so a test can watch it across a migration:
 * - `tb.clientArgv(["curl", ...])`: argv that runs a command in the client namespace;
 * - `tb.clientGet(url)`: one HTTP GET from the client (curl), never throws: `{ status: 0, error }` when
 *   unreachable;
 * - `host.bridgeFdb()`: where br0 in that host believes each MAC lives (`dev`, the port; learned entries
 *   move from a's tap to `bridgeLink` when a guest moves to b); `host.bridgePorts()`: br0's ports.
 */
import { execFile, execFileSync, spawn, spawnSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";
import { AgentClient, readToken } from "../agent/client.js";
import { agentClientTls } from "../agent/tls.js";

export const HOST_ROOT = "/var/lib/nbdmig";
export const AGENT_PORT = 7800;
/** The bridge in each host that guests' taps join. */
export const BRIDGE = "br0";
/** The client's address on the guest network (a /24). */
export const CLIENT_ADDR = "10.77.0.100";
export const GUEST_PREFIX_LEN = 24;
const TB_BASE = "/tmp/nbdmig-testbed";
const cliPath = fileURLToPath(new URL("../cli/main.js", import.meta.url));

/** A guest's address on the guest network, 10.77.0.N for N in 10..99 (add `/${GUEST_PREFIX_LEN}` for nbdmig.ip). */
export function guestAddress(n: number): string {
  if (!Number.isInteger(n) || n < 10 || n > 99)
    throw new Error(`guest addresses are 10.77.0.10-99, not .${n}`);
  return `10.77.0.${n}`;
}

/** One entry of a bridge's forwarding database. */
export interface FdbEntry {
  mac: string;
  /** The bridge port. */
  dev: string;
  /** "br0" for the bridge's entries; absent for the port device's own ("self") ones, e.g. multicast. */
  master?: string;
  /** "permanent" for a port's own addresses; absent for a learned one. */
  state?: string;
}

/** One request of `Testbed.startPoller`: sent at `at` (epoch ms), answered (`ok`) after `ms`. */
export interface PollSample {
  at: number;
  ok: boolean;
  ms: number;
  detail: string;
}

/**
 * The longest time without an answer within [from, to]: between the arrival of one answer and the
 * arrival of the next (a request that was answered late counts as the gap it left).
 */
export function longestGap(samples: PollSample[], from = 0, to = Infinity): { ms: number; at: number } {
  const answers = samples
    .filter((s) => s.ok)
    .map((s) => s.at + s.ms)
    .sort((x, y) => x - y);
  let best = { ms: 0, at: from };
  let prev: number | undefined;
  for (const t of answers) {
    if (prev !== undefined && t >= from && prev <= to && t - prev > best.ms)
      best = { ms: t - prev, at: prev };
    prev = t;
  }
  return best;
}

export interface TestbedOptions {
  /** tbf rate for the link between the hosts, e.g. "1gbit" or "200mbit"; unshaped when absent. */
  rate?: string;
  accel?: "tcg" | "kvm" | "auto";
  /** Extra arguments for each agent, by host name. */
  agentArgs?: { a?: string[]; b?: string[] };
}

export class TestHost {
  agentPid = 0;
  constructor(
    readonly tb: Testbed,
    readonly name: "a" | "b",
    /** Address on the migration link. */
    readonly addr: string,
    /** Address on the management link, reachable from the root namespace. */
    readonly mgmtAddr: string,
  ) {}

  get netns(): string {
    return `${this.tb.id}-${this.name}`;
  }
  /** The directory that is /var/lib/nbdmig inside this host. */
  get dir(): string {
    return path.join(this.tb.dir, this.name);
  }
  /** A path inside the host, as the root namespace sees it. */
  hostPath(p: string): string {
    if (!p.startsWith(HOST_ROOT)) throw new Error(`${p} is not under ${HOST_ROOT}`);
    return path.join(this.dir, p.slice(HOST_ROOT.length));
  }
  get imagesDir(): string {
    return path.join(this.dir, "images");
  }
  /**
   * A guest's serial console log on this host, as QEMU writes it ("" before there is one). Tests poll this
   * rather than `nbdmig console`: a CLI process per poll competes with the TCG guest for the 2 CPUs.
   */
  consoleLog(name: string): string {
    try {
      return fs.readFileSync(path.join(this.dir, "log", `${name}.serial.log`), "utf8");
    } catch {
      return "";
    }
  }
  /** The agent's URI on the migration link (what a peer uses as DEST_URI). */
  get uri(): string {
    return `nbdmig://${this.addr}:${AGENT_PORT}`;
  }
  get mgmtUri(): string {
    return `nbdmig://${this.mgmtAddr}:${AGENT_PORT}`;
  }
  client(): AgentClient {
    return new AgentClient(
      { host: this.mgmtAddr, port: AGENT_PORT },
      readToken(this.tb.tokenFile),
      undefined,
      agentClientTls(path.join(this.dir, "pki"), true),
    );
  }
  /** argv prefix that runs a command inside this host (its network and mount namespaces). */
  execPrefix(): string[] {
    return ["nsenter", "-t", String(this.agentPid), "-n", "-m", "--"];
  }
  /** argv that runs the built nbdmig CLI inside this host, talking to its local agent. */
  cliArgv(args: string[]): string[] {
    return [...this.execPrefix(), process.execPath, cliPath, ...args];
  }
  /** Runs the CLI inside this host; `timeoutMs` bounds it (none by default: a migration may take long). */
  cli(args: string[], timeoutMs?: number): { status: number; stdout: string; stderr: string } {
    const argv = this.cliArgv(args);
    const r = spawnSync(argv[0]!, argv.slice(1), { encoding: "utf8", timeout: timeoutMs });
    return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }
  /** The CLI's output inside this host; throws with what it said when it fails. */
  cliOk(args: string[], timeoutMs?: number): string {
    const r = this.cli(args, timeoutMs);
    if (r.status !== 0)
      throw new Error(`[host ${this.name}] nbdmig ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
    return r.stdout;
  }

  /** Starts this host's agent; `env` adds to its environment (NBDMIG_FAILPOINTS, say). */
  async startAgent(extra: string[] = [], env: Record<string, string> = {}): Promise<void> {
    fs.mkdirSync(this.dir, { recursive: true });
    fs.copyFileSync(this.tb.tokenFile, path.join(this.dir, "token"));
    fs.chmodSync(path.join(this.dir, "token"), 0o600);
    fs.rmSync(path.join(this.dir, "agent.json"), { force: true });
    const log = fs.openSync(path.join(this.tb.dir, `agent-${this.name}.log`), "a");
    const script = `mount --bind ${this.dir} ${HOST_ROOT} && exec "$@"`;
    const child = spawn(
      "ip",
      [
        "netns",
        "exec",
        this.netns,
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        script,
        "agent",
        process.execPath,
        cliPath,
        "daemon",
        "--listen",
        `0.0.0.0:${AGENT_PORT}`,
        "--accel",
        this.tb.opts.accel ?? "tcg",
        ...extra,
      ],
      { stdio: ["ignore", log, log], detached: true, env: { ...process.env, ...env } },
    );
    fs.closeSync(log);
    child.unref();
    this.agentPid = child.pid!;
    fs.writeFileSync(path.join(this.tb.dir, `agent-${this.name}.pid`), String(this.agentPid));
    const deadline = Date.now() + 20_000;
    while (!fs.existsSync(path.join(this.dir, "agent.json"))) {
      if (child.exitCode !== null || Date.now() > deadline) {
        throw new Error(
          `agent ${this.name} did not start: ${fs.readFileSync(path.join(this.tb.dir, `agent-${this.name}.log`), "utf8").slice(-2000)}`,
        );
      }
      await sleep(50);
    }
  }

  /** Whether this host's agent process is alive. */
  alive(): boolean {
    try {
      process.kill(this.agentPid, 0);
      return true;
    } catch {
      return false;
    }
  }

  /** Kills the agent process only (its QEMU processes keep running). */
  async killAgent(signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
    try {
      process.kill(this.agentPid, signal);
    } catch {
      return;
    }
    for (let i = 0; i < 100; i++) {
      try {
        process.kill(this.agentPid, 0);
      } catch {
        return;
      }
      await sleep(50);
    }
  }

  /** PIDs of every process in this host's network namespace. */
  pids(): number[] {
    try {
      return execFileSync("ip", ["netns", "pids", this.netns], { encoding: "utf8" })
        .split(/\s+/)
        .filter(Boolean)
        .map(Number);
    } catch {
      return [];
    }
  }

  /** TCP ports listening in this host. */
  listeningPorts(): number[] {
    const out = execFileSync("ip", ["netns", "exec", this.netns, "ss", "-ltnH"], { encoding: "utf8" });
    return out
      .split("\n")
      .filter(Boolean)
      .map((l) => Number(l.trim().split(/\s+/)[3]!.split(":").pop()));
  }

  /** This host's end of the veth pair that joins the two hosts' bridges. */
  get bridgeLink(): string {
    return `${this.tb.id}j${this.name}`;
  }

  /** br0's forwarding database in this host (`bridge fdb show br br0`), entries on its ports only. */
  bridgeFdb(): FdbEntry[] {
    const out = execFileSync(
      "ip",
      ["netns", "exec", this.netns, "bridge", "-j", "fdb", "show", "br", BRIDGE],
      {
        encoding: "utf8",
      },
    );
    const entries = JSON.parse(out || "[]") as {
      mac: string;
      ifname: string;
      master?: string;
      state?: string;
    }[];
    return entries
      .filter((e) => e.ifname !== BRIDGE)
      .map((e) => ({
        mac: e.mac,
        dev: e.ifname,
        ...(e.master ? { master: e.master } : {}),
        ...(e.state ? { state: e.state } : {}),
      }));
  }

  /** Names of br0's ports in this host (taps, the bridge link, the client link on host a). */
  bridgePorts(): string[] {
    const out = execFileSync("ip", ["-n", this.netns, "-j", "link", "show", "master", BRIDGE], {
      encoding: "utf8",
    });
    return (JSON.parse(out || "[]") as { ifname: string }[]).map((l) => l.ifname);
  }

  /**
   * Loses this host's answers on local TCP port `sport` to `daddr` (nftables in its namespace): every packet
   * from that port to that address is dropped except the SYN-ACK, so connections still open and requests
   * still arrive and are carried out here, but nothing of what this host answers gets back (a lost reply,
   * while the link stays up). Answers the function that lifts the drop.
   */
  dropAnswers(daddr: string, sport: number): () => void {
    return this.nftDrop(`nbdmig_drop_${sport}`, "output", [
      ...["ip", "daddr", daddr, "tcp", "sport", String(sport)],
      ...["tcp", "flags", "&", "(syn", "|", "ack)", "!=", "syn", "|", "ack"],
    ]);
  }

  /**
   * Loses every packet `saddr` sends to this host's TCP port `dport`, SYNs included (a lost request: nothing
   * arrives here, and the caller hears nothing). Answers the function that lifts the drop.
   */
  dropRequests(saddr: string, dport: number): () => void {
    return this.nftDrop(`nbdmig_dropin_${dport}`, "input", [
      "ip",
      "saddr",
      saddr,
      "tcp",
      "dport",
      String(dport),
    ]);
  }

  /** One nftables table in this host's namespace with one chain on `hook` that drops what `match` matches. */
  private nftDrop(table: string, hook: "input" | "output", match: string[]): () => void {
    const nft = (...args: string[]) => execFileSync("ip", ["netns", "exec", this.netns, "nft", ...args]);
    nft("add", "table", "inet", table);
    nft("add", "chain", "inet", table, "c", `{ type filter hook ${hook} priority 0; }`);
    nft("add", "rule", "inet", table, "c", ...match, "drop");
    return () => nft("delete", "table", "inet", table);
  }

  /** QEMU processes running in this host. */
  qemuPids(): number[] {
    return this.pids().filter((p) => {
      try {
        return fs.readFileSync(`/proc/${p}/cmdline`, "utf8").startsWith("qemu-system");
      } catch {
        return false;
      }
    });
  }
}

export class Testbed {
  readonly id: string;
  readonly dir: string;
  readonly a: TestHost;
  readonly b: TestHost;
  private exitHook = () => this.downSync();

  private constructor(readonly opts: TestbedOptions) {
    this.id = `nbm${randomBytes(3).toString("hex")}`;
    this.dir = path.join(TB_BASE, this.id);
    const n = 1 + (randomBytes(1)[0]! % 250);
    this.a = new TestHost(this, "a", "198.18.0.1", `198.19.${n}.2`);
    this.b = new TestHost(this, "b", "198.18.0.2", `198.19.${n}.6`);
  }

  get hosts(): [TestHost, TestHost] {
    return [this.a, this.b];
  }
  get tokenFile(): string {
    return path.join(this.dir, "token");
  }
  /** The client network namespace, on host a's br0 with CLIENT_ADDR. */
  get clientNetns(): string {
    return `${this.id}-c`;
  }
  /** Host a's end of the client's veth (a port of a's br0). */
  get clientLink(): string {
    return `${this.id}ca`;
  }
  /** argv that runs `argv` in the client namespace (network only; the root filesystem). */
  clientArgv(argv: string[]): string[] {
    return ["nsenter", `--net=/run/netns/${this.clientNetns}`, "--", ...argv];
  }
  /**
   * GET `url` from the client with curl: the status (0 when no HTTP answer came, `error` then says why) and
   * the body. Asynchronous, so that a test can poll a guest while it drives a migration.
   */
  clientGet(url: string, timeoutMs = 5000): Promise<{ status: number; body: string; error?: string }> {
    const argv = this.clientArgv([
      "curl",
      "-sS",
      "--max-time",
      String(timeoutMs / 1000),
      "-o",
      "-",
      "-w",
      "\n%{http_code}",
      url,
    ]);
    return new Promise((resolve) => {
      execFile(argv[0]!, argv.slice(1), { encoding: "utf8" }, (err, stdout, stderr) => {
        const cut = stdout.lastIndexOf("\n");
        const status = Number(stdout.slice(cut + 1)) || 0;
        const body = cut >= 0 ? stdout.slice(0, cut) : "";
        if (status === 0)
          resolve({ status, body, error: stderr.trim() || (err ? String(err) : "no answer") });
        else resolve({ status, body });
      });
    });
  }

  /**
   * Starts polling `url` from the client every `everyMs` (one process in the client namespace, not one per
   * request). `samples()` are the requests finished so far (when each was sent and whether it was
   * answered); `stop()` ends the poller and returns them all.
   */
  startPoller(url: string, everyMs = 50): { samples(): PollSample[]; stop(): Promise<PollSample[]> } {
    const poller = fileURLToPath(new URL("./http-poller.js", import.meta.url));
    const run = this.runToFile("poller", [process.execPath, poller, url, String(everyMs), "1000"], "SIGTERM");
    // Only whole lines: a line still being written is not a sample yet.
    const samples = () =>
      run
        .output()
        .split("\n")
        .slice(0, -1)
        .filter(Boolean)
        .map((l) => {
          const [at, ok, ms, ...detail] = l.split(" ");
          return { at: Number(at), ok: ok === "ok", ms: Number(ms), detail: detail.join(" ") };
        });
    return { samples, stop: async () => (await run.stop(), samples()) };
  }

  /**
   * Pings `addr` from the client every `everyMs` (ICMP echo, answered by the guest's kernel: it costs the
   * guest next to nothing, unlike a connection to a service). `samples()` are the answers so far (sent at
   * `at`, answered after `ms`), in the form longestGap() takes; `stop()` ends it and returns them all.
   */
  startPinger(addr: string, everyMs = 50): { samples(): PollSample[]; stop(): Promise<PollSample[]> } {
    const run = this.runToFile(
      "ping",
      ["stdbuf", "-oL", "ping", "-n", "-D", "-W", "1", "-i", String(everyMs / 1000), addr],
      "SIGINT",
    );
    // "[1764640000.123456] 64 bytes from 10.77.0.20: icmp_seq=12 ttl=64 time=0.512 ms": stamped on arrival.
    const samples = () =>
      [...run.output().matchAll(/^\[([\d.]+)\] .* icmp_seq=(\d+) .*time=([\d.]+) ms/gm)].map((m) => {
        const ms = Number(m[3]);
        return { at: Math.round(Number(m[1]) * 1000 - ms), ok: true, ms, detail: `seq ${m[2]}` };
      });
    return { samples, stop: async () => (await run.stop(), samples()) };
  }

  private outputs = 0;
  /**
   * Runs `argv` in the client namespace with its output in a file of the test bed, not a pipe: a test that
   * blocks its event loop (spawnSync of a long migration) would leave a pipe unread, and a full pipe stops
   * the writer, which then reports a pause that never was.
   */
  private runToFile(
    what: string,
    argv: string[],
    stopSignal: NodeJS.Signals,
  ): { output(): string; stop(): Promise<void> } {
    const file = path.join(this.dir, `${what}-${++this.outputs}.out`);
    const fd = fs.openSync(file, "w");
    const full = this.clientArgv(argv);
    // stdin a pipe that is never written: the poller ends when it closes, so also when this process dies.
    const child = spawn(full[0]!, full.slice(1), { stdio: ["pipe", fd, "inherit"] });
    fs.closeSync(fd);
    const closed = new Promise<void>((resolve) => child.on("close", () => resolve()));
    return {
      output: () => fs.readFileSync(file, "utf8"),
      stop: async () => {
        child.kill(stopSignal);
        await closed;
      },
    };
  }

  static async up(opts: TestbedOptions = {}): Promise<Testbed> {
    requireTools(["ip", "nsenter", "unshare", "tc", "mount", "bridge"]);
    if (process.getuid?.() !== 0) throw new Error("the test bed needs root (network and mount namespaces)");
    reapStale();
    const tb = new Testbed(opts);
    fs.mkdirSync(tb.dir, { recursive: true });
    fs.writeFileSync(path.join(tb.dir, "owner"), String(process.pid));
    fs.writeFileSync(tb.tokenFile, randomBytes(32).toString("hex") + "\n", { mode: 0o600 });
    fs.mkdirSync(HOST_ROOT, { recursive: true });
    process.once("exit", tb.exitHook);
    try {
      tb.network();
      for (const h of tb.hosts) {
        fs.mkdirSync(h.imagesDir, { recursive: true });
        await h.startAgent(opts.agentArgs?.[h.name]);
      }
    } catch (err) {
      tb.downSync();
      throw err;
    }
    return tb;
  }

  private network(): void {
    const ip = (...args: string[]) => execFileSync("ip", args, { stdio: ["ignore", "ignore", "pipe"] });
    const [a, b] = this.hosts;
    for (const h of this.hosts) ip("netns", "add", h.netns);
    // The migration link.
    ip(
      "link",
      "add",
      `${this.id}l`,
      "netns",
      a.netns,
      "type",
      "veth",
      "peer",
      "name",
      `${this.id}r`,
      "netns",
      b.netns,
    );
    const inNs = (h: TestHost, ...args: string[]) => ip("-n", h.netns, ...args);
    inNs(a, "addr", "add", `${a.addr}/24`, "dev", `${this.id}l`);
    inNs(b, "addr", "add", `${b.addr}/24`, "dev", `${this.id}r`);
    for (const [h, dev] of [
      [a, `${this.id}l`],
      [b, `${this.id}r`],
    ] as const) {
      inNs(h, "link", "set", dev, "up");
      inNs(h, "link", "set", "lo", "up");
      if (this.opts.rate) {
        execFileSync("tc", [
          "-n",
          h.netns,
          "qdisc",
          "add",
          "dev",
          dev,
          "root",
          "tbf",
          "rate",
          this.opts.rate,
          "burst",
          "1mb",
          "latency",
          "50ms",
        ]);
      }
    }
    // The guest network: a bridge per host, the bridges joined, the client on a's bridge.
    for (const h of this.hosts) {
      inNs(h, "link", "add", BRIDGE, "type", "bridge");
      inNs(h, "link", "set", BRIDGE, "up");
    }
    const veth = (dev: string, ns: string, peer: string, peerNs: string) =>
      ip("link", "add", dev, "netns", ns, "type", "veth", "peer", "name", peer, "netns", peerNs);
    veth(a.bridgeLink, a.netns, b.bridgeLink, b.netns);
    for (const h of this.hosts) inNs(h, "link", "set", h.bridgeLink, "master", BRIDGE, "up");
    ip("netns", "add", this.clientNetns);
    veth(this.clientLink, a.netns, "eth0", this.clientNetns);
    inNs(a, "link", "set", this.clientLink, "master", BRIDGE, "up");
    ip("-n", this.clientNetns, "addr", "add", `${CLIENT_ADDR}/${GUEST_PREFIX_LEN}`, "dev", "eth0");
    ip("-n", this.clientNetns, "link", "set", "eth0", "up");
    ip("-n", this.clientNetns, "link", "set", "lo", "up");
    // Management links from the root namespace.
    for (const h of this.hosts) {
      const rootDev = `${this.id}m${h.name}`;
      ip("link", "add", rootDev, "type", "veth", "peer", "name", "mgmt", "netns", h.netns);
      const base = h.mgmtAddr.replace(/\d+$/, "");
      const last = Number(h.mgmtAddr.split(".")[3]);
      ip("addr", "add", `${base}${last - 1}/30`, "dev", rootDev);
      ip("link", "set", rootDev, "up");
      inNs(h, "addr", "add", `${h.mgmtAddr}/30`, "dev", "mgmt");
      inNs(h, "link", "set", "mgmt", "up");
    }
  }

  /** Shapes the migration link with tbf at `rate` (e.g. "200mbit"), or removes the shaping. */
  setRate(rate: string | undefined): void {
    for (const [h, dev] of [
      [this.a, `${this.id}l`],
      [this.b, `${this.id}r`],
    ] as const) {
      if (rate) {
        execFileSync("tc", [
          "-n",
          h.netns,
          "qdisc",
          "replace",
          "dev",
          dev,
          "root",
          "tbf",
          "rate",
          rate,
          "burst",
          "1mb",
          "latency",
          "50ms",
        ]);
      } else {
        // Deleting the root qdisc of an unshaped link fails; unshaped is what we want either way.
        spawnSync("tc", ["-n", h.netns, "qdisc", "del", "dev", dev, "root"], { stdio: "ignore" });
      }
    }
  }

  /** Bytes sent by host a over the migration link so far. */
  linkTxBytes(): number {
    return Number(
      execFileSync(
        "ip",
        ["netns", "exec", this.a.netns, "cat", `/sys/class/net/${this.id}l/statistics/tx_bytes`],
        { encoding: "utf8" },
      ),
    );
  }

  /**
   * Captures the migration link (host a's end) into a pcap `file` with tcpdump; the returned stop ends it
   * and says how many packets the kernel dropped before tcpdump read them (a capture with drops proves
   * nothing either way). An unshaped link is shaped to `rate` while the capture runs, so that tcpdump
   * keeps up on a loaded machine (a capture of an unshaped veth once lost every packet of a disk's 1 MiB).
   */
  async captureLink(file: string, rate = "1gbit"): Promise<() => Promise<{ dropped: number; log: string }>> {
    const shaped = !this.opts.rate;
    if (shaped) this.setRate(rate);
    const child = spawn(
      "ip",
      // -B: a 64 MiB kernel buffer (KiB); -U: each packet written as it comes.
      [
        "netns",
        "exec",
        this.a.netns,
        "tcpdump",
        "-i",
        `${this.id}l`,
        "-B",
        "65536",
        "-U",
        "-s",
        "0",
        "-w",
        file,
      ],
      { stdio: ["ignore", "ignore", "pipe"] },
    );
    let err = "";
    const exited = new Promise<number | null>((r) => child.once("exit", r));
    try {
      await new Promise<void>((resolve, reject) => {
        child.stderr.on("data", (d: Buffer) => {
          err += d.toString();
          if (err.includes("listening on")) resolve();
        });
        void exited.then((code) => reject(new Error(`tcpdump exited (${code}): ${err}`)));
      });
    } catch (e) {
      if (shaped) this.setRate(undefined);
      throw e;
    }
    return async () => {
      child.kill("SIGINT");
      const code = await exited;
      if (shaped) this.setRate(undefined);
      const dropped = /(\d+) packets? dropped by kernel/.exec(err);
      if (code !== 0 || !dropped) throw new Error(`tcpdump ended (${code}) without its counts: ${err}`);
      return { dropped: Number(dropped[1]), log: err.trim() };
    };
  }

  /** Takes the migration link down or up (failure tests). */
  setLink(up: boolean): void {
    execFileSync("ip", ["-n", this.a.netns, "link", "set", `${this.id}l`, up ? "up" : "down"]);
  }

  async down(): Promise<void> {
    this.downSync();
  }

  downSync(): void {
    process.removeListener("exit", this.exitHook);
    // NBDMIG_KEEP_LOGS=DIR keeps the agents' logs of a run that is being debugged.
    const keep = process.env.NBDMIG_KEEP_LOGS;
    if (keep) {
      fs.mkdirSync(keep, { recursive: true });
      for (const f of fs.readdirSync(this.dir).filter((x) => x.endsWith(".log")))
        fs.copyFileSync(path.join(this.dir, f), path.join(keep, `${this.id}-${f}`));
    }
    teardown(this.id, this.dir);
  }
}

function teardown(id: string, dir: string): void {
  // The guest network's veths go with their namespaces; deleting them first also frees them when a process
  // that outlived the kill still holds a namespace.
  for (const dev of [`${id}ja`, `${id}ca`]) {
    spawnSync("ip", ["-n", `${id}-a`, "link", "del", dev], { stdio: "ignore" });
  }
  for (const h of ["a", "b", "c"]) {
    const ns = `${id}-${h}`;
    let pids: number[] = [];
    try {
      pids = execFileSync("ip", ["netns", "pids", ns], {
        encoding: "utf8",
        stdio: ["ignore", "pipe", "ignore"],
      })
        .split(/\s+/)
        .filter(Boolean)
        .map(Number);
    } catch {
      /* namespace gone */
    }
    try {
      pids.push(Number(fs.readFileSync(path.join(dir, `agent-${h}.pid`), "utf8")));
    } catch {
      /* never started */
    }
    for (const p of pids) {
      try {
        process.kill(p, "SIGKILL");
      } catch {
        /* gone */
      }
    }
    for (let i = 0; i < 50 && pids.some(alive); i++) execFileSync("sleep", ["0.1"]);
    try {
      execFileSync("ip", ["netns", "del", ns], { stdio: "ignore" });
    } catch {
      /* gone */
    }
    if (h === "c") continue;
    try {
      execFileSync("ip", ["link", "del", `${id}m${h}`], { stdio: "ignore" });
    } catch {
      /* gone with the namespace */
    }
  }
  if (!process.env.NBDMIG_KEEP_TESTBED) fs.rmSync(dir, { recursive: true, force: true });
}

/** Whether `pid` still runs; a zombie does not (the agent stays one until its parent, maybe us, reaps it). */
function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
    // "PID (COMM) STATE ...", and COMM may itself hold ") ".
    return stat[stat.lastIndexOf(")") + 2] !== "Z";
  } catch {
    return false;
  }
}

/** Removes test beds whose owning process is gone (a killed test run). */
export function reapStale(all = false): string[] {
  const reaped: string[] = [];
  let ids: string[];
  try {
    ids = fs.readdirSync(TB_BASE);
  } catch {
    ids = [];
  }
  for (const id of ids) {
    let owner = 0;
    try {
      owner = Number(fs.readFileSync(path.join(TB_BASE, id, "owner"), "utf8"));
    } catch {
      /* no owner file: stale */
    }
    if (all || !owner || !alive(owner)) {
      teardown(id, path.join(TB_BASE, id));
      reaped.push(id);
    }
  }
  // Namespaces left without a directory.
  try {
    for (const line of execFileSync("ip", ["netns", "list"], { encoding: "utf8" }).split("\n")) {
      const m = /^(nbm[0-9a-f]{6})-[abc]\b/.exec(line);
      if (m && !ids.includes(m[1]!) && !reaped.includes(m[1]!)) {
        teardown(m[1]!, path.join(TB_BASE, m[1]!));
        reaped.push(m[1]!);
      }
    }
  } catch {
    /* no ip */
  }
  return reaped;
}

export function requireTools(tools: string[]): void {
  for (const t of tools) {
    try {
      execFileSync("sh", ["-c", `command -v ${t}`], { stdio: "ignore" });
    } catch {
      throw new Error(`'${t}' is missing; install it (bash .ci/run installs everything the tests need)`);
    }
  }
}
