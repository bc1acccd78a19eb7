#!/usr/bin/env bash
# Warm and fresh time to first event of two turnpike builds, rounds interleaved (BENCHMARKS.md):
#
#   scripts/ttfe_ab.sh OLD_BINARY [NEW_BINARY]      # NEW defaults to target/release/turnpike
#
# Per round and build: a fresh relay on a new SQLite file in front of `bench upstream`, 20 warm-up
# sessions, then `bench ttfe` over 300 sessions; a direct row last. BENCH_ROUNDS (3). Never run
# beside a build or a test run: only same-run ratios count.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: scripts/ttfe_ab.sh OLD_BINARY [NEW_BINARY]}
NEW=${2:-$PWD/target/release/turnpike}
cargo build --release --quiet --example bench
B=$PWD/target/release/examples/bench
source scripts/bench_lib.sh
W=$(mktemp -d /tmp/turnpike-ttfe.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
UP=$(free_port)
"$B" upstream "127.0.0.1:$UP" & PIDS+=($!)
wait_port "$UP"
for round in $(seq 1 "${BENCH_ROUNDS:-3}"); do
  for build in old new; do
    bin=$OLD
    [ "$build" = new ] && bin=$NEW
    P=$(free_port)
    KEY=$(bench_relay "$bin" "$W/$build$round.toml" "$P" "sqlite://$W/$build$round.db" "$UP")
    "$bin" --config "$W/$build$round.toml" serve 2>>"$W/relay.log" &
    RP=$!
    wait_port "$P"
    "$B" ttfe "ws://127.0.0.1:$P/v1/responses" "$KEY" 20 >/dev/null
    echo "{\"build\":\"$build\",\"round\":$round,\"r\":$("$B" ttfe "ws://127.0.0.1:$P/v1/responses" "$KEY" 300)}"
    kill "$RP"
    wait "$RP" 2>/dev/null || true
  done
done
echo "{\"build\":\"direct\",\"round\":0,\"r\":$("$B" ttfe "ws://127.0.0.1:$UP/v1/responses" k 300)}"
