#!/usr/bin/env bash
# Ferry's test command: installs the Debian packages the suite needs, builds, runs every test.
#
#   ./deploy/test.sh                      # everything
#   ./deploy/test.sh --filter Enrollment  # extra arguments go to `swift test`
#
# Runs on Debian 12 as root (the lab tests build network namespaces). CI runs it with CI=true
# and no stdin. Packages come from deploy/install-deps.sh (FERRY_SKIP_APT=1 skips it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'test.sh: %s\n' "$*"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

"$root/deploy/install-deps.sh"

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
if [ "$#" -eq 0 ]; then
  # The heaviest tests (the lab's DR cycle, the recovery-point checker at 500 writes/s with
  # two controller crashes) time their cuts and failovers, the fake peers' heartbeats and the
  # never-reading client's and the pre-authentication floods load both cores: they run alone, after the rest.
  # The console test runs Chromium, the fsfreeze tests freeze loop-mounted file systems, and a
  # resized volume fails over and back as the landing failover tests do.
  heavy='LabTests|ControlLaneTests|MemoryBoundTests|checkerPassesOnAllPoints|ExtremeValueTests|ExportLimitsTests|PreAuthLimitsTests|LandingFailoverTests|ConsoleTests|FsfreezeTests|grownVolumeFailsBack'
  swift test --skip-build --skip "$heavy" || rc=$?
  log "now the heavy tests, one at a time ($heavy)"
  swift test --skip-build --filter "$heavy" --no-parallel || rc=$?
else
  swift test --skip-build "$@" || rc=$?
fi
echo
if [ "$rc" -eq 0 ]; then
  echo "test.sh: OK: all tests passed (build $((built - start))s, tests $((SECONDS - built))s)"
else
  echo "test.sh: FAILED: swift test exited $rc (build $((built - start))s, tests $((SECONDS - built))s)"
fi
exit "$rc"
