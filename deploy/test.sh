#!/usr/bin/env bash
# Ferry's test command: installs the Debian packages the suite needs, builds, runs every test.
#
#   ./deploy/test.sh                      # everything
#   ./deploy/test.sh --filter Enrollment  # extra arguments go to `swift test`
#
# Runs on Debian 12 as root (or a user with sudo). CI runs it with CI=true and no stdin.
# Environment:
#   FERRY_SKIP_APT=1   do not check or install Debian packages (e.g. on a non-Debian dev box)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'test.sh: %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

# What the suite needs now and in the next milestones (NBD, images, lab networking).
# nbdfuse: Debian 12 has no package of that name; the nbdfuse binary ships in libnbd-bin.
packages=(
  libsqlite3-dev     # SQLite headers for the controller's state store
  openssl            # PKI tests and deploy/pki/make-operator-ca.sh
  qemu-utils         # qemu-img, qemu-nbd
  libnbd-bin         # nbdinfo, nbdcopy, nbdfuse
  fuse3              # fusermount3, for nbdfuse
  nbdkit
  fio
  python3-libnbd
  iproute2           # ip netns for the multi-host lab
  nftables
  procps
  curl
  protobuf-compiler  # protoc, for proto/generate.sh
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

command -v swift >/dev/null 2>&1 || die "swift not found: a Swift 6.x toolchain must be on PATH"
log "$(swift --version 2>/dev/null | head -n 1)"

# A configuration given to `swift test` (-c release) must also be the one built.
build_args=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    -c|--configuration) build_args+=("${args[$i]}" "${args[$((i + 1))]:-}") ;;
    --configuration=*) build_args+=("${args[$i]}") ;;
  esac
done

start=$SECONDS
log "building (swift build --build-tests ${build_args[*]:-}); the first build takes several minutes"
if ! swift build --build-tests "${build_args[@]}"; then
  echo
  echo "test.sh: FAILED: build failed after $((SECONDS - start))s"
  exit 1
fi
built=$SECONDS
log "build done in $((built - start))s; running tests (swift test --skip-build $*)"

rc=0
swift test --skip-build "$@" || rc=$?
echo
if [ "$rc" -eq 0 ]; then
  echo "test.sh: OK: all tests passed (build $((built - start))s, tests $((SECONDS - built))s)"
else
  echo "test.sh: FAILED: swift test exited $rc (build $((built - start))s, tests $((SECONDS - built))s)"
fi
exit "$rc"
