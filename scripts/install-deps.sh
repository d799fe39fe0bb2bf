#!/usr/bin/env bash
# Installs the Debian packages nbdmig and its tests need, if any is missing (needs root for apt-get).
set -euo pipefail
# ovmf, swtpm and swtpm-tools: UEFI and TPM guests; curl and iputils-ping: the test bed's client reaching guests.
# mmdebstrap and e2fsprogs build the database guest; postgresql-client-15 (pgbench, psql, pg_amcheck) is its client.
# nftables: the fault tests drop one direction of a connection. openssl makes TLS certificates (nbdmig
# tls-ca, tls-host); tcpdump captures the migration link in the TLS test.
pkgs=(qemu-system-x86 qemu-utils nbdkit libnbd-bin python3-libnbd gcc libc6-dev busybox-static iproute2 util-linux cpio kmod xz-utils zstd gzip
  ovmf swtpm swtpm-tools curl iputils-ping mmdebstrap e2fsprogs postgresql-client-15 nftables
  openssl tcpdump)
# --bench: libvirt 9.0 too, which the migration benchmark measures beside nbdmig (bench/libvirt.ts).
if [ "${1:-}" = "--bench" ]; then
  pkgs+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: missing packages: ${missing[*]}; run as root (sudo) to install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
