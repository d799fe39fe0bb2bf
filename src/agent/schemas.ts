/** The bodies of the domain API (CLI -> agent): one zod schema each, giving the validation and the types. */
import { z } from "zod";

const xml = z
  .string()
  .min(1, "must not be empty")
  .max(4 * 1024 * 1024);

/** POST /v1/domains (define). */
export const DefineSchema = z.strictObject({ xml });
/** POST /v1/domains/create (a transient domain, started at once). */
export const CreateSchema = z.strictObject({ xml, paused: z.boolean().optional() });
/** POST /v1/domains/NAME/start. */
export const StartSchema = z.strictObject({ paused: z.boolean().optional() });
/** DELETE /v1/domains/NAME (undefine). */
export const UndefineSchema = z.strictObject({
  nvram: z.enum(["remove", "keep"]).optional(),
  keepTpm: z.boolean().optional(),
});
/** POST /v1/domains/NAME/monitor: a QMP command as JSON text, or an HMP line with `hmp`. */
export const MonitorSchema = z.strictObject({
  command: z
    .string()
    .min(1, "must not be empty")
    .max(1024 * 1024),
  hmp: z.boolean().optional(),
});
