/**
 * QMP client: one UNIX-socket connection to one QEMU. Negotiates capabilities, runs commands matched by id,
 * delivers asynchronous events, and rejects every pending call with a QmpError once QEMU goes away.
 */
import { EventEmitter } from "node:events";
import net from "node:net";
import { QmpError } from "../errors.js";
import { pollPause } from "../util/poll.js";
import type { QmpCommands } from "./qmp-schema.js";

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

export interface QmpConnectOptions {
  /** Keep retrying a missing or refusing socket for this long (QEMU may still be starting). */
  waitMs?: number;
  /** Default per-command timeout. */
  commandTimeoutMs?: number;
}

export interface CommandOptions {
  timeoutMs?: number;
  /** Out of band, where QEMU allows it for this command (`yank`) and the monitor has it on. */
  oob?: boolean;
}

type CommandArgs<K extends keyof QmpCommands> = QmpCommands[K] extends { args: infer A } ? A : undefined;
type CommandReturn<K extends keyof QmpCommands> = QmpCommands[K] extends { ret: infer R } ? R : unknown;

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private readonly socket: net.Socket;
  private buffer = "";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private closedFlag = false;
  readonly commandTimeoutMs: number;
  /** QEMU's version as announced in the greeting. */
  version = { major: 0, minor: 0, micro: 0 };
  /**
   * Whether out-of-band execution is on (QEMU offers it on a socket monitor): a command sent with `oob`
   * runs in the monitor's own thread even while the main loop is stuck, e.g. draining I/O that waits on a
   * dead NBD connection; `yank` is the command meant for that.
   */
  oob = false;
  private greeting: ((v: unknown) => void) | undefined;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket, commandTimeoutMs: number) {
    super();
    this.socket = socket;
    this.commandTimeoutMs = commandTimeoutMs;
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => this.onData(chunk));
    this.closed = new Promise((resolve) => {
      socket.on("close", () => {
        this.closedFlag = true;
        const err = new QmpError("ConnectionLost", "QMP connection closed (QEMU exited or was killed)");
        for (const p of this.pending.values()) {
          if (p.timer) clearTimeout(p.timer);
          p.reject(err);
        }
        this.pending.clear();
        this.emit("close");
        resolve();
      });
    });
    socket.on("error", () => {
      /* 'close' follows and rejects what is pending */
    });
  }

  static async connect(path: string, opts: QmpConnectOptions = {}): Promise<QmpClient> {
    const started = Date.now();
    const deadline = started + (opts.waitMs ?? 0);
    for (;;) {
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.createConnection(path);
          s.once("connect", () => {
            s.removeListener("error", reject);
            resolve(s);
          });
          s.once("error", reject);
        });
        const client = new QmpClient(socket, opts.commandTimeoutMs ?? 30_000);
        await client.handshake();
        return client;
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        const retriable = code === "ENOENT" || code === "ECONNREFUSED" || code === "EAGAIN";
        if (!retriable || Date.now() >= deadline) {
          if (err instanceof QmpError) throw err;
          throw new QmpError(
            "ConnectFailed",
            `cannot connect to QMP socket ${path}: ${(err as Error).message}`,
          );
        }
        // A QEMU being started creates its socket some 20 ms after exec here: retrying every 50 ms cost
        // each start (the destination's Prepare among them) up to 50 ms; an attempt costs microseconds.
        await pollPause(started, { fastFor: 2000 });
      }
    }
  }

  private async handshake(): Promise<void> {
    const greeting = (await new Promise<unknown>((resolve, reject) => {
      const t = setTimeout(() => reject(new QmpError("Timeout", "no QMP greeting within 10 s")), 10_000);
      this.greeting = (v) => {
        clearTimeout(t);
        resolve(v);
      };
      void this.closed.then(() => {
        clearTimeout(t);
        reject(new QmpError("ConnectionLost", "QMP connection closed before the greeting"));
      });
    })) as {
      QMP?: { version?: { qemu?: { major: number; minor: number; micro: number } }; capabilities?: string[] };
    };
    const v = greeting.QMP?.version?.qemu;
    if (v) this.version = v;
    const oob = greeting.QMP?.capabilities?.includes("oob") ?? false;
    await this.raw("qmp_capabilities", oob ? { enable: ["oob"] } : undefined);
    this.oob = oob;
  }

  get isClosed(): boolean {
    return this.closedFlag;
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf("\n")) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onMessage(line);
    }
  }

  private onMessage(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      return; // QEMU only sends JSON; a garbled line is not ours to act on
    }
    if ("QMP" in msg) {
      const g = this.greeting;
      this.greeting = undefined;
      g?.(msg);
      return;
    }
    if (typeof msg.event === "string") {
      // Some events (STOP, RESUME...) carry no data; listeners always get an object.
      this.emit("event", {
        ...(msg as unknown as QmpEvent),
        data: (msg.data as Record<string, unknown>) ?? {},
      });
      return;
    }
    const id = typeof msg.id === "string" ? msg.id : undefined;
    const p = id ? this.pending.get(id) : undefined;
    if (!p || !id) return; // reply to a call that timed out
    this.pending.delete(id);
    if (p.timer) clearTimeout(p.timer);
    if ("error" in msg) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(e.class ?? "GenericError", e.desc ?? "unknown QMP error", p.command));
    } else {
      p.resolve(msg.return);
    }
  }

  /** Runs a typed command. */
  execute<K extends keyof QmpCommands>(
    command: K,
    ...rest: CommandArgs<K> extends undefined
      ? [args?: undefined, opts?: CommandOptions]
      : [args: CommandArgs<K>, opts?: CommandOptions]
  ): Promise<CommandReturn<K>> {
    return this.raw(command, rest[0] as Record<string, unknown> | undefined, rest[1]) as Promise<
      CommandReturn<K>
    >;
  }

  /** Runs any command by name (for qemu-monitor-command and commands without a typed entry). */
  raw(command: string, args?: Record<string, unknown>, opts: CommandOptions = {}): Promise<unknown> {
    if (this.closedFlag) {
      return Promise.reject(new QmpError("ConnectionLost", "QMP connection is closed", command));
    }
    const id = `nbdmig-${this.nextId++}`;
    const timeoutMs = opts.timeoutMs ?? this.commandTimeoutMs;
    return new Promise((resolve, reject) => {
      const timer =
        timeoutMs > 0
          ? setTimeout(() => {
              this.pending.delete(id);
              reject(new QmpError("Timeout", `no reply within ${timeoutMs} ms`, command));
            }, timeoutMs)
          : undefined;
      this.pending.set(id, { command, resolve, reject, timer });
      const msg: Record<string, unknown> = { [opts.oob && this.oob ? "exec-oob" : "execute"]: command, id };
      if (args !== undefined) msg.arguments = args;
      this.socket.write(JSON.stringify(msg) + "\n");
    });
  }

  /** Resolves with the first event named `name` (and matching `filter`) that arrives after this call. */
  waitEvent(
    name: string,
    filter: (data: Record<string, unknown>) => boolean = () => true,
    timeoutMs = 0,
  ): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const cleanup = () => {
        this.off("event", onEvent);
        this.off("close", onClose);
        if (timer) clearTimeout(timer);
      };
      const onEvent = (ev: QmpEvent) => {
        if (ev.event === name && filter(ev.data ?? {})) {
          cleanup();
          resolve(ev);
        }
      };
      const onClose = () => {
        cleanup();
        reject(new QmpError("ConnectionLost", `QMP connection closed while waiting for ${name}`));
      };
      if (timeoutMs > 0) {
        timer = setTimeout(() => {
          cleanup();
          reject(new QmpError("Timeout", `no ${name} event within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this.on("event", onEvent);
      this.on("close", onClose);
      if (this.closedFlag) onClose();
    });
  }

  close(): void {
    this.socket.end();
    this.socket.destroy();
  }
}
