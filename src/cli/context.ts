/** What every verb needs: the agent client picked by -c / --token-file, and output helpers. */
import path from "node:path";
import type { Command } from "commander";
import { AgentClient, localAgent, parseAgentUri, readToken, stateDirFromEnv } from "../agent/client.js";
import { agentClientTls } from "../agent/tls.js";

export interface GlobalOptions {
  connect?: string;
  tokenFile?: string;
}

export function agentFrom(cmd: Command): AgentClient {
  const opts = cmd.optsWithGlobals<GlobalOptions>();
  const stateDir = stateDirFromEnv();
  const address = opts.connect ? parseAgentUri(opts.connect) : localAgent(stateDir);
  const token = readToken(opts.tokenFile ?? process.env.NBDMIG_TOKEN_FILE ?? path.join(stateDir, "token"));
  // This host's certificates, if it has some: the local agent must present its own server certificate.
  return new AgentClient(
    address,
    token,
    undefined,
    agentClientTls(path.join(stateDir, "pki"), !opts.connect),
  );
}

export const out = (s: string): void => void process.stdout.write(s);
export const enc = encodeURIComponent;
