/**
 * The pause between two looks at something that usually happens within milliseconds but may take seconds
 * (a process exiting, a socket appearing, a stream's last bytes arriving): `fast` ms during the first
 * `fastFor` ms since `begun` (by default 5 ms during the first second), then `slow` ms (50).
 */
export function pollPause(begun: number, { fastFor = 1000, fast = 5, slow = 50 } = {}): Promise<void> {
  return new Promise((r) => setTimeout(r, Date.now() - begun < fastFor ? fast : slow));
}
