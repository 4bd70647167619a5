#!/usr/bin/env bash
# The full disaster-recovery cycle of a three-tier shop in the multi-host lab, unattended, with
# the data verified at every step by the workload checker (Tests/workload/ferry_workload.py).
#
#   setup     lab up; controller in ctl; agents db app web (primary), rec1 rec2 (secondary) with
#             start/stop hooks; 4 volumes of 64 MiB protected, group `shop` (a crash point a
#             second), plan `shop`: db -> rec1, then (manual gate) app -> rec2, web -> rec2
#   cycle A   workload on the primaries; drill at latest-group (checker: the recovered images
#             are one consistent group point; production went on); drill cleanup; the same
#             drill hydrated onto the recovery hosts' files (checker again; time, bytes); planned
#             failover (stop hooks stop the workload; checker: every recovered volume holds every
#             logged write, and equals its source); a pattern written on the recovered site;
#             reprotect (only changed blocks); failback (the sources hold the recovered site's
#             writes and accept writes again); protected again
#   cycle B   workload again; the inter-site link is cut under load; unplanned failover at
#             latest-group; the controller is killed -9 while the job waits at its gate,
#             restarted, the job resumed (checker: a consistent group point); heal: the old
#             primaries come back fenced (a write to db's source fails); reprotect moves only
#             changed blocks
#   cycle C   failback; workload again; planned failover --hydrate (checker --full on the landed
#             volumes); the workload on the landed volumes; reprotect of that landed failover
#             (only changed blocks; the sinks follow the landed journals in write order: db's
#             agent killed -9 mid-stream, each of its sink files as the crash left it is a prefix
#             of its volume's writes per the checker; it follows on after the restart; a point
#             of shop-recovered, exported, passes the checker as one group point); failback
#             of the landed failover (the recovery hosts' stop hooks stop the workload; checker
#             --full on the sources: zero loss; the landed volumes released); workload again;
#             migrate --hydrate (stop hooks; checker --full on the
#             landed volumes: zero loss; hydration time and bytes; the sources unprotected, the
#             landed volumes protected on rec1 and rec2, group shop-recovered cutting points); the
#             controller killed -9 for good: the landed volumes still take writes
#
# Prints a timeline (step, duration, RPO, RTO, data verified) and exits 0 only if every check
# passed. A trap tears everything down (processes, the lab) on any exit, also on failure or
# SIGINT/SIGTERM. Run as root. See deploy/lab/README.md.
#
#   bash deploy/lab/dr-cycle.sh [--prefix P]       # default prefix fdr$RANDOM
#
# Environment:
#   FERRY_BIN=DIR          ferry-controller, ferry-agent, ferryctl (default: the repo's
#                          .build/x86_64-unknown-linux-gnu/debug); they are copied into the work
#                          dir first, so a rebuild during the run does not pull them away
#   FERRY_DR_KEEP=1        keep the work dir after a passing run (it is always kept on failure)
#   FERRY_DR_RATE=150      workload writes per second per volume
#   FERRY_DR_TIMEOUT=90    seconds to wait for each thing (a job, a state) before failing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
LAB="$here/lab.sh"
TOOL="$here/drtool.py"
WL="$root/Tests/workload/ferry_workload.py"
PY=/usr/bin/python3
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
    --prefix=*) PREFIX="${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "dr-cycle.sh: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
PREFIX="${PREFIX:-fdr$RANDOM}"
RATE="${FERRY_DR_RATE:-150}"
TIMEOUT="${FERRY_DR_TIMEOUT:-90}"
SRC_BIN="${FERRY_BIN:-$root/.build/x86_64-unknown-linux-gnu/debug}"
# A relative FERRY_BIN: from the current directory if it is there, else from the repo.
case "$SRC_BIN" in /*) ;; *) if [ -d "$SRC_BIN" ]; then SRC_BIN="$(cd "$SRC_BIN" && pwd)"; else SRC_BIN="$root/$SRC_BIN"; fi ;; esac

# fds 3 and 4: the script's own stdout/stderr, for messages while a command's output is redirected.
exec 3>&1 4>&2

die() { printf 'dr-cycle.sh: error: %s\n' "$*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"
for b in ferry-controller ferry-agent ferryctl; do
  [ -x "$SRC_BIN/$b" ] || die "$SRC_BIN/$b is missing (set FERRY_BIN, or build first)"
done
for t in ip qemu-io qemu-img; do command -v "$t" >/dev/null 2>&1 || die "$t not found"; done
[ -x "$PY" ] || die "$PY not found"
"$PY" -c 'import nbd' 2>/dev/null || die "$PY has no libnbd module (apt-get install python3-libnbd)"
[ -f "$WL" ] || die "$WL not found"

work="$(mktemp -d /tmp/ferry-dr-cycle.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/bin" "$work/logs" "$work/hooks" "$work/jobs" "$work/check" "$work/wl" "$work/volumes"

# ---------------------------------------------------------------------------------------------
# Output: elapsed time, steps, the timeline table.

t_start="${EPOCHREALTIME/./}"
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed() { local n; n="$(now_us)"; printf '%d.%d' $(((n - t_start) / 1000000)) $((((n - t_start) / 100000) % 10)); }
say() { printf '[%6ss] %s\n' "$(elapsed)" "$*" >&3; }
info() { printf '          %s\n' "$*" >&3; }
indent() { sed 's/^/          /' >&3; }

TL_STEP=() TL_DUR=() TL_RPO=() TL_RTO=() TL_DATA=()
cur_step="" cur_t0=0 cur_rpo="-" cur_rto="-" cur_data="-"
begin() {  # begin NAME: a timeline row (ended by the next begin or by finish)
  end_step
  cur_step="$1" cur_t0="$(now_us)" cur_rpo="-" cur_rto="-" cur_data="-"
  printf '\n[%6ss] == %s\n' "$(elapsed)" "$1" >&3
}
end_step() {
  [ -n "$cur_step" ] || return 0
  local d=$(( $(now_us) - cur_t0 ))
  TL_STEP+=("$cur_step") TL_DUR+=("$(printf '%d.%d' $((d / 1000000)) $(((d / 100000) % 10)))")
  TL_RPO+=("$cur_rpo") TL_RTO+=("$cur_rto") TL_DATA+=("$cur_data")
  cur_step=""
}
verified() { cur_data="$*"; info "verified: $*"; }

print_timeline() {
  local i w=4
  for i in "${!TL_STEP[@]}"; do [ ${#TL_STEP[$i]} -le "$w" ] || w=${#TL_STEP[$i]}; done
  printf '\nTimeline (prefix %s, work dir %s)\n' "$PREFIX" "$work"
  printf '  %-*s %8s %7s %7s  %s\n' "$w" STEP SECONDS RPO RTO "DATA VERIFIED"
  for i in "${!TL_STEP[@]}"; do
    printf '  %-*s %8s %7s %7s  %s\n' "$w" "${TL_STEP[$i]}" "${TL_DUR[$i]}" "${TL_RPO[$i]}" "${TL_RTO[$i]}" "${TL_DATA[$i]}"
  done
}

FAIL_REASON=""
fail() {  # the run fails here; the reason is printed at the end with the timeline
  FAIL_REASON="$*"
  printf '\n[%6ss] CHECK FAILED: %s\n' "$(elapsed)" "$*" >&4
  exit 1
}

# ---------------------------------------------------------------------------------------------
# Processes and the teardown that runs on every exit.

declare -A pids=() logs=()
labels=()
wl_pid=""

stop_pid() {  # stop_pid PID: SIGTERM, up to 5 s, then SIGKILL
  local p="$1" i
  kill -0 "$p" 2>/dev/null || return 0
  kill -TERM "$p" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$p" 2>/dev/null || true
  wait "$p" 2>/dev/null || true
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  exec 1>&3 2>&4
  end_step
  if [ -n "$wl_pid" ]; then   # the workload: its stop file first (a clean stop), then signals
    touch "$work/wl/stop"
    local w; for ((w = 0; w < 30; w++)); do [ -e "$work/wl/rc" ] && break; sleep 0.1; done
    stop_pid "$wl_pid"
  fi
  # The daemons: SIGTERM to all at once, up to 5 s in all, then SIGKILL.
  local l p i alive
  for l in "${labels[@]}"; do [ -n "${pids[$l]:-}" ] && kill -TERM "${pids[$l]}" 2>/dev/null; done
  for ((i = 0; i < 50; i++)); do
    alive=0
    for l in "${labels[@]}"; do [ -n "${pids[$l]:-}" ] && kill -0 "${pids[$l]}" 2>/dev/null && alive=1; done
    [ "$alive" = 1 ] || break
    sleep 0.1
  done
  for l in "${labels[@]}"; do
    p="${pids[$l]:-}"
    [ -n "$p" ] || continue
    kill -0 "$p" 2>/dev/null && { echo "cleanup: $l (pid $p) still running 5 s after SIGTERM: SIGKILL"; kill -KILL "$p" 2>/dev/null; }
    wait "$p" 2>/dev/null
  done
  "$LAB" down --prefix "$PREFIX" >"$work/logs/lab-down.log" 2>&1 || cat "$work/logs/lab-down.log"
  # Anything of this run still alive outside the lab (a qemu-io, a checker): by pid, matched on
  # this run's own work dir.
  local left
  left="$(pgrep -f -- "$work/" | grep -vx "$$" || true)"
  if [ -n "$left" ]; then
    echo "cleanup: killing leftover processes of this run: $(echo $left)"
    kill -KILL $left 2>/dev/null || true
  fi
  rm -rf "$work/bin"
  print_timeline
  if [ "$rc" -eq 0 ]; then
    printf '\nPASSED: every check passed in %ss\n' "$(elapsed)"
    if [ "${FERRY_DR_KEEP:-}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
  else
    case "$rc" in 130) FAIL_REASON="${FAIL_REASON:-interrupted (SIGINT)}" ;; 143) FAIL_REASON="${FAIL_REASON:-terminated (SIGTERM)}" ;; esac
    for l in "${labels[@]}"; do
      [ -s "${logs[$l]:-}" ] || continue
      printf '\n----- last lines of %s (%s)\n' "$l" "${logs[$l]}"
      tail -n 15 "${logs[$l]}"
    done
    printf '\nFAILED after %ss: %s\n' "$(elapsed)" "${FAIL_REASON:-exit status $rc (see above)}"
    echo "work dir kept (logs, data dirs, workload logs, checker reports): $work"
  fi
  exit "$rc"
}
trap cleanup EXIT
# An unexpected failure (set -e) names its command and line.
trap 'FAIL_REASON="${FAIL_REASON:-unexpected failure at line $LINENO: $BASH_COMMAND}"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

lab() { "$LAB" --prefix "$PREFIX" "$@"; }
inns() { local h="$1"; shift; ip netns exec "$PREFIX-$h" "$@"; }   # inns HOST CMD...

# start_daemon LABEL HOST CMD...: runs CMD in HOST's namespace, output to logs/LABEL.log
start_daemon() {
  local label="$1" host="$2"; shift 2
  local log="$work/logs/$label.log"
  [ -e "$log" ] && log="$work/logs/$label-$(date +%s%N).log"
  logs[$label]="$log"
  case " ${labels[*]} " in *" $label "*) ;; *) labels+=("$label") ;; esac
  "$LAB" --prefix "$PREFIX" exec "$host" -- "$@" >"$log" 2>&1 &
  pids[$label]=$!
}

# wait_for DESCRIPTION COMMAND...: polls COMMAND until it succeeds, at most $TIMEOUT s.
wait_for() {
  local what="$1"; shift
  local deadline=$((SECONDS + TIMEOUT))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${TIMEOUT}s waiting for $what"
    sleep 0.25
  done
}

tool() { "$PY" "$TOOL" "$@"; }
# ferryctl, run in ctl (the API listens on ctl's address only). The API settings are handed to
# ferryctl alone, never exported to the daemons (the hooks must not see an admin token).
API="" API_TOKEN="" API_CA=""
fctl() { FERRY_API="$API" FERRY_TOKEN="$API_TOKEN" FERRY_CA="$API_CA" inns ctl "$BIN/ferryctl" "$@"; }
# Daemons and the workload run with a clean environment.
CLEAN_ENV=(env -i "PATH=$PATH" "HOME=${HOME:-/root}" "LANG=C.UTF-8")


# qio URI [-r] COMMAND...: qemu-io on an NBD URI (-r: read-only); fails if qemu-io fails or
# reports a failure
qio() {
  local uri="$1" out; shift
  local args=()
  if [ "${1:-}" = -r ]; then args+=(-r); shift; fi
  for c in "$@"; do args+=(-c "$c"); done
  out="$(qemu-io -f raw "${args[@]}" "$uri" 2>&1)" || { echo "$out"; return 1; }
  echo "$out"
  ! grep -qiE 'failed|error' <<<"$out"
}

# run_job NAME ARGS...: starts a ferryctl operation (--no-wait), resumes each manual gate it
# waits at, waits for its end; jobs/NAME.json holds the final job. Fails the run unless it
# succeeded.
JOB_ID="" JOB_GATES=0
run_job() {
  local name="$1"; shift
  local f="$work/jobs/$name.json"
  fctl "$@" --no-wait --json >"$f" 2>"$work/jobs/$name.err" || { cat "$work/jobs/$name.err" >&4; fail "ferryctl $* failed to start"; }
  JOB_ID="$(tool get "j['id']" "$f")" JOB_GATES=0
  info "job $JOB_ID: ferryctl $*"
  follow_job "$name"
}
# follow_job NAME: as run_job, for the job in $JOB_ID
follow_job() {
  local name="$1" f="$work/jobs/$1.json" state="" deadline=$((SECONDS + TIMEOUT)) resumed_at=""
  while :; do
    fctl job show "$JOB_ID" --json >"$f.tmp" 2>>"$work/jobs/$name.err" && mv "$f.tmp" "$f" &&
      state="$(tool get "j['state']" "$f")" || state=""
    case "$state" in
      succeeded|failed|cancelled) break ;;
      waiting)
        local gate; gate="$(tool get "[s['name'] for s in j['steps'] if s['state'] == 'waiting'][0]" "$f")"
        if [ "$gate" != "$resumed_at" ]; then
          fctl job resume "$JOB_ID" >>"$work/jobs/$name.err" 2>&1 || fail "ferryctl job resume $JOB_ID failed"
          JOB_GATES=$((JOB_GATES + 1)) resumed_at="$gate"
          info "waiting at '$gate': ferryctl job resume $JOB_ID"
        fi ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || { tool steps "$f" >&3; fail "job $JOB_ID ($name) still $state after ${TIMEOUT}s"; }
    sleep 0.3
  done
  tool steps "$f" | indent
  tool report "$f" | indent
  [ "$state" = succeeded ] || fail "job $JOB_ID ($name) $state: $(tool get "j.get('error')" "$f")"
}
report() { tool get "j['report'].get('$2')" "$work/jobs/$1.json"; }   # report NAME KEY

# check_images NAME LOG [--full] ID=URI...: the workload checker over one group set of images
check_images() {
  local name="$1" log="$2" full=""; shift 2
  if [ "${1:-}" = --full ]; then full=--full; shift; fi
  tool sets "$work/check/$name.sets.json" "$name" true "$@"
  local rc=0
  "$PY" "$WL" check --log "$log" --sets "$work/check/$name.sets.json" --report "$work/check/$name.report.json" \
    --quiet >"$work/check/$name.out" 2>&1 || rc=$?
  if [ "$rc" -ge 2 ]; then cat "$work/check/$name.out" >&4; fail "checker ($name) could not run (exit $rc)"; fi
  tool prefixes "$log" "$work/check/$name.report.json" $full >"$work/check/$name.summary" || rc=1
  indent <"$work/check/$name.summary"
  [ "$rc" -eq 0 ]
}
rec_images() { local v; for v in "${VOLS[@]}"; do printf '%s=%s\n' "$v" "${REC_URI[$v]}"; done; }
src_images() { local v; for v in "${VOLS[@]}"; do printf '%s=%s\n' "$v" "${SRC_URI[$v]}"; done; }
prefix_list() {  # "db/data 1..947/2000, ...": the writes each image holds, of those logged
  tool get "', '.join('%s 1..%s/%s' % (k, v, n) for k, v, n in [(k, v, last[k]) for k, v in sorted(j['sets'][0]['prefix'].items())])" \
    "$work/check/$1.report.json" --last "$WL_LOG"
}

# reprotect_checks JOBNAME: after reprotect, only changed blocks moved (bytes_sent at most 1/8 of
# the volumes) and the original hosts (sinks now) come to equal the recovered volumes, which
# are read through the sources' (fenced, read-only) exports.
sources_equal_recovered() {
  local v
  for v in "${VOLS[@]}"; do
    qemu-img compare -q -f raw -F raw "${REC_URI[$v]}" "${SRC_URI[$v]}" >"$work/check/compare.out" 2>&1 || return 1
  done
}
reprotect_checks() {
  local sent compared
  sent="$(report "$1" bytes_sent)" compared="$(report "$1" bytes_compared)"
  info "bytes compared ${compared:-?}, sent ${sent:-?} of $TOTAL_BYTES (4 volumes x 64 MiB)"
  [ -n "$sent" ] && [ "$sent" -le $((TOTAL_BYTES / 8)) ] ||
    fail "reprotect sent ${sent:-?} bytes: expected only changed blocks, at most 1/8 of $TOTAL_BYTES"
  wait_for "the original hosts to equal the recovered volumes after reprotect" sources_equal_recovered
  info "the original hosts' images now equal the recovered volumes (qemu-img compare, 4 x 64 MiB)"
  verified "yes: only changed blocks: $sent B sent of $TOTAL_BYTES B ($(awk -v a="$sent" -v b="$TOTAL_BYTES" 'BEGIN { printf "%.2f", 100 * a / b }') %); sinks = recovered (qemu-img compare)"
}

# wait_hydrated NAME: waits until every recovered volume of plan shop is local on its recovery
# host (exports released); sets h_secs (ms after the job), h_bytes (fetched) and h_size.
hydrated() {
  fctl plan show shop --json | tool get "len(j.get('hydration') or []) == 4 and all(h['complete'] and h['released'] for h in j['hydration'])" - | grep -qx True
}
wait_hydrated() {
  local t0 f="$work/jobs/$1-plan.json"
  t0="$(now_us)"
  wait_for "the 4 recovered volumes to hydrate" hydrated
  h_secs="$(( ($(now_us) - t0) / 1000 ))"
  fctl plan show shop --json >"$f"
  h_bytes="$(tool get "sum(h['fetchedBytes'] for h in j['hydration'])" "$f")"
  h_size="$(tool get "sum(h['sizeBytes'] for h in j['hydration'])" "$f")"
  info "hydrated after the job in ${h_secs} ms: $h_bytes bytes fetched of $h_size (holes and zero ranges are not moved)"
}

# --- the workload: one process over all four volumes (so its dependency vectors span hosts) ----
WL_LOG=""
wl_start() {  # wl_start NAME SEED [URI-MAP (default SRC_URI)]
  WL_LOG="$work/wl/$1.log"
  rm -f "$work/wl/stop" "$work/wl/ready" "$work/wl/rc"
  touch "$work/wl/active"
  local vols=() v
  local -n wl_uris="${3:-SRC_URI}"
  for v in "${VOLS[@]}"; do vols+=(--volume "$v=${wl_uris[$v]}"); done
  # In db's namespace; `active` is removed once it has exited (the stop hooks wait for that).
  "$LAB" --prefix "$PREFIX" exec db -- "${CLEAN_ENV[@]}" sh -c '"$@" >"$0.out" 2>"$0.err"; echo $? >"$(dirname "$0")/rc"; rm -f "$(dirname "$0")/active"' \
    "$WL_LOG" "$PY" "$WL" run "${vols[@]}" --log "$WL_LOG" --rate "$RATE" --seed "$2" \
    --stop-file "$work/wl/stop" --ready-file "$work/wl/ready" &
  wl_pid=$!
  WL_T0="$(date +%s)"
  local deadline=$((SECONDS + 20))
  until [ -e "$work/wl/ready" ]; do
    [ ! -e "$work/wl/rc" ] || { cat "$WL_LOG.err" >&4; fail "the workload exited at start"; }
    [ "$SECONDS" -lt "$deadline" ] || fail "the workload did not get ready in 20 s"
    sleep 0.1
  done
}
# points_since T N: at least N complete points of group shop were cut after epoch second T
points_since() {
  fctl points shop --json >"$work/points.json" || return 1
  [ "$(tool points "$work/points.json" "$1")" -ge "$2" ]
}
wl_running() { [ -e "$work/wl/active" ] && [ ! -e "$work/wl/rc" ]; }
wl_writes() { [ -s "$WL_LOG" ] && echo $(($(wc -l <"$WL_LOG") - 1)) || echo 0; }
wl_reap() { [ -n "$wl_pid" ] && { wait "$wl_pid" 2>/dev/null || true; }; wl_pid=""; }

# ---------------------------------------------------------------------------------------------
say "Ferry DR cycle in the lab: prefix $PREFIX, work dir $work"
begin "setup: lab, controller, 5 agents, 4 volumes, group, plan"

cp "$SRC_BIN/ferry-controller" "$SRC_BIN/ferry-agent" "$SRC_BIN/ferryctl" "$work/bin/"
BIN="$work/bin"
for b in ferry-controller ferry-agent ferryctl; do   # a copy taken mid-link would not run
  "$BIN/$b" --help >/dev/null 2>&1 || fail "$SRC_BIN/$b does not run (a rebuild in progress?): rerun when the build is done"
done
info "binaries from $SRC_BIN (copied to $BIN)"

lab up >"$work/logs/lab-up.log" 2>&1 || { cat "$work/logs/lab-up.log" >&4; fail "lab.sh up failed"; }
info "$(tail -n1 "$work/logs/lab-up.log")"

CTL_IP="$(lab addr ctl)"
CTL_AGENT="$CTL_IP:7443" CTL_API="$CTL_IP:7444" CTL_NBD="$CTL_IP:7445"
CDIR="$work/controller"
start_controller() {
  start_daemon controller ctl "${CLEAN_ENV[@]}" "$BIN/ferry-controller" --data-dir "$CDIR" --listen "$CTL_AGENT" \
    --api-listen "$CTL_API" --nbd-tls-listen "$CTL_NBD" --log-level debug
}
start_controller
wait_for "the controller to write ferryctl.env" test -s "$CDIR/ferryctl.env"
API="$(. "$CDIR/ferryctl.env" && echo "$FERRY_API")"
API_TOKEN="$(. "$CDIR/ferryctl.env" && echo "$FERRY_TOKEN")"
API_CA="$(. "$CDIR/ferryctl.env" && echo "$FERRY_CA")"
wait_for "ferryctl health" fctl health
info "controller in ctl: agents $CTL_AGENT, API $API, NBD over TLS $CTL_NBD"

# --- hooks: start records its environment; stop stops the workload writing to the host --------
cat >"$work/hooks/hook.sh" <<HOOK
#!/bin/sh
# hook.sh start|stop HOST, run by HOST's agent (hooks: in its agent.yaml).
kind="\$1" host="\$2" dir="$work/hooks" wl="$work/wl"
ts="\$(date +%s.%N)"
tag="\$host-\$kind-\${FERRY_SOURCE_HOST:-x}-\${FERRY_MODE:-x}-\${FERRY_NETWORK:-x}-\$ts"
env | grep '^FERRY_' | sort >"\$dir/\$tag.env"
echo "\$ts \$kind mode=\${FERRY_MODE:-} network=\${FERRY_NETWORK:-} source=\${FERRY_SOURCE_HOST:-} volumes=\${FERRY_VOLUMES:-}" >>"\$dir/\$host.log"
case "\$kind" in
start)
  [ -n "\${FERRY_RECOVERY_FILE:-}" ] && cp "\$FERRY_RECOVERY_FILE" "\$dir/\$tag.json" 2>/dev/null
  if [ "\${FERRY_NETWORK:-}" = test ]; then
    echo "\$ts   drill in the test network: nothing started, only logged" >>"\$dir/\$host.log"
    exit 0
  fi
  # Production (recover, failback): every volume handed over must be served.
  for v in \${FERRY_VOLUMES:-}; do
    [ -S "\${v#*=}" ] || { echo "\$ts   start: \$v is not a socket" >>"\$dir/\$host.log"; exit 1; }
  done
  echo "\$ts   volumes served; the application would start here" >>"\$dir/\$host.log"
  ;;
stop)
  # The workload writes the primaries' volumes, or (marker \$wl/landed) the volumes landed on
  # the recovery hosts.
  case "\$host" in db|app|web) [ ! -e "\$wl/landed" ] ;; *) [ -e "\$wl/landed" ] ;; esac || {
    echo "\$ts   no workload writes to \$host's volumes: nothing to stop" >>"\$dir/\$host.log"; exit 0; }
  # One workload process writes all the primaries' volumes: stop it and wait until it exited.
  touch "\$wl/stop"
  i=0
  while [ -e "\$wl/active" ]; do
    i=\$((i + 1))
    [ "\$i" -le 300 ] || { echo "\$ts   the workload did not stop in 30 s" >>"\$dir/\$host.log"; exit 1; }
    sleep 0.1
  done
  echo "\$(date +%s.%N)   the workload has stopped" >>"\$dir/\$host.log"
  ;;
*) echo "hook.sh: unknown hook \$kind" >&2; exit 2 ;;
esac
HOOK
chmod 755 "$work/hooks/hook.sh"

AGENTS=(db app web rec1 rec2)
for h in "${AGENTS[@]}"; do
  cat >"$work/agent-$h.yaml" <<YAML
hooks:
  start: "$work/hooks/hook.sh start $h"
  stop: "$work/hooks/hook.sh stop $h"
# The volumes live in the lab's work dir, not under the agent's data dir; a hydrating drill lands
# in the data dir's volumes/ (the default target).
protect-allow: ["$work/volumes/$h/", "$work/agents/$h/volumes/"]
YAML
done

# --- enroll (in parallel) and start the agents, each in its namespace ---------------------------
enroll_pids=()
for h in "${AGENTS[@]}"; do
  tok="$(fctl token create --host "$h" --ttl 10m 2>>"$work/logs/tokens.log")" || fail "ferryctl token create --host $h failed"
  inns "$h" "${CLEAN_ENV[@]}" "FERRY_ENROLL_TOKEN=$tok" "$BIN/ferry-agent" enroll --controller "$CTL_AGENT" \
    --data-dir "$work/agents/$h" --name "$h" >"$work/logs/enroll-$h.log" 2>&1 &
  enroll_pids+=("$!")
done
for i in "${!AGENTS[@]}"; do
  wait "${enroll_pids[$i]}" || { cat "$work/logs/enroll-${AGENTS[$i]}.log" >&4; fail "ferry-agent enroll ${AGENTS[$i]} failed"; }
done
for h in "${AGENTS[@]}"; do
  start_daemon "agent-$h" "$h" "${CLEAN_ENV[@]}" "$BIN/ferry-agent" run --data-dir "$work/agents/$h" \
    --config "$work/agent-$h.yaml" --log-level debug
done

host_states() { fctl hosts --json >"$work/hosts.json" && tool get "' '.join('%s=%s' % (h['name'], h.get('state')) for h in j)" "$work/hosts.json"; }
hosts_online() {  # hosts_online NAME...
  local s h; s=" $(host_states) " || return 1
  for h in "$@"; do [[ "$s" == *" $h=online "* ]] || return 1; done
}
wait_for "agents ${AGENTS[*]} online" hosts_online "${AGENTS[@]}"
info "agents enrolled and online: ${AGENTS[*]} (logs in $work/logs)"

# --- volumes, group, plan ------------------------------------------------------------------------
VOLS=(db/data db/log app/data web/data)
declare -A REC_HOST=([db]=rec1 [app]=rec2 [web]=rec2)
declare -A SRC_URI=() REC_URI=()
for v in "${VOLS[@]}"; do
  h="${v%/*}" n="${v#*/}"
  mkdir -p "$work/volumes/$h"
  fctl protect "$h" --volume "$n" --path "$work/volumes/$h/$n.img" --create-size 64M >/dev/null || fail "ferryctl protect $v failed"
  REC_URI[$v]="nbd+unix:///$h-$n?socket=$work/agents/${REC_HOST[$h]}/sockets/recovered-$h-$n.sock"
done
VOL_SIZE=$((64 << 20))
TOTAL_BYTES=$((VOL_SIZE * ${#VOLS[@]}))
# caught_up V: replica protected, no sync pending, every captured write durable on the controller
caught_up() {
  fctl volume show "$1" --json >"$work/vol.json" || return 1
  tool get "j.get('replicaState') == 'protected' and (j.get('sync') or {}).get('done', True) and j.get('durableSequence') == j.get('lastSequence')" "$work/vol.json" | grep -qx True
}
all_caught_up() { local v; for v in "${VOLS[@]}"; do caught_up "$v" || return 1; done; }
for v in "${VOLS[@]}"; do
  wait_for "$v to be protected" caught_up "$v"
  SRC_URI[$v]="nbd+unix:///${v#*/}?socket=$(tool get "j['socketPath']" "$work/vol.json")"
done
info "protected, 64 MiB each (sparse images, created): ${VOLS[*]}"

fctl group create shop --volume db/data --volume db/log --volume app/data --volume web/data \
  --crash-interval 1s --app-interval 0 >/dev/null || fail "ferryctl group create shop failed"
cat >"$work/plan.yaml" <<'PLAN'
name: shop
description: three-tier shop in the lab (db -> rec1; app, web -> rec2)
groups:
  - name: db
    items:
      - host: db
        recovery-host: rec1
        volumes: [data, log]
        start-hook: start
        stop-hook: stop
        timeout: 60s
        networks:
          - source: prod
            recovery: dr
            test: drill
  - name: app
    pre:
      - gate: "database up on rec1: check it, then resume"
        timeout: 10m
    items:
      - host: app
        recovery-host: rec2
        volumes: [data]
        start-hook: start
        stop-hook: stop
        timeout: 60s
        networks:
          - source: prod
            recovery: dr
  - name: web
    items:
      - host: web
        recovery-host: rec2
        volumes: [data]
        start-hook: start
        stop-hook: stop
        timeout: 60s
        networks:
          - source: prod
            recovery: dr
PLAN
fctl plan apply -f "$work/plan.yaml" >/dev/null 2>"$work/logs/plan-apply.err" || { cat "$work/logs/plan-apply.err" >&4; fail "ferryctl plan apply failed"; }
info "group shop (a crash point every 1 s) over ${VOLS[*]}"
info "plan shop: db -> rec1 | gate | app -> rec2 | web -> rec2"
verified "yes: 4 volumes protected, replicas caught up"

# =============================================================================================
# Cycle A
begin "A: workload on the primaries"
wl_start a 1001
wait_for "2 group points cut under the workload" points_since "$WL_T0" 2
n0="$(wl_writes)"
info "workload: ${#VOLS[@]} volumes, $RATE writes/s each, log $WL_LOG ($n0 writes so far)"
verified "yes: workload running, $n0 writes logged"

begin "A: drill at latest-group"
n_before="$(wl_writes)"
seq_before="$(fctl volume show db/data --json | tool get "j.get('lastSequence')")"
run_job drill drill shop --point latest-group
cur_rpo="$(report drill rpo_seconds)s" cur_rto="$(report drill rto_seconds)s"
[ "$JOB_GATES" -ge 1 ] || fail "the drill never waited at its gate"
env_file="$(ls "$work"/hooks/rec1-start-db-recover-test-*.env 2>/dev/null | head -1)"
[ -n "$env_file" ] && grep -qx 'FERRY_NETWORK=test' "$env_file" && grep -qx 'FERRY_PLAN=shop' "$env_file" ||
  fail "rec1's start hook did not run for db in the test network (hooks/rec1.log: $(tail -n 3 "$work/hooks/rec1.log" 2>/dev/null))"
json_file="${env_file%.env}.json"
[ -s "$json_file" ] && [ "$(tool get "j['network'] == 'test' and j['source_host'] == 'db' and bool(j['source_inventory'].get('interfaces')) and j['networks'][0]['test'] == 'drill'" "$json_file")" = True ] ||
  fail "the recovery file handed to rec1's start hook lacks the test network, the source or its inventory ($json_file)"
for h in app web; do
  ls "$work"/hooks/rec2-start-$h-recover-test-*.env >/dev/null 2>&1 || fail "rec2's start hook did not run for $h in the test network"
done
info "start hooks ran on rec1 (db) and rec2 (app, web) with FERRY_MODE=recover FERRY_NETWORK=test;"
info "the recovery file has the source's inventory and the network map (prod -> test network drill)"
mapfile -t imgs < <(rec_images)
check_images drill "$WL_LOG" "${imgs[@]}" || fail "the drill's recovered images are not one consistent group point (check/drill.report.json)"
sleep 1
n_after="$(wl_writes)"
seq_after="$(fctl volume show db/data --json | tool get "j.get('lastSequence')")"
wl_running || fail "the production workload stopped during the drill"
[ "$n_after" -gt "$n_before" ] && [ "$seq_after" -gt "$seq_before" ] || fail "production did not go on during the drill (writes $n_before -> $n_after, db/data sequence $seq_before -> $seq_after)"
verified "yes: checker: 4 recovered images = one group point ($(prefix_list drill)); production went on (+$((n_after - n_before)) writes, db/data seq $seq_before -> $seq_after)"

begin "A: drill cleanup (drill report)"
run_job cleanup drill cleanup shop
cur_rpo="$(report cleanup drill_rpo_seconds)s" cur_rto="$(report cleanup drill_rto_seconds)s"
for v in "${VOLS[@]}"; do
  s="${REC_URI[$v]#*socket=}"
  [ ! -e "$s" ] || fail "after cleanup the drill's socket $s is still there"
done
wl_running || fail "the drill cleanup stopped the production workload"
verified "yes: overlays gone (no recovered sockets), production still writing ($(wl_writes) writes)"

begin "A: drill --hydrate (onto the recovery hosts' own files)"
run_job hydrate drill shop --point latest-group --hydrate
cur_rto="$(report hydrate rto_seconds)s"
wait_hydrated hydrate
mapfile -t imgs < <(rec_images)
check_images hydrate "$WL_LOG" "${imgs[@]}" || fail "the hydrated drill's images are not one consistent group point (check/hydrate.report.json)"
run_job hydrate-cleanup drill cleanup shop
wl_running || fail "the hydrating drill stopped the production workload"
verified "yes: checker on the hydrated images: one group point ($(prefix_list hydrate)); hydration ${h_secs} ms, $h_bytes of $h_size bytes fetched"

begin "A: planned failover"
run_job planned failover shop --planned
cur_rpo="$(report planned rpo_seconds)s" cur_rto="$(report planned rto_seconds)s"
[ "$(report planned rpo_seconds)" = 0 ] || fail "planned failover RPO is $(report planned rpo_seconds), not 0"
[ -e "$work/wl/rc" ] || fail "the stop hooks did not stop the workload"
[ "$(cat "$work/wl/rc")" = 0 ] || fail "the workload failed before the stop hooks stopped it: $(cat "$WL_LOG.err")"
wl_reap
for h in db app web; do grep -q ' stop mode=' "$work/hooks/$h.log" 2>/dev/null || fail "no stop hook ran on $h"; done
info "stop hooks ran on db, app, web; the workload stopped: $(cat "$WL_LOG.out")"
ls "$work"/hooks/rec1-start-db-recover-production-*.env >/dev/null 2>&1 || fail "rec1's start hook did not run for db in production"
mapfile -t imgs < <(rec_images)
check_images planned "$WL_LOG" --full "${imgs[@]}" || fail "after the planned failover a recovered volume does not hold every logged write (check/planned.report.json)"
for v in "${VOLS[@]}"; do
  qemu-img compare -q -f raw -F raw "${REC_URI[$v]}" "${SRC_URI[$v]}" >"$work/check/compare.out" 2>&1 ||
    fail "recovered $v differs from its source: $(cat "$work/check/compare.out")"
done
info "every recovered volume equals its source (qemu-img compare, 64 MiB each)"
qio "${SRC_URI[db/data]}" "write -P 0x66 20M 4k" >"$work/check/fenced-a.out" 2>&1 &&
  fail "the fenced source db/data accepted a write: $(cat "$work/check/fenced-a.out")"
info "the fenced source db/data refuses writes: $(head -n 1 "$work/check/fenced-a.out")"
qio "${SRC_URI[db/data]}" -r "read 0 4k" >/dev/null 2>&1 || fail "the fenced source db/data cannot be read any more"
verified "yes: zero data loss: checker: each recovered volume holds every logged write ($(prefix_list planned)); = source (qemu-img compare); source fenced"

begin "A: recovered site writes a pattern"
for v in "${VOLS[@]}"; do
  qio "${REC_URI[$v]}" "write -P 0xa5 8M 256k" "flush" "read -P 0xa5 8M 256k" >"$work/check/pattern.out" 2>&1 ||
    fail "writing the pattern through the recovered $v failed: $(cat "$work/check/pattern.out")"
done
verified "yes: 0xa5 x 256 KiB at 8 MiB written and read back through each of the 4 recovered sockets"

begin "A: reprotect (recovered site -> original hosts)"
run_job reprotect-a reprotect shop
reprotect_checks reprotect-a

begin "A: failback"
run_job failback failback shop
cur_rpo="$(report failback rpo_seconds)"; cur_rpo="${cur_rpo:--}${cur_rpo:+s}"
cur_rto="$(report failback rto_seconds)"; cur_rto="${cur_rto:--}${cur_rto:+s}"
for v in "${VOLS[@]}"; do
  qio "${SRC_URI[$v]}" "read -P 0xa5 8M 256k" >"$work/check/failback.out" 2>&1 ||
    fail "after failback the source $v does not hold the recovered site's writes: $(cat "$work/check/failback.out")"
done
mapfile -t imgs < <(src_images)
check_images failback "$WL_LOG" --full "${imgs[@]}" || fail "after failback a source does not hold every write of workload A (check/failback.report.json)"
for v in "${VOLS[@]}"; do
  qio "${SRC_URI[$v]}" "write -P 0x5a 12M 64k" "read -P 0x5a 12M 64k" >"$work/check/failback.out" 2>&1 ||
    fail "after failback the source $v refuses writes: $(cat "$work/check/failback.out")"
done
for v in "${VOLS[@]}"; do
  s="${REC_URI[$v]#*socket=}"
  [ ! -e "$s" ] || fail "after failback the recovered socket $s is still there"
done
for h in db app web; do
  ls "$work"/hooks/$h-start-*-failback-*.env >/dev/null 2>&1 || fail "no start hook with FERRY_MODE=failback ran on $h"
done
verified "yes: sources hold the recovered writes (0xa5) and all of workload A (checker), accept writes again (0x5a)"

begin "A: protected again"
wait_for "every volume protected and caught up" all_caught_up
fctl volumes | indent
plan_state="$(fctl plans --json | tool get "[p['state'] for p in j if p['plan']['name'] == 'shop'][0]")"
[ "$plan_state" = protected ] || fail "plan shop is $plan_state after failback, not protected"
verified "yes: 4 volumes protected, replicas caught up (incl. the 0x5a writes); plan protected"

# =============================================================================================
# Cycle B
begin "B: workload again; cut the link under load"
for v in "${VOLS[@]}"; do   # the workload's area (and the block after it) to zeroes: a fresh start
  qio "${SRC_URI[$v]}" "write -z 0 $((4 * 1024 * 1024 + 4096))" >"$work/check/zero.out" 2>&1 ||
    fail "zeroing $v failed: $(cat "$work/check/zero.out")"
done
wl_start b 2002
wait_for "3 group points cut under the workload" points_since "$WL_T0" 3
lab cut >>"$work/logs/lab.log" 2>&1 || fail "lab.sh cut failed"
t_cut="$(now_us)"
n_cut="$(wl_writes)"
info "inter-site link cut with $n_cut writes logged; the primaries go on writing"
sleep 1
wl_running || fail "the workload stopped when the link was cut: $(cat "$WL_LOG.err")"
verified "yes: the workload writes on in the cut-off primary site ($(wl_writes) writes)"

begin "B: unplanned failover; controller kill -9 at the gate"
fctl failover shop --point latest-group --no-wait --json >"$work/jobs/unplanned.json" 2>"$work/jobs/unplanned.err" ||
  { cat "$work/jobs/unplanned.err" >&4; fail "ferryctl failover shop --point latest-group failed to start"; }
JOB_ID="$(tool get "j['id']" "$work/jobs/unplanned.json")"
info "job $JOB_ID: ferryctl failover shop --point latest-group"
job_waiting() { fctl job show "$JOB_ID" --json >"$work/jobs/unplanned.json" && [ "$(tool get "j['state']" "$work/jobs/unplanned.json")" = waiting ]; }
wait_for "job $JOB_ID to wait at its gate" job_waiting
tool steps "$work/jobs/unplanned.json" | indent
kill -KILL "${pids[controller]}"
wait "${pids[controller]}" 2>/dev/null || true
info "controller killed -9 while the job waits at its gate; restarting it (same addresses, same data dir)"
start_controller
wait_for "the restarted controller to answer" fctl health
wait_for "job $JOB_ID to wait at its gate again after the restart" job_waiting
info "controller back; the job still waits at its gate"
recovered_db_served() { qio "${REC_URI[db/data]}" -r "read 0 4k"; }
wait_for "db/data (recovered before the crash) to be served on rec1 again" recovered_db_served
info "db/data, recovered on rec1 before the crash, is served again; resuming the job:"
follow_job unplanned
cur_rpo="$(report unplanned rpo_seconds)s" cur_rto="$(report unplanned rto_seconds)s"
mapfile -t imgs < <(rec_images)
check_images unplanned "$WL_LOG" "${imgs[@]}" || fail "the unplanned failover's recovered images are not one consistent group point (check/unplanned.report.json)"
verified "yes: checker: 4 recovered images = one group point ($(prefix_list unplanned)); the job survived kill -9, recovered db served across it"

begin "B: heal; old primaries come back fenced"
lab heal >>"$work/logs/lab.log" 2>&1 || fail "lab.sh heal failed"
wait_for "db, app, web to reconnect" hosts_online db app web
deadline=$((SECONDS + 10))
until ! wl_running; do
  [ "$SECONDS" -lt "$deadline" ] || fail "10 s after the old primaries reconnected the workload still writes to them (not fenced?)"
  sleep 0.1
done
grep -qiE 'EPERM|not permitted|read-only' "$WL_LOG.err" ||
  fail "the workload stopped, but not because its writes were refused: $(cat "$WL_LOG.err")"
info "the workload on the old primaries was stopped by the fence: $(tail -n 1 "$WL_LOG.err")"
wl_reap
qio "${SRC_URI[db/data]}" "write -P 0x66 20M 4k" >"$work/check/fenced-b.out" 2>&1 &&
  fail "the old primary db/data accepted a write after reconnecting: $(cat "$work/check/fenced-b.out")"
info "a write through db's source socket fails: $(head -n 1 "$work/check/fenced-b.out")"
qio "${SRC_URI[db/data]}" -r "read 0 4k" >/dev/null 2>&1 || fail "the fenced old primary db/data cannot be read"
verified "yes: qemu-io write to db/data refused; the workload's writes refused too"

begin "B: reprotect (delta after the split)"
run_job reprotect-b reprotect shop
reprotect_checks reprotect-b

# =============================================================================================
# Cycle C
begin "C: failback (after the split)"
run_job failback-c failback shop
wait_for "every volume protected and caught up" all_caught_up
plan_state="$(fctl plans --json | tool get "[p['state'] for p in j if p['plan']['name'] == 'shop'][0]")"
[ "$plan_state" = protected ] || fail "plan shop is $plan_state after failback, not protected"
verified "yes: plan protected again, the 4 replicas caught up"

# zero_heads URI-MAP: zeroes the range the workload writes, so a new run starts from zeroes.
zero_heads() {
  local -n zero_uris="$1"
  local v
  for v in "${VOLS[@]}"; do
    qio "${zero_uris[$v]}" "write -z 0 $((4 * 1024 * 1024 + 4096))" >"$work/check/zero.out" 2>&1 ||
      fail "zeroing $v failed: $(cat "$work/check/zero.out")"
  done
}
# The volumes a failover --hydrate lands: the recovery hosts' own protected volumes, on their
# ordinary sockets.
declare -A LAND_URI=()
for v in "${VOLS[@]}"; do
  h="${v%/*}" n="${v#*/}"
  LAND_URI[$v]="nbd+unix:///$h-$n?socket=$work/agents/${REC_HOST[$h]}/sockets/$h-$n.sock"
done
land_images() { local v; for v in "${VOLS[@]}"; do printf '%s=%s\n' "$v" "${LAND_URI[$v]}"; done; }
recovered_points_since() { fctl points shop-recovered --json >"$work/points.json" && [ "$(tool points "$work/points.json" "$1")" -ge "$2" ]; }

begin "C: planned failover --hydrate; the workload goes on on the landed volumes"
zero_heads SRC_URI
wl_start c1 3002
wait_for "2 group points cut under the workload" points_since "$WL_T0" 2
run_job landfail failover shop --planned --hydrate
cur_rpo="$(report landfail rpo_seconds)s" cur_rto="$(report landfail rto_seconds)s"
[ "$(report landfail rpo_seconds)" = 0 ] || fail "planned failover --hydrate RPO is $(report landfail rpo_seconds), not 0"
[ -e "$work/wl/rc" ] && [ "$(cat "$work/wl/rc")" = 0 ] || fail "the stop hooks did not stop the workload cleanly: $(cat "$WL_LOG.err")"
wl_reap
mapfile -t imgs < <(land_images)
check_images landfail "$WL_LOG" --full "${imgs[@]}" || fail "after failover --planned --hydrate a landed volume does not hold every logged write (check/landfail.report.json)"
landfail_held="$(prefix_list landfail)"   # against workload c1's log, before d starts its own
zero_heads LAND_URI
touch "$work/wl/landed"
wl_start d 3004 LAND_URI
wait_for "a point of shop-recovered cut under the workload on the landed volumes" recovered_points_since "$WL_T0" 1
verified "yes: zero data loss onto the landed volumes (checker --full: $landfail_held); workload d writes them, group shop-recovered cuts points"

begin "C: reprotect of the landed failover: the original volumes follow the landed journals in write order"
run_job reprotect-land reprotect shop
sent="$(report reprotect-land bytes_sent)"
info "bytes compared $(report reprotect-land bytes_compared), sent $sent of $TOTAL_BYTES"
[ -n "$sent" ] && [ "$sent" -le $((TOTAL_BYTES / 8)) ] || fail "reprotect sent ${sent:-?} bytes: expected only changed blocks, at most 1/8 of $TOTAL_BYTES"
sink_seq() { fctl volume show "$1" --json | tool get "(j.get('sink') or {}).get('sequence', 0)"; }
s0="$(sink_seq db/data)"
sink_moved() { [ "$(sink_seq db/data)" -gt "$s0" ]; }
wait_for "db/data's sink to apply records of the running workload" sink_moved
# An arbitrary instant: db's agent killed -9 mid-stream. Its two volume files as the crash left
# them must each hold a prefix of their volume's writes (applied in write order).
pkill -KILL -f "ferry-agent run --data-dir $work/agents/db " || fail "no agent of db to kill"
wait "${pids[agent-db]}" 2>/dev/null || true
for v in db/data db/log; do
  cp --sparse=always "$work/volumes/$v.img" "$work/check/sink-${v/\//-}.img"
  check_images "sink-${v/\//-}" "$WL_LOG" "$v=$work/check/sink-${v/\//-}.img" ||
    fail "db's sink $v, as kill -9 left it, is not a prefix of its volume's writes (check/sink-${v/\//-}.report.json)"
done
start_daemon agent-db db "${CLEAN_ENV[@]}" "$BIN/ferry-agent" run --data-dir "$work/agents/db" --config "$work/agent-db.yaml" --log-level debug
wait_for "db to reconnect" hosts_online db
s0="$(sink_seq db/data)"
wait_for "db/data's sink to follow on after the restart" sink_moved
fctl volumes >"$work/jobs/reprotect-land-volumes.txt"
indent <"$work/jobs/reprotect-land-volumes.txt"
# A point of the landed volumes' group, cut now (reversed, under the workload), exported to files:
# one consistent group point per the checker, as the primary's points are.
rpoint="$(fctl point create shop-recovered)" || fail "ferryctl point create shop-recovered failed"
rimgs=()
for v in "${VOLS[@]}"; do
  h="${v%/*}" n="${v#*/}"
  fctl volume export "${REC_HOST[$h]}/$h-$n" --point "$rpoint" --out "$work/check/rpoint-$h-$n.img" --force >/dev/null ||
    fail "ferryctl volume export ${REC_HOST[$h]}/$h-$n --point $rpoint failed"
  rimgs+=("$v=$work/check/rpoint-$h-$n.img")
done
check_images rpoint "$WL_LOG" "${rimgs[@]}" || fail "point $rpoint of shop-recovered is not one consistent group point (check/rpoint.report.json)"
verified "yes: only changed blocks ($sent B of $TOTAL_BYTES B); db's sinks after kill -9: each a prefix of its volume's writes ($(prefix_list sink-db-data), $(prefix_list sink-db-log)); they follow on after the restart; shop-recovered point $rpoint = one group point ($(prefix_list rpoint))"

begin "C: failback of the landed failover (a planned failover in reverse)"
run_job failback-land failback shop
[ -e "$work/wl/rc" ] && [ "$(cat "$work/wl/rc")" = 0 ] || fail "the recovery hosts' stop hooks did not stop the workload cleanly: $(cat "$WL_LOG.err")"
wl_reap
rm -f "$work/wl/landed"
mapfile -t imgs < <(src_images)
check_images failback-land "$WL_LOG" --full "${imgs[@]}" || fail "after failback a source does not hold every write of the landed workload (check/failback-land.report.json)"
wait_for "every volume protected and caught up" all_caught_up
plan_state="$(fctl plans --json | tool get "[p['state'] for p in j if p['plan']['name'] == 'shop'][0]")"
[ "$plan_state" = protected ] || fail "plan shop is $plan_state after failback, not protected"
fctl volumes --json >"$work/jobs/failback-land-volumes.json"
protected="$(tool get "' '.join(sorted('%s/%s' % (v['host'], v['name']) for v in j))" "$work/jobs/failback-land-volumes.json")"
[ "$protected" = "app/data db/data db/log web/data" ] || fail "after failback the protected volumes are '$protected', not the 4 sources"
verified "yes: zero data loss (checker --full on the sources: $(prefix_list failback-land)); plan protected, the landed volumes released"

begin "C: migrate --hydrate (lands on the recovery hosts' own files)"
zero_heads SRC_URI
wl_start c 3003
wait_for "2 group points cut under the workload" points_since "$WL_T0" 2
run_job migrate migrate shop --hydrate
cur_rpo="$(report migrate rpo_seconds)s" cur_rto="$(report migrate rto_seconds)s"
[ "$(report migrate rpo_seconds)" = 0 ] || fail "migrate RPO is $(report migrate rpo_seconds), not 0"
[ -e "$work/wl/rc" ] || fail "the stop hooks did not stop the workload"
[ "$(cat "$work/wl/rc")" = 0 ] || fail "the workload failed before the stop hooks stopped it: $(cat "$WL_LOG.err")"
wl_reap
wait_hydrated migrate
mapfile -t imgs < <(land_images)
check_images migrate "$WL_LOG" --full "${imgs[@]}" || fail "after migrate --hydrate a landed volume does not hold every logged write (check/migrate.report.json)"
fctl volumes --json >"$work/jobs/migrate-volumes.json"
landed="$(tool get "' '.join(sorted('%s/%s' % (v['host'], v['name']) for v in j))" "$work/jobs/migrate-volumes.json")"
[ "$landed" = "rec1/db-data rec1/db-log rec2/app-data rec2/web-data" ] ||
  fail "after migrate the protected volumes are '$landed', not the 4 landed ones on rec1 and rec2 (the sources unprotected)"
landed_caught_up() { local v; for v in rec1/db-data rec1/db-log rec2/app-data rec2/web-data; do caught_up "$v" || return 1; done; }
wait_for "the landed volumes' replicas to catch up" landed_caught_up
recovered_points() { fctl points shop-recovered --json >"$work/points.json" && [ "$(tool points "$work/points.json" 0)" -ge 1 ]; }
wait_for "a point of shop-recovered (the group's twin over the landed volumes)" recovered_points
verified "yes: zero data loss (checker --full: $(prefix_list migrate)); hydration ${h_secs} ms, $h_bytes of $h_size bytes fetched; protected: $landed; group shop-recovered cuts points"

begin "C: the controller stopped for good; the landed workload goes on"
kill -KILL "${pids[controller]}"
wait "${pids[controller]}" 2>/dev/null || true
for v in "${VOLS[@]}"; do
  qio "${LAND_URI[$v]}" "write -P 0xc3 16M 256k" "flush" "read -P 0xc3 16M 256k" >"$work/check/landed.out" 2>&1 ||
    fail "with the controller gone, writing through the landed $v failed: $(cat "$work/check/landed.out")"
done
verified "yes: controller killed -9; 0xc3 x 256 KiB written, flushed and read back through each of the 4 landed volumes"
end_step
