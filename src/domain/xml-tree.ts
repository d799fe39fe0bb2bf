/** A minimal element tree over fast-xml-parser's ordered output, with location-aware errors. */
import { randomBytes } from "node:crypto";
import { XMLParser, XMLValidator } from "fast-xml-parser";
import { DomainXmlError } from "../errors.js";

export interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  children: XmlElement[];
  text: string;
  /** A readable path such as `domain/devices/disk[2]/target`, used in error messages. */
  path: string;
}

type Ordered = Record<string, unknown> & { ":@"?: Record<string, string> };

export function parseXml(xml: string, rootName: string): XmlElement {
  const valid = XMLValidator.validate(xml);
  if (valid !== true) {
    const e = valid.err;
    throw new DomainXmlError("XML", `malformed at line ${e.line}, column ${e.col}: ${e.msg}`);
  }
  const parser = new XMLParser({
    preserveOrder: true,
    ignoreAttributes: false,
    attributeNamePrefix: "",
    parseTagValue: false,
    parseAttributeValue: false,
    trimValues: true,
    processEntities: true,
  });
  const doc = parser.parse(xml) as Ordered[];
  const roots = doc
    .map((n) => convert(n, ""))
    .filter((e): e is XmlElement => e !== undefined && !e.name.startsWith("?"));
  const root = roots[0];
  if (!root || roots.length !== 1) {
    throw new DomainXmlError("XML", `expected exactly one <${rootName}> root element`);
  }
  if (root.name !== rootName) {
    throw new DomainXmlError(root.name, `the root element must be <${rootName}>, not <${root.name}>`);
  }
  return root;
}

function convert(node: Ordered, parentPath: string, index = 0): XmlElement | undefined {
  const name = Object.keys(node).find((k) => k !== ":@");
  if (!name || name === "#text" || name === "#comment") return undefined;
  const path = parentPath ? `${parentPath}/${name}${index > 0 ? `[${index + 1}]` : ""}` : name;
  const el: XmlElement = { name, attrs: { ...(node[":@"] ?? {}) }, children: [], text: "", path };
  const counts = new Map<string, number>();
  for (const child of (node[name] as Ordered[]) ?? []) {
    if ("#text" in child) {
      el.text += String(child["#text"]);
      continue;
    }
    const childName = Object.keys(child).find((k) => k !== ":@");
    if (!childName || childName === "#comment") continue;
    const n = counts.get(childName) ?? 0;
    counts.set(childName, n + 1);
    const c = convert(child, path, n);
    if (c) el.children.push(c);
  }
  el.text = el.text.trim();
  return el;
}

export function child(el: XmlElement, name: string): XmlElement | undefined {
  return el.children.find((c) => c.name === name);
}

export function children(el: XmlElement, name: string): XmlElement[] {
  return el.children.filter((c) => c.name === name);
}

export function requireChild(el: XmlElement, name: string): XmlElement {
  const c = child(el, name);
  if (!c) throw new DomainXmlError(`${el.path}/${name}`, `missing required element <${name}>`);
  return c;
}

export function attr(el: XmlElement, name: string): string | undefined {
  return el.attrs[name];
}

export function requireAttr(el: XmlElement, name: string): string {
  const v = el.attrs[name];
  if (v === undefined || v === "") {
    throw new DomainXmlError(`${el.path}/@${name}`, `missing required attribute '${name}'`);
  }
  return v;
}

export function oneOf<T extends string>(el: XmlElement, name: string, allowed: readonly T[], dflt?: T): T {
  const v = el.attrs[name];
  if (v === undefined) {
    if (dflt !== undefined) return dflt;
    throw new DomainXmlError(`${el.path}/@${name}`, `missing; allowed: ${allowed.join(", ")}`);
  }
  if (!(allowed as readonly string[]).includes(v)) {
    throw new DomainXmlError(
      `${el.path}/@${name}`,
      `'${v}' is not supported; allowed: ${allowed.join(", ")}`,
    );
  }
  return v as T;
}

export function escapeXml(s: string): string {
  return s
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&apos;");
}

/** A whole number in decimal or, as libvirt writes PCI addresses and ports, 0x-hex. */
export function parseInteger(text: string, where: string, min: number, max: number): number {
  if (!/^(\d+|0x[0-9a-f]+)$/i.test(text)) throw new DomainXmlError(where, `'${text}' is not a whole number`);
  const n = Number(text);
  if (n < min || n > max) throw new DomainXmlError(where, `${n} is out of range (${min}..${max})`);
  return n;
}

/** An on/off or yes/no attribute; `dflt` when absent. */
export function parseSwitch(el: XmlElement, name: string, dflt?: boolean): boolean | undefined {
  const v = attr(el, name);
  if (v === undefined) return dflt;
  if (v === "on" || v === "yes") return true;
  if (v === "off" || v === "no") return false;
  throw new DomainXmlError(`${el.path}/@${name}`, `'${v}' is not valid; use yes/no (or on/off)`);
}

/** A locally administered address in QEMU's 52:54:00 range, as libvirt generates them. */
export function generateMac(): string {
  const b = randomBytes(3);
  return `52:54:00:${[...b].map((x) => x.toString(16).padStart(2, "0")).join(":")}`;
}
