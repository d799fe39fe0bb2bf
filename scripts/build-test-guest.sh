#!/usr/bin/env bash
# Builds the writing test guest: Debian's kernel plus a busybox initramfs whose /init writes to the disk.
# Everything comes from Debian packages at build time; nothing binary is committed. Output is cached in
# $NBDMIG_GUEST_DIR (default: .cache/test-guest) and reused while the inputs are unchanged.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${NBDMIG_GUEST_DIR:-$here/.cache/test-guest}
init_src=$here/test-guest/init
stamp_in="$(cat "$init_src" "$0" | sha256sum | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp_in" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  exit 0
fi
for tool in apt-get dpkg depmod cpio gzip; do
  command -v "$tool" >/dev/null || { echo "build-test-guest: '$tool' is missing; install it (see .ci/run)" >&2; exit 1; }
done
[ -x /bin/busybox ] || { echo "build-test-guest: /bin/busybox is missing; apt-get install busybox-static" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$pkg" ] || { echo "build-test-guest: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
( cd "$work" && apt-get download "$pkg" >/dev/null 2>&1 ) || { echo "build-test-guest: apt-get download $pkg failed" >&2; exit 1; }
dpkg -x "$work"/"$pkg"_*.deb "$work/k"
kver=$(ls "$work/k/lib/modules")
depmod -b "$work/k" "$kver"
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,lib/modules/"$kver"}
cp /bin/busybox "$root/bin/busybox"
# Modules the guest needs for virtio-blk, virtio-scsi and SATA disks, with their dependencies.
wanted="virtio_pci virtio_blk virtio_scsi sd_mod ahci"
declare -A seen=()
add() {
  local rel=$1 line dep
  [ -n "${seen[$rel]:-}" ] && return
  seen[$rel]=1
  line=$(grep -E "^${rel}:" "$work/k/lib/modules/$kver/modules.dep")
  for dep in ${line#*:}; do add "$dep"; done
  mkdir -p "$root/lib/modules/$kver/$(dirname "$rel")"
  case "$rel" in
    *.xz) xz -dc "$work/k/lib/modules/$kver/$rel" > "$root/lib/modules/$kver/${rel%.xz}" ;;
    *.zst) zstd -qdc "$work/k/lib/modules/$kver/$rel" > "$root/lib/modules/$kver/${rel%.zst}" ;;
    *) cp "$work/k/lib/modules/$kver/$rel" "$root/lib/modules/$kver/$rel" ;;
  esac
}
for m in $wanted; do
  rel=$(grep -oE "^[^:]*/${m}\.ko(\.xz|\.zst)?:" "$work/k/lib/modules/$kver/modules.dep" | head -1 | tr -d :)
  [ -n "$rel" ] || { echo "build-test-guest: module $m not found in $pkg" >&2; exit 1; }
  add "$rel"
done
# depmod warns about these index files when a module tree lacks them; the guest needs none of them.
touch "$root/lib/modules/$kver/"{modules.order,modules.builtin,modules.builtin.modinfo}
depmod -b "$root" "$kver"
cp "$init_src" "$root/init"
chmod 755 "$root/init"
mkdir -p "$out"
( cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 ) > "$out/initrd.img.tmp"
cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
mv "$out/initrd.img.tmp" "$out/initrd.img"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp_in" > "$out/stamp"
echo "test guest built in $out (kernel $kver)"
