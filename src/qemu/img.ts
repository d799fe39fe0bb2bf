/** qemu-img helpers: the image facts nbdmig needs, read without taking the image lock (-U). */
import { execFile } from "node:child_process";
import { promisify } from "node:util";
import { NbdmigError } from "../errors.js";

const run = promisify(execFile);
export const qemuImgBinary = (): string => process.env.NBDMIG_QEMU_IMG ?? "qemu-img";

export interface ImageInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFilename?: string;
  backingFormat?: string;
}

async function qemuImg(args: string[]): Promise<string> {
  try {
    const { stdout } = await run(qemuImgBinary(), args, { maxBuffer: 64 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new NbdmigError("E_QEMU_IMG", `qemu-img ${args[0]}: ${(e.stderr || e.message).trim()}`);
  }
}

export async function imageInfo(path: string, format?: string): Promise<ImageInfo> {
  const args = ["info", "-U", "--output=json"];
  if (format) args.push("-f", format);
  const j = JSON.parse(await qemuImg([...args, path])) as Record<string, unknown>;
  return {
    format: String(j.format),
    virtualSize: Number(j["virtual-size"]),
    actualSize: Number(j["actual-size"] ?? 0),
    backingFilename: j["backing-filename"] as string | undefined,
    backingFormat: j["backing-filename-format"] as string | undefined,
  };
}

export async function createImage(
  path: string,
  format: string,
  size: number,
  backing?: { file: string; format: string },
): Promise<void> {
  const args = ["create", "-q", "-f", format];
  if (format === "qcow2") args.push("-o", "compat=1.1");
  if (backing) args.push("-b", backing.file, "-F", backing.format);
  args.push(path);
  if (!backing) args.push(String(size));
  await qemuImg(args);
}

/** Compares two images' guest-visible contents; returns null when identical, else qemu-img's message. */
export async function compareImages(a: string, b: string, fa?: string, fb?: string): Promise<string | null> {
  const args = ["compare", "-U"];
  if (fa) args.push("-f", fa);
  if (fb) args.push("-F", fb);
  try {
    await run(qemuImgBinary(), [...args, a, b]);
    return null;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    return (e.stdout || e.stderr || e.message).trim();
  }
}

export interface ChainImage {
  /** The image's path as QEMU resolves it. */
  filename: string;
  format: string;
  virtualSize: number;
  actualSize: number;
  /** The backing file name as written in this image's header (may be relative). */
  backingFilename?: string;
  backingFormat?: string;
}

/** The image and its backing chain, top first. */
export async function backingChain(path: string): Promise<ChainImage[]> {
  const list = JSON.parse(await qemuImg(["info", "-U", "--backing-chain", "--output=json", path])) as Record<
    string,
    unknown
  >[];
  return list.map((j, i) => ({
    filename: i === 0 ? path : String(j.filename),
    format: String(j.format),
    virtualSize: Number(j["virtual-size"]),
    actualSize: Number(j["actual-size"] ?? 0),
    backingFilename: j["backing-filename"] as string | undefined,
    backingFormat: j["backing-filename-format"] as string | undefined,
  }));
}
