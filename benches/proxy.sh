#!/usr/bin/env bash
# flowgate, signed in, measured beside the bare upstream, nginx and haproxy
# (benches/bench.sh does the measuring; see benches/README.md).
#
#   benches/proxy.sh            3 rounds x 8 s, the figures in BENCHMARKS.md
#   benches/proxy.sh --short    1 round x 2 s, for CI (also SHORT=1)
#   benches/proxy.sh --store memory       the session store: memory, embedded
#                                         (default, as `serve`) or redis (a
#                                         redis-server started here); also STORE=
#   benches/proxy.sh --policies           the route has policies (a group and a
#                                         CEL expression on a header): the
#                                         general path; also POLICIES=1
#   FAST_LANE=false benches/proxy.sh      everything on the general path (hyper)
#   FLOWGATE_BIN=path benches/proxy.sh    measure that binary instead of building
#
# Builds flowgate (release), starts the harness upstream, runs flowgate with
# one worker and no access log in front of it, logs in through the JSON
# executor API, checks one proxied GET, then runs `bench.sh compare` with the
# session cookie. Prints the RESULT line and flowgate's RSS. Fails when the
# subject saw any error (non-2xx, socket error): such a run is not a
# measurement. Knobs passed to bench.sh: DURATION, ROUNDS, CONNS, BENCH_PATH,
# BENCH_JSON, BENCH_DIR. Stops everything it started, however it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
trap 'echo "proxy.sh: failed at line $LINENO" >&2' ERR

SHORT=${SHORT:-0}
STORE=${STORE:-embedded}
POLICIES=${POLICIES:-0}
FAST_LANE=${FAST_LANE:-true}
while [ $# -gt 0 ]; do
  case "$1" in
    --short) SHORT=1 ;;
    --store) STORE=${2:-}; shift ;;
    --policies) POLICIES=1 ;;
    *) sed -n '2,21p' "$0"; exit 2 ;;
  esac
  shift
done
case "$STORE" in memory|embedded|redis) ;; *) echo "proxy.sh: --store memory|embedded|redis" >&2; exit 2 ;; esac
[ "$SHORT" = 1 ] && export DURATION=2 ROUNDS=1
BENCH_PATH=${BENCH_PATH:-/small}; export BENCH_PATH

die() { echo "proxy.sh: $*" >&2; exit 1; }

WORK=$(mktemp -d /tmp/flowgate-proxy-bench.XXXXXX)
FLOWGATE_PID=
UPSTREAM_STARTED=0
REDIS_PID=
cleanup() {
  if [ -n "$REDIS_PID" ]; then kill "$REDIS_PID" 2>/dev/null || true; fi
  if [ -n "$FLOWGATE_PID" ]; then
    kill "$FLOWGATE_PID" 2>/dev/null || true
    wait "$FLOWGATE_PID" 2>/dev/null || true
  fi
  [ "$UPSTREAM_STARTED" = 1 ] && benches/bench.sh upstream stop
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v curl >/dev/null || apt-get install -y curl >/dev/null 2>&1 \
  || { apt-get update >/dev/null && apt-get install -y curl >/dev/null; }

if [ -n "${FLOWGATE_BIN:-}" ]; then  # another build (say, an older commit's) in the same harness
  BIN=$FLOWGATE_BIN
else
  echo "== build (release)"
  cargo build --release --bin flowgate --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/flowgate
fi

echo "== upstream"
# bench.sh keeps its state (pid files) in one folder on fixed ports: a second
# run at the same time would stop the first one's processes. Refuse instead.
for port in "${UP_PORT:-19101}" "${NGX_PORT:-19102}" "${HAP_PORT:-19103}"; do
  if (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
    die "port $port is taken: another benchmark is running (or a killed one left its upstream: benches/bench.sh upstream stop)"
  fi
done
UPSTREAM_URL=
UPSTREAM_STARTED=1
eval "$(benches/bench.sh upstream start)"
[ -n "$UPSTREAM_URL" ] || die "the harness upstream did not start"
echo "$UPSTREAM_URL"

free_port() {  # a loopback port nobody listens on
  local p
  for p in $(shuf -i 20000-29999 -n 50); do
    (echo >/dev/tcp/127.0.0.1/"$p") 2>/dev/null || { echo "$p"; return 0; }
  done
  return 1
}
PORT=$(free_port) || die "no free port"
BASE=http://127.0.0.1:$PORT
PASSWORD=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
SECRET=$(head -c 48 /dev/urandom | base64 | tr '+/' '-_')

# One worker (the anchors run one each), no access log (nginx in the harness
# runs with access_log off), no admin listener.
HASH=$("$BIN" hash-password <<<"$PASSWORD")
cat >"$WORK/users.toml" <<EOF
[[user]]
username = "bench"
password = "$HASH"
groups = ["staff"]
EOF
REDIS_LINE=
if [ "$STORE" = redis ]; then
  REDIS_PORT=$(free_port)
  # Beside the load generator and the upstream, off flowgate's pinned core.
  PIN_REDIS=()
  if [ "${BENCH_PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
    PIN_REDIS=(taskset -c 0)
  fi
  "${PIN_REDIS[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
  REDIS_PID=$!
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$REDIS_PORT") 2>/dev/null && break; sleep 0.05; done
  REDIS_LINE="redis_url = \"redis://127.0.0.1:$REDIS_PORT/0\""
fi
cat >"$WORK/flowgate.toml" <<EOF
[server]
listen = "127.0.0.1:$PORT"
workers = 1
fast_lane = $FAST_LANE

[session]
secret = "$SECRET"

[directory]
users_file = "users.toml"

[state]
store = "$STORE"
$REDIS_LINE

[log]
level = "warn"
access = false

[admin]
enabled = false

[[route]]
upstream = "$UPSTREAM_URL"
EOF
if [ "$POLICIES" = 1 ]; then
  cat >>"$WORK/flowgate.toml" <<'EOF'
policies = ["staff", "no-blocked-client"]
policy_engine_mode = "all"

[policy.staff]
kind = "group"
groups = ["staff"]

[policy.no-blocked-client]
kind = "expression"
expression = "!('x-blocked' in request.headers) && request.path.startsWith('/')"
EOF
fi
"$BIN" check --config "$WORK/flowgate.toml" >/dev/null || die "flowgate check rejected the bench config"

echo "== flowgate on $BASE (1 worker, access log off, $STORE store, route policies: $POLICIES, fast lane: $FAST_LANE)"
# On its own core, as the anchors are (bench.sh: BENCH_PIN).
if [ "${BENCH_PIN:-1}" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  taskset -c 1 "$BIN" serve --config "$WORK/flowgate.toml" 2>"$WORK/flowgate.log" &
else
  "$BIN" serve --config "$WORK/flowgate.toml" 2>"$WORK/flowgate.log" &
fi
FLOWGATE_PID=$!
for _ in $(seq 100); do
  (echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null && break
  kill -0 "$FLOWGATE_PID" 2>/dev/null || { cat "$WORK/flowgate.log" >&2; die "flowgate exited"; }
  sleep 0.05
done
(echo >/dev/tcp/127.0.0.1/"$PORT") 2>/dev/null || { cat "$WORK/flowgate.log" >&2; die "flowgate never listened"; }
rss_kib() { awk -v k="$1" '$1==k":" {print $2}' "/proc/$FLOWGATE_PID/status"; }
RSS_START=$(rss_kib VmRSS)

echo "== log in through the executor API"
JAR=$WORK/jar
EXECUTOR="$BASE/_flowgate/api/v3/flows/executor/default-authentication-flow/"
api() { curl -s -b "$JAR" -c "$JAR" -H 'Accept: application/json' "$@" "$EXECUTOR"; }
post() {  # $1 JSON body; the executor answers a passed stage with a raw 302
  local code; code=$(api -H 'Content-Type: application/json' -d "$1" -o /dev/null -w '%{http_code}')
  [ "$code" = 302 ] || die "executor POST answered $code, not 302"
}
api >/dev/null
post '{"uid_field":"bench"}'
api >/dev/null
post "{\"password\":\"$PASSWORD\"}"
last=$(api -L --max-redirs 5)   # a stage that passes by itself (mfa, no TOTP) is one more 302
grep -q '"xak-flow-redirect"' <<<"$last" || die "login did not end in xak-flow-redirect: $last"
COOKIE=$(awk '$6 == "flowgate_session" {print $7}' "$JAR")
[ -n "$COOKIE" ] || die "no flowgate_session cookie after login"
HEADER="Cookie: flowgate_session=$COOKIE"

for path in /small "$BENCH_PATH"; do  # the gateway must answer exactly as the upstream does
  curl -s -o "$WORK/direct" "$UPSTREAM_URL$path"
  code=$(curl -s -H "$HEADER" -o "$WORK/through" -w '%{http_code}' "$BASE$path")
  [ "$code" = 200 ] || die "GET $path through flowgate answered $code, not 200"
  cmp -s "$WORK/direct" "$WORK/through" || die "GET $path through flowgate: body differs from the upstream's"
done
echo "signed in; GET /small through flowgate: 200, the upstream's body"
RSS_IDLE=$(rss_kib VmRSS)

echo "== compare (DURATION=${DURATION:-8} ROUNDS=${ROUNDS:-3} CONNS=${CONNS:-64} BENCH_PATH=$BENCH_PATH)"
GATEWAY_URL=$BASE GATEWAY_HEADER=$HEADER GATEWAY_PID=$FLOWGATE_PID benches/bench.sh compare | tee "$WORK/compare.out"
kill -0 "$FLOWGATE_PID" 2>/dev/null || { tail -20 "$WORK/flowgate.log" >&2; die "flowgate died during the run"; }
RSS_AFTER=$(rss_kib VmRSS)
RSS_PEAK=$(rss_kib VmHWM)
if grep -q . "$WORK/flowgate.log"; then
  echo "flowgate's log (warnings and errors):"; tail -20 "$WORK/flowgate.log"
fi

RESULT=$(grep '^RESULT ' "$WORK/compare.out") || die "bench.sh printed no RESULT line"
echo
echo "$RESULT"
echo "RSS flowgate_start_kib=$RSS_START idle_kib=$RSS_IDLE after_kib=$RSS_AFTER peak_kib=$RSS_PEAK"
errors=$(sed -n 's/.* subject_errors=\([0-9]*\).*/\1/p' <<<"$RESULT")
[ "${errors:-x}" = 0 ] || die "flowgate answered ${errors:-?} requests with an error: not a valid measurement"
