/** The QMP commands nbdmig uses, typed after QEMU 7.2's QAPI schema (qapi/*.json). */

export type RunState =
  | "running"
  | "paused"
  | "prelaunch"
  | "inmigrate"
  | "postmigrate"
  | "finish-migrate"
  | "shutdown"
  | "suspended"
  | "internal-error"
  | "io-error"
  | "guest-panicked"
  | "restore-vm"
  | "save-vm"
  | "debug"
  | "watchdog"
  | "colo";

export interface BlockInfo {
  device: string;
  qdev?: string;
  inserted?: {
    "node-name": string;
    file: string;
    ro: boolean;
    drv: string;
    image: { "virtual-size": number; "actual-size"?: number; filename: string; format: string };
    bps_wr?: number;
    [k: string]: unknown;
  };
}

export interface BlockStats {
  device: string;
  qdev?: string;
  stats: { wr_bytes: number; rd_bytes: number; wr_operations: number; rd_operations: number };
}

export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  ready: boolean;
  status: string;
  "auto-finalize": boolean;
  "auto-dismiss": boolean;
  error?: string;
}

export interface MigrationStats {
  transferred: number;
  remaining: number;
  total: number;
  duplicate: number;
  normal: number;
  "normal-bytes": number;
  "dirty-pages-rate": number;
  mbps: number;
  "dirty-sync-count": number;
  "postcopy-requests": number;
  "page-size": number;
  "multifd-bytes": number;
  "pages-per-second": number;
  "precopy-bytes"?: number;
}

export interface MigrationInfo {
  status?: string;
  ram?: MigrationStats;
  disk?: { transferred: number; remaining: number; total: number };
  "total-time"?: number;
  "expected-downtime"?: number;
  downtime?: number;
  "setup-time"?: number;
  "error-desc"?: string;
}

export type SocketAddress = { type: "inet"; host: string; port: string } | { type: "unix"; path: string };

export interface QmpCommands {
  qmp_capabilities: { args: undefined; ret: Record<string, never> };
  "query-status": { args: undefined; ret: { running: boolean; status: RunState; singlestep?: boolean } };
  "query-block": { args: undefined; ret: BlockInfo[] };
  "query-block-jobs": { args: undefined; ret: BlockJobInfo[] };
  "query-blockstats": { args: undefined; ret: BlockStats[] };
  "query-migrate": { args: undefined; ret: MigrationInfo };
  "query-kvm": { args: undefined; ret: { enabled: boolean; present: boolean } };
  "query-commands": { args: undefined; ret: { name: string }[] };
  "query-migrate-capabilities": { args: undefined; ret: { capability: string; state: boolean }[] };
  "query-named-block-nodes": {
    args: { flat?: boolean } | undefined;
    ret: { "node-name": string; file: string; drv: string; image: { "virtual-size": number } }[];
  };
  stop: { args: undefined; ret: Record<string, never> };
  cont: { args: undefined; ret: Record<string, never> };
  quit: { args: undefined; ret: Record<string, never> };
  system_powerdown: { args: undefined; ret: Record<string, never> };
  "human-monitor-command": { args: { "command-line": string }; ret: string };
  "migrate-set-capabilities": {
    args: { capabilities: { capability: string; state: boolean }[] };
    ret: Record<string, never>;
  };
  "migrate-set-parameters": { args: Record<string, unknown>; ret: Record<string, never> };
  "migrate-incoming": { args: { uri: string }; ret: Record<string, never> };
  migrate: { args: { uri: string; blk?: boolean; inc?: boolean }; ret: Record<string, never> };
  migrate_cancel: { args: undefined; ret: Record<string, never> };
  "migrate-continue": { args: { state: string }; ret: Record<string, never> };
  "nbd-server-start": {
    args: {
      addr: { type: "inet"; data: { host: string; port: string } };
      "tls-creds"?: string;
      "tls-authz"?: string;
    };
    ret: Record<string, never>;
  };
  "nbd-server-stop": { args: undefined; ret: Record<string, never> };
  "block-export-add": {
    args: { type: "nbd"; id: string; "node-name": string; name: string; writable: boolean };
    ret: Record<string, never>;
  };
  "block-export-del": { args: { id: string; mode?: "safe" | "hard" }; ret: Record<string, never> };
  "blockdev-add": { args: Record<string, unknown>; ret: Record<string, never> };
  "object-add": {
    args: { "qom-type": string; id: string } & Record<string, unknown>;
    ret: Record<string, never>;
  };
  "object-del": { args: { id: string }; ret: Record<string, never> };
  "blockdev-del": { args: { "node-name": string }; ret: Record<string, never> };
  "blockdev-mirror": {
    args: {
      "job-id": string;
      device: string;
      target: string;
      sync: "full" | "top" | "none";
      "auto-dismiss"?: boolean;
      "auto-finalize"?: boolean;
      speed?: number;
      "copy-mode"?: "background" | "write-blocking";
      granularity?: number;
      "buf-size"?: number;
    };
    ret: Record<string, never>;
  };
  "block-job-cancel": { args: { device: string; force?: boolean }; ret: Record<string, never> };
  "block-job-set-speed": { args: { device: string; speed: number }; ret: Record<string, never> };
  "query-jobs": {
    args: undefined;
    ret: {
      id: string;
      type: string;
      status: string;
      "current-progress": number;
      "total-progress": number;
      error?: string;
    }[];
  };
  yank: {
    args: { instances: ({ type: "block-node"; "node-name": string } | { type: "migration" })[] };
    ret: Record<string, never>;
  };
  "job-dismiss": { args: { id: string }; ret: Record<string, never> };
  block_set_io_throttle: { args: Record<string, unknown>; ret: Record<string, never> };
}
