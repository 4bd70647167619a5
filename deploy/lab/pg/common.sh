# PostgreSQL on db over two Ferry volumes, for pg-cycle.sh and soak.sh (sourced, not run, after
# they set SCRIPT, PREFIX, TIMEOUT and SRC_BIN): the lab's shared helpers (lib.sh), the checks of
# a recovered database, and the setup (pg_setup).
PGH="$here/pg/pg-hook.sh"
PGBIN=/usr/lib/postgresql/15/bin
LAB_TOOLS=(nsenter qemu-io nbdfuse losetup mkfs.ext4 pgbench runuser "$PGBIN/pg_ctl" "$PGBIN/pg_amcheck")
LAB_KEEP="${FERRY_PG_KEEP:-}"
. "$here/lib.sh"
mkdir -p "$work/volumes/db" "$work/pg/db" "$work/pg/rec1"

lab_stop_workloads() {  # every PostgreSQL of this run, immediately, and its mounts
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
lab_failure_logs() {
  local c; for c in "$work"/pg/*/*/pg.log; do [ -e "$c" ] && { printf '\n----- %s\n' "$c"; tail -n 12 "$c"; }; done
  return 0
}
bench_pid=""

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
  # Its redo decision: WAL replayed, or none written since the last checkpoint (a point cut just
  # after the database started, before its clients wrote).
  grep -q "redo done at\\|redo starts at\\|redo is not required" "$1/pg.log" || fail "PostgreSQL on $1 made no redo decision: $(tail -n 5 "$1/pg.log")"
  grep -q "database system is ready to accept connections" "$1/pg.log" || fail "PostgreSQL on $1 is not ready"
}
start_seconds() {  # start_seconds RUN STATE: the hook's last start of RUN, to PostgreSQL accepting connections
  awk -v r="run=$1" '$3 == r && $2 == "start" { t = $1 } $3 == r && $2 == "ready" { d = $1 - t } END { printf "%.1f", d }' "$2/events"
}
history_rows() { sql "$1" "select count(*) from pgbench_history"; }
# volume_event EVENTS KIND WHEN DIR: what pg-hook.sh last recorded of KIND (fsck, sha256) for DIR
volume_event() {
  awk -v k="$2" -v w="$3" -v d="dir=$4" '$2 == k && $3 == w && $4 == d { v = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ [^ ]+ /, "", v) } END { print v }' "$1" 2>/dev/null
}
# fsck_point VOLUME POINT: the point's image of db/VOLUME, exported and copied, passes e2fsck after
# its journal replay (the file system itself, below what PostgreSQL checks).
fsck_point() {
  local img="$work/check/$1-$2.img"
  fctl volume export "db/$1" --point "$2" --out "$img" --force >/dev/null || fail "export of db/$1 at $2 failed"
  if [ -e "$work/pg/rec1/hash-volumes" ]; then
    # What rec1 was given before it mounted: the point, byte for byte.
    local name=data; [ "$1" = pgwal ] && name=wal
    local given; given="$(volume_event "$work/pg/rec1/events" sha256 before-mount "$work/pg/rec1/pg.db/$name")"
    [ "$(sha256sum <"$img" | cut -d' ' -f1)" = "$given" ] || fail "rec1 was not given db/$1 at $2 byte for byte (see $work/pg/rec1/events)"
  fi
  fsck_image "$img" "db/$1 at $2"
  rm -f "$img"
}


start_controller() {
  start_daemon controller ctl "${CLEAN_ENV[@]}" "$BIN/ferry-controller" --data-dir "$work/controller" --listen "$CTL_AGENT" \
    --api-listen "$CTL_API" --nbd-tls-listen "$CTL_NBD" --log-level debug
}
# start_agent HOST: the enrolled agent in HOST's network namespace and the machine's mount
# namespace (as inns, but nsenter itself: $! must be the agent, not a subshell running a shell
# function, or kill9 leaves the agent running beside its restart): the file systems its hooks
# mount are the ones this script checks and the fsfreeze hook freezes.
start_agent() {
  logs[agent-$1]="$work/logs/agent-$1.log"
  case " ${labels[*]} " in *" agent-$1 "*) ;; *) labels+=("agent-$1") ;; esac
  nsenter --net="/run/netns/$PREFIX-$1" -- "${CLEAN_ENV[@]}" "$BIN/ferry-agent" run --data-dir "$work/agents/$1" \
    --config "$work/agent-$1.yaml" --log-level debug >>"${logs[agent-$1]}" 2>&1 &
  pids[agent-$1]=$!
}
# kill9 LABEL: a daemon dies at once (its restart is the caller's)
kill9() { kill -KILL "${pids[$1]}" 2>/dev/null || true; wait "${pids[$1]}" 2>/dev/null || true; }

# pg_setup: the lab, a controller, agents db and rec1 (hooks pg-start, pg-stop, pg-freeze),
# db/pgdata and db/pgwal protected (256 MiB ext4 each), PostgreSQL on db over them (initdb -k,
# the WAL on its own volume, pgbench -i -s 4), group pg (a crash point every 2 s; app points every
# PG_APP_INTERVAL, none by default) and plan pg: db -> rec1.
pg_setup() {
  # ---------------------------------------------------------------------------------------------
  cp "$SRC_BIN/ferry-controller" "$SRC_BIN/ferry-agent" "$SRC_BIN/ferryctl" "$work/bin/"
  BIN="$work/bin"
  lab up >"$work/logs/lab-up.log" 2>&1 || { cat "$work/logs/lab-up.log" >&4; fail "lab.sh up failed"; }
  CTL_IP="$(lab addr ctl)"
  CTL_AGENT="$CTL_IP:7443" CTL_API="$CTL_IP:7444" CTL_NBD="$CTL_IP:7445"
  start_controller
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
  # App-consistent points: both file systems frozen (in order), thawed in reverse.
  pg-freeze:
    fsfreeze: ["$work/pg/$h/home/data", "$work/pg/$h/home/wal"]
protect-allow: ["$work/volumes/$h/", "$work/agents/$h/volumes/"]
YAML
    tok="$(fctl token create --host "$h" --ttl 10m 2>/dev/null)" || fail "token for $h"
    inns "$h" "${CLEAN_ENV[@]}" "FERRY_ENROLL_TOKEN=$tok" "$BIN/ferry-agent" enroll --controller "$CTL_AGENT" \
      --data-dir "$work/agents/$h" --name "$h" >"$work/logs/enroll-$h.log" 2>&1 || { cat "$work/logs/enroll-$h.log" >&4; fail "enroll $h"; }
    start_agent "$h"
  done
  online() { fctl hosts --json | tool get "sorted(h['name'] for h in j if h.get('state') == 'online')" - | tr '\n' ' ' | grep -q "db rec1"; }
  wait_for "agents db and rec1 online" online

  declare -gA SOCK=()
  for v in pgdata pgwal; do
    truncate -s 256M "$work/volumes/db/$v.img"
    # 4 KiB blocks, as on a real server (mke2fs picks 1 KiB for a volume this small). With 1 KiB
    # blocks, on this machine's kernel, ext4 over loop and nbdfuse wrote group 1's block bitmap
    # with bits 2048-8191 set (an inode bitmap's padding: bytes no Ferry transfer splits) within a
    # few cycles, while each handover the soak hashed was byte for byte.
    mkfs.ext4 -q -F -b 4096 -L "$v" "$work/volumes/db/$v.img"
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
  "$PGH" pg-start "$PROD" >>"$work/logs/pg-db.log"
  runuser -u postgres -- "$PGBIN/pgbench" -h "$PROD/sock" -i -s 4 -q postgres >"$work/logs/pgbench-init.log" 2>&1 ||
    { tail -n 5 "$work/logs/pgbench-init.log" >&4; fail "pgbench -i failed"; }
  for v in pgdata pgwal; do wait_for "db/$v to catch up" caught_up "db/$v"; done
  fctl group create pg --volume db/pgdata --volume db/pgwal --crash-interval 2s --app-interval "${PG_APP_INTERVAL:-0}" \
    --quiesce-hook pg-freeze --thaw-hook pg-freeze --hold-budget 2s >/dev/null || fail "group create"
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
}
