/**
 * What actually crosses the link: the bytes a peer has acknowledged on one process's TCP connections to a
 * port, read from the kernel with `ss` (iproute2). The mirror jobs' own progress counts zero regions, which
 * QEMU sends as a few bytes of WRITE_ZEROES, so it cannot tell how fast the link copies data.
 */
import { execFile } from "node:child_process";

/**
 * Sum of `bytes_acked` over the established connections of process `pid` to remote port `port`, or
 * undefined when `ss` cannot be run or shows no such connection.
 */
export function tcpBytesAcked(pid: number, port: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    execFile(
      "ss",
      ["-tinpH", "state", "established", "dport", "=", `:${port}`],
      { timeout: 2000 },
      (err, stdout) => resolve(err ? undefined : parseBytesAcked(stdout, pid)),
    );
  });
}

/** Parses `ss -tinpH` output: a socket line naming its process, then an indented line of TCP_INFO fields. */
export function parseBytesAcked(out: string, pid: number): number | undefined {
  let total: number | undefined;
  let ours = false;
  for (const line of out.split("\n")) {
    if (!line.trim()) continue;
    if (!/^\s/.test(line)) {
      ours = line.includes(`pid=${pid},`);
      continue;
    }
    const m = /\bbytes_acked:(\d+)/.exec(line);
    if (ours && m) total = (total ?? 0) + Number(m[1]);
  }
  return total;
}
