#!/usr/bin/env bash
# Installs the Debian packages Ferry's build, demo and tests need; skips apt when every one is
# already installed. Used by deploy/test.sh and deploy/demo.sh; safe to run on its own.
#
# Runs on Debian 12 as root (or a user with sudo). Environment:
#   FERRY_SKIP_APT=1   do not check or install Debian packages (e.g. on a non-Debian dev box)
set -euo pipefail

log() { printf 'install-deps.sh: %s\n' "$*"; }
die() { printf 'install-deps.sh: error: %s\n' "$*" >&2; exit 1; }

# What the suite needs now and in the next milestones (NBD, images, lab networking).
# nbdfuse: Debian 12 has no package of that name; the nbdfuse binary ships in libnbd-bin.
packages=(
  libsqlite3-dev     # SQLite headers for the controller's state store
  liblz4-dev         # LZ4, compression of replication streams (WAN mode)
  openssl            # PKI tests and deploy/pki/make-operator-ca.sh
  qemu-utils         # qemu-img, qemu-nbd
  libnbd-bin         # nbdinfo, nbdcopy, nbdfuse
  fuse3              # fusermount3, for nbdfuse
  e2fsprogs          # mkfs.ext4, e2fsck: the fsfreeze tests put ext4 on exports
  nbdkit
  fio
  python3-libnbd
  iproute2           # ip netns for the multi-host lab
  nftables
  procps
  curl
  protobuf-compiler  # protoc, for proto/generate.sh
  python3            # deploy/demo.sh reads ferryctl --json
  chromium           # the web console's test drives headless Chromium
  chromium-driver
  python3-selenium
  prometheus         # promtool checks deploy/prometheus/ferry-rules.yml
  qemu-system-x86    # the lab's guest (deploy/lab/vm/): a VM whose disk is a Ferry volume
  busybox-static     # the guest's initramfs
  postgresql-15      # the lab's database on Ferry volumes (deploy/lab/pg-cycle.sh, soak.sh)
)

install_packages() {
  local missing=() p status
  for p in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ] || missing+=("$p")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    log "system packages: all ${#packages[@]} present, skipping apt"
    return
  fi
  log "system packages missing: ${missing[*]}"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 \
      || die "not root and sudo is not installed; run as root or install as root: apt-get install -y ${missing[*]}"
    # Without a terminal (CI) sudo must not wait for a password.
    if [ -t 0 ]; then sudo=(sudo); else sudo=(sudo -n); fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
    || die "apt-get update failed"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    || die "apt-get install failed for: ${missing[*]}"
}

if [ "${FERRY_SKIP_APT:-}" = 1 ]; then
  log "FERRY_SKIP_APT=1: not checking system packages"
elif ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
  die "this is not a Debian system (no dpkg-query/apt-get); install the equivalents of: ${packages[*]} and rerun with FERRY_SKIP_APT=1"
else
  install_packages
fi

