/**
 * The host side of a guest's network interfaces: taps on bridges (type bridge and network) and macvtaps on
 * host links (type direct), created before QEMU starts and removed when it exits.
 *
 * - A tap is created persistent (`ip tuntap add`) and attached to its bridge before QEMU opens it by name;
 *   its MTU is the interface's `<mtu>` or else the bridge's, as libvirt does.
 * - A macvtap is created on its link with the guest's MAC; QEMU inherits open descriptors of its character
 *   device, one per queue. The device node is made by us from sysfs (major:minor) in the run directory,
 *   so neither udev nor a shared /dev (two test hosts on one kernel) matters.
 * - libvirt network names map to bridges with `daemon --network NAME=BRIDGE`; `default` means virbr0
 *   when that bridge exists and no mapping says otherwise.
 * Every name created is recorded by the caller before creation (acquireResources), so a restarted agent
 * can remove what a crashed one left; and every link made is tagged with the alias `nbdmig:DOMAIN`, so that
 * removing one never takes a link of the same name that someone else made (libvirt's own vnet0, say).
 */
import { execFile } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import { promisify } from "node:util";
import { UsageError } from "../errors.js";
import { isGeneratedNicName, type InterfaceDef } from "../domain/model.js";

const run = promisify(execFile);

/** A host that lacks what an interface needs: the message names the bridge, network or link, and the host. */
export class HostNetworkError extends UsageError {
  constructor(message: string) {
    super(message, "E_HOST_NETWORK");
  }
}

const SYS = "/sys/class/net";

export function linkExists(name: string): boolean {
  return fs.existsSync(path.join(SYS, name));
}

export function isBridge(name: string): boolean {
  return fs.existsSync(path.join(SYS, name, "bridge"));
}

export function listLinks(): string[] {
  try {
    return fs.readdirSync(SYS).sort();
  } catch {
    return [];
  }
}

export function listBridges(): string[] {
  return listLinks().filter(isBridge);
}

/**
 * Repeated `--FLAG NAME=VALUE` options -> NAME -> VALUE; refuses a malformed value (`usage` says what is
 * wanted) or a name given twice. `libvirtDefault`, when it exists on this host and no option names
 * `default`, is what libvirt's `default` would be.
 */
function namedValues(
  flag: string,
  flags: string[],
  valid: (value: string) => boolean,
  usage: string,
  libvirtDefault: { value: string; exists: boolean },
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const f of flags) {
    const eq = f.indexOf("=");
    const name = f.slice(0, eq);
    const value = f.slice(eq + 1);
    if (eq <= 0 || !valid(value)) throw new UsageError(`--${flag} takes ${usage}, not '${f}'`);
    if (name in out) throw new UsageError(`--${flag} ${name} is given twice`);
    out[name] = value;
  }
  if (!("default" in out) && libvirtDefault.exists) out.default = libvirtDefault.value;
  return out;
}

/** The networks this host offers (`--network NAME=BRIDGE`), with default -> virbr0 when that bridge exists. */
export function hostNetworks(flags: string[]): Record<string, string> {
  return namedValues(
    "network",
    flags,
    (bridge) => /^[A-Za-z0-9_.-]{1,15}$/.test(bridge),
    "NAME=BRIDGE (e.g. --network default=virbr0)",
    { value: "virbr0", exists: isBridge("virbr0") },
  );
}

/** The directory pools this host offers (`--pool NAME=DIR`), with libvirt's default pool when it exists. */
export function hostPools(flags: string[]): Record<string, string> {
  const images = "/var/lib/libvirt/images";
  return namedValues(
    "pool",
    flags,
    (dir) => dir.startsWith("/"),
    "NAME=DIR with an absolute DIR (e.g. --pool default=/var/lib/libvirt/images)",
    { value: images, exists: fs.existsSync(images) },
  );
}

export type Attachment =
  { kind: "user" } | { kind: "bridge"; bridge: string } | { kind: "direct"; link: string };

/** Where `nic` attaches on this host, or a HostNetworkError naming what is missing on `host`. */
export function attachmentOf(nic: InterfaceDef, networks: Record<string, string>, host: string): Attachment {
  switch (nic.type) {
    case "user":
      return { kind: "user" };
    case "bridge":
      if (!isBridge(nic.source!)) {
        throw new HostNetworkError(
          `interface ${nic.mac}: bridge '${nic.source}' does not exist on ${host}${linkExists(nic.source!) ? " (there is a link of that name, but it is not a bridge)" : ""}; create it there or change <source bridge>`,
        );
      }
      return { kind: "bridge", bridge: nic.source! };
    case "network": {
      const bridge = networks[nic.source!];
      if (!bridge) {
        const known = Object.keys(networks);
        throw new HostNetworkError(
          `interface ${nic.mac}: network '${nic.source}' is not known on ${host} (${known.length ? `it has ${known.map((n) => `${n} -> ${networks[n]}`).join(", ")}` : "it maps no networks"}); start its agent with --network ${nic.source}=BRIDGE`,
        );
      }
      if (!isBridge(bridge)) {
        throw new HostNetworkError(
          `interface ${nic.mac}: network '${nic.source}' maps to bridge '${bridge}', which does not exist on ${host}; create it or change the agent's --network`,
        );
      }
      return { kind: "bridge", bridge };
    }
    case "direct":
      if (!linkExists(nic.source!)) {
        throw new HostNetworkError(
          `interface ${nic.mac}: host link '${nic.source}' (for macvtap) does not exist on ${host}; change <source dev>`,
        );
      }
      return { kind: "direct", link: nic.source! };
  }
}

/** The tap/macvtap name for `nic`: its own <target dev> unless that is a generated one, else prefixN. */
export function chooseNicName(nic: InterfaceDef, taken: Set<string>): string {
  if (nic.targetDev && !isGeneratedNicName(nic.targetDev)) {
    if (linkExists(nic.targetDev) || taken.has(nic.targetDev)) {
      throw new HostNetworkError(
        `interface ${nic.mac}: <target dev='${nic.targetDev}'> already exists on this host; remove it or leave <target> out`,
      );
    }
    return nic.targetDev;
  }
  const prefix = nic.type === "direct" ? "macvtap" : "vnet";
  for (let n = 0; ; n++) {
    const name = `${prefix}${n}`;
    if (!linkExists(name) && !taken.has(name)) return name;
  }
}

async function ip(...args: string[]): Promise<void> {
  try {
    await run("ip", args);
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new HostNetworkError(`ip ${args.join(" ")}: ${(e.stderr ?? e.message).trim()}`);
  }
}

function mtuOf(name: string): number | undefined {
  try {
    return Number(fs.readFileSync(path.join(SYS, name, "mtu"), "utf8"));
  } catch {
    return undefined;
  }
}

/** The alias nbdmig gives the links it makes for `domain`. */
export const ownerAlias = (domain: string): string => `nbdmig:${domain}`;

/** Creates a persistent tap `name` for `owner`, attached to `bridge` and up. */
export async function createTap(
  name: string,
  bridge: string,
  opts: { owner: string; mtu?: number; queues?: number },
): Promise<void> {
  await ip("tuntap", "add", "dev", name, "mode", "tap", ...((opts.queues ?? 1) > 1 ? ["multi_queue"] : []));
  try {
    const mtu = opts.mtu ?? mtuOf(bridge);
    await ip("link", "set", "dev", name, "alias", ownerAlias(opts.owner));
    await ip("link", "set", "dev", name, ...(mtu ? ["mtu", String(mtu)] : []), "master", bridge, "up");
  } catch (err) {
    await deleteLink(name); // made just now, by this call
    throw err;
  }
}

/**
 * Creates macvtap `name` on `link` (mode bridge) with the guest's MAC, and opens `queues` descriptors of it
 * through a device node made in `nodeDir`. The caller passes them to QEMU and closes its own copies.
 */
export async function createMacvtap(
  name: string,
  link: string,
  opts: { owner: string; mac: string; mtu?: number; queues?: number; nodeDir: string },
): Promise<{ fds: number[]; node: string }> {
  await ip("link", "add", "link", link, "name", name, "type", "macvtap", "mode", "bridge");
  const fds: number[] = [];
  try {
    await ip("link", "set", "dev", name, "alias", ownerAlias(opts.owner));
    await ip(
      "link",
      "set",
      "dev",
      name,
      "address",
      opts.mac,
      ...(opts.mtu ? ["mtu", String(opts.mtu)] : []),
      "up",
    );
    const ifindex = fs.readFileSync(path.join(SYS, name, "ifindex"), "utf8").trim();
    const devno = fs.readFileSync(path.join(SYS, name, "macvtap", `tap${ifindex}`, "dev"), "utf8").trim();
    const [major, minor] = devno.split(":");
    const node = path.join(opts.nodeDir, `${name}.tap`);
    fs.rmSync(node, { force: true });
    await run("mknod", ["-m", "0600", node, "c", major!, minor!]);
    try {
      for (let q = 0; q < (opts.queues ?? 1); q++) fds.push(fs.openSync(node, "r+"));
    } catch (err) {
      for (const fd of fds) fs.closeSync(fd);
      fs.rmSync(node, { force: true });
      throw err;
    }
    return { fds, node };
  } catch (err) {
    await deleteLink(name);
    throw err instanceof HostNetworkError
      ? err
      : new HostNetworkError(`macvtap ${name} on ${link}: ${(err as Error).message}`);
  }
}

/**
 * Removes a tap or macvtap (and our device node for it); a missing one is not an error. With `owner`, only a
 * link that carries owner's alias goes: a record may name a link that someone else made under that name.
 * Answers whether a link was left because it is not ours.
 */
export async function deleteLink(
  name: string,
  opts: { node?: string; owner?: string } = {},
): Promise<boolean> {
  if (opts.node) fs.rmSync(opts.node, { force: true });
  if (!linkExists(name)) return false;
  if (opts.owner !== undefined) {
    let alias = "";
    try {
      alias = fs.readFileSync(path.join(SYS, name, "ifalias"), "utf8").trim();
    } catch {
      /* no alias */
    }
    if (alias !== ownerAlias(opts.owner)) return true;
  }
  await ip("link", "del", "dev", name).catch(() => undefined);
  return false;
}

/** vhost-net is used when /dev/vhost-net opens (and the guest runs under KVM). */
export function vhostNetUsable(): boolean {
  try {
    fs.closeSync(fs.openSync("/dev/vhost-net", "r+"));
    return true;
  } catch {
    return false;
  }
}

/** Opens `n` descriptors of /dev/vhost-net for a macvtap's queues (QEMU cannot open them by name). */
export function openVhostFds(n: number): number[] {
  const fds: number[] = [];
  try {
    for (let i = 0; i < n; i++) fds.push(fs.openSync("/dev/vhost-net", "r+"));
  } catch (err) {
    for (const fd of fds) fs.closeSync(fd);
    throw err;
  }
  return fds;
}
