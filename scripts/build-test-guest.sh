#!/usr/bin/env bash
# Builds the test guest: Debian's kernel plus a busybox initramfs whose /init writes to the disk and, when asked,
# serves HTTP with EFI variable and TPM helpers (test-guest/init lists its parameters).
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
for tool in apt-get dpkg depmod cpio gzip gcc; do
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
# efivarfs makes every variable it does not know immutable, so rewriting one takes `chattr -i`, which busybox
# lacks: a 9 KiB static stand-in (raw syscalls, no libc).
cat > "$work/chattr.c" <<'EOF'
/* chattr -i|+i FILE...: clears or sets the immutable flag, the one attribute efivarfs has. */
#define FS_IOC_GETFLAGS 0x80086601L
#define FS_IOC_SETFLAGS 0x40086602L
#define FS_IMMUTABLE_FL 0x10
static long sys(long n, long a, long b, long c) {
  long r;
  __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
  return r;
}
static void say(const char *a, const char *b) {
  const char *p[] = {"chattr: ", a, b, "\n"};
  for (int i = 0; i < 4; i++) {
    long n = 0;
    while (p[i][n]) n++;
    sys(1, 2, (long)p[i], n);
  }
}
int run(long argc, char **argv) {
  if (argc < 3 || (argv[1][0] != '-' && argv[1][0] != '+') || argv[1][1] != 'i' || argv[1][2]) {
    say("usage: chattr -i|+i FILE...", "");
    return 2;
  }
  int rc = 0;
  for (long i = 2; i < argc; i++) {
    long fd = sys(2, (long)argv[i], 0, 0); /* open(O_RDONLY) */
    int flags;                             /* FS_IOC_[GS]ETFLAGS take an int, whatever their name says */
    if (fd < 0) {
      say("cannot open ", argv[i]);
      rc = 1;
      continue;
    }
    if (sys(16, fd, FS_IOC_GETFLAGS, (long)&flags) < 0) {
      say("cannot read the flags of ", argv[i]);
      rc = 1;
    } else {
      flags = argv[1][0] == '-' ? flags & ~FS_IMMUTABLE_FL : flags | FS_IMMUTABLE_FL;
      if (sys(16, fd, FS_IOC_SETFLAGS, (long)&flags) < 0) {
        say("cannot set the flags of ", argv[i]);
        rc = 1;
      }
    }
    sys(3, fd, 0, 0);
  }
  return rc;
}
__asm__(".globl _start\n_start:\n  mov (%rsp), %rdi\n  lea 8(%rsp), %rsi\n  and $-16, %rsp\n  call run\n"
        "  mov %eax, %edi\n  mov $231, %eax\n  syscall\n");
EOF
gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -s -o "$root/bin/chattr" "$work/chattr.c"
# Modules the guest needs, with their dependencies: virtio-blk, virtio-scsi and SATA disks; NICs (virtio-net,
# e1000 for pc, e1000e for q35, rtl8139 through 8139cp); efivarfs; the TPM drivers (CRB, TIS). Debian's kernel
# builds the TPM drivers in; whatever the kernel config builds in (modules.builtin) is skipped.
wanted="virtio_pci virtio_blk virtio_scsi sd_mod ahci virtio_net e1000 e1000e 8139cp efivarfs tpm_crb tpm_tis"
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
  rel=$(grep -oE "^[^:]*/${m}\.ko(\.xz|\.zst)?:" "$work/k/lib/modules/$kver/modules.dep" | head -1 | tr -d : || true)
  if [ -z "$rel" ] && grep -qE "/${m}\.ko$" "$work/k/lib/modules/$kver/modules.builtin"; then continue; fi
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
