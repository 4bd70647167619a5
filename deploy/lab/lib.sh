# Shared by the lab's scripted runs (vm-cycle.sh, pg-cycle.sh, soak.sh; sourced, not run):
# output (say, info, a timeline of rows, fail), daemons in the lab's namespaces with their logs,
# waiting, ferryctl in ctl, jobs, and the teardown every exit runs (workloads first, through
# `lab_stop_workloads` if the script defines it, then daemons, the lab, stray processes).
# The sourcing script sets SCRIPT, PREFIX, TIMEOUT, SRC_BIN and LAB_TOOLS (commands it needs) first,
# and may define `summary` (printed at exit instead of the timeline), `lab_failure_logs` and
# set TL_TIME (the timeline's time column) and LAB_KEEP=1 (keep the work dir after a pass).
LAB="$here/lab.sh"
TOOL="$here/drtool.py"
PY=/usr/bin/python3
exec 3>&1 4>&2

die() { printf '%s: error: %s\n' "$SCRIPT" "$*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, loop devices, mounts)"
for b in ferry-controller ferry-agent ferryctl; do [ -x "$SRC_BIN/$b" ] || die "$SRC_BIN/$b is missing (set FERRY_BIN, or build first)"; done
for t in ip nsenter "${LAB_TOOLS[@]}"; do command -v "$t" >/dev/null 2>&1 || die "$t not found (deploy/install-deps.sh)"; done

work="$(mktemp -d "/tmp/ferry-${SCRIPT%.sh}.XXXXXX")"
chmod 755 "$work"
mkdir -p "$work/bin" "$work/logs" "$work/jobs" "$work/check"

t_start="${EPOCHREALTIME/./}"
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed() { local n; n="$(now_us)"; printf '%d.%d' $(((n - t_start) / 1000000)) $((((n - t_start) / 100000) % 10)); }
say() { printf '[%6ss] %s\n' "$(elapsed)" "$*" >&3; }
info() { printf '          %s\n' "$*" >&3; }
TL=()
row() { TL+=("$(printf '  %-10s %8s %10s  %s' "$1" "$2" "$3" "$4")"); }
FAIL_REASON=""
fail() { FAIL_REASON="$*"; printf '\n[%6ss] CHECK FAILED: %s\n' "$(elapsed)" "$*" >&4; exit 1; }
# fsck_image IMAGE WHAT: a copy of a file system at a crash point is clean by e2fsck -fn after only
# its journal replay (nothing repaired; the superblock's free counts, which ext4 keeps in the
# group descriptors and a crash leaves stale, are the one thing accepted). Output in IMAGE.fsck*.
fsck_image() {
  e2fsck -E journal_only -y "$1" >"$1.fsck1" 2>&1 || [ $? -le 1 ] || fail "e2fsck could not replay the journal of $2: $(tail -n 5 "$1.fsck1")"
  e2fsck -fn "$1" >"$1.fsck2" 2>&1 && return 0
  local damage
  damage="$(grep -v '^Pass \|^e2fsck \|^$\|files (\|^Free \(blocks\|inodes\) count wrong\|^Fix? no' "$1.fsck2" | head -n 8)"
  [ -z "$damage" ] || fail "$2 is not a clean file system after its journal replay: $damage"
}

declare -A pids=() logs=()
labels=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  exec 1>&3 2>&4
  if declare -F lab_stop_workloads >/dev/null; then lab_stop_workloads; fi
  local l i alive
  for l in "${labels[@]}"; do kill -TERM "${pids[$l]}" 2>/dev/null; done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for l in "${labels[@]}"; do kill -0 "${pids[$l]}" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break
    sleep 0.1
  done
  for l in "${labels[@]}"; do kill -KILL "${pids[$l]}" 2>/dev/null; wait "${pids[$l]}" 2>/dev/null; done
  "$LAB" down --prefix "$PREFIX" >"$work/logs/lab-down.log" 2>&1 || cat "$work/logs/lab-down.log"
  local left; left="$(pgrep -f -- "$work/" | grep -vx "$$" || true)"
  [ -z "$left" ] || kill -KILL $left 2>/dev/null
  rm -rf "$work/bin"
  if declare -F summary >/dev/null; then summary; else
    printf '\nTimeline (prefix %s, work dir %s)\n' "$PREFIX" "$work"
    printf '  %-10s %8s %10s  %s\n' STEP SECONDS "${TL_TIME:-START (s)}" "CHECKED"
    printf '%s\n' "${TL[@]}"
  fi
  if [ "$rc" -eq 0 ]; then
    printf '\nPASSED: every check passed in %ss\n' "$(elapsed)"
    if [ "${LAB_KEEP:-}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
  else
    for l in "${labels[@]}"; do printf '\n----- last lines of %s\n' "$l"; tail -n 12 "${logs[$l]}"; done
    if declare -F lab_failure_logs >/dev/null; then lab_failure_logs; fi
    printf '\nFAILED after %ss: %s\nwork dir kept: %s\n' "$(elapsed)" "${FAIL_REASON:-exit status $rc}" "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'FAIL_REASON="${FAIL_REASON:-unexpected failure at line $LINENO: $BASH_COMMAND}"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

lab() { "$LAB" --prefix "$PREFIX" "$@"; }
# A command in a host's network namespace, in the machine's mount namespace: `ip netns exec` gives
# each command a private copy of the mount table, and on this machine (no shared mounts) a
# process started while a hook's file system is mounted keeps that file system alive after the
# hook unmounts it (not flushed, its loop device busy; found by the soak: a controller restarted
# by its chaos, or a ferryctl poll, held the recovered database's mounts over the failback).
inns() { local h="$1"; shift; nsenter --net="/run/netns/$PREFIX-$h" -- "$@"; }
start_daemon() {  # appends to its log: a restarted daemon's log keeps what came before
  local label="$1" host="$2"; shift 2
  logs[$label]="$work/logs/$label.log"
  case " ${labels[*]} " in *" $label "*) ;; *) labels+=("$label") ;; esac
  "$LAB" --prefix "$PREFIX" exec "$host" -- "$@" >>"${logs[$label]}" 2>&1 &
  pids[$label]=$!
}
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.25
  done
}
tool() { "$PY" "$TOOL" "$@"; }
API="" API_TOKEN="" API_CA=""
fctl() { FERRY_API="$API" FERRY_TOKEN="$API_TOKEN" FERRY_CA="$API_CA" inns ctl "$BIN/ferryctl" "$@"; }
CLEAN_ENV=(env -i "PATH=$PATH" "HOME=${HOME:-/root}" "LANG=C.UTF-8")

run_job() {  # run_job NAME ARGS...: a ferryctl operation, waited for; fails the run unless it succeeded
  local name="$1" f="$work/jobs/$1.json"; shift
  fctl "$@" --json >"$f" 2>"$work/jobs/$name.err" || true
  [ "$(tool get "j.get('state')" "$f" 2>/dev/null)" = succeeded ] || {
    tool steps "$f" >&4 2>/dev/null; cat "$work/jobs/$name.err" >&4; fail "ferryctl $* did not succeed"; }
}
