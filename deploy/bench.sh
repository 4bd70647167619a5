#!/usr/bin/env bash
# Ferry's benchmark: in one invocation, fio through nbdkit's file plugin (the baseline) and fio
# through the Ferry agent's export while it replicates to a controller on the same machine.
# Volumes, journal and replica live on tmpfs, so software is measured, not the disk.
# Prints a table of ratios agent / nbdkit and the replication lag p50 / p99, then recovery
# points (group-cut pauses, a point export's first read) and recovery time (RTO of a 3-group
# plan of 16 volumes, drill and unplanned failover, at two volume sizes).
#
#   ./deploy/bench.sh                       # 1 GiB volume, 15 s per fio run
#   FERRY_BENCH_SIZE=2G FERRY_BENCH_RUNTIME=30 ./deploy/bench.sh
#   FERRY_BENCH_LAG_RUNTIME=60              # the 500 MB/s lag run's length (seconds)
#   FERRY_BENCH_PARTS=rto ./deploy/bench.sh # only some parts: replication, points, rto, hydration, scale (comma-separated)
#   FERRY_BENCH_RTO_SIZES="1G 10G" FERRY_BENCH_RTO_DRILLS=3 FERRY_BENCH_RTO_FAILOVER=1  # the RTO part's defaults
#   FERRY_BENCH_PARTS=hydration FERRY_BENCH_HYDRATE_SIZE=10G ./deploy/bench.sh   # hydration (on disk, in /var/tmp)
#   FERRY_BENCH_PARTS=wan ./deploy/bench.sh  # WAN mode in the lab: a 100 Mbit/s inter-site link, lz4 on and off
#   FERRY_BENCH_PARTS=disk FERRY_BENCH_DISK_DIR=/var/tmp ./deploy/bench.sh   # one replication run on a real disk
#   FERRY_BENCH_PARTS=sync ./deploy/bench.sh  # initial sync of a 4 GiB half-full volume vs nbdcopy over TLS
#   FERRY_BENCH_PARTS=scale ./deploy/bench.sh   # idle agents on one controller, not a default part (it builds the
#   FERRY_BENCH_SCALE_AGENTS=1000 FERRY_BENCH_SCALE_IDLE=30   # tests too, in debug); its defaults (agents, idle window s)
#
# Needs root (tmpfs mount). A benchmark, not a test: figures vary from machine to machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
size="${FERRY_BENCH_SIZE:-1G}"
runtime="${FERRY_BENCH_RUNTIME:-15}"
lag_runtime="${FERRY_BENCH_LAG_RUNTIME:-60}"
parts="${FERRY_BENCH_PARTS:-replication,disk,sync,points,rto,hydration,wan}"
disk_dir="${FERRY_BENCH_DISK_DIR:-/var/tmp}"
wan_runtime="${FERRY_BENCH_WAN_RUNTIME:-30}"
hydrate_size="${FERRY_BENCH_HYDRATE_SIZE:-10G}"
rto_sizes="${FERRY_BENCH_RTO_SIZES:-1G 10G}"
rto_drills="${FERRY_BENCH_RTO_DRILLS:-3}"
rto_failover="${FERRY_BENCH_RTO_FAILOVER:-1}"
scale_agents="${FERRY_BENCH_SCALE_AGENTS:-1000}"
scale_idle="${FERRY_BENCH_SCALE_IDLE:-30}"

log() { printf 'bench.sh: %s\n' "$*" >&2; }
die() { printf 'bench.sh: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "run as root (the volumes go on a tmpfs mounted here)"
want() { [[ ",$parts," == *",$1,"* ]]; }
for p in ${parts//,/ }; do
  case "$p" in replication | disk | sync | points | rto | hydration | wan | scale) ;; *) die "FERRY_BENCH_PARTS: unknown part '$p' (replication, disk, sync, points, rto, hydration, wan, scale)" ;; esac
done
[[ "$rto_drills" =~ ^[1-9][0-9]*$ ]] || die "FERRY_BENCH_RTO_DRILLS: a positive number"
[[ "$scale_agents" =~ ^[1-9][0-9]*$ ]] || die "FERRY_BENCH_SCALE_AGENTS: a positive number"
[[ "$scale_idle" =~ ^[1-9][0-9]*$ ]] || die "FERRY_BENCH_SCALE_IDLE: a positive number of seconds"

./deploy/install-deps.sh >&2
log "building (release)"
swift build -c release >&2 || die "swift build failed"
bin="$(swift build -c release --show-bin-path)"

work="$(mktemp -d /tmp/ferry-bench.XXXXXX)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount "$work" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
# Room for the volume, the spill file, the replica, its base image and the default 8 GiB journal.
mount -t tmpfs -o size=14G ferry-bench "$work"
mkdir -p "$work/results"
# The bench's images live in its work dir, not under the agents' data dirs: the host allows it.
printf 'protect-allow: ["%s/"]\n' "$work" >"$work/agent.yaml"

wait_for() { # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ "$SECONDS" -lt "$deadline" ] || return 1; sleep 0.2; done
}

ticks() { # CPU time (clock ticks) the given processes have used so far
  local t=0 p
  for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$t"
}

run_fio() { # run_fio URI RW BS OUTPUT [PID...]: also records the CPU seconds the PIDs used
  local uri="$1" rw="$2" bs="$3" out="$4"; shift 4
  local before; before=$(ticks "$@")
  fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --size="$size" --iodepth=16 \
      --time_based --runtime="${runtime}s" --output-format=json --output="$work/results/$out" >&2 \
      || die "fio $rw $bs failed"
  echo "$(( $(ticks "$@") - before )) $(getconf CLK_TCK)" >"$work/results/${out%.json}.cpu"
}

stop_daemons() { # stops the daemons this script started (newest first) and waits for them
  local i
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do kill "${pids[$i]}" 2>/dev/null || true; done
  for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
  pids=()
}

start_site() { # start_site DIR CONFIG HOST...: a controller (with nbd-tls-listen) in DIR and enrolled, online agents
  local d="$1" config="$2" host token; shift 2
  "$bin/ferry-controller" --data-dir "$d/controller" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 \
    --nbd-tls-listen 127.0.0.1:0 >"$d-controller.log" 2>&1 &
  pids+=($!)
  wait_for 30 test -s "$d/controller/ferryctl.env" -a -s "$d/controller/nbd-tls-listen.addr" || die "controller ($d) did not start"
  # shellcheck disable=SC1091
  . "$d/controller/ferryctl.env"
  for host in "$@"; do
    token="$("$bin/ferryctl" token create --host "$host" 2>/dev/null)"
    FERRY_ENROLL_TOKEN="$token" "$bin/ferry-agent" enroll --controller "$(cat "$d/controller/agent-listen.addr")" \
      --data-dir "$d/agent-$host" >/dev/null || die "enroll $host ($d) failed"
    "$bin/ferry-agent" run --data-dir "$d/agent-$host" --config "$config" >"$d-agent-$host.log" 2>&1 &
    pids+=($!)
  done
  for host in "$@"; do
    wait_for 30 sh -c "'$bin/ferryctl' hosts | grep -q '$host .*online'" || die "agent $host ($d) did not come online"
  done
}

protected_all() {
  "$bin/ferryctl" volumes --json | python3 -c '
import json, sys
sys.exit(0 if all(v.get("replicaState") == "protected" for v in json.load(sys.stdin)) else 1)'
}

if want replication; then
  log "baseline: nbdkit file plugin on tmpfs"
  truncate -s "$size" "$work/base.img"
  nbdkit --foreground --unix "$work/nbdkit.sock" file file="$work/base.img" &
  pids+=($!)
  wait_for 10 test -S "$work/nbdkit.sock" || die "nbdkit did not start"
  run_fio "nbd+unix:///?socket=$work/nbdkit.sock" write 1M nbdkit-seq.json "${pids[0]}"
  run_fio "nbd+unix:///?socket=$work/nbdkit.sock" randwrite 4k nbdkit-rand.json "${pids[0]}"
  kill "${pids[0]}"; rm -f "$work/base.img"

  # What the unavoidable work of replication costs on this machine, for the floor table: one
  # core's AES-128-GCM rate (TLS 1.3 here), and tmpfs write rates into new pages (a journal
  # append) and over existing ones (the replica image).
  log "measuring the cost floor: AES-GCM and tmpfs write rates"
  # Each rate is the best of three: a floor is what the machine can do, not what it did once.
  best() { sort -g | tail -n 1; }
  aes="$(for _ in 1 2 3; do openssl speed -evp aes-128-gcm -bytes 16384 -seconds 1 2>/dev/null | awk '/^AES-128-GCM/ {sub(/k$/, "", $2); print $2 * 1000}'; done | best)"
  fresh="$(for _ in 1 2 3; do rm -f "$work/dd.img"; dd if=/dev/zero of="$work/dd.img" bs=1M count=1024 2>&1 | awk '/copied/ {print $1 / $(NF-3)}'; done | best)"
  over="$(for _ in 1 2 3; do dd if=/dev/zero of="$work/dd.img" bs=1M count=1024 conv=notrunc 2>&1 | awk '/copied/ {print $1 / $(NF-3)}'; done | best)"
  rm -f "$work/dd.img"
  # The replica image takes a 4 KiB random write's record where it lands: that costs a system
  # call and a page lookup per 4 KiB, which no sequential rate shows (one core, fio, psync).
  rand4k="$(for _ in 1 2 3; do fio --name=floor4k --filename="$work/floor4k.img" --rw=randwrite --bs=4k --size=256M --ioengine=psync \
      --norandommap --randrepeat=0 --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["jobs"][0]["write"]["bw_bytes"])'; done | best)"
  rm -f "$work/floor4k.img"
  printf 'aes_bytes_per_second %s\ntmpfs_new_bytes_per_second %s\ntmpfs_overwrite_bytes_per_second %s\ntmpfs_random_4k_bytes_per_second %s\ncores %s\n' \
    "$aes" "$fresh" "$over" "$rand4k" "$(nproc)" >"$work/results/floor.txt"

  log "ferry: controller and agent on this machine, replicating"
  # The journal cap is sized for the tmpfs: the 500 MB/s run writes ~30 GB, which the controller
  # folds into the replica's base image as the journal passes 2 GiB (the steady state of a
  # long-running replica, and what its CPU figure includes).
  printf 'replica-journal-max: 2G\n' >"$work/controller.yaml"
  "$bin/ferry-controller" --config "$work/controller.yaml" --data-dir "$work/controller" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 >"$work/controller.log" 2>&1 &
  pids+=($!)
  controller_pid=$!
  wait_for 30 test -f "$work/controller/ferryctl.env" || die "controller did not start"
  # shellcheck disable=SC1091
  . "$work/controller/ferryctl.env"
  token="$("$bin/ferryctl" token create --host bench 2>/dev/null)"
  FERRY_ENROLL_TOKEN="$token" "$bin/ferry-agent" enroll --controller "$(cat "$work/controller/agent-listen.addr")" \
    --data-dir "$work/agent" >/dev/null || die "enroll failed"
  "$bin/ferry-agent" run --data-dir "$work/agent" --config "$work/agent.yaml" >"$work/agent.log" 2>&1 &
  pids+=($!)
  agent_pid=$!
  wait_for 20 sh -c "'$bin/ferryctl' hosts | grep -q 'bench .*online'" || die "agent did not come online"
  "$bin/ferryctl" protect bench --volume bench --path "$work/vol.img" --create-size "$size" >&2 || die "protect failed"
  uri="nbd+unix:///bench?socket=$work/agent/sockets/bench.sock"
  # The change log absorbs what replication has not caught up with yet: a run's CPU is counted
  # until it is all durable on the controller (and any resync after a change-log overflow done).
  caught_up() {
    "$bin/ferryctl" volumes --json | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
sync = v.get("sync") or {"done": True}
sys.exit(0 if v.get("lagBytes") == 0 and v.get("replicaState") == "protected" and sync["done"] else 1)'
  }
  # Twice, two reports apart: a report can lag behind an overflow the agent has just noticed.
  settled() { caught_up && sleep 2.5 && caught_up; }
  agent_run() { # agent_run NAME RW BS [FIO ARGS...]: fio through the agent, then CPU per process until replicated
    local name="$1" rw="$2" bs="$3"; shift 3
    wait_for 300 settled || die "replication had not caught up before the $name run"
    "$bin/ferryctl" metrics >"$work/results/metrics-$name-before.txt"
    local a0 c0 t0 t1; a0=$(ticks "$agent_pid"); c0=$(ticks "$controller_pid"); t0=$SECONDS
    fio --name=bench --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --size="$size" --iodepth=16 \
        --time_based --output-format=json --output="$work/results/agent-$name.json" "$@" >&2 || die "fio $name failed"
    t1=$SECONDS
    wait_for 300 settled || log "WARNING: replication had not caught up 300 s after the $name run"
    "$bin/ferryctl" metrics >"$work/results/metrics-$name-after.txt"
    printf 'agent_ticks %s\ncontroller_ticks %s\nticks_per_second %s\ncatch_up_seconds %s\n' \
      "$(( $(ticks "$agent_pid") - a0 ))" "$(( $(ticks "$controller_pid") - c0 ))" "$(getconf CLK_TCK)" "$((SECONDS - t1))" \
      >"$work/results/agent-$name.proc"
    log "$name: fio $((t1 - t0)) s, replication caught up $((SECONDS - t1)) s after it"
  }
  agent_run seq write 1M --runtime="${runtime}s"
  agent_run rand randwrite 4k --runtime="${runtime}s"
  # Lag at a fixed 500 MB/s (or what this machine reaches under it), for longer: the exact
  # per-record lag histogram the agents report (ferry_volume_write_lag_seconds).
  agent_run lag write 1M --rate=500m --runtime="$lag_runtime"s
  # Peak memory of each daemon over all three runs, and the change log's memory cap it has.
  printf 'agent_hwm_kib %s\ncontroller_hwm_kib %s\nchange_log_memory_bytes %s\n' \
    "$(awk '/^VmHWM/ {print $2}' "/proc/$agent_pid/status")" "$(awk '/^VmHWM/ {print $2}' "/proc/$controller_pid/status")" \
    "$((64 << 20))" >"$work/results/rss.txt"
  if qemu-img compare -q -f raw -F raw "$work/vol.img" "$("$bin/ferryctl" volume show bench/bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicaPath"])')"; then
    log "replica identical to the source after the runs"
  else
    log "WARNING: replica differs from the source after the runs"
    "$bin/ferryctl" volume show bench/bench >&2
  fi
fi

if want disk; then
  # The same 1 MiB sequential run with everything on a real disk (FERRY_BENCH_DISK_DIR): the
  # volume, the agent's change log, the controller's journal and replica. Its floor is the disk's
  # own sequential write rate with an fdatasync every 4 MiB (the controller's group commit),
  # measured first, in the same run.
  stop_daemons
  dd_dir="$(mktemp -d "$disk_dir/ferry-bench-disk.XXXXXX")"
  trap 'rm -rf "$dd_dir"; cleanup' EXIT
  log "real disk: floor (fio write + fdatasync every 4 MiB) in $dd_dir"
  fio --name=floor --filename="$dd_dir/floor.img" --rw=write --bs=1M --size=1G --fdatasync=4 --end_fsync=1 \
      --output-format=json --output="$work/results/disk-floor.json" >&2 || die "fio floor on disk failed"
  rm -f "$dd_dir/floor.img"
  printf 'protect-allow: ["%s/"]\n' "$dd_dir" >"$dd_dir/agent.yaml"
  mkdir -p "$dd_dir/site"
  start_site "$dd_dir/site" "$dd_dir/agent.yaml" disk
  disk_controller="${pids[0]}" disk_agent="${pids[1]}"
  "$bin/ferryctl" protect disk --volume data --path "$dd_dir/vol.img" --create-size "$size" >/dev/null || die "protect on disk failed"
  wait_for 120 protected_all || die "the volume on disk did not become protected"
  a0=$(ticks "$disk_agent"); c0=$(ticks "$disk_controller"); t0=$SECONDS
  fio --name=disk --ioengine=nbd --uri="nbd+unix:///data?socket=$dd_dir/site/agent-disk/sockets/data.sock" --rw=write --bs=1M \
      --size="$size" --iodepth=16 --time_based --runtime="${runtime}s" --output-format=json --output="$work/results/disk-run.json" >&2 \
      || die "fio through the agent on disk failed"
  t1=$SECONDS
  disk_settled() {
    "$bin/ferryctl" volumes --json | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
sync = v.get("sync") or {"done": True}
sys.exit(0 if v.get("lagBytes") == 0 and v.get("replicaState") == "protected" and sync["done"] else 1)'
  }
  wait_for 600 disk_settled || log "WARNING: replication on disk had not caught up 600 s after the run"
  printf 'agent_ticks %s\ncontroller_ticks %s\nticks_per_second %s\nfio_seconds %s\ncatch_up_seconds %s\n' \
    "$(( $(ticks "$disk_agent") - a0 ))" "$(( $(ticks "$disk_controller") - c0 ))" "$(getconf CLK_TCK)" "$((t1 - t0))" "$((SECONDS - t1))" \
    >"$work/results/disk-run.proc"
  log "real disk: fio $((t1 - t0)) s, replication caught up $((SECONDS - t1)) s after it"
  stop_daemons
  rm -rf "$dd_dir"
  trap cleanup EXIT
fi

if want sync; then
  # Initial sync of a volume that already holds data: 4 GiB, every other MiB random (2 GiB of
  # data, 2 GiB of holes), protected from scratch; against nbdcopy of the same file over TLS
  # into nbdkit's memory plugin (both skip the holes), in the same invocation.
  stop_daemons
  s_dir="$work/sync"
  mkdir -p "$s_dir/tls"
  truncate -s 4G "$s_dir/vol.img"
  fio --name=fill --filename="$s_dir/vol.img" --rw=write:1M --bs=1M --size=4G --refill_buffers >/dev/null \
    || die "filling the sync volume failed"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -keyout "$s_dir/tls/server-key.pem" -out "$s_dir/tls/server-cert.pem" 2>/dev/null \
    || die "openssl (sync baseline certificate) failed"
  cp "$s_dir/tls/server-cert.pem" "$s_dir/tls/ca-cert.pem"
  log "initial sync: baseline nbdcopy over TLS into nbdkit's memory plugin"
  # A free port (this nbdkit has no --print-uri).
  port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  nbdkit --foreground --ipaddr 127.0.0.1 --port "$port" --tls=require --tls-certificates="$s_dir/tls" memory 4G 2>"$s_dir/nbdkit.log" &
  pids+=($!)
  wait_for 10 python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)" || die "nbdkit (sync baseline) did not start"
  t0=$(date +%s.%N)
  nbdcopy "$s_dir/vol.img" "nbds://localhost:$port/?tls-certificates=$s_dir/tls" >&2 || die "nbdcopy (sync baseline) failed"
  t1=$(date +%s.%N)
  stop_daemons
  log "initial sync: ferry"
  start_site "$s_dir/site" "$work/agent.yaml" sync
  t2=$(date +%s.%N)
  "$bin/ferryctl" protect sync --volume data --path "$s_dir/vol.img" >/dev/null || die "protect (sync) failed"
  sync_done() {
    "$bin/ferryctl" volumes --json | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
sync = v.get("sync") or {}
sys.exit(0 if v.get("replicaState") == "protected" and sync.get("done") and v.get("lagBytes") == 0 else 1)'
  }
  wait_for 600 sync_done || die "the initial sync did not finish"
  t3=$(date +%s.%N)
  replica="$("$bin/ferryctl" volume show sync/data --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["replicaPath"])')"
  cmp -s "$s_dir/vol.img" "$replica" || die "the replica differs from the volume after the initial sync"
  python3 -c "print('nbdcopy_seconds %.3f' % ($t1 - $t0)); print('ferry_seconds %.3f' % ($t3 - $t2))" >"$work/results/sync.txt"
  log "initial sync: $(tr '\n' ' ' <"$work/results/sync.txt")(replica identical)"
  stop_daemons
  rm -rf "$s_dir"
fi

if want points; then
  # Recovery points, on a fresh controller: the replication runs above leave up to 8 GiB of
  # journal on the tmpfs. Group cuts: a 16-volume group over 4 agents, a point every ~0.2 s while
  # fio writes 4 KiB blocks to one volume of each agent at 4000 IOPS each (16 MiB/s; all of
  # them share this machine's cores with the controller); each point records the longest pause
  # of its members, as the agents measured it.
  log "recovery points: 16-volume group on 4 agents under fio"
  stop_daemons
  rm -rf "$work/controller" "$work/agent" "$work/vol.img"
  "$bin/ferry-controller" --data-dir "$work/points" --listen 127.0.0.1:0 --api-listen 127.0.0.1:0 >"$work/points.log" 2>&1 &
  pids+=($!)
  wait_for 30 test -f "$work/points/ferryctl.env" || die "controller did not start"
  # shellcheck disable=SC1091
  . "$work/points/ferryctl.env"
  members=()
  for host in cut1 cut2 cut3 cut4; do
    token="$("$bin/ferryctl" token create --host "$host" 2>/dev/null)"
    FERRY_ENROLL_TOKEN="$token" "$bin/ferry-agent" enroll --controller "$(cat "$work/points/agent-listen.addr")" \
      --data-dir "$work/agent-$host" >/dev/null || die "enroll $host failed"
    "$bin/ferry-agent" run --data-dir "$work/agent-$host" --config "$work/agent.yaml" >"$work/agent-$host.log" 2>&1 &
    pids+=($!)
    wait_for 20 sh -c "'$bin/ferryctl' hosts | grep -q '$host .*online'" || die "agent $host did not come online"
    for v in 1 2 3 4; do
      "$bin/ferryctl" protect "$host" --volume "g$v" --path "$work/$host-g$v.img" --create-size 256M >/dev/null || die "protect $host/g$v failed"
      members+=(--volume "$host/g$v")
    done
  done
  wait_for 120 protected_all || die "the group's volumes did not become protected"
  "$bin/ferryctl" group create bench16 "${members[@]}" --crash-interval 0 --app-interval 0 >/dev/null || die "group create failed"
  cut_uris=()
  for host in cut1 cut2 cut3 cut4; do
    cut_uris+=("--name=$host" "--uri=nbd+unix:///g1?socket=$work/agent-$host/sockets/g1.sock")
  done
  cut_run() { # cut_run NAME [FIO ARGS...]: a point every ~0.2 s while fio writes to g1 of each agent;
    # writes results/cuts-NAME.txt (each new point's longest pause, and the rounds aborted)
    local name="$1"; shift
    local seen aborted=0 fio_pid
    seen="$("$bin/ferryctl" points bench16 --json | python3 -c 'import json, sys; print(" ".join(p["id"] for p in json.load(sys.stdin)))')"
    fio --ioengine=nbd --rw=randwrite --bs=4k --size=256M --iodepth=16 --time_based --runtime="${runtime}s" "$@" \
        "${cut_uris[@]}" --output="$work/results/cut-fio-$name.txt" >&2 &
    fio_pid=$!
    sleep 2
    : >"$work/results/cut-errors-$name.txt"
    while kill -0 "$fio_pid" 2>/dev/null; do
      "$bin/ferryctl" point create bench16 >/dev/null 2>>"$work/results/cut-errors-$name.txt" || aborted=$((aborted + 1))
      sleep 0.2
    done
    grep -h 'aborted' "$work/results/cut-errors-$name.txt" | sed "s/^/bench.sh: $name: /" | sort | uniq -c | sort -rn | head -5 >&2 || true
    wait "$fio_pid" || die "fio under cuts ($name) failed"
    "$bin/ferryctl" points bench16 --json | SEEN="$seen" python3 -c '
import json, os, sys
seen = set(os.environ["SEEN"].split())
for p in json.load(sys.stdin):
    if p["id"] not in seen and p.get("pauseMicros") is not None: print("pause_micros", p["pauseMicros"])' >"$work/results/cuts-$name.txt"
    echo "aborted $aborted" >>"$work/results/cuts-$name.txt"
  }
  cut_run paced --rate_iops=4000
  # The same cuts while fio writes as fast as it can: the data path is saturated, and cut
  # control must not queue behind replication data.
  log "recovery points: the same group under saturating fio"
  cut_run saturated

  # A point-in-time export of a 10 GiB volume: from the command to the first read answered.
  log "recovery points: export of a 10 GiB volume at a point"
  "$bin/ferryctl" protect cut1 --volume big --path "$work/big.img" --create-size 10G >/dev/null || die "protect big failed"
  wait_for 300 protected_all || die "the 10 GiB volume did not become protected"
  fio --name=big --ioengine=nbd --uri="nbd+unix:///big?socket=$work/agent-cut1/sockets/big.sock" --rw=randwrite --bs=64k \
      --size=10G --io_size=512M --iodepth=16 >&2 || die "fio on the 10 GiB volume failed"
  "$bin/ferryctl" group create big --volume cut1/big --crash-interval 0 --app-interval 0 >/dev/null || die "group create big failed"
  point="$("$bin/ferryctl" point create big)" || die "point create big failed"
  point_complete() {
    "$bin/ferryctl" points big --json | python3 -c 'import json, sys; sys.exit(0 if all(p["complete"] for p in json.load(sys.stdin)) else 1)'
  }
  wait_for 120 point_complete || die "the point of the 10 GiB volume never completed"
  python3 - "$bin/ferryctl" "$point" >"$work/results/export.txt" <<'PY' || die "export timing failed"
import json, subprocess, sys, time
ctl, point = sys.argv[1], sys.argv[2]
start = time.monotonic()
export = json.loads(subprocess.run([ctl, "volume", "export", "cut1/big", "--point", point, "--json"],
                                   check=True, capture_output=True, text=True).stdout)
subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", export["uri"]], check=True, capture_output=True)
print("first_read_ms", (time.monotonic() - start) * 1000)
print("open_ms", export["openMilliseconds"])
PY

  # The same volume after 2 GiB more of 8 KiB random writes (about 260 000 journal records,
  # over its first 256 MiB so that the tmpfs holds the volume's file and the journal):
  # opening a point image starts from the journal's index at a sealed segment (refreshed in
  # the background, and left by each open) and walks only what follows it, so its cost must
  # not follow the journal's length. First open and best of three, against the open above.
  log "recovery points: export at a point after 2 GiB more of journal"
  fio --name=journal --ioengine=nbd --uri="nbd+unix:///big?socket=$work/agent-cut1/sockets/big.sock" --rw=randwrite --bs=8k \
      --size=256M --io_size=2G --iodepth=16 >&2 || die "fio (2 GiB of journal) failed"
  point="$("$bin/ferryctl" point create big)" || die "point create big failed"
  wait_for 120 point_complete || die "the point after 2 GiB of journal never completed"
  python3 - "$bin/ferryctl" "$point" >>"$work/results/export.txt" <<'PY' || die "export timing failed"
import json, subprocess, sys
ctl, point = sys.argv[1], sys.argv[2]
opens = []
for _ in range(3):
    export = json.loads(subprocess.run([ctl, "volume", "export", "cut1/big", "--point", point, "--json"],
                                       check=True, capture_output=True, text=True).stdout)
    opens.append(export["openMilliseconds"])
    subprocess.run([ctl, "export", "remove", export["id"]], check=True, capture_output=True)
print("journal_first_open_ms", opens[0])
print("journal_best_open_ms", min(opens))
PY
fi

if want rto; then
  # Recovery time (RTO), on a fresh controller per volume size: a plan of three groups (db: db1
  # and db2; app: app1; web: web1), each source agent protecting 4 sparse volumes (16 in all),
  # recovered onto 2 recovery agents whose start and stop hooks do nothing ("true"), so that
  # Ferry's own work is measured. The controller reports each job's RTO: from the command (the
  # job's creation) to the last start hook done; the wall time of the whole ferryctl command is
  # measured here too (ferryctl, off a terminal, polls the job every 500 ms, so that wall time
  # is RTO rounded up to the poll). Drills leave production untouched and repeat; an unplanned
  # failover fences the sources, so it runs once per size, last. The volumes hold no workload
  # writes: this measures the orchestration (point images and overlays, NBD+TLS connections from
  # the recovery hosts, hooks), which must not grow with volume size. After each run every
  # recovered volume is read once through its recovery host's socket.
  log "recovery time: 3-group plan of 16 volumes at $rto_sizes per volume"
  rto_start=$SECONDS
  stop_daemons
  rm -rf "$work/points" "$work"/agent-* "$work"/*.img
  : >"$work/results/rto.txt"
  echo "drills $rto_drills" >>"$work/results/rto.txt"
  printf 'hooks:\n  start: "true"\n  stop: "true"\nprotect-allow: ["%s/"]\n' "$work" >"$work/rto-hooks.yaml"
  cat >"$work/rto-plan.yaml" <<'YAML'
name: bench
description: three groups, 16 volumes, hooks that do nothing
groups:
  - name: db
    items:
      - host: db1
        recovery-host: rec1
        start-hook: start
        stop-hook: stop
        timeout: 60s
      - host: db2
        recovery-host: rec2
        start-hook: start
        stop-hook: stop
        timeout: 60s
  - name: app
    items:
      - host: app1
        recovery-host: rec1
        start-hook: start
        stop-hook: stop
        timeout: 60s
  - name: web
    items:
      - host: web1
        recovery-host: rec2
        start-hook: start
        stop-hook: stop
        timeout: 60s
YAML
  synced_all() { # all 16 replicas protected, initial syncs done
    "$bin/ferryctl" volumes --json | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if len(v) == 16 and all(x.get("replicaState") == "protected" and (x.get("sync") or {"done": True})["done"] for x in v) else 1)'
  }
  for rsize in $rto_sizes; do
    d="$work/rto-$rsize"
    mkdir -p "$d"
    start_site "$d" "$work/rto-hooks.yaml" db1 db2 app1 web1 rec1 rec2
    for host in db1 db2 app1 web1; do
      mkdir -p "$d/volumes-$host"
      for v in 1 2 3 4; do
        "$bin/ferryctl" protect "$host" --volume "v$v" --path "$d/volumes-$host/v$v.img" --create-size "$rsize" >/dev/null \
          || die "protect $host/v$v ($rsize) failed"
      done
    done
    start=$SECONDS
    wait_for 600 synced_all || die "the 16 volumes of $rsize did not all become protected in 600 s"
    log "$rsize: 16 volumes protected (initial syncs done) $((SECONDS - start)) s after protect"
    echo "sync $rsize $((SECONDS - start))" >>"$work/results/rto.txt"
    "$bin/ferryctl" plan apply -f "$work/rto-plan.yaml" >/dev/null || die "plan apply ($rsize) failed"
    python3 - "$bin/ferryctl" "$rsize" "$rto_drills" "$rto_failover" "$work/results" "$d" >>"$work/results/rto.txt" <<'PY' \
      || die "recovery time ($rsize) failed"
import json, subprocess, sys, time
ctl, size, drills, failover, results, d = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5], sys.argv[6]
recovery_host = {"db1": "rec1", "db2": "rec2", "app1": "rec1", "web1": "rec2"}

def job(name, *args):
    """Runs a ferryctl job command to its end; returns the job and the command's wall time."""
    start = time.monotonic()
    r = subprocess.run([ctl, *args, "--json"], capture_output=True, text=True, timeout=600)
    wall = time.monotonic() - start
    try:
        j = json.loads(r.stdout)
    except ValueError:
        sys.exit(f"bench.sh: ferryctl {' '.join(args)}: exit {r.returncode}, no job: {r.stderr.strip()}")
    with open(f"{results}/rto-{size}-{name}.json", "w") as f:
        json.dump(j, f, indent=1)
    if j.get("state") != "succeeded":
        sys.exit(f"bench.sh: ferryctl {' '.join(args)}: job {j.get('state')}: {j.get('error')}")
    return j, wall

def check_recovered():
    """After the measurement: every one of the 16 volumes answers a read on its recovery host."""
    for host, rec in recovery_host.items():
        for v in range(1, 5):
            name = f"{host}-v{v}"
            uri = f"nbd+unix:///{name}?socket={d}/agent-{rec}/sockets/recovered-{name}.sock"
            r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0 0 4k", uri], capture_output=True, text=True, timeout=60)
            if r.returncode != 0 or "failed" in r.stdout + r.stderr:
                sys.exit(f"bench.sh: recovered {name} on {rec} does not read back: {(r.stdout + r.stderr).strip()}")

for i in range(1, drills + 1):
    j, wall = job(f"drill{i}", "drill", "bench", "--point", "latest")
    rto = float(j["report"]["rto_seconds"])
    print(f"drill_rto {size} {rto:.3f}")
    print(f"drill_wall {size} {wall:.3f}")
    check_recovered()
    print(f"bench.sh: {size} drill {i}: RTO {rto:.3f} s, ferryctl drill {wall:.3f} s; 16 recovered volumes read back", file=sys.stderr)
    j, wall = job(f"cleanup{i}", "drill", "cleanup", "bench")
    print(f"bench.sh: {size} drill cleanup {i}: {wall:.3f} s", file=sys.stderr)
if failover:
    j, wall = job("failover", "failover", "bench", "--point", "latest")
    rto = float(j["report"]["rto_seconds"])
    print(f"failover_rto {size} {rto:.3f}")
    print(f"failover_wall {size} {wall:.3f}")
    check_recovered()
    print(f"bench.sh: {size} unplanned failover: RTO {rto:.3f} s, ferryctl failover {wall:.3f} s; 16 recovered volumes read back", file=sys.stderr)
PY
    stop_daemons
    rm -rf "$d"
  done
  log "recovery time: done in $((SECONDS - rto_start)) s"
fi

if want hydration; then
  # Hydration of a half-full point (data in every other 512 MiB) onto a recovery host's file by
  # a failover that lands there (--hydrate), vs nbdcopy of the same point export over NBD+TLS
  # into a file on the same file system (libnbd, block status, multi-conn), both with the
  # recovery host's certificate. Then fio through the landed volume (rec1's protected volume:
  # captured and replicated like the source) against the source agent's export (run before the
  # failover fences it), with the figures of a plain drill (served from the controller) beside
  # them. On disk: the copies of the data do not fit in memory.
  log "hydration: a $hydrate_size half-full point"
  hyd_start=$SECONDS
  stop_daemons
  hyd_dir="$(mktemp -d /var/tmp/ferry-bench-hydrate.XXXXXX)"
  trap 'cleanup; rm -rf "$hyd_dir"' EXIT
  printf 'protect-allow: ["%s/"]\n' "$hyd_dir" >"$hyd_dir/agent.yaml"
  h="$hyd_dir/site"
  mkdir -p "$h"
  start_site "$h" "$hyd_dir/agent.yaml" db rec1
  python3 - "$h/source.img" "$hydrate_size" <<'PY' || die "cannot write the source image"
import os, sys
path, size = sys.argv[1], sys.argv[2]
units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
total = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
block = os.urandom(1 << 20)
with open(path, "wb") as f:
    f.truncate(total)
    for start in range(0, total, 1 << 30):          # 512 MiB of data in every GiB
        f.seek(start)
        for _ in range(min(512, (total - start) >> 20)):
            f.write(block)
PY
  "$bin/ferryctl" protect db --volume data --path "$h/source.img" >/dev/null || die "protect (hydration) failed"
  start=$SECONDS
  wait_for 1800 sh -c "'$bin/ferryctl' volume show db/data --json | python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v.get(\"replicaState\")==\"protected\" and (v.get(\"sync\") or {\"done\": True})[\"done\"] else 1)'" \
    || die "db/data did not become protected"
  log "hydration: source protected (initial sync) in $((SECONDS - start)) s"
  "$bin/ferryctl" group create bench --volume db/data --crash-interval 0 --app-interval 0 >/dev/null
  printf 'name: bench\ngroups:\n  - name: db\n    items:\n      - host: db\n        recovery-host: rec1\n        targets:\n          data: %s\n' \
    "$h/target.img" >"$h/plan.yaml"
  "$bin/ferryctl" plan apply -f "$h/plan.yaml" >/dev/null || die "plan apply (hydration) failed"
  uri_src="nbd+unix:///data?socket=$h/agent-db/sockets/data.sock"
  replica_caught_up() { # replica_caught_up HOST/VOLUME: protected, every captured write durable
    wait_for 600 sh -c "'$bin/ferryctl' volume show $1 --json | python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v.get(\"replicaState\")==\"protected\" and (v.get(\"sync\") or {\"done\": True})[\"done\"] and v.get(\"durableSequence\")==v.get(\"lastSequence\") else 1)'" \
      || die "$1's replica did not catch up"
  }
  hyd_fio() { # hyd_fio URI RW BS OUT
    fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --size=1G --iodepth=16 --time_based \
      --runtime="${FERRY_BENCH_HYDRATE_RUNTIME:-10}s" --output-format=json --output="$work/results/$4" >&2 || die "fio $2 $3 ($4) failed"
  }
  # Served from the controller (a plain drill): the figures hydration is to beat.
  uri_drill="nbd+unix:///db-data?socket=$h/agent-rec1/sockets/recovered-db-data.sock"
  "$bin/ferryctl" drill bench --point latest --json >"$work/results/hydrate-served-drill.json" || die "drill (served) failed"
  for w in "randread 4k rr" "randwrite 4k rw" "write 1M sw"; do
    set -- $w
    hyd_fio "$uri_drill" "$1" "$2" "hydrate-served-$3.json"
  done
  "$bin/ferryctl" drill cleanup bench --json >/dev/null || die "drill cleanup (hydration) failed"
  # The source export, twice each (the better kept, as for the landed volume below), each run
  # from a caught-up replica: a run that starts with the change log full of the last one's
  # writes (or overflowed, replicating marks instead of writes) measures something else.
  for w in "randread 4k rr" "randwrite 4k rw" "write 1M sw"; do
    set -- $w
    replica_caught_up db/data
    hyd_fio "$uri_src" "$1" "$2" "hydrate-source-$3-a.json"
    replica_caught_up db/data
    hyd_fio "$uri_src" "$1" "$2" "hydrate-source-$3-b.json"
  done
  # The point the failover lands, cut now (the source's fio runs above would push an older
  # one out of a small journal), and the baseline copy of it. (A busy agent can miss a cut's
  # hold budget: the cut aborts, and is tried again.)
  replica_caught_up db/data
  point=""
  for _ in 1 2 3 4 5; do
    point="$("$bin/ferryctl" point create bench)" && break
    sleep 1
  done
  [ -n "$point" ] || die "no point of group bench could be cut"
  replica_caught_up db/data # the point complete: every write it holds durable here
  # The baseline: nbdcopy of the point, over TLS with rec1's certificate, into a file.
  export_id="$("$bin/ferryctl" volume export db/data --point "$point" --for rec1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')"
  mkdir -p "$h/tls"
  cp "$h/agent-rec1/ca.pem" "$h/tls/ca-cert.pem"; cp "$h/agent-rec1/agent.pem" "$h/tls/client-cert.pem"; cp "$h/agent-rec1/agent.key" "$h/tls/client-key.pem"
  sync; echo 1 >/proc/sys/vm/drop_caches || true
  t0=$(date +%s.%N)
  nbdcopy "nbds://$(cat "$h/controller/nbd-tls-listen.addr")/$export_id?tls-certificates=$h/tls" "$h/nbdcopy.img" >&2 || die "nbdcopy failed"
  sync
  t1=$(date +%s.%N)
  "$bin/ferryctl" export remove "$export_id" >/dev/null 2>&1 || true
  # The point's bytes, to check the landed target against (the source changes below).
  point_sum="$(md5sum <"$h/nbdcopy.img")"
  rm -f "$h/nbdcopy.img"
  sync; echo 1 >/proc/sys/vm/drop_caches || true
  # Hydration: from the failover command until every block is on the target (synced).
  t2=$(date +%s.%N)
  "$bin/ferryctl" failover bench --point "$point" --hydrate --json >"$work/results/hydrate-failover.json" ||
    die "failover --hydrate failed: $(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j.get("error"))' "$work/results/hydrate-failover.json" 2>&1)"
  wait_for 3600 sh -c "'$bin/ferryctl' plan show bench --json | python3 -c 'import json,sys; h=(json.load(sys.stdin).get(\"hydration\") or [{}])[0]; sys.exit(0 if h.get(\"complete\") else 1)'" \
    || die "hydration did not complete"
  t3=$(date +%s.%N)
  sleep 1.5 # the recovery host's last report, with the copy's final duration
  "$bin/ferryctl" plan show bench --json >"$work/results/hydrate-plan.json"
  [ "$(md5sum <"$h/target.img")" = "$point_sum" ] || die "the hydrated target differs from the point"
  # The landed volume's own replica (built on the controller from the point, then streamed to)
  # caught up: the steady state the fio runs below measure.
  wait_for 1800 sh -c "'$bin/ferryctl' volume show rec1/db-data --json | python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v.get(\"replicaState\")==\"protected\" and v.get(\"durableSequence\")==v.get(\"lastSequence\") else 1)'" \
    || die "rec1/db-data's replica did not catch up"
  t4=$(date +%s.%N)
  seeded="$(grep "replica built from its failover point" "$h-controller.log" | sed -n 's/.*seconds=\([0-9.]*\).*/\1/p' | head -n 1)"
  uri_rec="nbd+unix:///db-data?socket=$h/agent-rec1/sockets/db-data.sock"
  for w in "randread 4k rr" "randwrite 4k rw" "write 1M sw"; do
    set -- $w
    replica_caught_up rec1/db-data
    hyd_fio "$uri_rec" "$1" "$2" "hydrate-local-$3-a.json"
    replica_caught_up rec1/db-data
    hyd_fio "$uri_rec" "$1" "$2" "hydrate-local-$3-b.json"
  done
  # Each run's figures, not only the better one's (the table keeps the better).
  for f in "$work"/results/hydrate-{source,local}-*.json; do
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(sys.argv[1].rsplit("/",1)[1], "read %.0f IOPS" % j["read"]["iops"], "write %.0f IOPS %.0f MiB/s" % (j["write"]["iops"], j["write"]["bw_bytes"] / 1048576))' "$f" >&2
  done
  python3 - "$t0" "$t1" "$t2" "$t3" "$hydrate_size" "$work/results" "$t4" "${seeded:-}" >"$work/results/hydration.txt" <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5])
t4, seeded = float(sys.argv[7]), sys.argv[8]
plan = json.load(open(sys.argv[6] + "/hydrate-plan.json"))
h = plan["hydration"][0]
failover = json.load(open(sys.argv[6] + "/hydrate-failover.json"))
print(f"nbdcopy_seconds {t1 - t0:.3f}")
print(f"hydrate_total_seconds {t3 - t2:.3f}")
print(f"hydrate_seconds {h.get('copySeconds') or (t3 - t2):.3f}")
print(f"size_bytes {h['sizeBytes']}")
print(f"fetched_bytes {h['fetchedBytes']}")
print(f"failover_rto_seconds {float(failover['report']['rto_seconds']):.3f}")
print(f"landed_replica_caught_up_seconds {t4 - t2:.3f}")
if seeded:
    print(f"seed_seconds {float(seeded):.3f}")
PY
  stop_daemons
  rm -rf "$hyd_dir"
  log "hydration: done in $((SECONDS - hyd_start)) s"
fi

if want wan; then
  # WAN mode, in the lab (deploy/lab): the controller in the secondary site, one agent in the
  # primary, the inter-site link shaped to 100 Mbit/s each way (tbf). fio writes 64 KiB random
  # blocks at 16 MB/s (128 Mbit/s, more than the link carries) for 30 s: database-like data
  # (fio's buffers half compressible) and random data, each with compression off and lz4. Per run:
  # the per-record lag (the agent's histogram), bytes on the wire and once decompressed (the
  # controller's counters), the agent's compression CPU and how long the backlog took to drain.
  log "WAN: lab with a 100 Mbit/s inter-site link"
  stop_daemons
  lab=(bash ./deploy/lab/lab.sh --prefix fbw)
  "${lab[@]}" down >/dev/null 2>&1 || true
  "${lab[@]}" up >&2 || die "lab up failed"
  wan_down() { "${lab[@]}" down >/dev/null 2>&1 || true; }
  trap 'wan_down; cleanup' EXIT
  w="$work/wan"
  mkdir -p "$w"
  ctl_addr="$("${lab[@]}" addr ctl)"
  "${lab[@]}" exec ctl -- "$bin/ferry-controller" --data-dir "$w/controller" --listen "$ctl_addr:7443" \
    --api-listen 127.0.0.1:0 >"$w-controller.log" 2>&1 &
  pids+=($!)
  wait_for 30 test -s "$w/controller/ferryctl.env" || die "WAN: controller did not start"
  # shellcheck disable=SC1091
  . "$w/controller/ferryctl.env"
  ctl() { "${lab[@]}" exec ctl -- "$bin/ferryctl" "$@"; }
  token="$(ctl token create --host db 2>/dev/null)"
  FERRY_ENROLL_TOKEN="$token" "${lab[@]}" exec db -- "$bin/ferry-agent" enroll --controller "$ctl_addr:7443" \
    --data-dir "$w/agent-db" >/dev/null || die "WAN: enroll failed"
  "${lab[@]}" exec db -- "$bin/ferry-agent" run --data-dir "$w/agent-db" --config "$work/agent.yaml" >"$w-agent.log" 2>&1 &
  pids+=($!)
  wan_agent=$!
  db_online() { ctl hosts | grep -q 'db .*online'; }
  wait_for 30 db_online || die "WAN: agent did not come online"
  ctl protect db --volume data --path "$w/data.img" --create-size 2G >/dev/null || die "WAN: protect failed"
  wan_settled() {
    ctl volumes --json | python3 -c '
import json, sys
v = json.load(sys.stdin)[0]
sync = v.get("sync") or {"done": True}
sys.exit(0 if v.get("lagBytes") == 0 and v.get("replicaState") == "protected" and sync["done"] else 1)'
  }
  wait_for 120 wan_settled || die "WAN: the volume did not become protected"
  "${lab[@]}" shape 100mbit >&2 || die "WAN: shaping the link failed"
  wan_uri="nbd+unix:///data?socket=$w/agent-db/sockets/data.sock"
  wan_run() { # wan_run NAME COMPRESSION [FIO ARGS...]
    local name="$1" compression="$2"; shift 2
    ctl wan set --compression "$compression" >/dev/null || die "WAN: wan set failed"
    wait_for 300 wan_settled || die "WAN: not caught up before $name"
    sleep 2.5
    ctl metrics >"$work/results/metrics-wan-$name-before.txt"
    local a0 t0 t1; a0=$(ticks "$wan_agent"); t0=$SECONDS
    fio --name=wan --ioengine=nbd --uri="$wan_uri" --rw=randwrite --bs=64k --size=2G --iodepth=8 --rate=16m \
        --time_based --runtime="${wan_runtime}s" --output-format=json --output="$work/results/wan-$name.json" "$@" >&2 \
        || die "WAN: fio $name failed"
    t1=$SECONDS
    wait_for 600 wan_settled || log "WARNING: WAN $name had not caught up 600 s after fio"
    sleep 2.5
    ctl metrics >"$work/results/metrics-wan-$name-after.txt"
    printf 'agent_ticks %s\nticks_per_second %s\ncatch_up_seconds %s\ncompression %s\n' \
      "$(( $(ticks "$wan_agent") - a0 ))" "$(getconf CLK_TCK)" "$((SECONDS - t1))" "$([ "$compression" = lz4 ] && echo 1 || echo 0)" \
      >"$work/results/wan-$name.proc"
    log "WAN $name: fio $((t1 - t0)) s, caught up $((SECONDS - t1)) s after it"
  }
  wan_run db-none none --buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers
  wan_run db-lz4 lz4 --buffer_compress_percentage=50 --buffer_compress_chunk=4k --refill_buffers
  wan_run random-none none --refill_buffers
  wan_run random-lz4 lz4 --refill_buffers
  stop_daemons
  wan_down
  trap cleanup EXIT
fi

if want scale; then
  # Many idle agents on one controller: the scale test (Tests/FerryTests/EndToEnd/ScaleTests.swift),
  # its agents in-process sessions of the test build (the same code as ferry-agent run), against
  # this build's release controller and ferryctl (FERRY_BIN_DIR), with 5 s heartbeats. It writes
  # the time from the sessions' start to all online, and the controller's CPU over an idle
  # window once they are, and its RSS at the window's end.
  log "scale: $scale_agents idle agents on one controller, ${scale_idle} s idle window"
  scale_start=$SECONDS
  stop_daemons
  swift build --build-tests >&2 || die "swift build --build-tests (for the scale test) failed"
  FERRY_BIN_DIR="$bin" FERRY_SCALE_AGENTS="$scale_agents" FERRY_SCALE_IDLE_SECONDS="$scale_idle" \
    FERRY_SCALE_RESULTS="$work/results/scale.txt" swift test --skip-build --filter ScaleTests >"$work/scale-test.log" 2>&1 \
    || { tail -n 40 "$work/scale-test.log" >&2; die "the scale test failed"; }
  grep '^scale:' "$work/scale-test.log" | sed 's/^/bench.sh: /' >&2 || true
  log "scale: done in $((SECONDS - scale_start)) s"
fi

echo
if want replication; then
  echo "Ferry benchmark: ${size} volume, ${runtime} s per run, iodepth 16, volumes and journal on tmpfs"
fi
"$bin/ferry-bench" --results "$work/results"
