//! Nothing lost, nothing doubled: usage rows, ledger and compensations under load, under billing
//! failures and across `kill -9`, on SQLite and (when `TURNPIKE_TEST_PG_URL` is set) PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::ledger::{assert_invariant, exec, query_sums, sums, wait_rows};
use common::stack::{Stack, StackOptions, block};
use common::ws::Client;
use common::{Proc, TestDb, http_get};
use serde_json::json;
use turnpike::db::queries;

const T: Duration = Duration::from_secs(20);

/// The response ids of the turns the clients saw complete.
fn load(
    addr: &str,
    key: &str,
    sessions: usize,
    turns: usize,
    directive: &'static str,
) -> Vec<String> {
    common::stack::load(addr, key, sessions, turns, directive).completed
}

#[test]
fn invariant_under_load() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                max_conns: 16,
                ..StackOptions::default()
            },
        );
        let seen = load(&s.addr, &s.key, 12, 15, "deltas=5");
        assert_eq!(seen.len(), 12 * 15, "{backend}: {:?}", s.problems());
        let sums = wait_rows(&s.db, seen.len() as i64);
        assert_eq!(
            sums.usage_rows,
            seen.len() as i64,
            "{backend}: exactly one row per finished turn"
        );
        assert!(sums.usage_cost > 0);
        assert_invariant(&sums);
        // Each row's cost is the price of its tokens (default: $1.25 in, $10 out per Mtok).
        let rows = s.rows(seen.len());
        for r in &rows {
            let expected = (r.input_tokens as i128 * 1_250_000_000
                + r.output_tokens as i128 * 10_000_000_000
                + 500_000)
                / 1_000_000;
            assert_eq!(r.cost_nanousd as i128, expected, "{r:?}");
        }
        s.finish();
    }
}

fn drop_trigger(db: &TestDb) {
    match db.backend {
        "sqlite" => exec(db, "DROP TRIGGER fail_debit;"),
        _ => exec(
            db,
            "DROP TRIGGER fail_debit ON billing_ledger; DROP FUNCTION fail_debit();",
        ),
    }
}

fn backlog(db: &TestDb) -> Vec<(String, i64)> {
    block(async {
        let pool = db.pool();
        turnpike::db::queries::billing::compensation_backlog(&pool)
            .await
            .unwrap()
    })
    .into_iter()
    .map(|r| (r.status, r.rows_count))
    .collect()
}

fn wait_backlog(db: &TestDb, want: &[(&str, i64)]) -> Vec<(String, i64)> {
    let want: Vec<(String, i64)> = want.iter().map(|(s, n)| (s.to_string(), *n)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let b = backlog(db);
        if b == want || std::time::Instant::now() > deadline {
            return b;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn billing_failures_become_compensations_then_settle() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                env: &[
                    ("TURNPIKE_COMPENSATION__POLL_INTERVAL_MS", "50"),
                    ("TURNPIKE_COMPENSATION__BASE_BACKOFF_MS", "30"),
                    ("TURNPIKE_COMPENSATION__MAX_ATTEMPTS", "3"),
                ],
                ..StackOptions::default()
            },
        );
        // A test-only trigger makes every debit fail.
        match s.db.backend {
            "sqlite" => exec(
                &s.db,
                "CREATE TRIGGER fail_debit BEFORE INSERT ON billing_ledger BEGIN SELECT RAISE(ABORT, 'injected billing failure'); END;",
            ),
            _ => exec(
                &s.db,
                "CREATE FUNCTION fail_debit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'injected billing failure'; END $$ LANGUAGE plpgsql; \
                 CREATE TRIGGER fail_debit BEFORE INSERT ON billing_ledger FOR EACH ROW EXECUTE FUNCTION fail_debit();",
            ),
        }
        let seen = load(&s.addr, &s.key, 3, 4, "");
        assert_eq!(seen.len(), 12);
        let owed = wait_rows(&s.db, 12);
        assert_eq!(
            owed.usage_rows, 12,
            "{backend}: usage rows land although billing failed"
        );
        assert_eq!(owed.ledger, 0);
        assert_eq!(
            owed.unsettled, owed.usage_cost,
            "every debit is owed: {owed:?}"
        );
        assert_invariant(&owed);
        // The compensator tries 3 times each (the trigger is still there), then gives up.
        assert_eq!(
            wait_backlog(&s.db, &[("dead", 12)]),
            vec![("dead".to_string(), 12)],
            "{backend}"
        );
        let rows = block(async {
            let pool = s.db.pool();
            turnpike::db::queries::billing::compensations(
                &pool,
                Some(turnpike::record::CompensationStatus::Dead),
                None,
            )
            .await
            .unwrap()
        });
        for (r, _) in &rows {
            assert_eq!(r.attempts, 3);
            assert!(
                r.last_error
                    .as_deref()
                    .unwrap_or_default()
                    .contains("injected billing failure"),
                "{r:?}"
            );
            let history: Vec<serde_json::Value> = serde_json::from_str(&r.error_history).unwrap();
            assert_eq!(
                history.len(),
                4,
                "the first failure and three attempts: {history:?}"
            );
            assert!(r.dead_at.is_some());
        }
        assert_invariant(&sums(&s.db));

        // The cause is fixed; an operator re-queues the dead rows; they settle, exactly once.
        drop_trigger(&s.db);
        for (r, _) in &rows {
            let out = common::turnpike()
                .env("TURNPIKE_DATABASE__URL", &s.db.url)
                .args(["compensations", "retry", &r.id.to_string()])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(
            wait_backlog(&s.db, &[("settled", 12)]),
            vec![("settled".to_string(), 12)],
            "{backend}"
        );
        let after = sums(&s.db);
        assert_eq!(
            (after.unsettled, after.ledger),
            (0, after.usage_cost),
            "{after:?}"
        );
        assert_invariant(&after);
        let listed = common::turnpike()
            .env("TURNPIKE_DATABASE__URL", &s.db.url)
            .args(["compensations", "list", "--status", "settled"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 13);
        s.finish();
    }
}

#[test]
fn kill_9_mid_load_loses_nothing() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        // No flush before the kill: every record the clients saw finish is only in the spool.
        let mut s = Stack::start(
            db,
            StackOptions {
                max_conns: 16,
                env: &[("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "600000")],
                ..StackOptions::default()
            },
        );
        let addr = s.addr.clone();
        let key = s.key.clone();
        let loader = std::thread::spawn(move || load(&addr, &key, 8, 40, "deltas=3"));
        std::thread::sleep(Duration::from_millis(700));
        let pid = s.relay.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-9", &pid])
                .status()
                .unwrap()
                .success()
        );
        let _ = s.relay.child.wait();
        let problems: Vec<String> = s
            .relay
            .log
            .try_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        let seen_before_kill = loader.join().unwrap();
        assert!(
            !seen_before_kill.is_empty(),
            "{backend}: some turns finished before the kill"
        );
        assert_eq!(
            sums(&s.db).usage_rows,
            0,
            "{backend}: nothing reached the database before the kill: {problems:?}"
        );

        // Start again on the same database and spool: the spool is replayed.
        let mut cmd = common::turnpike();
        let config = s.config_path();
        cmd.arg("--config")
            .arg(&config)
            .env("TURNPIKE_DATABASE__URL", &s.db.url)
            .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
            .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", s.spool_dir())
            // Replay more than fits in memory: the rest is read back from disk.
            .env("TURNPIKE_ACCOUNTING__MAX_IN_MEMORY", "10")
            .arg("serve");
        let relay = Proc::spawn(cmd);
        let addr2 = relay.listening_addr();
        let seen_after = load(&addr2, &s.key, 2, 5, "");
        let total = seen_before_kill.len() + seen_after.len();
        // The spool also held turns whose clients never saw them end: wait for every turn a
        // client saw, not for a row count.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let (rows, count) = loop {
            let rows = s.rows(total);
            let mut count: HashMap<String, usize> = HashMap::new();
            for r in &rows {
                *count
                    .entry(r.response_id.clone().unwrap_or_default())
                    .or_default() += 1;
            }
            let all = seen_before_kill
                .iter()
                .chain(&seen_after)
                .all(|id| count.contains_key(id));
            if all || std::time::Instant::now() > deadline {
                break (rows, count);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let sums = common::ledger::sums(&s.db);
        for id in seen_before_kill.iter().chain(&seen_after) {
            if count.get(id.as_str()) != Some(&1) {
                let log: Vec<String> = relay.log.try_iter().collect();
                panic!(
                    "{backend}: turn {id} the client saw finish has exactly one row: {:?}; {} rows for {total} turns; first run: {problems:?}; second run: {log:#?}",
                    count.get(id.as_str()),
                    rows.len()
                );
            }
        }
        assert_invariant(&sums);
        drop(relay);
        s.finish();
    }
}

fn record(n: usize, key: i64, user: i64) -> turnpike::record::TurnRecord {
    use turnpike::record::TurnRecord;
    TurnRecord {
        request_id: format!("turn_restart_{n}").into(),
        response_id: None,
        api_key_id: key,
        user_id: user,
        session_id: "sess_test".into(),
        turn_index: n as i32,
        account: "sim".into(),
        model: "gpt-test".into(),
        status: turnpike::record::TurnStatus::Completed,
        usage_source: turnpike::record::UsageSource::Reported,
        warmup: false,
        usage: turnpike::protocol::usage::Usage {
            input_tokens: 10,
            output_tokens: 5,
            total_tokens: 15,
            ..Default::default()
        },
        cost_nanousd: 1_000 + n as i64,
        timing: turnpike::record::Timing {
            upstream_wait_ms: Some(1),
            first_event_ms: Some(2),
            first_token_ms: Some(3),
            duration_ms: 4,
        },
        error_code: None,
        accepted_at: turnpike::db::now(),
        set_aside: None,
        origin: turnpike::record::Origin::Create,
        transport: turnpike::record::Transport::Ws,
        upstream_transport: turnpike::record::Transport::Ws,
        service_tier: "standard".into(),
        block: None,
    }
}

/// An accounting actor over `spool_dir` and `pool` (flushing every 30 ms), with a user (balance
/// `balance`) and a key to bill: (actor, user id, key id).
async fn accounting_with_key(
    pool: &turnpike::db::DbPool,
    spool_dir: &std::path::Path,
    balance: Option<i64>,
    max_in_memory: usize,
) -> (actix::Addr<turnpike::accounting::Accounting>, i64, i64) {
    let user = turnpike::db::queries::users::create(pool, "u", balance)
        .await
        .unwrap();
    let (_, key) = turnpike::auth::create_key(pool, user.id, &Default::default())
        .await
        .unwrap();
    let mut settings = turnpike::config::Settings::default();
    settings.accounting.spool_dir = spool_dir.to_string_lossy().into_owned();
    settings.accounting.flush_interval_ms = 30;
    settings.accounting.max_in_memory = max_in_memory;
    let acc = turnpike::app::start_accounting(
        &settings,
        pool.clone(),
        Default::default(),
        Default::default(),
        turnpike::app::open_spool_dir(&settings).unwrap(),
    );
    (acc, user.id, key.id)
}

/// Restarting the supervised accounting actor mid-stream loses no record: what was acknowledged
/// is in the spool and replayed; what was not is refused and sent again by the caller.
#[test]
fn accounting_restart_loses_nothing() {
    use turnpike::accounting::messages::{Backlog, RecordTurn};
    use turnpike::actors::RestartActor;
    turnpike::telemetry::init(
        &turnpike::config::LogSettings::default(),
        &turnpike::config::TelemetrySettings::default(),
    );
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let spool = tempfile::tempdir().unwrap();
        let spool_dir = spool.path().to_path_buf();
        let dbref = &db;
        actix_web::rt::System::new().block_on(async move {
            let pool = dbref.migrated_pool().await;
            // Restarts reload more than fits in memory: the rest is read back from disk.
            let (acc, user_id, key_id) =
                accounting_with_key(&pool, &spool_dir, Some(1_000_000_000), 20).await;
            let mut acked = 0;
            for n in 0..300 {
                if n % 50 == 25 {
                    acc.do_send(RestartActor);
                }
                // A record refused while the actor restarts is sent again, as sessions do.
                let mut tries = 0;
                loop {
                    match acc.send(RecordTurn(record(n, key_id, user_id))).await {
                        Ok(Ok(())) => break,
                        other => {
                            tries += 1;
                            assert!(
                                tries < 500,
                                "{backend}: record {n} never acknowledged: {other:?}"
                            );
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                    }
                }
                acked += 1;
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while acc.send(Backlog).await.unwrap_or(1) > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let s = query_sums(&pool).await;
            assert_eq!((s.usage_rows, acked), (300, 300), "{backend}: {s:?}");
            assert_eq!(s.ledger, (0..300).map(|n| 1_000 + n).sum::<i64>());
            assert_invariant(&s);
            let u = turnpike::db::queries::users::by_name(&pool, "u")
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                u.balance_nanousd,
                Some(1_000_000_000 - s.ledger),
                "{backend}: the balance moved by the ledger"
            );
        });
        block(db.cleanup());
    }
}

/// A key's quota counts spend still in the spool: no overrun while the database lags.
#[test]
fn quota_counts_spend_still_in_the_spool() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "600000")],
            key: turnpike::auth::KeyRequest {
                // The first turn's reservation (≈ 3 input + 5 output tokens: 53,750) fits;
                // what it costs (7 output tokens) passes the quota while in the spool only.
                quota_nanousd: Some(60_000),
                ..Default::default()
            },
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    let turn = json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "Say hello",
        "max_output_tokens": 5});
    c.send(&turn);
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(sums(&s.db).usage_rows, 0, "nothing in the database yet");
    c.send(&turn);
    let e = c.next_event(T);
    assert_eq!(
        (e["error"]["code"].as_str(), e["status"].as_u64()),
        (Some("quota_exhausted"), Some(403))
    );
    s.finish();
}

/// The database vanishes for seconds mid-load (PostgreSQL behind a proxy the test cuts): turns
/// keep flowing, readiness says so, and everything lands once the database is back.
#[test]
fn database_outage_mid_load() {
    // A tiny memory cap: most of the outage's backlog waits on disk only.
    let env = [
        ("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "500"),
        ("TURNPIKE_ACCOUNTING__MAX_IN_MEMORY", "5"),
    ];
    let Some((s, proxy)) = Stack::behind_pg_proxy(&env) else {
        eprintln!("PostgreSQL not configured: skipped");
        return;
    };
    // Sessions connect (and authenticate) while the database is up.
    let clients: Vec<Client> = (0..6).map(|_| s.client()).collect();
    let mut first = s.client();
    first.send(&json!({"type": "response.create", "model": "gpt-test", "input": "warm"}));
    assert_eq!(
        first.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    proxy.cut();
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || {
                let mut done = 0;
                for _ in 0..6 {
                    c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "during the outage"}));
                    if c.until_terminal(T).last().unwrap()["type"] == "response.completed" {
                        done += 1;
                    }
                    std::thread::sleep(Duration::from_millis(150));
                }
                done
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // A key seen before the outage still connects (Codex reconnects after every error).
    let mut late = s.client();
    late.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "reconnected"}));
    assert_eq!(
        late.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    let (status, body) = common::http_get(&s.addr, "/readyz");
    assert_eq!(status, 503, "readiness reports the outage: {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("backlog"),
        "{body}"
    );
    let finished: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(
        finished, 36,
        "every turn completed while the database was away"
    );
    assert!(t0.elapsed() > Duration::from_millis(900));
    assert!(
        sums(&s.db).usage_rows <= 1,
        "at most the turn from before the outage is in the database"
    );
    proxy.restore();
    let after = wait_rows(&s.db, 38);
    assert_eq!(after.usage_rows, 38);
    assert_invariant(&after);
    let (status, body) = common::http_get(&s.addr, "/readyz");
    assert_eq!(status, 200, "{body}");
    s.finish();
}

/// A record the database refuses for its content (here: a key that does not exist) is
/// quarantined with the reason and never blocks the records behind it; a spool record of an
/// unknown format version is kept aside (`.unknown`), never skipped silently.
#[test]
fn poison_records_are_quarantined_and_never_block() {
    use turnpike::accounting::messages::{Backlog, RecordTurn};
    use turnpike::accounting::spool::{DirFs, Spool};
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let spool = tempfile::tempdir().unwrap();
        let spool_dir = spool.path().to_path_buf();
        // A record written by a future version, left by an earlier run.
        {
            let (mut s, _) = Spool::open(DirFs::new(&spool_dir).unwrap(), &mut |_, _| {}).unwrap();
            s.append(br#"{"v":99,"request_id":"turn_future"}"#).unwrap();
            s.sync().unwrap();
        }
        let dbref = &db;
        actix_web::rt::System::new().block_on(async move {
            let pool = dbref.migrated_pool().await;
            let (acc, user_id, key_id) =
                accounting_with_key(&pool, &spool_dir, None, 100_000).await;
            let mut poison = record(1_000, key_id, user_id);
            poison.api_key_id = 987_654; // no such key: every insert fails its foreign key
            poison.request_id = "turn_poison".into();
            let mut all = vec![record(0, key_id, user_id), poison];
            all.extend((1..6).map(|n| record(n, key_id, user_id)));
            for r in all {
                assert_eq!(acc.send(RecordTurn(r)).await.unwrap(), Ok(()));
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while acc.send(Backlog).await.unwrap_or(1) > 0 && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let s = query_sums(&pool).await;
            assert_eq!(
                s.usage_rows, 6,
                "{backend}: the records behind the poison landed"
            );
            assert_invariant(&s);
            let q = turnpike::db::queries::billing::quarantined(&pool)
                .await
                .unwrap();
            assert_eq!(q.len(), 1, "{backend}: {q:?}");
            assert_eq!((q[0].0.as_str(), q[0].1), ("turn_poison", 987_654));
            assert!(q[0].2.to_lowercase().contains("foreign key"), "{q:?}");
        });
        let unknown: Vec<_> = std::fs::read_dir(spool.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".unknown"))
            .collect();
        assert_eq!(
            unknown.len(),
            1,
            "{backend}: the future record was kept aside"
        );
        block(db.cleanup());
    }
}

/// PostgreSQL unreachable when `serve` starts (docs/DESIGN.md#database-at-start): the relay
/// comes up anyway — `/healthz` 200, `/readyz` 503 naming the database, handshakes refused
/// 503 — retries, migrates once the database answers, becomes ready, and a turn is billed.
#[test]
fn database_down_at_start_then_up() {
    let Some((db, proxy, via_proxy)) = common::postgres_behind_proxy() else {
        eprintln!("PostgreSQL not configured: skipped");
        return;
    };
    proxy.cut();
    let (_sim, sim_addr) = common::start_sim(&[]);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("relay.toml");
    std::fs::write(
        &config,
        format!("[[accounts]]\nname = \"sim\"\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"sk-upstream\"\n"),
    )
    .unwrap();
    let mut cmd = common::turnpike();
    cmd.arg("--config")
        .arg(&config)
        .env("TURNPIKE_DATABASE__URL", &via_proxy)
        .env("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "500")
        .env("TURNPIKE_DATABASE__START_RETRY_MAX_MS", "1000")
        .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
        .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", dir.path().join("spool"))
        .env("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "50")
        .arg("serve");
    let relay = Proc::spawn(cmd);
    let addr = relay.listening_addr();
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    let named = format!("PostgreSQL {}", via_proxy.rsplit('@').next().unwrap());
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(message.contains(&named), "{named} in {message}");
    assert!(!message.contains("postgres@"), "{message}");

    proxy.restore();
    let deadline = std::time::Instant::now() + T;
    while http_get(&addr, "/readyz").0 != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        http_get(&addr, "/readyz").0,
        200,
        "ready once the database answers"
    );
    let (key, key_id) = block(async {
        let pool = db.pool();
        let user = queries::users::create(&pool, "late", None).await.unwrap();
        let (key, row) = turnpike::auth::create_key(&pool, user.id, &Default::default())
            .await
            .unwrap();
        (key, row.id)
    });
    let mut c = Client::bearer(&addr, &key);
    c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    let s = wait_rows(&db, 1);
    assert_eq!(s.usage_rows, 1);
    assert_invariant(&s);
    let rows = block(async { queries::usage::by_key(&db.pool(), key_id).await }).unwrap();
    assert_eq!(rows.len(), 1);
    drop(relay);
    block(db.cleanup());
}
