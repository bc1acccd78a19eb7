#!/usr/bin/env bash
# The operators' console in a real browser (tests/console/console.mjs): a relay with the sim and
# the admin API, dead compensations in its database, headless Debian Chromium and Firefox ESR
# driven by puppeteer-core (installed once into ~/.cache/turnpike-clients; nothing downloads a
# browser).
# `SCREENSHOTS=docs/console tests/console/ci.sh` also regenerates the screenshots of docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${TURNPIKE_CLIENTS_CACHE:-${HOME:-/root}/.cache/turnpike-clients}
WORK=$(mktemp -d)
TOKEN=console-test-token-0123456789abcdef0123456789
mkdir -p "$CACHE/node"

for pkg in chromium firefox-esr; do
  if ! command -v "$pkg" >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  fi
done
if [ ! -d "$CACHE/node/node_modules/puppeteer-core" ] || [ ! -d "$CACHE/node/node_modules/ws" ]; then
  (cd "$CACHE/node" && [ -f package.json ] || npm init -y >/dev/null)
  (cd "$CACHE/node" && PUPPETEER_SKIP_DOWNLOAD=1 npm install --no-audit --no-fund puppeteer-core@24 ws@8 >/dev/null)
fi

cargo build -q
BIN=$ROOT/target/debug/turnpike
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
addr_from() {
  for _ in $(seq 1 200); do
    a=$(grep -o 'listening on http://[0-9.:]*' "$1" | head -1 | sed 's|.*http://||') || true
    [ -n "$a" ] && { echo "$a"; return; }
    sleep 0.1
  done
  echo "no address in $1" >&2; cat "$1" >&2; exit 1
}

"$BIN" sim --bind 127.0.0.1:0 --api-key sk-console 2>"$WORK/sim.log" &
PIDS=$!
trap 'kill $PIDS 2>/dev/null || true; rm -rf "$WORK"' EXIT
SIM=$(addr_from "$WORK/sim.log")
export TURNPIKE_DATABASE__URL="sqlite://$WORK/turnpike.db"
printf '[[accounts]]\nname = "sim"\nbase_url = "http://%s/v1"\napi_key = "sk-console"\n' "$SIM" >"$WORK/relay.toml"
"$BIN" --config "$WORK/relay.toml" migrate >/dev/null 2>&1
"$BIN" users create console >/dev/null 2>&1
KEY=$("$BIN" keys create --user console --models gpt-test 2>/dev/null)
# A dead compensation for the console to retry (as if every debit attempt had failed), with the
# usage row of its turn (a compensation is settled only with it).
python3 - "$WORK/turnpike.db" <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
key_id, user_id = db.execute("select id, user_id from api_keys").fetchone()
for n in (1, 2):  # one for each browser
    turn = f"turn_console_dead_{n}"
    db.execute("insert into usage_logs (request_id, api_key_id, user_id, session_id, turn_index, account,"
               " model, status, usage_source, warmup, input_tokens, cached_input_tokens, cache_write_tokens,"
               " output_tokens, reasoning_tokens, total_tokens, cost_nanousd, duration_ms, accepted_at,"
               " created_at) values (?, ?, ?, 'sess_console', 1, 'sim', 'gpt-test', 'completed',"
               " 'reported', 0, 10, 0, 0, 5, 0, 15, 12345, 9, datetime('now'), datetime('now'))",
               (turn, key_id, user_id))
    db.execute("insert into billing_compensations (request_id, api_key_id, user_id, amount_nanousd, status,"
               " attempts, next_attempt_at, last_error, error_history, created_at, updated_at, dead_at)"
               " values (?, ?, ?, 12345, 'dead', 8, null, 'database unreachable', '[]',"
               " datetime('now'), datetime('now'), datetime('now'))", (turn, key_id, user_id))
db.commit()
PY
ADMIN=127.0.0.1:$(free_port)
TURNPIKE_SERVER__BIND=127.0.0.1:0 TURNPIKE_ACCOUNTING__SPOOL_DIR=$WORK/spool \
  TURNPIKE_ADMIN__TOKEN=$TOKEN TURNPIKE_ADMIN__BIND=$ADMIN \
  TURNPIKE_COMPENSATION__POLL_INTERVAL_MS=200 \
  "$BIN" --config "$WORK/relay.toml" serve 2>"$WORK/relay.log" &
PIDS="$PIDS $!"
RELAY=$(addr_from "$WORK/relay.log")
cp "$ROOT/tests/console/console.mjs" "$CACHE/node/console.mjs"
if [ -n "${SCREENSHOTS:-}" ]; then SCREENSHOTS=$(cd "$SCREENSHOTS" && pwd); export SCREENSHOTS; fi
if node "$CACHE/node/console.mjs" "$ADMIN" "$RELAY" "$KEY" "$TOKEN" &&
  BROWSER=firefox node "$CACHE/node/console.mjs" "$ADMIN" "$RELAY" "$KEY" "$TOKEN"; then
  # Every action is in the relay's log with where it came from.
  grep -q 'restarted by an operator.*from=\|from=.*restarted by an operator' "$WORK/relay.log" || { echo "FAIL no logged restart"; exit 1; }
  echo "console: 2 passed, 0 failed"
else
  tail -20 "$WORK/relay.log" >&2
  echo "console: 0 passed, 1 failed"
  exit 1
fi
