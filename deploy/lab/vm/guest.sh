#!/usr/bin/env bash
# Builds the lab's guest: a Debian kernel and a busybox initramfs whose /init (guest-init) runs a
# workload on its data disk, a Ferry volume.
#
#   deploy/lab/vm/guest.sh build DIR     # DIR/vmlinuz and DIR/initrd.img (kept if already there)
#   deploy/lab/vm/guest.sh format IMAGE SIZE   # a new ext4 image for the guest's data disk
#
# The kernel is the versioned package linux-image-amd64 depends on, fetched with apt-get
# download and unpacked with dpkg-deb -x (nothing is installed on this machine); only vmlinuz
# and the modules the guest loads (virtio, ext4) are taken. Needs busybox-static (its cpio too).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
die() { printf 'guest.sh: error: %s\n' "$*" >&2; exit 1; }

modules=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk failover net_failover virtio_net
         crc16 mbcache jbd2 crc32c_generic ext4)

build() {
  local out="$1"
  mkdir -p "$out"
  if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ "$out/initrd.img" -nt "$here/guest-init" ]; then
    return
  fi
  [ -x /bin/busybox ] && file -L /bin/busybox | grep -q 'statically linked' || die "/bin/busybox is not the static one: apt-get install busybox-static"
  # Global, not local: the EXIT trap runs after build() has returned (and set -u would fail on
  # a local gone out of scope, turning a good build into exit status 1).
  work="$(mktemp -d)"
  # (EXIT, not RETURN: die exits from inside the function.)
  trap 'rm -rf "${work:-}"' EXIT
  local package
  package="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  if [ -z "$package" ]; then   # a machine whose package lists were never fetched
    apt-get update -q >/dev/null 2>&1 || true
    package="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
  fi
  [ -n "$package" ] || die "cannot tell which kernel linux-image-amd64 depends on (apt-get update?)"
  (cd "$work" && apt-get download "$package" >/dev/null 2>&1) || die "apt-get download $package failed"
  dpkg-deb -x "$work"/"$package"_*.deb "$work/kernel"
  local version="${package#linux-image-}"
  cp "$work/kernel/boot/vmlinuz-$version" "$out/vmlinuz"
  local root="$work/root"
  mkdir -p "$root/bin" "$root/lib/modules" "$root/dev" "$root/proc" "$root/sys" "$root/data" "$root/tmp"
  cp /bin/busybox "$root/bin/busybox"
  for m in "${modules[@]}"; do
    local ko
    ko="$(find "$work/kernel/lib/modules/$version" -name "$m.ko" -o -name "$m.ko.xz" | head -n 1)"
    [ -n "$ko" ] || die "module $m not in $package"
    case "$ko" in *.xz) xz -dc "$ko" > "$root/lib/modules/$m.ko" ;; *) cp "$ko" "$root/lib/modules/$m.ko" ;; esac
  done
  install -m 0755 "$here/guest-init" "$root/init"
  (cd "$root" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1) > "$out/initrd.img.tmp"
  mv "$out/initrd.img.tmp" "$out/initrd.img"
  echo "$version" > "$out/kernel-version"
}

case "${1:-}" in
  build) [ $# -eq 2 ] || die "usage: guest.sh build DIR"; build "$2" ;;
  format)
    [ $# -eq 3 ] || die "usage: guest.sh format IMAGE SIZE"
    truncate -s "$3" "$2"
    mkfs.ext4 -q -F -L ferry-guest "$2"
    ;;
  *) die "usage: guest.sh build DIR | format IMAGE SIZE" ;;
esac
