/**
 * Values of the migration's options that both the CLI and the API's schemas check, in a module that loads
 * nothing else: the CLI's `migrate` starts without the schemas' validator or the engine (about 0.2 s).
 */

/** `--storage-converge`: how the disks' mirrors catch up with a guest that writes faster than the link. */
export const CONVERGE_MODES = ["auto", "throttle", "sync", "none"] as const;
export type ConvergeMode = (typeof CONVERGE_MODES)[number];

/** The longest a partial copy may be kept (`--keep-partial-for`): a week. */
export const MAX_KEEP_PARTIAL_MS = 7 * 24 * 3600 * 1000;
