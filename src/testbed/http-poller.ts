/**
 * Polls a URL every N ms from inside the client namespace and prints one line per request on stdout:
 * `<epoch ms when sent> <ok|fail> <round trip ms> <detail>`. It runs until stdin closes (its parent went
 * away) or SIGTERM. A request gets at most `timeoutMs`; a new one starts every `everyMs` regardless, so a
 * pause in the answers shows as a run of failures (or of late answers) of its real length.
 *   node http-poller.js URL [everyMs=50] [timeoutMs=1000]
 */
import http from "node:http";

const [url, every = "50", timeout = "1000"] = process.argv.slice(2);
if (!url) {
  process.stderr.write("usage: http-poller URL [everyMs] [timeoutMs]\n");
  process.exit(2);
}
const everyMs = Number(every);
const timeoutMs = Number(timeout);
const agent = new http.Agent({ keepAlive: false });

function once(): void {
  const sent = Date.now();
  const done = (ok: boolean, detail: string) =>
    process.stdout.write(`${sent} ${ok ? "ok" : "fail"} ${Date.now() - sent} ${detail}\n`);
  const req = http.get(url!, { agent, timeout: timeoutMs }, (res) => {
    let body = "";
    res.setEncoding("utf8");
    res.on("data", (c: string) => (body += c));
    res.on("end", () => done(res.statusCode === 200, `${res.statusCode} ${body.trim().slice(0, 60)}`));
    res.on("error", (e) => done(false, e.message));
  });
  req.on("timeout", () => req.destroy(new Error("timeout")));
  req.on("error", (e) => done(false, e.message));
}

const timer = setInterval(once, everyMs);
once();
const stop = () => {
  clearInterval(timer);
  setTimeout(() => process.exit(0), timeoutMs + 50);
};
process.stdin.on("end", stop);
process.stdin.on("close", stop);
process.stdin.resume();
process.on("SIGTERM", stop);
