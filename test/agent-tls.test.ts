/**
 * TLS on the agent API, against a real agent listener on loopback: a host with certificates serves HTTPS
 * only (taking them up without a restart), a client certificate the CA signed authenticates a call without
 * the token, and every way a TLS call can go wrong is an error that names it and the fix.
 */
import assert from "node:assert/strict";
import fs from "node:fs";
import type { AddressInfo } from "node:net";
import os from "node:os";
import path from "node:path";
import { after, before, describe, it } from "node:test";
import { pino } from "pino";
import { AgentClient, peerClient } from "../src/agent/client.js";
import { Router } from "../src/agent/http.js";
import { agentClientTls, agentListener } from "../src/agent/tls.js";
import { AgentError } from "../src/errors.js";
import { createCa, issueHost } from "../src/qemu/pki.js";
import { available, need } from "./helpers/env.js";

const TOOLS = ["openssl"];
const TOKEN = "t".repeat(64);

describe("TLS on the agent API", { timeout: 120_000 }, () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "nbdmig-agent-tls-"));
  const pki = (name: string) => path.join(dir, name, "pki");
  let server: ReturnType<typeof agentListener> | undefined;
  let port = 0;
  const seen: string[] = [];

  /** A client from host `name`'s certificates (none when it has none). */
  const from = (name: string, token: string | undefined, pin = false) =>
    new AgentClient({ host: "127.0.0.1", port }, token, 5_000, agentClientTls(pki(name), pin));
  const refusal = async (c: AgentClient) => {
    const err = await c.call("GET", "/v1/ping").then(
      () => assert.fail("the call succeeded"),
      (e: unknown) => e,
    );
    assert.ok(err instanceof AgentError, String(err));
    return err;
  };

  before(async () => {
    if (!available(TOOLS)) return;
    await createCa(path.join(dir, "ca"), "cluster");
    await createCa(path.join(dir, "other-ca"), "someone else");
    const router = new Router().add("GET", "/v1/ping", () => ({ pong: true }));
    const log = pino({ level: "silent" });
    // The agent's host, "srv", has no certificates yet when it starts.
    fs.mkdirSync(path.join(dir, "srv"));
    const api = router.server(TOKEN, log, pki("srv"));
    api.on("request", (req) => seen.push(String(req.headers.authorization ?? "-")));
    server = agentListener(api, pki("srv"), log);
    await new Promise<void>((r) => server!.listen(0, "127.0.0.1", r));
    port = (server.address() as AddressInfo).port;
  });
  after(() => {
    server?.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("plain HTTP with the token while the host has no certificates; a TLS client is told why it fails", async (t) => {
    if (!need(t, TOOLS)) return;
    assert.deepEqual(await from("nobody", TOKEN).call("GET", "/v1/ping"), { pong: true });
    await issueHost(path.join(dir, "ca"), pki("peer"), ["127.0.0.1"]);
    const err = await refusal(from("peer", undefined));
    assert.equal(err.code, "E_TLS");
    assert.match(err.message, /did not take a TLS connection .* give that host certificates of the same CA/);
  });

  it("once it has certificates: HTTPS only, a signed client certificate needs no token, a plain call gets 426", async (t) => {
    if (!need(t, TOOLS)) return;
    await issueHost(path.join(dir, "ca"), pki("srv"), ["127.0.0.1"]);
    const plain = await refusal(from("nobody", TOKEN));
    assert.equal(plain.status, 426);
    assert.equal(plain.code, "E_TLS_REQUIRED");
    assert.match(plain.message, /takes HTTPS only/);

    seen.length = 0;
    const peer = peerClient({ host: "127.0.0.1", port }, pki("peer"), undefined, TOKEN, 5_000);
    assert.deepEqual(await peer.call("GET", "/v1/ping"), { pong: true });
    assert.deepEqual(seen, ["-"], "the peer call carried no token");
    // The local CLI: its own host's certificates, the server's pinned.
    assert.deepEqual(await from("srv", TOKEN, true).call("GET", "/v1/ping"), { pong: true });
  });

  it("refuses a client certificate from another CA unless the call has the token", async (t) => {
    if (!need(t, TOOLS)) return;
    // A host whose client certificate another CA signed, but which trusts the cluster's CA for the server.
    await issueHost(path.join(dir, "other-ca"), pki("stranger"), ["127.0.0.1"]);
    fs.copyFileSync(path.join(dir, "ca", "ca-cert.pem"), path.join(pki("stranger"), "ca-cert.pem"));
    const err = await refusal(from("stranger", undefined));
    assert.equal(err.status, 401);
    assert.match(err.message, /client certificate was refused: /);
    assert.deepEqual(await from("stranger", TOKEN).call("GET", "/v1/ping"), { pong: true });
  });

  it("names what is wrong with the agent's certificate: another CA, another name, not its own host's", async (t) => {
    if (!need(t, TOOLS)) return;
    await issueHost(path.join(dir, "other-ca"), pki("foreign"), ["127.0.0.1"]);
    let err = await refusal(from("foreign", undefined));
    assert.equal(err.code, "E_TLS");
    assert.match(err.message, /did not sign .* both hosts need the same ca-cert\.pem/);

    // The agent's certificate, reissued, names another address: taken up without a restart.
    await issueHost(path.join(dir, "ca"), pki("srv"), ["10.9.9.9", "b.example"]);
    err = await refusal(from("peer", undefined));
    assert.equal(err.code, "E_TLS");
    assert.match(err.message, /does not name the address used .*127\.0\.0\.1.* 'nbdmig tls-host'/);

    // The CLI's pin: the local agent must present this host's own server certificate.
    err = await refusal(from("peer", TOKEN, true));
    assert.equal(err.code, "E_TLS");
    assert.match(err.message, /other than this host's .*peer\/pki\/server-cert\.pem/);
  });
});
