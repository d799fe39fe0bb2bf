/**
 * NBD protocol constants, as named in the spec (NetworkBlockDevice/nbd doc/proto.md) and QEMU's
 * docs/interop/nbd.rst. Only the fixed newstyle handshake is spoken; oldstyle is not.
 */

export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const REP_ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const;

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

/** Transmission flags. */
export const TF = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;
export type CmdType = (typeof Cmd)[keyof typeof Cmd];
export const CMD_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(Cmd).map(([k, v]) => [v, k]),
);

/** Command flags. */
export const CF = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

/** Structured reply chunk types and flags. */
export const RF_DONE = 1 << 0;
export const Chunk = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
export const isErrorChunk = (type: number): boolean => (type & (1 << 15)) !== 0;

/** Errors on the wire (Linux errno values, whatever the host). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;
export const ERRNO_NAMES: Record<number, string> = Object.fromEntries(
  Object.entries(NbdErrno).map(([k, v]) => [v, k]),
);

/** The `base:allocation` meta context and its status flags. */
export const BASE_ALLOCATION = "base:allocation";
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;
/**
 * QEMU's `qemu:allocation-depth` meta context (qemu-nbd -A): an extent's value is the layer of the backing
 * chain that holds it, 1 for the top image, 2 for its backing file and so on; 0 where no layer does.
 */
export const ALLOCATION_DEPTH = "qemu:allocation-depth";

/** Limits: the spec's recommended maximum payload and the lengths we accept in handshake messages. */
export const MAX_STRING = 4096;
export const MAX_OPTION_LENGTH = 64 * 1024;
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
