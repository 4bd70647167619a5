#!/usr/bin/env bash
# A virtual machine protected by Ferry in the multi-host lab: a qemu guest (deploy/lab/vm/)
# whose disk is db's Ferry export, committing records to ext4 and saying so on its serial
# console, is drilled, failed over (planned) and failed back, and checked each time:
#
#   setup      lab up; controller in ctl; agents db and rec1, each with the hooks vm-start and
#              vm-stop (deploy/lab/vm/vm-hook.py, configured in the agent's own file); db/vm
#              (64 MiB, ext4) protected; the guest boots on db (2 CPUs, 192 MiB, MAC
#              52:54:00:00:00:32) on the production network and commits records; db's agent
#              records its shape (inventory); group shop, plan shop: db -> rec1, networks
#              prod -> dr, drill network "drill"
#   drill      a group point P after K commits on db's console; drill at P: rec1's start hook
#              boots the same guest (shape from the recorded inventory, not rec1's) from the
#              recovered export on the isolated test network with production's address; it
#              finds every record 1..K (and none damaged) and reaches nothing (production's
#              gateway, db, the DR site); P's image passes e2fsck after its journal replay;
#              production went on; cleanup stops the drilled guest
#   failover   planned: db's stop hook shuts the guest down cleanly (its last commit L); rec1
#              boots it on the DR network with a DR address: it holds exactly 1..L (zero loss),
#              reaches the DR site and goes on committing
#   failback   reprotect; failback: rec1's stop hook shuts it down (last commit L2), db boots
#              it again at home (shape from FERRY_GUESTS): it holds exactly 1..L2, reaches
#              production; stopped cleanly, db's volume passes e2fsck -fn
#
# Prints a timeline with each boot's time and exits 0 only if every check passed. A trap tears
# everything down (guests, daemons, the lab) on any exit. Run as root. See deploy/lab/README.md.
#
#   bash deploy/lab/vm-cycle.sh [--prefix P]       # default prefix fvm$RANDOM
#
# Environment:
#   FERRY_BIN=DIR          ferry-controller, ferry-agent, ferryctl (default: the debug build)
#   FERRY_LAB_GUEST=DIR    where the guest's kernel and initramfs are built and kept
#                          (default /var/tmp/ferry-lab-guest; built on first use)
#   FERRY_VM_KEEP=1        keep the work dir after a passing run
#   FERRY_VM_TIMEOUT=120   seconds to wait for each thing before failing
set -Eeuo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
VM="$here/vm/vm.sh"
PREFIX=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?--prefix needs a value}"; shift 2 ;;
    -h|--help) sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "vm-cycle.sh: unknown argument '$1' (--help)" >&2; exit 2 ;;
  esac
done
PREFIX="${PREFIX:-fvm$RANDOM}"
TIMEOUT="${FERRY_VM_TIMEOUT:-120}"
GUEST="${FERRY_LAB_GUEST:-/var/tmp/ferry-lab-guest}"
SRC_BIN="${FERRY_BIN:-$root/.build/x86_64-unknown-linux-gnu/debug}"
case "$SRC_BIN" in /*) ;; *) SRC_BIN="$(cd "$SRC_BIN" && pwd)" ;; esac
SCRIPT=vm-cycle.sh
LAB_TOOLS=(qemu-system-x86_64 e2fsck mkfs.ext4)
LAB_KEEP="${FERRY_VM_KEEP:-}"
TL_TIME="BOOT (s)"
. "$here/lib.sh"
mkdir -p "$work/volumes/db" "$work/vms/db" "$work/vms/rec1"
CLEAN_ENV+=("FERRY_LAB_GUEST=$GUEST")
lab_stop_workloads() {  # every guest of this run, by its state dir
  local s
  for s in "$work"/vms/*/*/; do [ -s "$s/qemu.pid" ] && "$VM" kill --state "$s" >/dev/null 2>&1; done
  return 0
}
lab_failure_logs() {
  local c; for c in "$work"/vms/*/*/console.log; do [ -e "$c" ] && { printf '\n----- %s\n' "$c"; tr -d '\r' <"$c" | grep FERRY | grep -v COMMIT | tail -n 12; }; done
  return 0
}

# The guests' consoles. console FILE: the lines of the guest's last boot in it.
console() { tr -d '\r' <"$1" | awk '/FERRY BOOTED/ { n = NR } { line[NR] = $0 } END { for (i = n; i <= NR; i++) print line[i] }' | grep '^FERRY '; }
commits() { console "$1" | awk '$2 == "COMMIT" { n = $3 } END { print n + 0 }'; }
field() { console "$1" | awk -v k="$2" '$2 == "RECORDS" { for (i = 3; i <= NF; i++) { split($i, a, "="); if (a[1] == k) print a[2] } }' | tail -n 1; }
has() { console "$1" | grep -q "$2"; }
latest_run() { "$PY" -c 'import json, sys; print([json.loads(l)["state"] for l in open(sys.argv[1])][-1])' "$work/vms/$1/runs.log"; }
# boot_time STATE: from the hook starting qemu to the guest's init saying BOOTED, in seconds
# (measured here on the console log's growth, 0.1 s resolution).
wait_boot() {  # wait_boot STATE: sets BOOT to the seconds from qemu's start to "BOOTED"
  local state="$1" t0 deadline=$((SECONDS + TIMEOUT))
  t0="$(awk '/ start / { t = $1 } END { print t }' "$state/events")"
  until [ -e "$state/console.log" ] && has "$state/console.log" "FERRY BOOTED"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the guest in $state did not boot in ${TIMEOUT}s"
    sleep 0.1
  done
  BOOT="$(awk -v a="$t0" -v b="${EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }')"
}
wait_records() {  # wait_records STATE: the guest's RECORDS line
  local deadline=$((SECONDS + TIMEOUT))
  until has "$1/console.log" "FERRY RECORDS"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "the guest in $1 never reported its records"
    sleep 0.2
  done
}
# exactly STATE L WHAT: the guest booted from STATE holds records 1..L, every one intact (zero loss).
exactly() {
  wait_records "$1"
  local last count bad
  last="$(field "$1/console.log" last)" count="$(field "$1/console.log" count)" bad="$(field "$1/console.log" bad)"
  [ "$bad" = 0 ] && [ "$count" = "$last" ] && [ "$last" = "$2" ] ||
    fail "after $3 the guest holds count=$count last=$last bad=$bad; zero loss means exactly 1..$2"
}
# fsck_point P: the point's image, exported and copied, passes e2fsck after its journal replay.
fsck_point() {
  local img="$work/check/$1.img"
  fctl volume export db/vm --point "$1" --out "$img" --force >/dev/null || fail "export of point $1 failed"
  fsck_image "$img" "point $1"
}

# ---------------------------------------------------------------------------------------------
say "Ferry VM cycle in the lab: prefix $PREFIX, work dir $work"
t0="$(now_us)"
"$here/vm/guest.sh" build "$GUEST" >"$work/logs/guest.log" 2>&1 || { cat "$work/logs/guest.log" >&4; fail "building the guest failed"; }
ACCEL="$("$VM" accel --guest "$GUEST")"
info "guest: $(cat "$GUEST/kernel-version") kernel, busybox initramfs, in $GUEST; accelerator $ACCEL"

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

# The lab's networks, as the hooks attach guests to them: each one's bridge is br0 of a namespace.
for h in db rec1; do
  cat >"$work/lab-vm-$h.json" <<JSON
{"guest": "$GUEST", "state": "$work/vms/$h", "home": "prod",
 "networks": {"prod": {"netns": "$PREFIX-prim", "cidr": "10.91.1.0/24", "gateway": "10.91.1.1"},
              "dr": {"netns": "$PREFIX-sec", "cidr": "10.91.2.0/24", "gateway": "10.91.2.1"},
              "drill": {"netns": "$PREFIX-test", "cidr": "10.91.4.0/24", "gateway": "10.91.4.1"}},
 "probe": ["10.91.1.1", "10.91.1.11", "10.91.2.1"]}
JSON
  cat >"$work/agent-$h.yaml" <<YAML
hooks:
  vm-start: "$PY $here/vm/vm-hook.py start --lab $work/lab-vm-$h.json"
  vm-stop: "$PY $here/vm/vm-hook.py stop --lab $work/lab-vm-$h.json"
protect-allow: ["$work/volumes/$h/", "$work/agents/$h/volumes/"]
YAML
  tok="$(fctl token create --host "$h" --ttl 10m 2>/dev/null)" || fail "token for $h"
  inns "$h" "${CLEAN_ENV[@]}" "FERRY_ENROLL_TOKEN=$tok" "$BIN/ferry-agent" enroll --controller "$CTL_AGENT" \
    --data-dir "$work/agents/$h" --name "$h" >"$work/logs/enroll-$h.log" 2>&1 || { cat "$work/logs/enroll-$h.log" >&4; fail "enroll $h"; }
  start_daemon "agent-$h" "$h" "${CLEAN_ENV[@]}" "$BIN/ferry-agent" run --data-dir "$work/agents/$h" --config "$work/agent-$h.yaml" --log-level debug
done
online() { fctl hosts --json | tool get "sorted(h['name'] for h in j if h.get('state') == 'online')" - | tr '\n' ' ' | grep -q "db rec1"; }
wait_for "agents db and rec1 online" online

"$here/vm/guest.sh" format "$work/volumes/db/vm.img" 64M
fctl protect db --volume vm --path "$work/volumes/db/vm.img" >/dev/null || fail "ferryctl protect db/vm failed"
caught_up() {
  fctl volume show db/vm --json >"$work/vol.json" || return 1
  tool get "j.get('replicaState') == 'protected' and (j.get('sync') or {}).get('done', True) and j.get('durableSequence') == j.get('lastSequence')" "$work/vol.json" | grep -qx True
}
wait_for "db/vm to be protected" caught_up
SOCK="$(tool get "j['socketPath']" "$work/vol.json")"
PROD="$work/vms/db/web-prod"
inns db "$VM" start --state "$PROD" --guest "$GUEST" --name web --cpus 2 --memory 192 --disk "nbd+unix:///vm?socket=$SOCK" \
  --mac 52:54:00:00:00:32 --net 10.91.1.0/24,10.91.1.1 --bridge-netns "$PREFIX-prim" --probe 10.91.1.1,10.91.1.11,10.91.2.1 >/dev/null
echo "{\"state\": \"$PROD\"}" >"$work/vms/db/runs.log"
wait_boot "$PROD"
first_boot="$BOOT"
wait_for "20 commits on db's guest" eval '[ "$(commits "$PROD/console.log")" -ge 20 ]'
has "$PROD/console.log" "FERRY NET 10.91.1.1 up" || fail "the production guest cannot reach its gateway"
fctl host refresh db >/dev/null || fail "ferryctl host refresh db failed"
recorded() { fctl host show db --json | tool get "[(g['name'], g['cpus'], g['memoryBytes'], [n['macAddress'] for n in g['nics']], g['volumes']) for g in j['inventory']['guests']]" - | grep -qx "('web', 2, 201326592, \['52:54:00:00:00:32'\], \['vm'\])"; }
wait_for "db's inventory to record guest web (2 CPUs, 192 MiB, its MAC, disk vm)" recorded
info "guest web on db: booted in ${first_boot}s ($ACCEL), committing; recorded in db's inventory"
row setup "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$first_boot" "guest recorded: 2 CPUs, 192 MiB, 52:54:00:00:00:32, disk vm"

fctl group create shop --volume db/vm --crash-interval 0 --app-interval 0 --hold-budget 2s >/dev/null || fail "group create"
cat >"$work/plan.yaml" <<'PLAN'
name: shop
groups:
  - name: web
    items:
      - host: db
        recovery-host: rec1
        volumes: [vm]
        start-hook: vm-start
        stop-hook: vm-stop
        timeout: 90s
        networks:
          - source: prod
            recovery: dr
            test: drill
PLAN
fctl plan apply -f "$work/plan.yaml" >/dev/null || fail "plan apply"

# --- drill ------------------------------------------------------------------------------------
say "drill"
t0="$(now_us)"
K="$(commits "$PROD/console.log")"
P="$(fctl point create shop)" || fail "point create"
run_job drill drill shop --point "$P"
DRILL="$(latest_run rec1)"
wait_boot "$DRILL"
drill_boot="$BOOT"
wait_records "$DRILL"
last="$(field "$DRILL/console.log" last)" count="$(field "$DRILL/console.log" count)" bad="$(field "$DRILL/console.log" bad)"
[ "$bad" = 0 ] && [ "$count" = "$last" ] && [ "$last" -ge "$K" ] ||
  fail "the drilled guest holds records count=$count last=$last bad=$bad; every one of 1..$K committed before point $P must be there"
console "$DRILL/console.log" | grep -q "SHAPE cpus=2 .* mac=52:54:00:00:00:32" || fail "the drilled guest does not have web's shape: $(console "$DRILL/console.log" | grep SHAPE)"
console "$DRILL/console.log" | grep -q "NET address 10.91.1.50/24" || fail "the drilled guest lost production's identity"
for a in 10.91.1.1 10.91.1.11 10.91.2.1; do
  has "$DRILL/console.log" "FERRY NET $a down" || fail "the drilled guest reached $a: the test network is not isolated"
done
fsck_point "$P"
before="$(commits "$PROD/console.log")"
wait_for "production to go on during the drill" eval '[ "$(commits "$PROD/console.log")" -gt "$before" ]'
run_job drill-cleanup drill cleanup shop
[ ! -s "$DRILL/qemu.pid" ] || fail "drill cleanup left the drilled guest running"
info "drill at $P (after $K commits): booted in ${drill_boot}s on rec1, records 1..$last intact, isolated, e2fsck clean"
row drill "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$drill_boot" "records 1..$last >= $K, 0 bad, e2fsck clean, 3/3 addresses unreachable"

# --- planned failover ------------------------------------------------------------------------
say "planned failover"
t0="$(now_us)"
run_job failover failover shop --planned
has "$PROD/console.log" "FERRY HALTED" || fail "db's stop hook did not shut the guest down cleanly"
L="$(commits "$PROD/console.log")"
FO="$(latest_run rec1)"
[ "$FO" != "$DRILL" ] || fail "rec1 booted no guest for the failover"
wait_boot "$FO"
fo_boot="$BOOT"
exactly "$FO" "$L" "the planned failover"
console "$FO/console.log" | grep -q "NET address 10.91.2.50/24" || fail "the failed-over guest has no DR address"
has "$FO/console.log" "FERRY NET 10.91.2.1 up" || fail "the failed-over guest cannot reach the DR site"
wait_for "the failed-over guest to commit" eval '[ "$(commits "$FO/console.log")" -gt "$L" ]'
info "planned failover: db's guest stopped at commit $L; rec1's booted in ${fo_boot}s with 1..$L, on the DR network, committing"
row failover "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$fo_boot" "zero loss: records 1..$L exactly, 0 bad; DR network reached"

# --- reprotect and failback ----------------------------------------------------------------------
say "reprotect and failback"
t0="$(now_us)"
run_job reprotect reprotect shop
run_job failback failback shop
has "$FO/console.log" "FERRY HALTED" || fail "rec1's stop hook did not shut the guest down cleanly"
L2="$(commits "$FO/console.log")"
HOME_RUN="$(latest_run db)"
[ "$HOME_RUN" != "$PROD" ] || fail "db booted no guest at failback"
wait_boot "$HOME_RUN"
fb_boot="$BOOT"
exactly "$HOME_RUN" "$L2" "failback"
console "$HOME_RUN/console.log" | grep -q "SHAPE cpus=2 .* mac=52:54:00:00:00:32" || fail "the guest came home with another shape"
has "$HOME_RUN/console.log" "FERRY NET 10.91.1.1 up" || fail "the guest at home cannot reach production"
wait_for "the guest at home to commit" eval '[ "$(commits "$HOME_RUN/console.log")" -gt "$L2" ]'
"$VM" stop --state "$HOME_RUN" >/dev/null || fail "the guest at home did not stop cleanly"
e2fsck -fn "$work/volumes/db/vm.img" >"$work/check/home.fsck" 2>&1 || fail "db's volume is not clean after failback: $(tail -n 5 "$work/check/home.fsck")"
info "failback: rec1's guest stopped at commit $L2; db's booted in ${fb_boot}s with 1..$L2 at home; stopped, e2fsck -fn clean"
row failback "$(awk -v a="$t0" -v b="$(now_us)" 'BEGIN { printf "%.1f", (b - a) / 1e6 }')" "$fb_boot" "zero loss: records 1..$L2 exactly, 0 bad; home network; e2fsck -fn clean"
