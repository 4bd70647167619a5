#!/usr/bin/env bash
# Randomized failover soak in the multi-host lab, over PostgreSQL on two Ferry volumes (see
# pg-cycle.sh): N trials, each an unplanned failover at a random point, checked, then reprotect
# and failback, checked, with a daemon killed -9 at a random step. Trials are checkpointed: a run
# stopped (or a session that ends) resumes at the next trial with `soak.sh N` again.
#
# One trial, under pgbench on db:
#   1. a random 3-7 s of load; the point: latest-crash, latest-app (both file systems frozen by
#      the agent's fsfreeze hook), latest-group, or --as-of a random time 1-3 s ago
#   2. chaos: none, or kill -9 of the controller or of db's agent at a random moment of a random
#      step (failover, reprotect, failback), restarted at once; a job that fails because of it is
#      run again once (what an operator does), counted as a retry. (rec1's agent is not killed:
#      it serves the recovered database's disks through nbdfuse, which does not reconnect, so
#      that is a crash of the recovered workload, not of Ferry.)
#   3. the inter-site link cut; unplanned failover at the point: both volumes' images at the point
#      pass e2fsck after their journal replay; rec1 starts PostgreSQL by its own crash recovery;
#      pg_amcheck --heapallindexed and pgbench's invariant must hold; rec1 runs pgbench for 3 s
#   4. the link heals; db's old PostgreSQL (on volumes fenced now) is stopped and unmounted, as
#      an operator powers the old primary's workload off; reprotect; failback: rec1's stop hook
#      shuts PostgreSQL down cleanly, db's start hook starts it at home: it must hold exactly
#      rec1's transactions (zero loss), pass amcheck and the invariant, and start without crash
#      recovery (unless the controller serving rec1's volumes was killed after the failover:
#      the writes rec1 had not flushed are lost with it and its fsync fails, by design)
#   A failed check is a violation: recorded with its reason, and the run stops there.
#
#   bash deploy/lab/soak.sh N [--state DIR] [--prefix P] [--seed S]
#
# DIR (default /var/tmp/ferry-soak) keeps trials.jsonl (one line per finished trial) and the
# seed; the summary covers every trial recorded there: trials, points by kind, chaos, retries,
# violations, bytes moved by reprotect and failback, RPO and RTO (from the failover jobs'
# reports) and PostgreSQL's recovery time (min, median, p90, max). Exits 0 only with no
# violation. Environment: FERRY_BIN, FERRY_PG_TIMEOUT (180 s).
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && cd .. && pwd)"
N="" STATE=/var/tmp/ferry-soak PREFIX="" SEED=""
while [ $# -gt 0 ]; do
  case "$1" in
    --state) STATE="${2:?}"; shift 2 ;;
    --prefix) PREFIX="${2:?}"; shift 2 ;;
    --seed) SEED="${2:?}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) [ -z "$N" ] && [[ "$1" =~ ^[0-9]+$ ]] || { echo "soak.sh: unknown argument '$1' (--help)" >&2; exit 2; }; N="$1"; shift ;;
  esac
done
[ -n "$N" ] || { echo "soak.sh: how many trials? soak.sh N" >&2; exit 2; }
PREFIX="${PREFIX:-fsk$RANDOM}"
TIMEOUT="${FERRY_PG_TIMEOUT:-180}"
SRC_BIN="${FERRY_BIN:-$root/.build/x86_64-unknown-linux-gnu/debug}"
case "$SRC_BIN" in /*) ;; *) SRC_BIN="$(cd "$SRC_BIN" && pwd)" ;; esac
mkdir -p "$STATE"
[ -s "$STATE/seed" ] || echo "${SEED:-$((RANDOM * 32768 + RANDOM))}" >"$STATE/seed"
SEED="$(cat "$STATE/seed")"
touch "$STATE/trials.jsonl"
SCRIPT=soak.sh

summary() {
  "$PY" - "$STATE/trials.jsonl" <<'PY'
import json, sys
trials = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
def dist(xs):
    xs = sorted(x for x in xs if x is not None)
    if not xs: return "-"
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]
    return f"min {xs[0]:.2f}  median {q(0.5):.2f}  p90 {q(0.9):.2f}  max {xs[-1]:.2f}"
def count(key):
    out = {}
    for t in trials: out[t.get(key)] = out.get(t.get(key), 0) + 1
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items(), key=lambda kv: str(kv[0])))
bad = [t for t in trials if not t.get("ok")]
print(f"\nSoak summary ({len(trials)} trials, {sys.argv[1]})")
print(f"  trials      {len(trials)} ({len(trials) - len(bad)} passed)")
print(f"  points      {count('kind')}")
print(f"  chaos       {count('chaos')}")
print(f"  retries     {sum(t.get('retries', 0) for t in trials)} jobs run again after a kill -9")
print(f"  violations  {len(bad)}" + "".join(f"\n    trial {t['trial']}: {t.get('violation')}" for t in bad))
print(f"  bytes moved {sum(t.get('bytes', 0) for t in trials)} (reprotect and failback, all trials)")
print(f"  RPO (s)     {dist([t.get('rpo') for t in trials])}")
print(f"  RTO (s)     {dist([t.get('rto') for t in trials])}")
print(f"  recovery(s) {dist([t.get('recovery') for t in trials])}  (PostgreSQL's start on rec1, crash recovery included)")
print(f"  zero loss   {sum(1 for t in trials if t.get('zero_loss'))} failbacks held exactly rec1's transactions")
PY
}

. "$here/pg/common.sh"

done_trials="$(grep -c . "$STATE/trials.jsonl" || true)"
if grep -q '"ok": false' "$STATE/trials.jsonl"; then
  say "a violation is recorded in $STATE/trials.jsonl: fix it, then move the file away to start again"
  exit 1
fi
if [ "$done_trials" -ge "$N" ]; then
  say "$done_trials trials recorded in $STATE already (asked for $N)"
  exit 0
fi
say "Ferry soak: trials $((done_trials + 1))..$N (seed $SEED), prefix $PREFIX, work dir $work, state $STATE"
PG_APP_INTERVAL=5s pg_setup
info "PostgreSQL on db over db/pgdata + db/pgwal, group pg (crash points every 2 s, app points every 5 s)"

bench_start() {  # pgbench on db for as long as the trial needs
  runuser -u postgres -- "$PGBIN/pgbench" -h "$PROD/sock" -c 4 -j 2 -T 3600 -n postgres >>"$work/logs/pgbench.log" 2>&1 &
  bench_pid=$!
}
bench_stop() {  # runuser and the pgbench under it
  if [ -n "$bench_pid" ]; then
    pkill -KILL -P "$bench_pid" 2>/dev/null || true
    kill -KILL "$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  bench_pid=""
}
points_after() { fctl points pg --json >"$work/points.json" && [ "$(tool points "$work/points.json" "$1")" -ge "$2" ]; }
app_after() {
  fctl points pg --json >"$work/points.json" &&
    [ "$(tool get "len([p for p in j if p.get('consistency') == 'app' and p.get('complete') and p.get('createdAt', '') >= '$1'])" "$work/points.json")" -ge 1 ]
}

# violation REASON: the trial's record says why; the run stops.
T=""  # the trial's JSON record, built as it goes
violation() { record false "$1"; fail "trial $trial: $1"; }
record() {  # record OK [VIOLATION]
  "$PY" -c '
import json, sys
t = json.loads(sys.argv[4] or "{}")
t["ok"] = sys.argv[2] == "true"
if sys.argv[3]: t["violation"] = sys.argv[3]
open(sys.argv[1], "a").write(json.dumps(t, sort_keys=True) + "\n")
' "$STATE/trials.jsonl" "$1" "${2:-}" "$T"
}
setT() { T="$("$PY" -c 'import json, sys; t = json.loads(sys.argv[1] or "{}"); t[sys.argv[2]] = json.loads(sys.argv[3]); print(json.dumps(t))' "$T" "$1" "$2")"; }

# chaos_job NAME STEP ARGS...: a job; if this trial's chaos strikes at STEP, its daemon is killed
# -9 a random 0.2-2.5 s into the job and restarted; a job that fails then is run once more.
RETRIES=0
chaos_job() {
  local name="$1" step="$2"; shift 2
  local f="$work/jobs/$trial-$name.json"
  fctl "$@" --no-wait --json >"$f" 2>"$f.err" || violation "ferryctl $* did not start: $(tail -n 2 "$f.err")"
  local id; id="$(tool get "j['id']" "$f")"
  if [ "$CHAOS_STEP" = "$step" ] && [ "$CHAOS" != none ]; then
    sleep "$(awk -v r="$RANDOM" 'BEGIN { printf "%.1f", 0.2 + (r % 24) / 10 }')"
    case "$CHAOS" in
      kill-controller) kill9 controller; start_controller; wait_for "the controller back" fctl health ;;
      kill-rec1) kill9 agent-rec1; start_agent rec1 ;;
      kill-db) kill9 agent-db; start_agent db ;;
    esac
    info "chaos: $CHAOS during $name"
  fi
  local state="" deadline=$((SECONDS + TIMEOUT))
  while :; do
    if fctl job show "$id" --json >"$f.tmp" 2>/dev/null; then mv "$f.tmp" "$f"; state="$(tool get "j['state']" "$f")"; fi
    case "$state" in succeeded|failed|cancelled) break ;; esac
    [ "$SECONDS" -lt "$deadline" ] || violation "job $name ($id) still $state after ${TIMEOUT}s"
    sleep 0.3
  done
  if [ "$state" != succeeded ]; then
    [ "${retried:-}" != "$name" ] || violation "job $name failed twice: $(tool get "j.get('error')" "$f")"
    info "job $name $state after $CHAOS ($(tool get "j.get('error')" "$f")): run again"
    RETRIES=$((RETRIES + 1)) retried="$name"
    local was="$CHAOS"; CHAOS=none
    chaos_job "$name" "$step" "$@"
    CHAOS="$was"
  fi
}
report() { tool get "j['report'].get('$2')" "$work/jobs/$trial-$1.json"; }

stop_old_primary() {  # db's PostgreSQL on its (now fenced) volumes: stopped at once, unmounted
  if [ -e "$PROD/data/pgdata/postmaster.pid" ]; then
    runuser -u postgres -- "$PGBIN/pg_ctl" stop -m immediate -D "$PROD/data/pgdata" >/dev/null 2>&1 || true
  fi
  "$PGH" umount "$PROD/wal" >>"$work/logs/pg-db.log" 2>&1 || true
  "$PGH" umount "$PROD/data" >>"$work/logs/pg-db.log" 2>&1 || true
  ! mountpoint -q "$PROD/data" && ! mountpoint -q "$PROD/wal" || violation "db's old file systems could not be unmounted"
}

bench_start
REC="$work/pg/rec1/pg.db"
[ "${FERRY_SOAK_HASH:-0}" = 0 ] || touch "$work/pg/rec1/hash-volumes" "$work/pg/db/hash-volumes"
for ((trial = done_trials + 1; trial <= N; trial++)); do
  RANDOM=$((SEED + trial))
  kinds=(crash app group as-of) chaoses=(none kill-controller kill-db) steps=(failover reprotect failback)
  KIND="${kinds[RANDOM % 4]}" CHAOS="${chaoses[RANDOM % 3]}" CHAOS_STEP="${steps[RANDOM % 3]}" RETRIES=0 retried=""
  T="" t_trial="$(now_us)"
  setT trial "$trial"; setT kind "\"$KIND\""; setT chaos "\"$CHAOS@$CHAOS_STEP\""
  say "trial $trial/$N: point $KIND, chaos $CHAOS at $CHAOS_STEP"
  since_s="$(date +%s)" since="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  sleep $((3 + RANDOM % 5))
  wait_for "2 points under load" points_after "$since_s" 2
  [ "$KIND" != app ] || wait_for "an app-consistent point" app_after "$since"
  case "$KIND" in
    crash) POINT=(--point latest-crash) ;;
    app) POINT=(--point latest-app) ;;
    group) POINT=(--point latest-group) ;;
    as-of)  # 1-3 s ago, but after the trial's first point (points come every 2 s)
      t=$(( $(date +%s) - 1 - RANDOM % 3 )); [ "$t" -ge $((since_s + 3)) ] || t=$((since_s + 3))
      POINT=(--as-of "$(date -u -d "@$t" +%Y-%m-%dT%H:%M:%SZ)") ;;
  esac
  lab cut >>"$work/logs/lab.log" 2>&1 || violation "lab.sh cut failed"
  chaos_job failover failover failover pg "${POINT[@]}"
  rpo="$(report failover rpo_seconds)" rto="$(report failover rto_seconds)"
  setT rpo "${rpo:-null}"; setT rto "${rto:-null}"
  setT point "\"$(report failover point)\""
  point="$(report failover point)"
  for v in pgdata pgwal; do ( fsck_point "$v" "$point" ) || violation "db/$v at point $point: not handed to rec1 byte for byte, or not a clean ext4 after its journal replay (see the log above and $work/check)"; done
  ( recovered "$REC" ) || violation "rec1's PostgreSQL did not recover by itself: $(tail -n 3 "$REC/pg.log")"
  setT recovery "$(start_seconds "$REC" "$work/pg/rec1")"
  ( amcheck "$REC" ) || violation "pg_amcheck after the failover: $(tail -n 5 "$work/check/amcheck-pg.db.out")"
  ( invariant "$REC" >/dev/null ) || violation "pgbench's invariant broken after the failover"
  runuser -u postgres -- "$PGBIN/pgbench" -h "$REC/sock" -c 2 -T 3 -n postgres >>"$work/logs/pgbench-rec1.log" 2>&1 || violation "pgbench on rec1 failed"
  rec_rows="$(history_rows "$REC")"
  lab heal >>"$work/logs/lab.log" 2>&1 || violation "lab.sh heal failed"
  bench_stop
  stop_old_primary
  chaos_job reprotect reprotect reprotect pg
  chaos_job failback failback failback pg
  b1="$(report reprotect bytes_sent)" b2="$(report failback bytes_sent)"
  b1="${b1%%.*}" b2="${b2%%.*}"
  bytes=$(( ${b1:-0} + ${b2:-0} ))
  setT bytes "${bytes:-0}"
  # At home: exactly rec1's transactions, and from its clean shutdown. Unless the controller was
  # killed (reprotect, failback) while rec1's volumes were served from it: the writes rec1 had
  # not flushed then are lost with the controller's overlay map, rec1's next fsync fails (EIO, as
  # a disk that lost its volatile cache says), PostgreSQL stops without its shutdown checkpoint
  # and db recovers from a crash instead; every committed transaction is still there.
  clean=true
  grep -q "database system was shut down at" "$PROD/pg.log" || clean=false
  if [ "$clean" = false ] && [ "$CHAOS" != kill-controller -o "$CHAOS_STEP" = failover ]; then
    violation "db's PostgreSQL did not start from rec1's clean shutdown: $(tail -n 3 "$PROD/pg.log")"
  fi
  setT clean_shutdown "$clean"
  # Below PostgreSQL: rec1's clean stop left both file systems clean (e2fsck -fn of the unmounted
  # volumes, in its stop hook), and the failback brought exactly that home (db's start hook
  # checks before it mounts; with FERRY_SOAK_HASH=1 both hooks hash the volumes too).
  for v in data wal; do
    at_stop="$(volume_event "$work/pg/rec1/events" fsck after-umount "$REC/$v")"
    at_home="$(volume_event "$work/pg/db/events" fsck before-mount "$PROD/$v")"
    if [ "$clean" = true ]; then
      [ "$at_stop" = clean ] || violation "rec1 shut down cleanly, yet its $v file system is not clean at its stop: $at_stop"
      [ "$at_home" = clean ] || violation "rec1 left its $v file system clean, but the failback brought it home damaged: $at_home"
    fi
    h1="$(volume_event "$work/pg/rec1/events" sha256 after-umount "$REC/$v")"
    h2="$(volume_event "$work/pg/db/events" sha256 before-mount "$PROD/$v")"
    [ -z "$h1" ] || [ "$h1" = "$h2" ] || violation "the failback did not bring $v home byte for byte: rec1 stopped at $h1, db starts at $h2"
  done
  home_rows="$(history_rows "$PROD")"
  [ "$home_rows" = "$rec_rows" ] || violation "failback lost or invented transactions: rec1 had $rec_rows, db has $home_rows"
  ( amcheck "$PROD" ) || violation "pg_amcheck after the failback"
  ( invariant "$PROD" >/dev/null ) || violation "pgbench's invariant broken after the failback"
  setT zero_loss true; setT retries "$RETRIES"; setT history "$home_rows"
  setT seconds "$(awk -v a="$t_trial" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')"
  record true
  info "trial $trial passed: point $(report failover point), rpo $(report failover rpo_seconds) s, rto $(report failover rto_seconds) s, $bytes bytes moved, $home_rows transactions kept"
  bench_start
done
