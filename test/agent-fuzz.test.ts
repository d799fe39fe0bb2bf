/**
 * The agent API takes untrusted input: malformed and hostile bodies and paths on every route get a 4xx with
 * a message naming what is wrong, the agent stays up, and nothing is created. An agent of its own, started
 * on a temporary state dir (no namespaces needed).
 */
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { cli, cliPath } from "./helpers/env.js";
import { waitFor } from "./helpers/wait.js";

const TOKEN = "f".repeat(32);

/** One raw request: `body` as it goes on the wire (a string is sent as it is, anything else as JSON). */
function send(
  port: number,
  method: string,
  p: string,
  body?: unknown,
): Promise<{ status: number; text: string }> {
  const data = body === undefined ? undefined : typeof body === "string" ? body : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: "127.0.0.1",
        port,
        method,
        path: p,
        headers: {
          authorization: `Bearer ${TOKEN}`,
          ...(data === undefined ? {} : { "content-length": Buffer.byteLength(data) }),
        },
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => (text += c));
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
      },
    );
    req.on("error", reject);
    req.end(data);
  });
}

/** Every file under `dir`, relative, sorted (the agent's log excepted: it grows). */
function tree(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of fs.readdirSync(d, { withFileTypes: true })) {
      const f = path.join(d, e.name);
      if (e.isDirectory()) walk(f);
      else if (!e.name.endsWith(".log")) out.push(path.relative(dir, f));
    }
  };
  walk(dir);
  return out.sort();
}

const NAME = "nope";
const goodXml = "<domain type='qemu'><name>fuzz</name><memory unit='MiB'>64</memory></domain>";
const cookie = {
  xml: goodXml,
  name: "fuzz",
  uuid: "00000000-0000-0000-0000-000000000000",
  accel: "tcg",
  disks: [],
  storagePath: "none",
};
/** Hostile bodies, each with the field the 400 must name. */
const BAD: Record<string, [unknown, RegExp][]> = {
  "POST /v1/domains": [
    [{ xml: 5 }, /xml: Invalid input: expected string/],
    [{ xml: goodXml, evil: true }, /Unrecognized key.*evil/],
    [{}, /xml: /],
    [[goodXml], /body: Invalid input: expected object, received array/],
    [null, /expected object, received null/],
    [{ xml: "x".repeat(5 * 1024 * 1024) }, /xml: Too big/],
  ],
  "POST /v1/domains/create": [[{ xml: goodXml, paused: "yes" }, /paused: Invalid input: expected boolean/]],
  [`POST /v1/domains/${NAME}/start`]: [[{ paused: 1 }, /paused/]],
  [`POST /v1/domains/${NAME}/destroy`]: [[{ force: true }, /Unrecognized key.*force/]],
  [`POST /v1/domains/${NAME}/shutdown`]: [[{ mode: "acpi" }, /Unrecognized key.*mode/]],
  [`DELETE /v1/domains/${NAME}`]: [[{ nvram: "erase" }, /nvram: Invalid option/]],
  [`POST /v1/domains/${NAME}/monitor`]: [
    [{ command: ["query-status"] }, /command: Invalid input: expected string/],
  ],
  [`POST /v1/domains/${NAME}/migrate`]: [
    [{ dest: "nbdmig://h:7800", copyStorage: "everything" }, /copyStorage: Invalid option/],
    [{ dest: "nbdmig://h:7800", bandwidthMiB: 1e300 }, /bandwidthMiB: Too big/],
    [{ dest: "nbdmig://h:7800", migrateDisks: ["../../etc"] }, /migrateDisks\[0\]: must be a disk target/],
    [{ dest: "nbdmig://h:7800", disksPort: 70000 }, /disksPort: Too big/],
  ],
  [`POST /v1/domains/${NAME}/migrate/recover`]: [
    [{ keep: "both" }, /keep: Invalid option/],
    [{ keep: "source", force: "yes" }, /force: Invalid input: expected boolean/],
    [{}, /keep: /],
  ],
  "POST /v1/migrations/prepare": [
    [{ cookie, listenHost: "h", tls: "on" }, /tls: Invalid input: expected boolean/],
    [{ cookie: { ...cookie, accel: "xen" }, listenHost: "h" }, /cookie\.accel: Invalid option/],
    [
      {
        cookie: {
          ...cookie,
          disks: [
            {
              target: "vda",
              source: "relative.qcow2",
              format: "qcow2",
              virtualSize: 1,
              allocated: 0,
              mode: "full",
            },
          ],
        },
        listenHost: "h",
      },
      /cookie\.disks\[0\]\.source: must be an absolute path/,
    ],
    [
      {
        cookie: {
          ...cookie,
          disks: [
            {
              target: "vda",
              source: "/x.qcow2",
              format: "vmdk",
              virtualSize: -1,
              allocated: 0,
              mode: "full",
            },
          ],
        },
        listenHost: "h",
      },
      /cookie\.disks\[0\]\.format: Invalid option.*cookie\.disks\[0\]\.virtualSize: Too small/,
    ],
    [{ cookie, listenHost: "h", disksPort: "49184" }, /disksPort: Invalid input: expected number/],
    [{ cookie: { ...cookie, uuid: "x" }, listenHost: "h", extra: {} }, /cookie\.uuid: must be a UUID/],
  ],
  "POST /v1/migrations/abc/finish": [[{ suspend: "no", persistent: false }, /suspend: Invalid input/]],
  "POST /v1/migrations/abc/cancel": [[{ now: true }, /Unrecognized key.*now/]],
  "POST /v1/migrations/abc/resume": [[{ now: true }, /Unrecognized key.*now/]],
};

describe("the agent API refuses malformed and hostile input", () => {
  let dir = "";
  let port = 0;
  let agent: ChildProcess | undefined;
  let before0: string[] = [];

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-fuzz-"));
    const tokenFile = path.join(dir, "token");
    fs.writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    port = 18000 + (process.pid % 1000);
    agent = spawn(
      process.execPath,
      [cliPath, "daemon", "--listen", `127.0.0.1:${port}`, "--state-dir", dir],
      {
        stdio: "ignore",
      },
    );
    const uri = `nbdmig://127.0.0.1:${port}`;
    await waitFor(
      "the agent to listen",
      () => cli(["-c", uri, "--token-file", tokenFile, "list"]).status === 0,
      20_000,
    );
    before0 = tree(dir);
  });
  after(() => {
    agent?.kill();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  for (const [route, cases] of Object.entries(BAD)) {
    const [method, p] = route.split(" ") as [string, string];
    it(`${route}: every bad body is a 400 naming the field`, async () => {
      for (const [body, re] of cases) {
        const r = await send(port, method, p, body);
        assert.equal(r.status, 400, `${route} ${JSON.stringify(body).slice(0, 80)}: ${r.text}`);
        const e = (JSON.parse(r.text) as { error: { code: string; message: string } }).error;
        assert.equal(e.code, "E_BAD_BODY");
        assert.match(e.message, re);
      }
    });
  }

  it("refuses what is not JSON, too deep to care about, too large, or a malformed path, with a 4xx", async () => {
    const cases: [string, string, unknown, number][] = [
      ["POST", "/v1/domains", "{not json", 400],
      ["POST", "/v1/domains", "[".repeat(100_000) + "]".repeat(100_000), 400],
      ["POST", "/v1/domains", JSON.stringify({ xml: "x".repeat(9 * 1024 * 1024) }), 413],
      ["POST", "/v1/domains/%ZZ/start", {}, 400],
      ["POST", "/v1/domains/..%2F..%2Fetc%2Fpasswd/start", {}, 404],
      ["GET", "/v1/migrations/..%2Fx", undefined, 404],
      ["GET", "/v1/nothing-here", undefined, 404],
    ];
    for (const [method, p, body, status] of cases) {
      const r = await send(port, method, p, body);
      assert.equal(r.status, status, `${method} ${p}: ${r.text.slice(0, 200)}`);
      assert.match((JSON.parse(r.text) as { error: { message: string } }).error.message, /\S/);
    }
  });

  it("stays up, and nothing was created", async () => {
    const r = await send(port, "GET", "/v1/domains");
    assert.equal(r.status, 200);
    assert.deepEqual((JSON.parse(r.text) as { domains: unknown[] }).domains, []);
    assert.deepEqual(tree(dir), before0);
  });
});
