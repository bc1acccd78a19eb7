#!/usr/bin/env bash
# The daily rollups' trigger cost on the accounting write (BENCHMARKS.md): rowbench with the
# usage_daily trigger on and off, interleaved, on a fresh PostgreSQL database and SQLite file.
#   scripts/rowbench_trigger.sh [ROUNDS] [ROWS]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3} rows=${2:-20000}
cargo build -q --release --example rowbench
bin=target/release/examples/rowbench
pg=postgres://postgres@127.0.0.1:5432/rowbench_trig sq=/tmp/turnpike-rowbench-trig.db
psql -q "postgres://postgres@127.0.0.1:5432/test" -c "DROP DATABASE IF EXISTS rowbench_trig" -c "CREATE DATABASE rowbench_trig"
rm -f "$sq"*
"$bin" "$pg" 1000 --json >/dev/null   # migrates
"$bin" "sqlite://$sq" 1000 --json >/dev/null
trig_pg=$(sed -n '/^CREATE TRIGGER/,/;$/p' migrations/postgres/2026-12-07-000002_usage_daily/up.sql)
trig_sq=$(sed -n '/^CREATE TRIGGER/,/^END;/p' migrations/sqlite/2026-12-07-000002_usage_daily/up.sql)
figures() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["batched_rows_per_s"], d["per_row_tx_rows_per_s"])'; }
for round in $(seq 1 "$rounds"); do
  for mode in on off; do
    psql -q "$pg" -c "DROP TRIGGER IF EXISTS usage_daily_after_insert ON usage_logs" 2>/dev/null
    sqlite3 "$sq" "DROP TRIGGER IF EXISTS usage_daily_after_insert;"
    if [ "$mode" = on ]; then psql -q "$pg" -c "$trig_pg"; sqlite3 "$sq" "$trig_sq"; fi
    echo "round $round trigger=$mode postgres=$("$bin" "$pg" "$rows" --json | figures) sqlite=$("$bin" "sqlite://$sq" "$rows" --json | figures)"
  done
done
psql -q "postgres://postgres@127.0.0.1:5432/test" -c "DROP DATABASE IF EXISTS rowbench_trig"
rm -f "$sq"*
