/** Small network helpers shared by tests and benchmarks that start servers as processes. */
import net from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

/** Resolves once host:port accepts a connection; rejects after `timeoutMs` or when `alive()` turns false. */
export async function waitForPort(
  port: number,
  opts: { host?: string; timeoutMs?: number; alive?: () => boolean; what?: string } = {},
): Promise<void> {
  const deadline = Date.now() + (opts.timeoutMs ?? 10_000);
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(port, opts.host ?? "127.0.0.1");
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline || (opts.alive && !opts.alive()))
      throw new Error(`${opts.what ?? `port ${port}`} did not start listening`);
    await sleep(25);
  }
}
