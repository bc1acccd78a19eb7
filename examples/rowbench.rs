//! Usage rows per second into the database, batched (one transaction per 500 rows, as the
//! accounting actor writes) vs one transaction per row; and the spool's fsync latency, which is
//! what a terminal event waits for before it is forwarded. See BENCHMARKS.md.
//!
//! cargo run --release --example rowbench -- sqlite:///tmp/rows.db 5000
//! cargo run --release --example rowbench -- postgres://postgres@127.0.0.1:5432/rowbench 5000
//!
//! With `--json` as third argument, one JSON line (for `scripts/bench.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: it stops at the first thing it cannot do

use std::time::Instant;

use turnpike::accounting::spool::{DirFs, Spool};
use turnpike::config::DatabaseSettings;
use turnpike::db::{DbPool, migrate, queries};
use turnpike::record::TurnRecord;

fn record(tag: &str, n: usize, key: i64, user: i64) -> TurnRecord {
    TurnRecord {
        request_id: format!("resp_{tag}_{n}").into(),
        response_id: None,
        api_key_id: key,
        user_id: user,
        session_id: "sess_bench".into(),
        turn_index: n as i32,
        account: "sim".into(),
        model: "gpt-bench".into(),
        status: turnpike::record::TurnStatus::Completed,
        usage_source: turnpike::record::UsageSource::Reported,
        warmup: false,
        usage: turnpike::protocol::usage::Usage {
            input_tokens: 1200,
            cached_input_tokens: 800,
            output_tokens: 300,
            total_tokens: 1500,
            ..Default::default()
        },
        cost_nanousd: 4_000 + n as i64,
        timing: turnpike::record::Timing {
            upstream_wait_ms: Some(2),
            first_event_ms: Some(40),
            first_token_ms: Some(90),
            duration_ms: 700,
        },
        error_code: None,
        accepted_at: turnpike::db::now(),
        set_aside: None,
        block: None,
        origin: turnpike::record::Origin::Create,
        transport: turnpike::record::Transport::Ws,
        upstream_transport: turnpike::record::Transport::Ws,
        service_tier: "standard".into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "sqlite:///tmp/turnpike-rowbench.db".into());
    let n: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5000);
    let json = args.get(3).is_some_and(|a| a == "--json");
    let (batched, per_row) = actix_web::rt::System::new().block_on(async move {
        let pool = DbPool::connect(&DatabaseSettings { url: url.clone(), ..Default::default() }).expect("pool");
        migrate::run_pending(&pool).await.expect("migrate");
        let name = format!("bench{}", turnpike::sim::monotonic_ns());
        let user = queries::users::create(&pool, &name, Some(1_000_000_000_000)).await.expect("user");
        let (_, key) = turnpike::auth::create_key(&pool, user.id, &Default::default()).await.expect("key");

        let batch: Vec<TurnRecord> = (0..n).map(|i| record(&format!("{name}b"), i, key.id, user.id)).collect();
        let t = Instant::now();
        let per_tx: usize = std::env::var("ROWBENCH_BATCH").ok().and_then(|v| v.parse().ok()).unwrap_or(500);
        for chunk in batch.chunks(per_tx) {
            queries::billing::record_batch(&pool, chunk).await.expect("batch");
        }
        let batched = n as f64 / t.elapsed().as_secs_f64();

        let single: Vec<TurnRecord> = (0..(n / 20).max(1)).map(|i| record(&format!("{name}s"), i, key.id, user.id)).collect();
        let t = Instant::now();
        for r in &single {
            queries::billing::record_batch(&pool, std::slice::from_ref(r)).await.expect("row");
        }
        let per_row = single.len() as f64 / t.elapsed().as_secs_f64();
        if !json {
            println!("{} backend={} batched_rows_per_s={batched:.0} per_row_tx_rows_per_s={per_row:.0} (usage + ledger + spend/balance per row)", url.split(':').next().unwrap_or(""), pool.backend());
        }
        (batched, per_row)
    });

    // Spool: one small record appended and fsynced, 500 times (the wait a lone terminal event
    // sees; records arriving together share one fsync).
    let dir = tempfile_dir();
    let (mut spool, _) =
        Spool::open(DirFs::new(&dir).expect("dir"), &mut |_, _| {}).expect("spool");
    let payload = serde_json::to_vec(&record("spool", 1, 1, 1)).expect("json");
    let mut lat: Vec<u128> = Vec::new();
    for _ in 0..500 {
        let t = Instant::now();
        spool.append(&payload).expect("append");
        spool.sync().expect("sync");
        lat.push(t.elapsed().as_micros());
    }
    lat.sort_unstable();
    let (p50, p99, max) = (
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1],
    );
    if json {
        println!(
            "{{\"rows\":{n},\"batched_rows_per_s\":{batched:.0},\"per_row_tx_rows_per_s\":{per_row:.0},\"spool_record_bytes\":{},\"spool_fsync_p50_us\":{p50},\"spool_fsync_p99_us\":{p99},\"spool_fsync_max_us\":{max}}}",
            payload.len()
        );
    } else {
        println!(
            "spool append+fsync of one {} B record: p50={p50} us p99={p99} us max={max} us",
            payload.len()
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "turnpike-rowbench-spool-{}",
        turnpike::sim::monotonic_ns()
    ))
}
