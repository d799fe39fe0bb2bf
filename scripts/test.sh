#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, lints, builds the test guests (the database guest
# takes about 95 s the first time, then comes from .cache), runs every test.
# Needs root (network namespaces); KVM is not needed (the test guests run under TCG).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
[ -d node_modules ] || npm ci --no-audit --no-fund
npm run build --silent
npm run lint --silent
bash scripts/build-test-guest.sh
bash scripts/build-db-guest.sh
# Stale test beds from a killed run are reaped by the first test that starts one.
exec node --test --test-concurrency=1 --test-timeout=900000 dist/test/*.test.js
