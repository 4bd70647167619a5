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
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "pg-cycle.sh: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
PREFIX="${PREFIX:-fpg$RANDOM}"
TIMEOUT="${FERRY_PG_TIMEOUT:-180}"
SRC_BIN="${FERRY_BIN:-$root/.build/x86_64-unknown-linux-gnu/debug}"
case "$SRC_BIN" in /*) ;; *) SRC_BIN="$(cd "$SRC_BIN" && pwd)" ;; esac
SCRIPT=pg-cycle.sh
. "$here/pg/common.sh"

say "Ferry PostgreSQL cycle in the lab: prefix $PREFIX, work dir $work"
t0="$(now_us)"
pg_setup
row setup "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "-" "initdb -k, pgbench -i -s 4 ($(sql "$PROD" "select count(*) from pgbench_accounts") accounts), replicas caught up"

# pgbench for the rest of the run, on db.
runuser -u postgres -- "$PGBIN/pgbench" -h "$PROD/sock" -c 4 -j 2 -T 3600 -n postgres >"$work/logs/pgbench.log" 2>&1 &
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
! mountpoint -q "$DRILL/data" && ! mountpoint -q "$DRILL/wal" || fail "drill cleanup left the recovered file systems mounted"
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
refused() { qemu-io -f raw -c "write -P 0 0 512" "nbd+unix:///pgdata?socket=${SOCK[pgdata]}" >"$work/check/fence.out" 2>&1; grep -q "Operation not permitted\|Permission denied" "$work/check/fence.out"; }
wait_for "db's volumes to be fenced once the link heals" refused
kill -KILL "$bench_pid" 2>/dev/null || true
info "failover: crash recovery, pg_amcheck clean, $fo_inv; pgbench on rec1: $(grep -o 'tps = [0-9.]*' "$work/logs/pgbench-rec1.log" | head -n 1), then $after_inv"
row failover "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$fo_start" "crash recovery; pg_amcheck clean; $fo_inv; writable on rec1; db fenced"
