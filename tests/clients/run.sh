#!/usr/bin/env bash
# Real clients against `turnpike sim`, then through `turnpike serve` in front of it:
# openai-python 3.51.0 (`client.responses.connect()`) and Codex CLI 0.169.0 (npm), each doing a
# text turn and a tool-call loop over WebSocket.
# Downloads from PyPI and npm (Codex is ~400 MB) into $CLIENTS_DIR (default target/clients).
# Usage: tests/clients/run.sh            (from the repository root; builds turnpike first)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DIR=${CLIENTS_DIR:-$ROOT/target/clients}
KEY=sk-sim-clients
mkdir -p "$DIR"

cargo build -q
BIN=$ROOT/target/debug/turnpike

# The sim, on a free port; its address comes from its log.
# The address a process logged as "listening on http://ADDR".
addr_from() {
  local a=""
  for _ in $(seq 1 100); do
    a=$(grep -o 'listening on http://[0-9.:]*' "$1" | head -1 | sed 's|.*http://||') || true
    [ -n "$a" ] && break
    sleep 0.1
  done
  echo "$a"
}

"$BIN" sim --bind 127.0.0.1:0 --api-key "$KEY" 2>"$DIR/sim.log" &
SIM_PID=$!
trap 'kill $SIM_PID 2>/dev/null || true' EXIT
ADDR=$(addr_from "$DIR/sim.log")
BASE="http://$ADDR/v1"
echo "sim at $BASE"

echo "== openai-python 3.51.0 =="
if [ ! -x "$DIR/venv/bin/python" ]; then
  python3 -m venv "$DIR/venv"
  "$DIR/venv/bin/pip" install -q "openai[realtime]==3.51.0"
fi
SIM_KEY=$KEY "$DIR/venv/bin/python" "$ROOT/tests/clients/sdk_client.py" "$BASE"

echo "== Codex CLI 0.169.0 =="
CODEX=$DIR/codex/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex
if [ ! -x "$CODEX" ]; then
  mkdir -p "$DIR/codex"
  (cd "$DIR/codex" && npm init -y >/dev/null && npm install --no-audit --no-fund @openai/codex@0.169.0 >/dev/null)
fi
export CODEX_HOME=$DIR/codexhome/.codex HOME=$DIR/codexhome MOCK_API_KEY=$KEY
mkdir -p "$CODEX_HOME"
cat > "$CODEX_HOME/config.toml" <<TOML
model = "gpt-5.2"
model_provider = "turnpikesim"

[model_providers.turnpikesim]
name = "turnpike sim"
base_url = "$BASE"
wire_api = "responses"
env_key = "MOCK_API_KEY"
supports_websockets = true
stream_idle_timeout_ms = 20000
stream_max_retries = 1
TOML
WORK=$(mktemp -d)
cd "$WORK"
echo "-- text turn"
"$CODEX" exec --skip-git-repo-check --ephemeral --json "Say hello" 2>"$DIR/codex-text.err" | tee "$DIR/codex-text.jsonl"
grep -q '"type":"turn.completed"' "$DIR/codex-text.jsonl"
echo "-- tool-call loop"
"$CODEX" exec --skip-git-repo-check --ephemeral --json "Run the tool [[sim: tool]]" 2>"$DIR/codex-tool.err" | tee "$DIR/codex-tool.jsonl"
grep -q 'sim-tool-ran' "$DIR/codex-tool.jsonl"
grep -q '"type":"turn.completed"' "$DIR/codex-tool.jsonl"
cd "$ROOT"

echo "== the same clients through turnpike =="
RELAY_DIR=$(mktemp -d)
printf '[[accounts]]\nname = "sim"\nbase_url = "%s"\napi_key = "%s"\n' "$BASE" "$KEY" > "$RELAY_DIR/relay.toml"
export TURNPIKE_DATABASE__URL="sqlite://$RELAY_DIR/turnpike.db"
"$BIN" users create clients >/dev/null 2>&1
TP_KEY=$("$BIN" keys create --user clients 2>/dev/null)
"$BIN" --config "$RELAY_DIR/relay.toml" serve 2>"$DIR/relay.log" &
RELAY_PID=$!
trap 'kill $SIM_PID $RELAY_PID 2>/dev/null || true' EXIT
RADDR=$(addr_from "$DIR/relay.log")
SIM_KEY=$TP_KEY "$DIR/venv/bin/python" "$ROOT/tests/clients/sdk_client.py" "http://$RADDR/v1"
sed -i "s|^base_url = .*|base_url = \"http://$RADDR/v1\"|" "$CODEX_HOME/config.toml"
export MOCK_API_KEY=$TP_KEY
cd "$WORK"
"$CODEX" exec --skip-git-repo-check --ephemeral --json "Run the tool [[sim: tool]]" 2>"$DIR/codex-relay.err" | tee "$DIR/codex-relay.jsonl"
grep -q 'sim-tool-ran' "$DIR/codex-relay.jsonl"
grep -q '"type":"turn.completed"' "$DIR/codex-relay.jsonl"
cd "$ROOT"
echo "-- usage rows written by turnpike"
python3 - "$RELAY_DIR/turnpike.db" <<'PY2'
import sqlite3, sys
for r in sqlite3.connect(sys.argv[1]).execute("select turn_index, status, usage_source, warmup, input_tokens, output_tokens, first_event_ms, first_token_ms, duration_ms from usage_logs order by id"):
    print(r)
PY2

echo "== what the sim saw =="
curl -s "http://$ADDR/sim/stats"; echo
python3 - "$ADDR" <<'PY'
import json, sys, urllib.request
conns = json.load(urllib.request.urlopen(f"http://{sys.argv[1]}/sim/connections"))
for c in conns:
    ua = dict(c["headers"]).get("user-agent", "?")
    creates = [json.loads(f["text"]) for f in c["frames"] if f["dir"] == "in" and f["text"].startswith("{")]
    summary = [(r.get("generate", True), r.get("previous_response_id"), [i.get("type", "message") for i in r["input"]] if isinstance(r.get("input"), list) else "text") for r in creates]
    print(f"conn {c['id']} {ua[:40]!r}: {len(creates)} response.create: {summary}")
PY
echo "all clients passed"
