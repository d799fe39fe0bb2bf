/**
 * Loads a native helper built by scripts/build-native.sh (dist/native/NAME.node). When it cannot load,
 * `addon` is undefined and `error` says why; every helper has a fallback, so nbdmig works without it.
 */
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

export function loadNative<T>(name: string): { addon?: T; error?: string } {
  if (process.env.NBDMIG_NO_NATIVE) return { error: "disabled by NBDMIG_NO_NATIVE" };
  // dist/src/nbd/native/load.js -> dist/native/NAME.node
  const file = path.resolve(path.dirname(fileURLToPath(import.meta.url)), `../../../native/${name}.node`);
  try {
    return { addon: createRequire(import.meta.url)(file) as T };
  } catch (err) {
    return { error: `${file}: ${(err as Error).message.split("\n")[0]}` };
  }
}
