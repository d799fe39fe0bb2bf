#!/usr/bin/env bash
# Builds the database guest: a Debian root filesystem (mmdebstrap, from the machine's configured Debian source)
# with systemd, Debian's kernel, PostgreSQL 15 (cluster made with --data-checksums, a pgbench database already
# initialised) and qemu-guest-agent, in an ext4 filesystem inside a qcow2 image. The kernel and its initramfs
# (initramfs-tools, which mounts /dev/vda) are also copied out for direct kernel boot.
#
# Output, cached in $NBDMIG_DB_GUEST_DIR (default .cache/db-guest) and reused while this script is unchanged:
#   vmlinuz, initrd.img, root.qcow2 (4 GiB virtual), build.json (timings, sizes, versions)
# Guest parameters on the kernel command line: nbdmig.ip=ADDR/PREFIX (default 10.77.0.20/24), the address
# systemd-networkd gives every Ethernet NIC. PostgreSQL listens on 5432; role nbdmig, password nbdmig,
# superuser; database bench (pgbench scale $scale, amcheck installed). The console prints
# "nbdmig-db-ready" once PostgreSQL accepts connections.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${NBDMIG_DB_GUEST_DIR:-$here/.cache/db-guest}
scale=4
stamp_in="$(sha256sum < "$0" | cut -c1-16)"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp_in" ] && [ -f "$out/root.qcow2" ]; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-db-guest: run as root (mmdebstrap makes device nodes and chowns files)" >&2; exit 1; }
for tool in mmdebstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || { echo "build-db-guest: '$tool' is missing; run scripts/install-deps.sh" >&2; exit 1; }
done
# The machine's own Debian source: every sources file that names this release, as apt itself reads them.
. /etc/os-release
suite=${VERSION_CODENAME:?build-db-guest: /etc/os-release names no VERSION_CODENAME}
sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] && grep -qE "^[^#]*(deb |Suites:).*\b$suite\b" "$f" && grep -qE "^[^#]*/debian" "$f" && sources+=("$f")
done
[ ${#sources[@]} -gt 0 ] || { echo "build-db-guest: no apt source for Debian $suite in /etc/apt/sources.list{,.d}; add one" >&2; exit 1; }
started=$(date +%s)
mkdir -p "$out"
work=$(mktemp -d "$out/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
root=$work/root

# Before the packages: initramfs-tools takes only the drivers that mount /dev/vda (the default "most" makes a
# 30 MiB initramfs that TCG takes seconds to unpack).
essential_hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && printf "MODULES=list\nCOMPRESS=zstd\n" > "$1/etc/initramfs-tools/conf.d/nbdmig" && printf "virtio_pci\nvirtio_blk\next4\ncrc32c_generic\n" >> "$1/etc/initramfs-tools/modules"'

cat > "$work/customize.sh" <<'EOF'
#!/bin/sh
# Runs with the new root as $1 (mmdebstrap's customize hook; /proc, /sys and /dev are mounted there).
set -eu
r=$1
scale=$2
echo nbdmig-db > "$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 nbdmig-db\n' > "$r/etc/hosts"
echo '/dev/vda / ext4 defaults,errors=remount-ro 0 1' > "$r/etc/fstab"
# The guest's address comes from the kernel command line, so one image serves every test guest.
cat > "$r/usr/local/sbin/nbdmig-address" <<'EOS'
#!/bin/sh
ip=10.77.0.20/24
for w in $(cat /proc/cmdline); do case "$w" in nbdmig.ip=*) ip=${w#nbdmig.ip=} ;; esac; done
mkdir -p /run/systemd/network
printf '[Match]\nType=ether\n\n[Network]\nAddress=%s\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$ip" > /run/systemd/network/20-nbdmig.network
EOS
chmod 755 "$r/usr/local/sbin/nbdmig-address"
cat > "$r/etc/systemd/system/nbdmig-address.service" <<'EOS'
[Unit]
Description=Static address from nbdmig.ip= on the kernel command line
DefaultDependencies=no
Before=systemd-networkd.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/nbdmig-address
[Install]
WantedBy=systemd-networkd.service
EOS
cat > "$r/etc/systemd/system/nbdmig-ready.service" <<'EOS'
[Unit]
Description=Tell the console once PostgreSQL accepts connections
After=postgresql@15-main.service
Wants=postgresql@15-main.service
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'until pg_isready -q -h 127.0.0.1; do sleep 0.5; done; echo nbdmig-db-ready > /dev/ttyS0'
[Install]
WantedBy=multi-user.target
EOS
chroot "$r" systemctl enable systemd-networkd nbdmig-address nbdmig-ready >/dev/null 2>&1
# Timers and jobs a migration test does not want running in the middle of it.
for u in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service fstrim.timer \
  systemd-tmpfiles-clean.timer getty@tty1.service; do
  chroot "$r" systemctl mask "$u" >/dev/null 2>&1 || true
done
# PostgreSQL: the cluster Debian made at install, remade with data checksums; reachable over the network.
chroot "$r" pg_dropcluster 15 main
chroot "$r" pg_createcluster 15 main -- --data-checksums >/dev/null
conf=$r/etc/postgresql/15/main
cat >> "$conf/postgresql.conf" <<'EOS'
listen_addresses = '*'
shared_buffers = 64MB
max_connections = 50
EOS
echo 'host all all 0.0.0.0/0 scram-sha-256' >> "$conf/pg_hba.conf"
# pg_ctlcluster's write to /proc/self/oom_score_adj fails inside mmdebstrap's chroot, and perl says so: only
# that line is dropped from its complaints.
chroot "$r" pg_ctlcluster 15 main start 2> "$r/tmp/pg-start.err" || { cat "$r/tmp/pg-start.err" >&2; exit 1; }
grep -v 'print() on closed filehandle' "$r/tmp/pg-start.err" >&2 || true
rm -f "$r/tmp/pg-start.err"
chroot "$r" su postgres -c "psql -q -c \"CREATE ROLE nbdmig LOGIN SUPERUSER PASSWORD 'nbdmig'\"" >/dev/null
chroot "$r" su postgres -c 'createdb -O nbdmig bench'
chroot "$r" su postgres -c 'psql -q -d bench -c "CREATE EXTENSION amcheck"'
chroot "$r" su postgres -c "pgbench -q -i -s $scale bench" >/dev/null 2>&1
chroot "$r" su postgres -c 'psql -q -d bench -c "ALTER TABLE pgbench_accounts OWNER TO nbdmig; ALTER TABLE pgbench_branches OWNER TO nbdmig; ALTER TABLE pgbench_tellers OWNER TO nbdmig; ALTER TABLE pgbench_history OWNER TO nbdmig; CHECKPOINT"'
chroot "$r" pg_ctlcluster 15 main stop
# Kernel modules: only the drivers a guest of ours uses, with their dependencies (the full set is 350 MiB that
# every copy of the disk would carry).
kver=$(ls "$r/lib/modules")
# button and evdev: the ACPI power button, which systemd-logind turns into a clean shutdown.
wanted="virtio_pci virtio_blk virtio_scsi virtio_net virtio_console virtio_balloon virtio_rng ext4 crc32c_generic efivarfs sd_mod button evdev autofs4"
keep=$(for m in $wanted; do chroot "$r" modprobe -S "$kver" --show-depends "$m" 2>/dev/null; done | awk '$1 == "insmod" {print $2}' | sort -u)
find "$r/lib/modules/$kver/kernel" -name '*.ko*' | while read -r f; do
  echo "$keep" | grep -qxF "${f#"$r"}" || rm -f "$f"
done
find "$r/lib/modules/$kver/kernel" -type d -empty -delete
chroot "$r" depmod "$kver"
chroot "$r" update-initramfs -u -k "$kver" >/dev/null 2>&1
rm -rf "$r/var/cache/apt/"*.bin "$r/var/cache/apt/archives/"*.deb "$r/var/lib/apt/lists/"* "$r/var/log/"*.log
EOF
chmod 755 "$work/customize.sh"

pkgs=systemd,systemd-sysv,udev,dbus,linux-image-amd64,initramfs-tools,zstd,postgresql-15,qemu-guest-agent,iproute2,e2fsprogs,kmod,procps
echo "build-db-guest: mmdebstrap $suite from ${sources[*]} (a few minutes; cached in $out)"
mmdebstrap --quiet --variant=apt --mode=root --format=directory --include="$pkgs" \
  --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
  --essential-hook="$essential_hook" \
  --customize-hook="$work/customize.sh \"\$1\" $scale" \
  "$suite" "$root" "${sources[@]}"
debootstrapped=$(date +%s)
kver=$(ls "$root/lib/modules")
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
truncate -s 4G "$work/root.raw"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw"
qemu-img convert -q -f raw -O qcow2 "$work/root.raw" "$work/root.qcow2"
pgver=$(ls "$root/usr/lib/postgresql")
finished=$(date +%s)
allocated=$(qemu-img map -f qcow2 --output=json "$work/root.qcow2" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).filter(e=>e.data).reduce((a,e)=>a+e.length,0)))')
printf '{"kernel":"%s","postgresql":"%s","pgbenchScale":%d,"mmdebstrapSeconds":%d,"totalSeconds":%d,"allocatedBytes":%d}\n' \
  "$kver" "$pgver" "$scale" $((debootstrapped - started)) $((finished - started)) "$allocated" > "$work/build.json"
for f in vmlinuz initrd.img root.qcow2 build.json; do mv "$work/$f" "$out/$f"; done
echo "$stamp_in" > "$out/stamp"
echo "build-db-guest: built in $out in $((finished - started)) s: $(cat "$out/build.json")"
