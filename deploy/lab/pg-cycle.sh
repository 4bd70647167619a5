#!/usr/bin/env bash
# PostgreSQL on real file systems over Ferry volumes, in the multi-host lab: the data directory on
# db/pgdata and the WAL on db/pgwal (initdb --waldir), each ext4 on a Ferry export reached
# through nbdfuse and a loop device (deploy/lab/pg/pg-hook.sh), under pgbench, the two volumes in
# one consistency group. A WAL on its own volume is what makes a group point necessary: a data
# file ahead of its WAL is a database PostgreSQL cannot recover.
#
#   setup      lab up; controller in ctl; agents db and rec1 with hooks pg-start / pg-stop;
#              db/pgdata (256 MiB) and db/pgwal (256 MiB) protected; initdb -k (page checksums)
#              over them on db, pgbench -i -s 4; group pg (a crash point every 2 s) and plan pg:
#              db -> rec1
#   load       pgbench -c 4 for the rest of the run (its own invariant: sum(abalance) =
#              sum(bbalance) = sum(tbalance) = sum(history.delta) after any crash recovery)
#   drill      at latest-group under load: rec1's start hook mounts the two recovered volumes and
#              starts PostgreSQL, which recovers by itself (its log says so); pg_amcheck
#              --heapallindexed over every relation, the pgbench invariant, the history holds
#              transactions; production goes on; cleanup stops it and unmounts
#   failover   the inter-site link cut under load; unplanned failover at latest-group: the same
#              recovery and checks on rec1, which then takes pgbench writes itself; the link
#              heals: db's volumes are fenced, its PostgreSQL can no longer write them
#
# Prints a timeline and exits 0 only if every check passed. A trap tears everything down
# (PostgreSQL, mounts, loop devices, daemons, the lab) on any exit. Run as root.
#
#   bash deploy/lab/pg-cycle.sh [--prefix P]       # default prefix fpg$RANDOM
#
# Environment: FERRY_BIN (default the debug build), FERRY_PG_KEEP=1 (keep the work dir after a
# passing run), FERRY_PG_TIMEOUT=180 (seconds to wait for each thing).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
LAB="$here/lab.sh"
TOOL="$here/drtool.py"
PGH="$here/pg/pg-hook.sh"
PGBIN=/usr/lib/postgresql/15/bin
PY=/usr/bin/python3
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "pg-cycle.sh: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
PREFIX="${PREFIX:-fpg$RANDOM}"
TIMEOUT="${FERRY_PG_TIMEOUT:-180}"
SRC_BIN="${FERRY_BIN:-$root/.build/x86_64-unknown-linux-gnu/debug}"
case "$SRC_BIN" in /*) ;; *) SRC_BIN="$(cd "$SRC_BIN" && pwd)" ;; esac
exec 3>&1 4>&2

die() { printf 'pg-cycle.sh: error: %s\n' "$*" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces, loop devices, mounts)"
for b in ferry-controller ferry-agent ferryctl; do [ -x "$SRC_BIN/$b" ] || die "$SRC_BIN/$b is missing (set FERRY_BIN, or build first)"; done
for t in ip nbdfuse losetup mkfs.ext4 pgbench runuser "$PGBIN/pg_ctl" "$PGBIN/pg_amcheck"; do command -v "$t" >/dev/null 2>&1 || die "$t not found (deploy/install-deps.sh)"; done

work="$(mktemp -d /tmp/ferry-pg-cycle.XXXXXX)"
chmod 755 "$work"
mkdir -p "$work/bin" "$work/logs" "$work/jobs" "$work/volumes/db" "$work/pg/db" "$work/pg/rec1" "$work/check"

t_start="${EPOCHREALTIME/./}"
now_us() { echo "${EPOCHREALTIME/./}"; }
elapsed() { local n; n="$(now_us)"; printf '%d.%d' $(((n - t_start) / 1000000)) $((((n - t_start) / 100000) % 10)); }
say() { printf '[%6ss] %s\n' "$(elapsed)" "$*" >&3; }
info() { printf '          %s\n' "$*" >&3; }
TL=()
row() { TL+=("$(printf '  %-10s %8s %10s  %s' "$1" "$2" "$3" "$4")"); }
FAIL_REASON=""
fail() { FAIL_REASON="$*"; printf '\n[%6ss] CHECK FAILED: %s\n' "$(elapsed)" "$*" >&4; exit 1; }

declare -A pids=() logs=()
labels=()
stop_databases() {  # every PostgreSQL of this run, immediately, and its mounts
  local r
  [ -z "$bench_pid" ] || kill -KILL "$bench_pid" 2>/dev/null
  for r in "$work"/pg/*/*/; do
    r="${r%/}"
    [ -d "$r/data" ] || continue
    [ -e "$r/data/pgdata/postmaster.pid" ] && runuser -u postgres -- "$PGBIN/pg_ctl" stop -m immediate -D "$r/data/pgdata" >/dev/null 2>&1
    "$PGH" umount "$r/wal" >/dev/null 2>&1; "$PGH" umount "$r/data" >/dev/null 2>&1
  done
  return 0
}
bench_pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  exec 1>&3 2>&4
  stop_databases
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
  printf '\nTimeline (prefix %s, work dir %s)\n' "$PREFIX" "$work"
  printf '  %-10s %8s %10s  %s\n' STEP SECONDS "START (s)" "CHECKED"
  printf '%s\n' "${TL[@]}"
  if [ "$rc" -eq 0 ]; then
    printf '\nPASSED: every check passed in %ss\n' "$(elapsed)"
    if [ "${FERRY_PG_KEEP:-}" = 1 ]; then echo "work dir kept: $work"; else rm -rf "$work"; fi
  else
    for l in "${labels[@]}"; do printf '\n----- last lines of %s\n' "$l"; tail -n 12 "${logs[$l]}"; done
    local c; for c in "$work"/pg/*/*/pg.log; do [ -e "$c" ] && { printf '\n----- %s\n' "$c"; tail -n 12 "$c"; }; done
    printf '\nFAILED after %ss: %s\nwork dir kept: %s\n' "$(elapsed)" "${FAIL_REASON:-exit status $rc}" "$work"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'FAIL_REASON="${FAIL_REASON:-unexpected failure at line $LINENO: $BASH_COMMAND}"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

lab() { "$LAB" --prefix "$PREFIX" "$@"; }
inns() { local h="$1"; shift; ip netns exec "$PREFIX-$h" "$@"; }
start_daemon() {
  local label="$1" host="$2"; shift 2
  logs[$label]="$work/logs/$label.log"
  labels+=("$label")
  "$LAB" --prefix "$PREFIX" exec "$host" -- "$@" >"${logs[$label]}" 2>&1 &
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


# sql RUN QUERY: one value, from the PostgreSQL of RUN (its socket directory)
sql() { runuser -u postgres -- "$PGBIN/psql" -h "$1/sock" -d postgres -XAtq -v ON_ERROR_STOP=1 -c "$2"; }
invariant() {  # invariant RUN: pgbench's balances agree; prints "accounts=… history=… rows"
  local sums
  sums="$(sql "$1" "select (select sum(abalance) from pgbench_accounts) || ' ' || (select sum(bbalance) from pgbench_branches) || ' ' || (select sum(tbalance) from pgbench_tellers) || ' ' || (select coalesce(sum(delta), 0) from pgbench_history) || ' ' || (select count(*) from pgbench_history)")" ||
    fail "the pgbench tables of $1 cannot be read"
  set -- $sums
  [ "$1" = "$2" ] && [ "$2" = "$3" ] && [ "$3" = "$4" ] || fail "pgbench's invariant is broken: accounts $1, branches $2, tellers $3, history $4"
  [ "$5" -gt 0 ] || fail "the recovered history holds no transaction"
  echo "balances $1 = $2 = $3 = $4, $5 history rows"
}
amcheck() {  # amcheck RUN: every table and index checked, heap against index
  runuser -u postgres -- "$PGBIN/pg_amcheck" -h "$1/sock" -d postgres --install-missing --heapallindexed --rootdescend \
    >"$work/check/amcheck-${1##*/}.out" 2>&1 || fail "pg_amcheck found damage in $1: $(tail -n 8 "$work/check/amcheck-${1##*/}.out")"
}
recovered() {  # recovered RUN: the log of its start shows crash recovery, and it accepts connections
  grep -q "database system was interrupted\\|not properly shut down" "$1/pg.log" || fail "PostgreSQL on $1 did not start by crash recovery: $(tail -n 5 "$1/pg.log")"
  grep -q "redo done at\\|redo starts at" "$1/pg.log" || fail "PostgreSQL on $1 replayed no WAL: $(tail -n 5 "$1/pg.log")"
  grep -q "database system is ready to accept connections" "$1/pg.log" || fail "PostgreSQL on $1 is not ready"
}
start_seconds() {  # start_seconds RUN STATE: the hook's last start of RUN, to PostgreSQL accepting connections
  awk -v r="run=$1" '$3 == r && $2 == "start" { t = $1 } $3 == r && $2 == "ready" { d = $1 - t } END { printf "%.1f", d }' "$2/events"
}
history_rows() { sql "$1" "select count(*) from pgbench_history"; }

# ---------------------------------------------------------------------------------------------
say "Ferry PostgreSQL cycle in the lab: prefix $PREFIX, work dir $work"
t0="$(now_us)"
cp "$SRC_BIN/ferry-controller" "$SRC_BIN/ferry-agent" "$SRC_BIN/ferryctl" "$work/bin/"
BIN="$work/bin"
lab up >"$work/logs/lab-up.log" 2>&1 || { cat "$work/logs/lab-up.log" >&4; fail "lab.sh up failed"; }
CTL_IP="$(lab addr ctl)"
CTL_AGENT="$CTL_IP:7443" CTL_API="$CTL_IP:7444" CTL_NBD="$CTL_IP:7445"
start_daemon controller ctl "${CLEAN_ENV[@]}" "$BIN/ferry-controller" --data-dir "$work/controller" --listen "$CTL_AGENT" \
  --api-listen "$CTL_API" --nbd-tls-listen "$CTL_NBD" --log-level debug
wait_for "the controller to write ferryctl.env" test -s "$work/controller/ferryctl.env"
API="$(. "$work/controller/ferryctl.env" && echo "$FERRY_API")"
API_TOKEN="$(. "$work/controller/ferryctl.env" && echo "$FERRY_TOKEN")"
API_CA="$(. "$work/controller/ferryctl.env" && echo "$FERRY_CA")"
wait_for "ferryctl health" fctl health
for h in db rec1; do
  cat >"$work/agent-$h.yaml" <<YAML
hooks:
  pg-start: "$PGH start --state $work/pg/$h"
  pg-stop: "$PGH stop --state $work/pg/$h"
protect-allow: ["$work/volumes/$h/", "$work/agents/$h/volumes/"]
YAML
  tok="$(fctl token create --host "$h" --ttl 10m 2>/dev/null)" || fail "token for $h"
  inns "$h" "${CLEAN_ENV[@]}" "FERRY_ENROLL_TOKEN=$tok" "$BIN/ferry-agent" enroll --controller "$CTL_AGENT" \
    --data-dir "$work/agents/$h" --name "$h" >"$work/logs/enroll-$h.log" 2>&1 || { cat "$work/logs/enroll-$h.log" >&4; fail "enroll $h"; }
  start_daemon "agent-$h" "$h" "${CLEAN_ENV[@]}" "$BIN/ferry-agent" run --data-dir "$work/agents/$h" --config "$work/agent-$h.yaml" --log-level debug
done
online() { fctl hosts --json | tool get "sorted(h['name'] for h in j if h.get('state') == 'online')" - | tr '\n' ' ' | grep -q "db rec1"; }
wait_for "agents db and rec1 online" online

declare -A SOCK=()
for v in pgdata pgwal; do
  truncate -s 256M "$work/volumes/db/$v.img"
  mkfs.ext4 -q -F -L "$v" "$work/volumes/db/$v.img"
  fctl protect db --volume "$v" --path "$work/volumes/db/$v.img" >/dev/null || fail "ferryctl protect db/$v failed"
done
caught_up() {
  fctl volume show "$1" --json >"$work/vol.json" || return 1
  tool get "j.get('replicaState') == 'protected' and (j.get('sync') or {}).get('done', True) and j.get('durableSequence') == j.get('lastSequence')" "$work/vol.json" | grep -qx True
}
for v in pgdata pgwal; do
  wait_for "db/$v to be protected" caught_up "db/$v"
  SOCK[$v]="$(tool get "j['socketPath']" "$work/vol.json")"
done

# PostgreSQL on db: both file systems through the agent's exports, page checksums on, the WAL on its own volume.
PROD="$work/pg/db/home"
mkdir -p "$PROD"
"$PGH" mount "${SOCK[pgdata]}" pgdata "$PROD/data" >>"$work/logs/pg-db.log"
"$PGH" mount "${SOCK[pgwal]}" pgwal "$PROD/wal" >>"$work/logs/pg-db.log"
chown postgres: "$PROD" "$PROD/data" "$PROD/wal"
runuser -u postgres -- "$PGBIN/initdb" -k -A trust -U postgres -D "$PROD/data/pgdata" --waldir="$PROD/wal/wal" >"$work/logs/initdb.log" 2>&1 ||
  { cat "$work/logs/initdb.log" >&4; fail "initdb failed"; }
cat >>"$PROD/data/pgdata/postgresql.conf" <<'CONF'
# The WAL volume is 256 MiB.
max_wal_size = 128MB
min_wal_size = 32MB
checkpoint_timeout = 30s
CONF
# Durable before any point is cut: a crash (or a crash-consistent point) keeps only what was
# synced, and an appended configuration line not yet written back reads as zeroes after it.
sync "$PROD/data/pgdata/postgresql.conf"
inns db "$PGH" pg-start "$PROD" >>"$work/logs/pg-db.log"
runuser -u postgres -- "$PGBIN/pgbench" -h "$PROD/sock" -i -s 4 -q postgres >"$work/logs/pgbench-init.log" 2>&1 ||
  { tail -n 5 "$work/logs/pgbench-init.log" >&4; fail "pgbench -i failed"; }
for v in pgdata pgwal; do wait_for "db/$v to catch up" caught_up "db/$v"; done
fctl group create pg --volume db/pgdata --volume db/pgwal --crash-interval 2s --app-interval 0 --hold-budget 2s >/dev/null || fail "group create"
cat >"$work/plan.yaml" <<'PLAN'
name: pg
groups:
  - name: db
    items:
      - host: db
        recovery-host: rec1
        volumes: [pgdata, pgwal]
        start-hook: pg-start
        stop-hook: pg-stop
        timeout: 5m
PLAN
fctl plan apply -f "$work/plan.yaml" >/dev/null || fail "plan apply"
row setup "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "-" "initdb -k, pgbench -i -s 4 ($(sql "$PROD" "select count(*) from pgbench_accounts") accounts), replicas caught up"

# pgbench for the rest of the run, on db.
inns db runuser -u postgres -- "$PGBIN/pgbench" -h "$PROD/sock" -c 4 -j 2 -T 3600 -n postgres >"$work/logs/pgbench.log" 2>&1 &
bench_pid=$!
points_after() { fctl points pg --json >"$work/points.json" && [ "$(tool points "$work/points.json" "$1")" -ge "$2" ]; }
started="$(date +%s)"
wait_for "3 group points under load" points_after "$started" 3
info "pgbench -c 4 running on db: $(history_rows "$PROD") transactions so far"

# --- drill ------------------------------------------------------------------------------------
say "drill at latest-group under load"
t0="$(now_us)"
run_job drill drill pg --point latest-group
DRILL="$work/pg/rec1/pg.db"
[ -d "$DRILL/data" ] || fail "rec1's start hook did not mount the recovered volumes"
recovered "$DRILL"
drill_start="$(start_seconds "$DRILL" "$work/pg/rec1")"
amcheck "$DRILL"
drill_inv="$(invariant "$DRILL")"
before="$(history_rows "$PROD")"
wait_for "production to go on during the drill" eval '[ "$(history_rows "$PROD")" -gt "$before" ]'
run_job drill-cleanup drill cleanup pg
! mountpoint -q "$DRILL/data" || fail "drill cleanup left the recovered file systems mounted"
info "drill: crash recovery, pg_amcheck clean, $drill_inv; production went on"
row drill "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$drill_start" "crash recovery; pg_amcheck --heapallindexed clean; $drill_inv"

# --- unplanned failover -------------------------------------------------------------------------
say "unplanned failover: link cut under load"
t0="$(now_us)"
started="$(date +%s)"
wait_for "2 more group points under load" points_after "$started" 2
lab cut >>"$work/logs/lab.log" 2>&1 || fail "lab.sh cut failed"
sleep 1
kill -0 "$bench_pid" 2>/dev/null || fail "pgbench stopped when the link was cut"
run_job failover failover pg --point latest-group
FO="$work/pg/rec1/pg.db"
recovered "$FO"
fo_start="$(start_seconds "$FO" "$work/pg/rec1")"
amcheck "$FO"
fo_inv="$(invariant "$FO")"
runuser -u postgres -- "$PGBIN/pgbench" -h "$FO/sock" -c 2 -T 5 -n postgres >"$work/logs/pgbench-rec1.log" 2>&1 || fail "pgbench on rec1 failed: $(tail -n 3 "$work/logs/pgbench-rec1.log")"
after_inv="$(invariant "$FO")"
lab heal >>"$work/logs/lab.log" 2>&1 || fail "lab.sh heal failed"
# Back in touch, db's agent learns it is fenced: its export refuses writes (512 bytes at offset 0:
# ext4's unused boot area, harmless had it been taken).
refused() { ! qemu-io -f raw -c "write -P 0 0 512" "nbd+unix:///pgdata?socket=${SOCK[pgdata]}" >"$work/check/fence.out" 2>&1 || grep -q "failed" "$work/check/fence.out"; }
wait_for "db's volumes to be fenced once the link heals" refused
kill -KILL "$bench_pid" 2>/dev/null || true
info "failover: crash recovery, pg_amcheck clean, $fo_inv; pgbench on rec1: $(grep -o 'tps = [0-9.]*' "$work/logs/pgbench-rec1.log" | head -n 1), then $after_inv"
row failover "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$fo_start" "crash recovery; pg_amcheck clean; $fo_inv; writable on rec1; db fenced"
