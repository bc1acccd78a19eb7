# Shared by scripts/bench.sh and scripts/bench_ab.sh (sourced, not run).

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_port PORT [TENTHS]: waits for a listener (10 s unless told).
wait_port() { for _ in $(seq 1 "${2:-100}"); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "bench: port $1 never opened" >&2; exit 1; }

# bench_relay BINARY CONFIG PORT DATABASE_URL UPSTREAM_PORT [WORKERS]: writes a relay's config
# (one account on the bench upstream, room for 20,000 sessions; WORKERS worker threads, 0 = the
# default, one per core), migrates, creates the user `bench`; prints a new key of it, limited to
# BENCH_QUOTA_USD when that is set (its turns then reserve: docs/DESIGN.md#reservations).
bench_relay() {
  local bin=$1 conf=$2 port=$3 db=$4 up=$5 workers=${6:-0}
  cat >"$conf" <<CONF
[server]
bind = "127.0.0.1:$port"
workers = $workers
[database]
url = "$db"
[log]
level = "warn"
[limits]
default_max_sessions_per_key = 20000
[[accounts]]
name = "bench"
base_url = "http://127.0.0.1:$up/v1"
api_key = "sk-bench"
max_conns = 20000
CONF
  "$bin" --config "$conf" migrate >/dev/null
  "$bin" --config "$conf" users create bench >/dev/null
  "$bin" --config "$conf" keys create --user bench ${BENCH_QUOTA_USD:+--quota-usd "$BENCH_QUOTA_USD"}
}
