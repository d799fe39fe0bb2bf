/** Human-readable sizes and durations for CLI output and error messages. */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(1)} ${units[i]}`;
}

export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

/** A text table shaped like virsh's: a header, a dashed rule, left-aligned columns. */
export function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? "").length)));
  const line = (cells: string[]) =>
    " " +
    cells
      .map((c, i) => c.padEnd(widths[i]!))
      .join("   ")
      .trimEnd();
  const head = line(headers);
  const out = [head, "-".repeat(Math.max(head.length + 2, 20))];
  for (const r of rows) out.push(line(r));
  return out.join("\n") + "\n";
}

/** "Key:   value" lines as virsh dominfo prints them. */
export function keyValues(pairs: [string, string | number][]): string {
  return pairs.map(([k, v]) => `${(k + ":").padEnd(18)}${v}`).join("\n") + "\n";
}
