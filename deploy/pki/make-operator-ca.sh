#!/usr/bin/env bash
# Makes an operator-owned CA for Ferry with the openssl command line, and optionally a controller
# server certificate signed by it. Only needed by operators who bring their own CA: by default
# the controller makes its own CA on first start.
#
#   deploy/pki/make-operator-ca.sh DIR
#   deploy/pki/make-operator-ca.sh --server-cert --san dr-controller.example.net --san IP:192.0.2.10 DIR
#
# Writes into DIR:
#   ca.pem, ca.key (0600)          EC P-256 CA: basicConstraints critical CA:TRUE, pathlen 0;
#                                  keyUsage critical keyCertSign, cRLSign
#   server.pem, server.key (0600)  with --server-cert: EC P-256, signed by the CA;
#                                  subjectAltName DNS:ferry-controller, DNS:localhost,
#                                  IP:127.0.0.1 and every --san;
#                                  extendedKeyUsage serverAuth, clientAuth
# An existing ca.pem/ca.key pair in DIR is reused (so --server-cert can reissue the server
# certificate from the same CA); it is never overwritten.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: make-operator-ca.sh [options] DIR

options:
  --server-cert        also issue a controller server certificate (server.pem, server.key)
  --san NAME           extra subjectAltName for the server certificate; repeatable.
                       DNS:name, IP:address, or a bare name/address (detected)
  --ca-name TEXT       CA common name (default: "Ferry operator CA")
  --ca-days N          CA validity in days (default: 3650)
  --days N             server certificate validity in days (default: 365)
  -h, --help           this help
EOF
}

die() { printf 'make-operator-ca.sh: %s\n' "$*" >&2; exit 1; }

server_cert=0
sans=()
ca_name="Ferry operator CA"
ca_days=3650
days=365
dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --server-cert) server_cert=1 ;;
    --san) [ $# -ge 2 ] || die "--san needs a value"; sans+=("$2"); shift ;;
    --san=*) sans+=("${1#--san=}") ;;
    --ca-name) [ $# -ge 2 ] || die "--ca-name needs a value"; ca_name="$2"; shift ;;
    --ca-days) [ $# -ge 2 ] || die "--ca-days needs a value"; ca_days="$2"; shift ;;
    --days) [ $# -ge 2 ] || die "--days needs a value"; days="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) usage >&2; die "unknown option: $1" ;;
    *) [ -z "$dir" ] || die "only one DIR, got '$dir' and '$1'"; dir="$1" ;;
  esac
  shift
done
[ -n "$dir" ] || { usage >&2; exit 2; }
command -v openssl >/dev/null 2>&1 || die "openssl not found (apt-get install openssl)"
[[ "$ca_days" =~ ^[1-9][0-9]*$ ]] || die "--ca-days must be a positive number of days"
[[ "$days" =~ ^[1-9][0-9]*$ ]] || die "--days must be a positive number of days"
[[ "$ca_name" =~ ^[A-Za-z0-9\ ._-]+$ ]] || die "--ca-name may hold letters, digits, space, '.', '_' and '-' only"

# Every --san becomes DNS:... or IP:...; anything that could break the openssl config is refused.
san_list="DNS:ferry-controller,DNS:localhost,IP:127.0.0.1"
for s in "${sans[@]}"; do
  case "$s" in
    DNS:*|IP:*) v="$s" ;;
    *) if [[ "$s" =~ ^[0-9.]+$ || "$s" == *:* ]]; then v="IP:$s"; else v="DNS:$s"; fi ;;
  esac
  [[ "$v" =~ ^(DNS:[A-Za-z0-9*][A-Za-z0-9.-]*|IP:[0-9A-Fa-f:.]+)$ ]] || die "not a DNS name or IP address: '$s'"
  san_list="$san_list,$v"
done

umask 077
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if [ -e "$dir/ca.pem" ] || [ -e "$dir/ca.key" ]; then
  [ -e "$dir/ca.pem" ] && [ -e "$dir/ca.key" ] || die "$dir has only one of ca.pem and ca.key; refusing to guess"
  echo "using the existing CA in $dir (ca.pem, ca.key)"
else
  cat >"$tmp/ca.cnf" <<EOF
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
O = Ferry
CN = $ca_name
[ v3_ca ]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve \
    -out "$tmp/ca.key" 2>/dev/null
  openssl req -new -x509 -config "$tmp/ca.cnf" -extensions v3_ca -key "$tmp/ca.key" -sha256 \
    -days "$ca_days" -set_serial "0x$(openssl rand -hex 16)" -out "$tmp/ca.pem"
  install -m 0600 "$tmp/ca.key" "$dir/ca.key"
  install -m 0644 "$tmp/ca.pem" "$dir/ca.pem"
  echo "created CA: $dir/ca.pem, $dir/ca.key (0600)"
fi

if [ "$server_cert" = 1 ]; then
  cat >"$tmp/server.cnf" <<EOF
[ req ]
distinguished_name = dn
prompt = no
[ dn ]
O = Ferry
CN = ferry-controller
[ v3_server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = $san_list
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve \
    -out "$tmp/server.key" 2>/dev/null
  openssl req -new -config "$tmp/server.cnf" -key "$tmp/server.key" -out "$tmp/server.csr"
  openssl x509 -req -in "$tmp/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
    -extfile "$tmp/server.cnf" -extensions v3_server -out "$tmp/server.pem" 2>/dev/null
  openssl verify -CAfile "$dir/ca.pem" "$tmp/server.pem" >/dev/null \
    || die "the new server certificate does not verify against $dir/ca.pem"
  install -m 0600 "$tmp/server.key" "$dir/server.key"
  install -m 0644 "$tmp/server.pem" "$dir/server.pem"
  echo "created server certificate: $dir/server.pem, $dir/server.key (0600)"
  echo "  subjectAltName: ${san_list//,/, }"
fi

fp="$(openssl x509 -in "$dir/ca.pem" -noout -fingerprint -sha256 | cut -d= -f2)"
cat <<EOF

CA SHA-256 fingerprint (what enrollment tokens pin): $fp

Start the controller with this CA:
  ferry-controller --data-dir /var/lib/ferry-controller --ca-cert $dir/ca.pem --ca-key $dir/ca.key
or set in /etc/ferry/controller.yaml:
  ca-cert: $dir/ca.pem
  ca-key: $dir/ca.key
EOF
if [ "$server_cert" = 1 ]; then
  cat <<EOF
  server-cert: $dir/server.pem
  server-key: $dir/server.key
(the server certificate is set in the config file only; without it the controller issues its
own server certificate from this CA on every start)
EOF
fi
cat <<EOF

Keep ca.key secret and backed up: whoever holds it can mint agent and controller certificates.
Switching an existing controller to another CA means every agent has to enroll again.
EOF
