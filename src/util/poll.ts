/**
 * The pause between two looks at something that usually happens within milliseconds but may take seconds
 * (a process exiting, a stream's last bytes arriving): 5 ms during the first second since `begun`, then
 * 50 ms.
 */
export function pollPause(begun: number): Promise<void> {
  return new Promise((r) => setTimeout(r, Date.now() - begun < 1000 ? 5 : 50));
}
