#!/usr/bin/env bash
# What a remote executor adds to a login step: the same executor request
# asked of flowgate A directly (its [executor_api]) and through flowgate B
# (executor.kind = "remote", pointed at A), on loopback, plain HTTP, each
# from a client without cookies (a first challenge), and an identification
# answer. Prints the median and p90 of each, in milliseconds.
#
#   benches/remote_step.sh [N]        (N requests of each kind, default 300)
#   FLOWGATE_BIN=path/to/flowgate     (default target/release/flowgate)
#   FLOWGATE_STATE=memory             (both gateways' [state] store; default
#                                      embedded, the default of `serve`: every
#                                      stored step is then a durable commit)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300}
STATE=${FLOWGATE_STATE:-embedded}
BIN=${FLOWGATE_BIN:-target/release/flowgate}
[ -x "$BIN" ] || cargo build --release --quiet
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

hash=$(printf 'pw\n' | "$BIN" hash-password)
cat > "$work/users.toml" <<EOF
[[user]]
username = "alice"
password = "$hash"
EOF
cat > "$work/a.toml" <<EOF
[server]
listen = "127.0.0.1:18301"
trusted_proxies = ["127.0.0.1/32"]
[session]
secret = "bench-secret-bench-secret-bench-secret-0123456789"
max_pre_auth_per_client = 100000
[admin]
enabled = false
[log]
access = false
[state]
store = "$STATE"
path = "$work/a.state"
[executor_api]
listen = "127.0.0.1:18302"
[[route]]
upstream = "http://127.0.0.1:9"
EOF
cat > "$work/b.toml" <<EOF
[server]
listen = "127.0.0.1:18303"
[session]
secret = "bench-secret-b-bench-secret-b-bench-secret-b-0123"
max_pre_auth_per_client = 100000
[admin]
enabled = false
[log]
access = false
[state]
store = "$STATE"
path = "$work/b.state"
[executor]
kind = "remote"
url = "http://127.0.0.1:18302"
[[route]]
upstream = "http://127.0.0.1:9"
EOF
"$BIN" serve --config "$work/a.toml" 2>"$work/a.log" &
"$BIN" serve --config "$work/b.toml" 2>"$work/b.log" &
for port in 18302 18303; do
  for _ in $(seq 50); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
done

flow=default-authentication-flow
direct="http://127.0.0.1:18302/api/v3/flows/executor/$flow/"
through="http://127.0.0.1:18303/_flowgate/api/v3/flows/executor/$flow/"

# One curl per request, so every one is a new client: its own connection
# to the gateway (B keeps its pooled connections to A).
measure() { # name url [post body]
  local name=$1 url=$2 body=${3:-}
  for _ in $(seq "$N"); do
    if [ -n "$body" ]; then
      curl -s -o /dev/null -w '%{time_total}\n' -H 'content-type: application/json' -d "$body" "$url"
    else
      curl -s -o /dev/null -w '%{time_total}\n' "$url"
    fi
  done | sort -n | awk -v name="$name" '{ t[NR] = $1 * 1000 } END {
    printf "%-34s median %.2f ms   p90 %.2f ms\n", name, t[int(NR / 2)], t[int(NR * 0.9)] }'
}
measure "first challenge, A directly" "$direct"
measure "first challenge, through B" "$through"
measure "identification, A directly" "$direct" '{"uid_field":"alice"}'
measure "identification, through B" "$through" '{"uid_field":"alice"}'
