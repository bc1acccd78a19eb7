#!/usr/bin/env bash
# Before/after of two turnpike builds in one run, rounds interleaved (BENCHMARKS.md):
#
#   scripts/bench_ab.sh OLD_BINARY [NEW_BINARY]       # NEW defaults to target/release/turnpike
#
# Per round and build: a fresh relay on a new SQLite file, a warm-up, then each scenario of
# `bench stream` against the same upstream; prints one JSON line per measurement and a median
# summary per build and scenario. BENCH_WORKLOAD=big|small picks the upstream (as bench.sh);
# BENCH_ROUNDS (3); BENCH_AB_SCENARIOS overrides the scenarios ("name:SESSIONS TURNS EVENTS GAP_US
# [LANES]" separated by commas; a name starting with `idle` runs `bench idle` with SESSIONS first,
# on the relay as it was started: memory per idle session; one starting with `ttfe` runs
# `bench ttfe` with SESSIONS: time to first event, fresh and warm). BENCH_AB_ENV_OLD and
# BENCH_AB_ENV_NEW: environment assignments for each build's relay (the same binary twice with
# two settings, e.g. BENCH_AB_ENV_OLD=TURNPIKE_BILLING__RESERVATION_BLOCK_TURNS=1);
# BENCH_QUOTA_USD gives the relays' key a quota (its turns reserve); BENCH_AB_QUOTA_OLD and
# BENCH_AB_QUOTA_NEW set it per build (empty: no quota). BENCH_DB=postgres puts each relay on
# a fresh PostgreSQL database (BENCH_PG_URL, default postgres://postgres@127.0.0.1:5432; needs
# psql) instead of a SQLite file. Never run beside a build or a test run: only same-run ratios
# count.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: scripts/bench_ab.sh OLD_BINARY [NEW_BINARY]}
NEW=${2:-$PWD/target/release/turnpike}
cargo build --release --quiet --example bench
B=$PWD/target/release/examples/bench
ROUNDS=${BENCH_ROUNDS:-3}
SCENARIOS=${BENCH_AB_SCENARIOS:-"idle1k:1000,s1_500eps:1 3 1500 2000,s100_50keps:100 2 1500 2000,s100_saturation:100 5 2000 0"}
case ${BENCH_WORKLOAD:-big} in
  big) MODE=upstream ;;
  small) MODE=upstream-async ;;
  *) echo "bench_ab: BENCH_WORKLOAD is big or small" >&2; exit 2 ;;
esac

WORK=$(mktemp -d /tmp/turnpike-ab.XXXXXX)
PIDS=()
PG=${BENCH_PG_URL:-postgres://postgres@127.0.0.1:5432}
PG_DBS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  for d in "${PG_DBS[@]}"; do psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $d" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
source scripts/bench_lib.sh

UP=$(free_port)
"$B" "$MODE" "127.0.0.1:$UP" & PIDS+=($!)
# Each `bench stream` line carries the upstream's CPU over its window (`upstream_cpu_s`).
export BENCH_UPSTREAM_PID=$!
wait_port "$UP"
OUT=$WORK/ab.jsonl
: >"$OUT"

run_build() { # label binary round
  local label=$1 bin=$2 round=$3 port db name="turnpike_ab_$$_$1_$3"
  port=$(free_port)
  local key pid
  # A new database for each relay run.
  case ${BENCH_DB:-sqlite} in
    sqlite) db="sqlite://$WORK/$name.db" ;;
    postgres)
      psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
      PG_DBS+=("$name")
      db="$PG/$name" ;;
    *) echo "bench_ab: BENCH_DB is sqlite or postgres" >&2; exit 2 ;;
  esac
  local quota=BENCH_AB_QUOTA_${label^^}
  key=$(BENCH_QUOTA_USD=${!quota-${BENCH_QUOTA_USD:-}} bench_relay "$bin" "$WORK/$label.toml" "$port" "$db" "$UP")
  local envs=BENCH_AB_ENV_${label^^}
  # shellcheck disable=SC2086 # assignments split on purpose
  env ${!envs:-} "$bin" --config "$WORK/$label.toml" serve 2>>"$WORK/$label.log" & pid=$!
  wait_port "$port"
  local url=ws://127.0.0.1:$port/v1/responses
  local warm=0
  IFS=, read -ra scens <<<"$SCENARIOS"
  for s in "${scens[@]}"; do
    local name=${s%%:*} args lanes j
    read -ra args <<<"${s#*:}"
    if [[ $name == idle* ]]; then
      j=$("$B" idle "$url" "$key" "${args[0]}" "$pid")
    elif [[ $name == ttfe* ]]; then
      j=$("$B" ttfe "$url" "$key" "${args[0]}")
    else
      if [ "$warm" = 0 ]; then "$B" stream "$url" "$key" 10 2 200 0 >/dev/null; warm=1; fi
      lanes=${args[4]:-1}
      j=$(BENCH_LANES=$lanes "$B" stream "$url" "$key" "${args[@]:0:4}" "$pid")
    fi
    echo "{\"build\":\"$label\",\"round\":$round,\"scenario\":\"$name\",\"r\":$j}" | tee -a "$OUT"
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
  # Alternate which build goes first, so neither always meets a warmer machine.
  if (( round % 2 )); then
    run_build old "$OLD" "$round"; run_build new "$NEW" "$round"
  else
    run_build new "$NEW" "$round"; run_build old "$OLD" "$round"
  fi
done

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(xs):
    xs = sorted(xs); n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2
def table(marker, head, a, b, fmt):
    """Median [range] of fields a and b per scenario and build, for rows holding `marker`."""
    sel = [r for r in rows if marker in r["r"]]
    if not sel:
        return
    print(head)
    print("|---|---|---|---|")
    for scen in dict.fromkeys(r["scenario"] for r in sel):
        for build in ("old", "new"):
            rs = [r["r"] for r in sel if r["scenario"] == scen and r["build"] == build]
            cols = []
            for f in (a, b):
                xs = [r[f] for r in rs]
                cols.append(f"{med(xs):{fmt}} [{min(xs):{fmt}}–{max(xs):{fmt}}]")
            print(f"| {scen} | {build} | {cols[0]} | {cols[1]} |")
    print()
table("kib_per_session", "| scenario | build | KiB per idle session overall, median [range] | marginal |",
      "kib_per_session", "marginal_kib_per_session", ".1f")
table("warm_p50_us", "| scenario | build | time to first event p50 µs, warm median [range] | fresh |",
      "warm_p50_us", "fresh_p50_us", ".0f")
rows = [r for r in rows if "kib_per_session" not in r["r"] and "warm_p50_us" not in r["r"]]
print("| scenario | build | events/s median [range] | p50 µs | p99 µs | relay CPU-s per 1M events median [range] |")
print("|---|---|---|---|---|---|")
for scen in dict.fromkeys(r["scenario"] for r in rows):
    for build in ("old", "new"):
        rs = [r["r"] for r in rows if r["scenario"] == scen and r["build"] == build]
        eps = [r["events_per_s"] for r in rs]
        cpu = [r["cpu_s_per_m_events"] for r in rs if r.get("cpu_s_per_m_events") is not None]
        p50 = med([r["p50_us"] for r in rs]); p99 = med([r["p99_us"] for r in rs])
        share = [r["relay_user_s"] / r["relay_cpu_s"] for r in rs if r.get("relay_user_s") is not None and r.get("relay_cpu_s")]
        user = f", user {med(share):.0%}" if share else ""
        # Context switches per event, voluntary + involuntary (what a paced relay's CPU follows).
        sw = [(r["relay_vol_switches_per_event"], r["relay_invol_switches_per_event"]) for r in rs
              if r.get("relay_vol_switches_per_event") is not None]
        if sw:
            user += f", sw {med([v for v, _ in sw]):.2f} + {med([i for _, i in sw]):.2f}"
        print(f"| {scen} | {build} | {med(eps):,.0f} [{min(eps):,.0f}–{max(eps):,.0f}] | {p50:.0f} | {p99:.0f} | "
              f"{med(cpu):.2f} [{min(cpu):.2f}–{max(cpu):.2f}]{user} |")
PY
