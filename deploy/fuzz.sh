#!/usr/bin/env bash
# Builds Ferry's libFuzzer targets (deploy/fuzz/Sources; Package.swift declares them only with
# FERRY_FUZZ=1) and runs each for SECONDS (default 10) from its committed seed corpus
# (deploy/fuzz/corpus/NAME). Prints executions, exec/s and crashes per target and exits
# nonzero if any target crashed; a crash's input is kept in BUILD/crashes/ (BUILD: .build-fuzz or FUZZ_SCRATCH).
#
#   ./deploy/fuzz.sh                    # every target, 10 s each (what CI runs)
#   ./deploy/fuzz.sh 600 fuzz-frames    # one target for 10 minutes
#   FUZZ_ARGS="-runs=10000000" ./deploy/fuzz.sh 86400 fuzz-token   # extra libFuzzer flags
#   FUZZ_SCRATCH=.build ./deploy/fuzz.sh   # build in the normal build's directory (what CI does)
#   FUZZ_CONFIG=release ./deploy/fuzz.sh 3600   # optimized: 3-10x the executions per second
#   ASAN_OPTIONS=malloc_context_size=0 ...      # long runs: no allocation stacks, ~1.4x faster
#
# The build goes to .build-fuzz unless FUZZ_SCRATCH names another directory. In the normal
# build's own directory every dependency is reused and only Ferry's modules are recompiled
# (minutes, not a quarter of an hour), but that build's Ferry modules are then the fuzz ones:
# the next `swift build` recompiles them.
#
# New inputs libFuzzer finds go to BUILD/corpus/NAME, not to the committed corpus: copy
# the interesting ones over (or minimize with -merge=1) when they are worth keeping.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() { printf 'fuzz.sh: %s\n' "$*"; }
die() { printf 'fuzz.sh: error: %s\n' "$*" >&2; exit 1; }

seconds="${1:-10}"
[[ "$seconds" =~ ^[0-9]+$ ]] || die "SECONDS must be a whole number, not '$seconds'"
shift || true
all=(fuzz-frames fuzz-nbd-server fuzz-nbd-client fuzz-plan fuzz-config fuzz-token fuzz-journal)
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [ -d "deploy/fuzz/Sources/$t" ] || die "no fuzz target '$t' (targets: ${all[*]})"
done

config="${FUZZ_CONFIG:-debug}"
[[ "$config" =~ ^(debug|release)$ ]] || die "FUZZ_CONFIG must be debug or release, not '$config'"
command -v swift >/dev/null 2>&1 || die "swift not found: a Swift 6.x toolchain must be on PATH"
scratch="$(realpath -m "${FUZZ_SCRATCH:-$root/.build-fuzz}")"
start=$SECONDS
log "building the fuzz targets ($config) in $scratch"
# -sanitize=fuzzer,address goes to Ferry's modules and the fuzz targets only (FERRY_FUZZ=1 in
# Package.swift): with SwiftPM's --sanitize or -Xswiftc every dependency is instrumented too, and
# each execution costs a scan of a million coverage counters.
# (gold warns once per ASan helper symbol at each link: hundreds of lines of noise, dropped.)
export FERRY_FUZZ=1
mkdir -p "$scratch"
build_rc=0
swift build -c "$config" --scratch-path "$scratch" >"$scratch/build.log" 2>&1 || build_rc=$?
grep -v "ld.gold: warning: Cannot export local symbol '__asan_" "$scratch/build.log" || true
[ "$build_rc" -eq 0 ] || die "the fuzz build failed (exit $build_rc)"
bin="$(swift build -c "$config" --scratch-path "$scratch" --show-bin-path)"
log "build done in $((SECONDS - start))s"

mkdir -p "$scratch/crashes"
failed=0
summary=()
for t in "${targets[@]}"; do
  seeds="deploy/fuzz/corpus/$t"
  work="$scratch/corpus/$t"
  mkdir -p "$work" "$seeds"
  out="$scratch/$t.log"
  log "running $t for ${seconds}s ($(find "$seeds" -type f | wc -l) seeds)"
  rc=0
  # SWIFT_BACKTRACE=enable=no: otherwise a crash leaves swift-backtrace running for minutes.
  # shellcheck disable=SC2086
  SWIFT_BACKTRACE=enable=no LSAN_OPTIONS="suppressions=$root/deploy/fuzz/lsan.supp" "$bin/$t" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
    -rss_limit_mb=4096 -artifact_prefix="$scratch/crashes/$t-" ${FUZZ_ARGS:-} "$work" "$seeds" >"$out" 2>&1 || rc=$?
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$out" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$out" | tail -n 1)"
  crashes=0
  if [ "$rc" -ne 0 ]; then
    crashes=1
    failed=1
    grep -E '^(==[0-9]+==ERROR|SUMMARY|Fatal error|.*precondition failed|artifact_prefix|Test unit written)' "$out" | head -n 20 >&2 || true
    log "$t CRASHED (exit $rc); full output in $out, input in $scratch/crashes/"
  fi
  line="$(printf '%-16s %12s executions %8s exec/s %2s crashes' "$t" "${runs:-?}" "${rate:-?}" "$crashes")"
  summary+=("$line")
  log "$line"
done
echo
printf 'fuzz.sh: %s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzz.sh: FAILED: a target crashed (inputs in $scratch/crashes/)"
  exit 1
fi
echo "fuzz.sh: OK: no crashes (${seconds}s per target)"
