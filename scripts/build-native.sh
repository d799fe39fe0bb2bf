#!/usr/bin/env bash
# Builds the sparse-file helper (src/nbd/native/sparse.c) into dist/native/sparse.node with the C compiler
# and Node's own headers. Without them nbdmig still works: the file backend then reports every range as data
# and writes zeros instead of punching holes (src/nbd/native/sparse.ts).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=$here/dist/native/sparse.node
inc=$(node -p 'require("path").resolve(process.execPath, "../../include/node")')
mkdir -p "$(dirname "$out")"
if ! command -v gcc >/dev/null || [ ! -f "$inc/node_api.h" ]; then
  echo "build-native: no gcc or no Node headers in $inc; the file backend will emulate holes" >&2
  rm -f "$out"
  exit 0
fi
if [ ! -f "$out" ] || [ "$here/src/nbd/native/sparse.c" -nt "$out" ]; then
  gcc -O2 -Wall -Werror -shared -fPIC -DNODE_GYP_MODULE_NAME=sparse -I"$inc" -o "$out.tmp" "$here/src/nbd/native/sparse.c"
  mv "$out.tmp" "$out"
fi
