#!/usr/bin/env bash
# The demo (README, first command): installs what is missing, builds, and runs scripts/demo.ts.
# Needs root (network and mount namespaces, apt-get); KVM is not needed (the guest runs under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# A fresh clone has no node_modules: tsc and the libraries come from npm ci.
[ -d node_modules ] || npm ci --no-audit --no-fund
npm run build --silent
exec node dist/scripts/demo.js "$@"
