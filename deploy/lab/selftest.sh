#!/usr/bin/env bash
# Self-test of the multi-host lab (deploy/lab/lab.sh): builds a lab under a random prefix, checks
# reachability across sites, the isolation of the test network, cut/heal, shaping, a TCP
# service across sites, that the root namespace is untouched, and that down removes everything
# (also after a failed or partial up). One line per check; exit 0 only if all pass.
# The lab is torn down on any exit (trap). Run as root; takes a few seconds.
#
#   bash deploy/lab/selftest.sh [PREFIX]     # default prefix flt$RANDOM
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LAB="$here/lab.sh"
PROBE="$here/probe.py"
PREFIX="${1:-flt$RANDOM}"
PY=/usr/bin/python3
[ -x "$PY" ] || PY="$(command -v python3 || true)"

log() { printf 'selftest.sh: %s\n' "$*"; }
die() { printf 'selftest.sh: error: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces)"
command -v ip >/dev/null 2>&1 || die "ip not found (apt-get install iproute2)"
[ -n "$PY" ] || die "python3 not found"

tmp="$(mktemp -d /tmp/ferry-lab-selftest.XXXXXX)"
bg_pids=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local p
  for p in "${bg_pids[@]+"${bg_pids[@]}"}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "$PREFIX" "${PREFIX}f" "${PREFIX}g"; do
    "$LAB" down --prefix "$p" >/dev/null 2>&1 || true
  done
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

lab() { "$LAB" --prefix "$PREFIX" "$@"; }
ax() { lab exec "$@"; }          # ax HOST -- CMD...
addr() { lab addr "$@"; }

passed=0 failed=0
out="$tmp/out"
# check NAME CMD...: runs CMD, prints one line; on failure the command's output follows, indented
check() {
  local name="$1" t0="$EPOCHREALTIME" rc=0; shift
  "$@" >"$out" 2>&1 || rc=$?
  local dt; dt="$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$rc" -eq 0 ]; then
    printf 'ok   %s (%ss)\n' "$name" "$dt"; passed=$((passed + 1))
  else
    printf 'FAIL %s (%ss)\n' "$name" "$dt"; sed 's/^/       /' "$out"; failed=$((failed + 1))
  fi
}

# reach HOST DEST [SRC]: one echo, 1 s; ping(8) when installed, else a raw-socket probe
reach() {
  local host="$1" dest="$2" src="${3:-}"
  if command -v ping >/dev/null 2>&1; then
    ax "$host" -- ping -n -q -c1 -W1 ${src:+-I "$src"} "$dest"
  else
    ax "$host" -- "$PY" "$PROBE" ping "$dest" ${src:+--source "$src"} --timeout 1
  fi
}
reaches_all() {  # reaches_all HOST DEST_HOST...
  local h="$1" d; shift
  for d in "$@"; do reach "$h" "$(addr "$d")" || { echo "$h cannot reach $d"; return 1; }; done
}
reaches_none() {  # reaches_none HOST SRC_ADDR DEST_ADDR...: every echo fails (tried in parallel)
  local h="$1" src="$2" d pids=() bad=0; shift 2
  for d in "$@"; do
    reach "$h" "$d" "$src" >/dev/null 2>&1 &
    pids+=("$!")
  done
  local i=0
  for d in "$@"; do
    if wait "${pids[$i]}"; then echo "$h${src:+ from $src} reached $d"; bad=1; fi
    i=$((i + 1))
  done
  [ "$bad" -eq 0 ] || return 1
  echo "$h${src:+ from $src} reaches none of: $*"
}
lab_namespaces() { ip netns list | awk '{print $1}' | grep -E "^($1)-" || true; }

start=$SECONDS
root_link_before="$(ip -o link)"
root_addr_before="$(ip -o addr)"
root_route_before="$(ip route; ip rule)"
log "prefix $PREFIX"

check "up builds the lab" lab up
nine_up() {
  lab_namespaces "$PREFIX"
  [ "$(lab_namespaces "$PREFIX" | wc -l)" -eq 9 ] && [ "$(lab status | grep -c ' up ')" -eq 9 ]
}
check "up: 9 namespaces $PREFIX-*, status lists them all up" nine_up

# --- reachability ------------------------------------------------------------------------------
within_sites() { reaches_all db app web && reaches_all ctl rec1 rec2; }
check "within sites: db -> app web, ctl -> rec1 rec2" within_sites
for h in db app web; do
  check "primary -> secondary: $h -> ctl rec1 rec2" reaches_all "$h" ctl rec1 rec2
done
for h in ctl rec1 rec2; do
  check "secondary -> primary: $h -> db app web" reaches_all "$h" db app web
done

# --- the test network ---------------------------------------------------------------------------
t1="$(addr rec1 --test)" t2="$(addr rec2 --test)" tt="$(addr test --test)"
test_segment() { reach test "$t1" && reach test "$t2" && reach rec1 "$t2" "$t1"; }
check "test network: test -> rec1 $t1, rec2 $t2; rec1 -> rec2 over it" test_segment
check "test network: rec1 from $t1 reaches neither ctl nor db (nor rec2's site address)" \
  reaches_none rec1 "$t1" "$(addr ctl)" "$(addr db)" "$(addr rec2)"
# A drill machine that routes through rec1 must still not get out (rec1 neither forwards nor
# answers on its secondary-site address from the test network).
ax test -- ip route add default via "$t1"
check "test network: test (default via rec1) reaches nothing outside" reaches_none test "" \
  "$(addr ctl)" "$(addr db)" "$(addr rec1)" "$(addr sec)"
unreachable_test_net() { reaches_none ctl "" "$tt" "$t1" && reaches_none db "" "$tt" "$t2"; }
check "test network: ctl and db cannot reach it" unreachable_test_net

# --- exec and a TCP service across sites -------------------------------------------------------
mkdir -p "$tmp/www"
token="ferry-lab-$RANDOM$RANDOM"
echo "$token" >"$tmp/www/token"
ctl_ip="$(addr ctl)" db_ip="$(addr db)"
# Started straight from this shell (not through a function) so that $! is lab.sh's pid, which
# lab.sh and then ip netns exec hand on to the server by exec.
"$LAB" --prefix "$PREFIX" exec ctl -- "$PY" -m http.server --bind "$ctl_ip" --directory "$tmp/www" 18080 >"$tmp/http.log" 2>&1 &
http_pid=$!; bg_pids+=("$http_pid"); disown "$http_pid"
wait_port() {  # wait_port HOST IP PORT: up to 3 s
  local i
  for i in $(seq 1 30); do
    ax "$1" -- "$PY" "$PROBE" connect "$2" "$3" --timeout 0.5 >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
check "exec: the background pid is the command's, inside $PREFIX-ctl" \
  bash -c "sleep 0.2; [ \"\$(ip netns identify $http_pid)\" = '$PREFIX-ctl' ] && grep -q python /proc/$http_pid/comm"
fetch() { ax db -- "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' "http://$ctl_ip:18080/token"; }
fetch_ok() { [ "$(fetch)" = "$token" ]; }
served() { wait_port db "$ctl_ip" 18080 && fetch_ok; }
check "TCP across sites: db fetches http://$ctl_ip:18080/token from ctl" served

# --- cut / heal ---------------------------------------------------------------------------------
fails_fast() {  # fails_fast HOST IP PORT: a connect must fail in under 1 s
  local o; o="$(ax "$1" -- "$PY" "$PROBE" connect "$2" "$3" --timeout 3 2>&1)" && { echo "connected: $o"; return 1; }
  echo "$o"
  [[ "$o" =~ failed\ after\ 0\. ]]
}
lab cut >/dev/null
check "cut: db -> ctl ping fails" reaches_none db "" "$ctl_ip"
check "cut: ctl -> db ping fails" reaches_none ctl "" "$db_ip"
check "cut: a TCP connect db -> ctl fails at once" fails_fast db "$ctl_ip" 18080
inside_sites() { reaches_all db web && reaches_all ctl rec1; }
check "cut: sites still work inside: db -> web, ctl -> rec1" inside_sites
lab heal >/dev/null
check "heal: db -> ctl ping works again" reaches_all db ctl
check "heal: TCP db -> ctl works again" fetch_ok
lab cut --silent >/dev/null
times_out() {  # times_out HOST IP PORT: a connect gets no answer at all within 0.5 s
  local o; o="$(ax "$1" -- "$PY" "$PROBE" connect "$2" "$3" --timeout 0.5 2>&1)" && { echo "connected: $o"; return 1; }
  echo "$o"
  [[ "$o" == *TIMEOUT* ]]
}
check "cut --silent: a TCP connect db -> ctl gets no answer (times out)" times_out db "$ctl_ip" 18080
lab heal >/dev/null
check "heal after --silent: TCP db -> ctl works" fetch_ok

# --- shaping ------------------------------------------------------------------------------------
"$LAB" --prefix "$PREFIX" exec ctl -- "$PY" "$PROBE" sink --bind "$ctl_ip" --port 19000 >/dev/null 2>&1 &
bg_pids+=("$!"); disown "$!"
rate_between() {  # rate_between LOW HIGH BYTES: db -> ctl throughput in Mbit/s within [LOW, HIGH]
  local r; r="$(ax db -- "$PY" "$PROBE" send "$ctl_ip" 19000 --bytes "$3" --timeout 10)" || { echo "$r"; return 1; }
  echo "sent $r (bytes seconds Mbit/s)"
  awk -v r="$(echo "$r" | awk '{print $3}')" -v lo="$1" -v hi="$2" 'BEGIN { exit !(r >= lo && r <= hi) }'
}
wait_port db "$ctl_ip" 19000 || true
lab shape 16mbit >/dev/null
check "shape 16mbit: db -> ctl runs at 8-20 Mbit/s" rate_between 8 20 1200000
lab unshape >/dev/null
check "unshape: db -> ctl runs above 200 Mbit/s" rate_between 200 1000000 20000000

# --- the root namespace -------------------------------------------------------------------------
root_unchanged() {  # the root namespace's links, addresses, routes and rules are as before up
  [ "$(ip -o link)" = "$root_link_before" ] || { echo "links differ:"; diff <(echo "$root_link_before") <(ip -o link); return 1; }
  [ "$(ip -o addr)" = "$root_addr_before" ] || { echo "addresses differ:"; diff <(echo "$root_addr_before") <(ip -o addr); return 1; }
  [ "$(ip route; ip rule)" = "$root_route_before" ] || { echo "routes or rules differ:"; diff <(echo "$root_route_before") <(ip route; ip rule); return 1; }
  echo "root namespace: $(ip -o link | wc -l) links, $(ip -o addr | wc -l) addresses, as before up"
}
check "root namespace (lab up): no interface, address, route or rule added" root_unchanged

# --- down ---------------------------------------------------------------------------------------
"$LAB" --prefix "$PREFIX" exec rec2 -- sleep 300 &
sleeper=$!; bg_pids+=("$sleeper"); disown "$sleeper"
sleep 0.1
check "down removes the lab" lab down
check "down: no namespace $PREFIX-* remains, no state file" bash -c "[ -z \"\$(ip netns list | awk '{print \$1}' | grep '^$PREFIX-')\" ] && [ ! -e /run/ferry-lab/$PREFIX.state ]"
check "down: killed the processes inside (http.server, sleep)" bash -c "sleep 0.1; ! kill -0 $http_pid 2>/dev/null && ! kill -0 $sleeper 2>/dev/null"
check "down again is a no-op" lab down
check "root namespace unchanged after down" root_unchanged

# --- failed and partial up ----------------------------------------------------------------------
fp="${PREFIX}f"
check "a failed up removes what it made" bash -c "
  if FERRY_LAB_FAIL_AFTER=isl '$LAB' up --prefix $fp; then echo 'up did not fail'; exit 1; fi
  [ -z \"\$(ip netns list | awk '{print \$1}' | grep '^$fp-')\" ] && [ ! -e /run/ferry-lab/$fp.state ]"
gp="${PREFIX}g"
ip netns add "$gp-prim"; ip netns add "$gp-db"
check "down after a partial up (no state file) removes its namespaces" bash -c "
  '$LAB' down --prefix $gp && [ -z \"\$(ip netns list | awk '{print \$1}' | grep '^$gp-')\" ]"
lab up >/dev/null
check "up refuses while the lab is up" bash -c "! '$LAB' up --prefix $PREFIX"
lab down >/dev/null

total=$((passed + failed))
if [ "$failed" -eq 0 ]; then
  log "all $total checks passed in $((SECONDS - start))s"
else
  log "$failed of $total checks FAILED ($((SECONDS - start))s)"
  exit 1
fi
