#!/usr/bin/env bash
# Ferry demo: first one controller and two agents on this machine, all on loopback, in
# throw-away data directories; then the whole DR cycle in the multi-host lab (deploy/lab/).
#
#   build -> start controller -> two host-bound enrollment tokens -> enroll two agents ->
#   run them -> wait until both are online -> show hosts, one host, the audit log ->
#   protect a new and an existing volume -> write through the NBD export -> replicas converge
#   (initial sync of the existing one) -> kill -9 an agent with unacked writes -> it resyncs only
#   its marked extents -> SIGTERM everything and check each daemon exits 0 within 5 s.
#
# Then deploy/lab/dr-cycle.sh: protect → drill → cleanup → planned failover → reprotect →
# failback, and an unplanned failover with the inter-site link cut under load and the controller
# killed -9 mid-job, every image checked, ending with a timeline (step, duration, RPO, RTO, data
# verified).
#
# Environment:
#   FERRY_BUILD_CONFIG=release  build and run release binaries (default: debug)
#   FERRY_BIN_DIR=DIR           use binaries already in DIR; skip the build
#   FERRY_DEMO_KEEP=1           keep the temporary directory (data dirs and logs) at the end
#   FERRY_DEMO_TIMEOUT=30       seconds to wait for each thing to become ready
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# fds 3 and 4: the script's own stdout/stderr, so that failure and cleanup output is seen even
# when it happens while a command's output is redirected (e.g. inside wait_until).
exec 3>&1 4>&2

timeout_s="${FERRY_DEMO_TIMEOUT:-30}"
config="${FERRY_BUILD_CONFIG:-debug}"
hosts=(demo-db demo-web)

# ---------------------------------------------------------------------------------------------
# Output helpers: a timeline of steps, and labelled sections.

t0="${EPOCHREALTIME//[!0-9]/}"
elapsed() { local now="${EPOCHREALTIME//[!0-9]/}"; printf '%d.%01d' $(((now - t0) / 1000000)) $((((now - t0) / 100000) % 10)); }
step_no=0
step() { step_no=$((step_no + 1)); printf '\n[%6ss] step %d: %s\n' "$(elapsed)" "$step_no" "$*"; }
info() { printf '           %s\n' "$*"; }
section() { printf '\n----- %s %s\n' "$*" "$(printf '%*s' $((70 - ${#1})) '' | tr ' ' '-')"; }
# To fd 4, the script's own stderr, so the message shows even inside a redirected command.
fail() { printf '\n[%6ss] FAILED: %s\n' "$(elapsed)" "$*" >&4; exit 1; }

# ---------------------------------------------------------------------------------------------
# Temporary directory, processes, and the cleanup that runs on every exit.

work="$(mktemp -d "${TMPDIR:-/tmp}/ferry-demo.XXXXXX")"
declare -A pids=()      # label -> pid of a daemon still to be stopped
declare -A logs=()      # label -> its log file
labels=()               # labels in start order

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  exec 1>&3 2>&4
  local label pid i n
  # Newest first: agents before the controller.
  for ((n = ${#labels[@]} - 1; n >= 0; n--)); do
    label="${labels[$n]}"
    pid="${pids[$label]:-}"
    [ -n "$pid" ] || continue
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "cleanup: $label (pid $pid) ignored SIGTERM for 5 s; killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
      fi
      wait "$pid" 2>/dev/null || true
    fi
  done
  if [ "$rc" -ne 0 ]; then
    for label in "${labels[@]}"; do
      [ -n "${logs[$label]:-}" ] && [ -e "${logs[$label]}" ] || continue
      printf '\n----- last lines of %s (%s)\n' "$label" "${logs[$label]}" >&2
      if [ -s "${logs[$label]}" ]; then tail -n 40 "${logs[$label]}" >&2; else echo "(empty)" >&2; fi
    done
  fi
  if [ "${FERRY_DEMO_KEEP:-}" = 1 ]; then
    echo "kept: $work"
  else
    rm -rf "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'printf "\ninterrupted\n" >&4; exit 130' INT
trap 'exit 143' TERM

# start LABEL LOGFILE COMMAND...: runs a daemon in the background, output to LOGFILE.
start() {
  local label="$1" logfile="$2"
  shift 2
  logs[$label]="$logfile"
  labels+=("$label")
  "$@" >"$logfile" 2>&1 &
  pids[$label]=$!
  info "$label: pid ${pids[$label]}, log $logfile"
}

# wait_until DESCRIPTION WATCHED-LABEL COMMAND...: polls COMMAND until it succeeds, for at most
# $timeout_s seconds; gives up early if the watched daemon died.
wait_until() {
  local what="$1" label="$2"
  shift 2
  local deadline=$((SECONDS + timeout_s))
  until "$@" >/dev/null 2>&1; do
    if [ -n "$label" ] && ! kill -0 "${pids[$label]}" 2>/dev/null; then
      fail "$label exited while waiting for $what"
    fi
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${timeout_s}s waiting for $what"
    sleep 0.2
  done
}

# stop LABEL: SIGTERM, then report the exit status and how long the daemon took to go.
stop_failures=0
stop() {
  local label="$1" pid="${pids[$1]}" i rc=0
  local begin="${EPOCHREALTIME//[!0-9]/}"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  if kill -0 "$pid" 2>/dev/null; then
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "pids[$label]"
    info "$label: still running 5 s after SIGTERM; killed  [FAIL]"
    stop_failures=$((stop_failures + 1))
    return
  fi
  wait "$pid" || rc=$?
  unset "pids[$label]"
  local took=$(( (${EPOCHREALTIME//[!0-9]/} - begin) / 1000 ))
  if [ "$rc" -eq 0 ]; then
    info "$label: exited 0 after SIGTERM in ${took} ms  [ok]"
  else
    info "$label: exited $rc after SIGTERM in ${took} ms  [FAIL: expected 0]"
    stop_failures=$((stop_failures + 1))
  fi
}

# all_online NAME...: true when `ferryctl hosts --json` lists every NAME with state "online";
# fails the demo at once if one of their agents died.
all_online() {
  local h
  for h in "$@"; do
    kill -0 "${pids[agent $h]}" 2>/dev/null || fail "agent $h exited before it came online"
  done
  "$ferryctl" hosts --json | python3 -c '
import json, sys
data = json.load(sys.stdin)
hosts = data.get("hosts", []) if isinstance(data, dict) else data
state = {h.get("name"): h.get("state") for h in hosts}
sys.exit(0 if all(state.get(n) == "online" for n in sys.argv[1:]) else 1)
' "$@"
}

# ---------------------------------------------------------------------------------------------

printf 'Ferry demo: one controller, two agents (%s), on loopback\n' "${hosts[*]}"
printf 'work dir: %s\n' "$work"

step "build ($config)"
if [ -n "${FERRY_BIN_DIR:-}" ]; then
  bin="$(cd "$FERRY_BIN_DIR" && pwd)"
  info "FERRY_BIN_DIR set: using $bin, no build"
else
  command -v swift >/dev/null 2>&1 || fail "swift not found: a Swift 6.x toolchain must be on PATH"
  # The build links the system SQLite and the demo reads JSON with python3: install them if missing.
  "$root/deploy/install-deps.sh" || fail "installing system packages failed"
  swift build -c "$config" || fail "swift build failed"
  bin="$(swift build -c "$config" --show-bin-path)"
fi
controller="$bin/ferry-controller"
agent="$bin/ferry-agent"
ferryctl="$bin/ferryctl"
for b in "$controller" "$agent" "$ferryctl"; do
  [ -x "$b" ] || fail "$b is missing or not executable"
done

step "start the controller (agents on 127.0.0.1:0, operator API on 127.0.0.1:0)"
cdir="$work/controller"
start controller "$work/controller.log" \
  "$controller" --data-dir "$cdir" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0
wait_until "the controller to write ferryctl.env and agent-listen.addr" controller \
  test -s "$cdir/ferryctl.env" -a -s "$cdir/agent-listen.addr"
agent_addr="$(tr -d '[:space:]' <"$cdir/agent-listen.addr")"
# shellcheck disable=SC1091
. "$cdir/ferryctl.env"
export FERRY_API FERRY_TOKEN FERRY_CA
info "agent listener: $agent_addr"
info "operator API:   $FERRY_API  (CA $FERRY_CA)"
info "made on first start: $(cd "$cdir" && ls | tr '\n' ' ')"

step "check the operator API (ferryctl health)"
wait_until "ferryctl health" controller "$ferryctl" health
"$ferryctl" health | sed 's/^/           /'

declare -A tokens=()
for h in "${hosts[@]}"; do
  step "create a one-time enrollment token bound to $h (ttl 10m)"
  tokens[$h]="$("$ferryctl" token create --host "$h" --ttl 10m)" || fail "ferryctl token create --host $h failed"
  [ -n "${tokens[$h]}" ] || fail "ferryctl token create printed no token"
  info "token: ${tokens[$h]:0:18}... (secret part not shown)"
done

for h in "${hosts[@]}"; do
  step "enroll agent $h (key made on this host; controller pinned by the token's CA fingerprint)"
  adir="$work/$h"
  logs["enroll $h"]="$work/enroll-$h.log"
  labels+=("enroll $h")
  timeout "$timeout_s" env FERRY_ENROLL_TOKEN="${tokens[$h]}" "$agent" enroll --controller "$agent_addr" --data-dir "$adir" --name "$h" \
    >"$work/enroll-$h.log" 2>&1 || fail "ferry-agent enroll for $h failed"
  sed 's/^/           /' "$work/enroll-$h.log"
  info "stored: $(cd "$adir" && ls | tr '\n' ' ')"
done

step "start both agents (ferry-agent run); each may protect only what its protect-allow lists"
# The demo's images live in one directory outside the agents' data dirs: the host allows it.
printf 'protect-allow: ["%s/volumes/", unused-block-devices]\n' "$work" >"$work/agent.yaml"
for h in "${hosts[@]}"; do
  start "agent $h" "$work/agent-$h.log" "$agent" run --data-dir "$work/$h" --config "$work/agent.yaml"
done

step "wait until the controller reports ${hosts[*]} online"
wait_until "both hosts to be online in 'ferryctl hosts --json'" controller all_online "${hosts[@]}"
for h in "${hosts[@]}"; do
  kill -0 "${pids[agent $h]}" 2>/dev/null || fail "agent $h is not running"
done
info "both online"

section "ferryctl hosts"
"$ferryctl" hosts

section "ferryctl host show demo-db"
"$ferryctl" host show demo-db

section "ferryctl tokens (each used once)"
"$ferryctl" tokens

section "ferryctl audit (tail)"
"$ferryctl" audit | tail -n 20

# volume_field TARGET EXPR: a field of `ferryctl volume show TARGET --json`, by a Python expression on v.
volume_field() {
  "$ferryctl" volume show "$1" --json | python3 -c "import json,sys; v=json.load(sys.stdin); print($2)"
}
# settled TARGET: the replica is protected and no sync is pending.
settled() {
  [ "$(volume_field "$1" "v.get('replicaState')")" = protected ] &&
    [ "$(volume_field "$1" "(v.get('sync') or {}).get('done', True)")" = True ]
}
identical() { qemu-img compare -q -f raw -F raw "$1" "$2"; }

step "protect demo-db/data (a new 256 MiB image) and demo-web/www (an existing image with data)"
vols="$work/volumes"
mkdir -p "$vols"
truncate -s 128M "$vols/www.img"
for at in 0 40 90; do dd if=/dev/urandom of="$vols/www.img" bs=1M count=8 seek="$at" conv=notrunc status=none; done
"$ferryctl" protect demo-db --volume data --path "$vols/data.img" --create-size 256M | sed 's/^/           /'
"$ferryctl" protect demo-web --volume www --path "$vols/www.img" | sed 's/^/           /'
db_socket="$(volume_field demo-db/data "v['socketPath']")"
db_replica="$(volume_field demo-db/data "v['replicaPath']")"
www_replica="$(volume_field demo-web/www "v['replicaPath']")"

step "the workload writes 64 MiB through demo-db's NBD export (qemu-io); replication follows"
qemu-io -f raw "nbd+unix:///data?socket=$db_socket" -c "write -P 0x42 0 32M" -c "write -P 0x43 100M 32M" -c flush >/dev/null \
  || fail "qemu-io through the export failed"
wait_until "demo-web/www's initial sync (24 MiB of data in 128 MiB)" controller settled demo-web/www
wait_until "demo-db/data's replica to match its source" controller identical "$vols/data.img" "$db_replica"
identical "$vols/www.img" "$www_replica" || fail "demo-web/www's replica differs from its source"
info "both replicas byte-identical to their sources (qemu-img compare)"
info "demo-web/www initial sync: $(volume_field demo-web/www "'%d MiB compared, %.1f MiB sent (zeroes and holes skipped)' % (v['sync']['doneBytes'] >> 20, v['sync']['sentBytes'] / 1048576)")"

section "ferryctl volumes"
"$ferryctl" volumes

step "crash demo-db's agent (kill -9) while the controller is frozen and writes are unacked"
kill -STOP "${pids[controller]}"
qemu-io -f raw "nbd+unix:///data?socket=$db_socket" -c "write -P 0x44 200M 4M" >/dev/null || fail "qemu-io failed"
kill -KILL "${pids[agent demo-db]}"
wait "${pids[agent demo-db]}" 2>/dev/null || true
unset "pids[agent demo-db]"
kill -CONT "${pids[controller]}"
info "agent killed with 4 MiB of writes the controller never acked; its activity log marked their extent"
start "agent demo-db" "$work/agent-demo-db-2.log" "$agent" run --data-dir "$work/demo-db"
wait_until "demo-db to come back online" controller all_online demo-db
wait_until "demo-db/data's resync of its marked extents" controller settled demo-db/data
wait_until "demo-db/data's replica to match its source" controller identical "$vols/data.img" "$db_replica"
info "resync after the crash: $(volume_field demo-db/data "'%s extents only: %d MiB compared of a %d MiB volume, %.1f MiB sent' % (v['sync']['kind'], v['sync']['doneBytes'] >> 20, v['sizeBytes'] >> 20, v['sync']['sentBytes'] / 1048576)")"
info "replica byte-identical again"

section "ferryctl volume show demo-db/data"
"$ferryctl" volume show demo-db/data

step "consistency group 'shop' over demo-db/data and demo-web/www; two-phase cut of a point"
"$ferryctl" group create shop --volume demo-db/data --volume demo-web/www --crash-interval 5s --app-interval 0 | sed 's/^/           /'
before="$("$ferryctl" point create shop --label before-change)" || fail "ferryctl point create failed"
info "point $before: both volumes held at one instant, then released"
qemu-io -f raw "nbd+unix:///data?socket=$db_socket" -c "write -P 0x45 0 16M" -c flush >/dev/null || fail "qemu-io failed"
info "then 16 MiB overwritten on demo-db/data"

step "demo-db/data as it was at $before, served at once by the controller (no copy), and as a file"
uri="$("$ferryctl" volume export demo-db/data --point "$before" 2>/dev/null)" || fail "ferryctl volume export failed"
info "export: $uri"
qemu-io -r -f raw "$uri" -c "read -P 0x42 0 16M" >/dev/null || fail "the point-in-time export does not hold the old bytes"
info "reads the bytes from before the change (0x42), not the new ones (0x45)"
"$ferryctl" volume export demo-db/data --point "$before" --out "$work/data-at-point.img" | sed 's/^/           /'
qemu-io -r -f raw "$work/data-at-point.img" -c "read -P 0x42 0 16M" >/dev/null || fail "the exported file does not hold the old bytes"

section "ferryctl points shop"
"$ferryctl" points shop

section "key material (modes)"
(cd "$work" && stat -c '%a  %n' controller/ca.key controller/admin.token controller/ferryctl.env \
  demo-db/agent.key demo-web/agent.key 2>&1 || true) | sed 's/^/  /'

step "stop everything with SIGTERM (agents first, then the controller)"
for h in "${hosts[@]}"; do stop "agent $h"; done
stop controller

if [ "$stop_failures" -ne 0 ]; then
  fail "$stop_failures daemon(s) did not exit 0 within 5 s of SIGTERM"
fi
printf '\n[%6ss] single-site part finished: controller and 2 agents enrolled, 2 volumes replicated (initial sync, crash resync), a group point cut and served, all stopped cleanly\n' "$(elapsed)"

step "the DR cycle in a multi-host lab (network namespaces): drill, planned failover, reprotect, failback; unplanned failover with the link cut"
info "deploy/lab/dr-cycle.sh: a primary site (db, app, web), a secondary site (controller, rec1, rec2), an inter-site link"
if [ "$(id -u)" -ne 0 ]; then
  fail "the lab needs root (network namespaces); run the demo as root"
fi
FERRY_BIN="$bin" bash "$root/deploy/lab/dr-cycle.sh" || fail "the DR cycle failed (its work directory and logs are named above)"
printf '\n[%6ss] demo finished\n' "$(elapsed)"
