/**
 * The bodies of the migration API, CLI -> agent (migrate) and agent -> agent (prepare, finish): one zod
 * schema each, from which both the validation and the TypeScript types come. Strict: an unknown field is
 * refused, as is anything out of range, so a peer's body is never trusted as it arrives.
 */
import { z } from "zod";
import { UUID_RE } from "../domain/xml.js";
import { CONVERGE_MODES, MAX_KEEP_PARTIAL_MS } from "./options.js";

/** Byte counts and sizes: whole, not negative, exact in a double. */
const bytes = z.number().int().nonnegative().max(Number.MAX_SAFE_INTEGER);
const port = z.number().int().min(1).max(65535);
const filePath = z.string().min(1).max(4096).startsWith("/", "must be an absolute path");
const sha256 = z.string().regex(/^[0-9a-f]{64}$/, "must be a SHA-256 in hex");
const imageFormat = z.enum(["raw", "qcow2"]);
/** A disk target (vda, sdb, hdc...) or the UEFI variable store's pseudo-target `nvram`. */
export const diskTarget = z.string().regex(/^[A-Za-z0-9_-]{1,32}$/, "must be a disk target such as vda");

export const CookieDiskSchema = z.strictObject({
  target: diskTarget,
  source: filePath,
  format: imageFormat,
  virtualSize: bytes,
  /** Bytes allocated in the source image (the top image for "top"): what the destination needs room for. */
  allocated: bytes,
  /** "full" copies the whole disk; "top" (--copy-storage-inc) only the top image of its backing chain. */
  mode: z.enum(["full", "top"]),
  /** For "top": the backing as written in the top image's header, to precreate the overlay the same way. */
  backing: z
    .strictObject({ file: z.string().min(1).max(4096), format: z.string().min(1).max(32) })
    .optional(),
  /** The source image's identity (size, mtime, inode), for resuming a partial copy of it (offline). */
  stamp: z.string().min(1).max(200).optional(),
  /** For "top": the chain below the top image, which the destination must already hold. */
  chain: z
    .array(
      z.strictObject({
        path: filePath,
        format: z.string().min(1).max(32),
        virtualSize: bytes,
        sha256: sha256.optional(),
      }),
    )
    .max(64)
    .optional(),
});
export type CookieDisk = z.infer<typeof CookieDiskSchema>;

/** How the disks travel: NBD mirrors, inside the migration stream (QEMU block migration), or not at all. */
export const StoragePathSchema = z.enum(["nbd", "stream", "none"]);
export type StoragePath = z.infer<typeof StoragePathSchema>;

/** The most files, and the largest file, a TPM state directory may hold (swtpm writes two of some KiB). */
export const MAX_TPM_FILES = 8;
export const MAX_TPM_FILE_BYTES = 512 * 1024;

/** A shut-off domain's TPM state, moved by an offline migration (see tpm-state.ts). */
export const TpmStateSchema = z.strictObject({
  files: z
    .array(
      z.strictObject({
        name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/, "must be a plain file name"),
        base64: z
          .string()
          .max(Math.ceil(MAX_TPM_FILE_BYTES / 3) * 4)
          .regex(/^[A-Za-z0-9+/]*={0,2}$/, "must be base64"),
      }),
    )
    .min(1)
    .max(MAX_TPM_FILES),
});
export type TpmState = z.infer<typeof TpmStateSchema>;

/** What Begin tells the destination about the domain (libvirt's migration cookie). */
export const MigrationCookieSchema = z.strictObject({
  /** The running definition, as domain XML. */
  xml: z
    .string()
    .min(1)
    .max(4 * 1024 * 1024),
  name: z.string().min(1).max(200),
  uuid: z.string().regex(UUID_RE, "must be a UUID"),
  /** How the source runs the guest; absent for an offline migration (no QEMU runs). */
  accel: z.enum(["kvm", "tcg"]).optional(),
  /** Every disk to copy; the UEFI variable store is one of them (target `nvram`) when storage is copied. */
  disks: z.array(CookieDiskSchema).max(256),
  storagePath: StoragePathSchema,
  /** A UEFI guest's variable store, copied or not: its size, for a destination that must create it. */
  nvram: z.strictObject({ path: filePath, format: imageFormat, virtualSize: bytes }).optional(),
  /** The UEFI code the source runs, so the destination can tell whether its copy is the same. */
  firmware: z.strictObject({ path: filePath, size: bytes, sha256 }).optional(),
  /** Offline only: the TPM's state, which a live migration carries in its stream instead. */
  tpmState: TpmStateSchema.optional(),
});
export type MigrationCookie = z.infer<typeof MigrationCookieSchema>;

/** POST /v1/migrations/prepare (source agent -> destination agent). */
export const PrepareRequestSchema = z.strictObject({
  cookie: MigrationCookieSchema,
  /** The address the source used to reach this agent: QEMU listens there for NBD and the migration. */
  listenHost: z.string().min(1).max(255),
  disksPort: port.optional(),
  /** Encrypt and authenticate the NBD copy and the migration stream (x509, this host's STATE/pki). */
  tls: z.boolean().default(false),
  /** With tls: the source's client certificate's subject; only it may connect (QEMU's tls-authz). */
  tlsIdentity: z.string().min(1).max(1024).optional(),
  /** A shut-off domain: no QEMU here; the created images are served over NBD for the source's copy engine. */
  offline: z.boolean().default(false),
  /** Offline: keep what was copied this long when the attempt fails, for the same command to resume. */
  keepPartialMs: z.number().int().positive().max(MAX_KEEP_PARTIAL_MS).optional(),
});
export type PrepareRequest = z.infer<typeof PrepareRequestSchema>;
/** A Prepare body as the source writes it (defaults not yet applied). */
export type PrepareRequestInput = z.input<typeof PrepareRequestSchema>;

/** POST /v1/migrations/ID/progress (offline, with keepPartialMs): a disk's copy is done below `doneTo`. */
export const ProgressRequestSchema = z.strictObject({ target: diskTarget, doneTo: bytes });

/**
 * POST /v1/migrations/ID/cancel: `discard` removes what was copied even with keepPartialMs (it is wrong);
 * `inspect` keeps a live copy whose --verify failed paused on the destination, for the operator to look at.
 */
export const CancelRequestSchema = z
  .strictObject({ discard: z.boolean().default(false), inspect: z.boolean().default(false) })
  .refine((b) => !(b.discard && b.inspect), { message: "discard and inspect exclude each other" });
export type CancelRequest = z.input<typeof CancelRequestSchema>;
/** Its answer: what the destination keeps (an offline partial copy, or a paused copy for inspection). */
export interface CancelResult {
  kept?: { bytes: number; until: number };
  inspect?: { until: number };
}

/** POST /v1/migrations/ID/finish. */
export const FinishRequestSchema = z.strictObject({ suspend: z.boolean(), persistent: z.boolean() });

/** POST /v1/domains/NAME/migrate (CLI -> source agent); absent fields take virsh's defaults. */
export const MigrateRequestSchema = z.strictObject({
  /** The destination agent, nbdmig://HOST:PORT; HOST is also where its QEMU listens. */
  dest: z.string().min(1).max(300),
  destToken: z.string().min(1).max(1024).optional(),
  live: z.boolean().default(true),
  copyStorage: z.enum(["all", "inc", "none"]).default("none"),
  /** With "inc": compare the destination's backing files with the source's by content hash. */
  verifyBacking: z.boolean().optional(),
  storageConverge: z.enum(CONVERGE_MODES).default("auto"),
  migrateDisks: z.array(diskTarget).max(256).optional(),
  bandwidthMiB: z.number().positive().max(1_000_000).optional(),
  disksPort: port.optional(),
  timeoutSec: z
    .number()
    .int()
    .positive()
    .max(86_400 * 30)
    .optional(),
  persistent: z.boolean().default(false),
  undefineSource: z.boolean().default(false),
  suspend: z.boolean().default(false),
  /** TLS on the NBD copy and the migration stream; absent: on when this host has certificates. */
  tls: z.boolean().optional(),
  /** virsh --offline: a shut-off domain, its disks copied by nbdmig's copy engine, defined on the destination. */
  offline: z.boolean().default(false),
  /**
   * With offline, or live with suspend: compare every copied disk on both sides before Finish; a
   * difference fails the migration.
   */
  verify: z.boolean().default(false),
  /** With offline: a failed copy leaves what it copied on the destination this long, to be resumed. */
  keepPartialMs: z.number().int().positive().max(MAX_KEEP_PARTIAL_MS).optional(),
});
export type MigrateRequest = z.infer<typeof MigrateRequestSchema>;

/** POST /v1/domains/NAME/migrate/recover: which copy of a migration with an unknown outcome runs. */
export const RecoverRequestSchema = z.strictObject({
  keep: z.enum(["source", "destination"]),
  /** Go ahead although the destination cannot be asked. */
  force: z.boolean().default(false),
});
export type RecoverRequest = z.infer<typeof RecoverRequestSchema>;
