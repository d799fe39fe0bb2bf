#!/usr/bin/env bash
# Builds the native helpers with the C compiler and Node's own headers: the sparse-file helper
# (src/nbd/native/sparse.c -> dist/native/sparse.node) and the TCP helper (tcp.c -> tcp.node). Without them
# nbdmig still works: the file backend then reports every range as data and writes zeros instead of punching
# holes (src/nbd/native/sparse.ts), and the NBD client's handshakes with some servers take longer
# (src/nbd/native/tcp.ts).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
inc=$(node -p 'require("path").resolve(process.execPath, "../../include/node")')
mkdir -p "$here/dist/native"
if ! command -v gcc >/dev/null || [ ! -f "$inc/node_api.h" ]; then
  echo "build-native: no gcc or no Node headers in $inc; the file backend will emulate holes and the NBD client will not ask for quick ACKs" >&2
  rm -f "$here"/dist/native/*.node
  exit 0
fi
for name in sparse tcp; do
  src=$here/src/nbd/native/$name.c
  out=$here/dist/native/$name.node
  if [ ! -f "$out" ] || [ "$src" -nt "$out" ]; then
    gcc -O2 -Wall -Werror -shared -fPIC -DNODE_GYP_MODULE_NAME=$name -I"$inc" -o "$out.tmp" "$src"
    mv "$out.tmp" "$out"
  fi
done
