//! Billing at the edges (docs/DESIGN.md#preemption, §5.4.7–9, §5.5): a spool that disappears, a spool and a
//! database both down, an fsync that fails inside a running relay, a blackholed PostgreSQL, an
//! upstream that repeats response ids, cancel and preempt after the answer, poison records.
//! Every test ends on the invariant: each turn a client saw end has exactly one usage row and
//! `ledger + unsettled = cost`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::ledger::{assert_invariant, sums, wait_rows};
use common::stack::{Stack, StackOptions, block, load, wait_log};
use common::ws::Client;
use common::{TestDb, http_get, start_sim};
use serde_json::{Value, json};
use turnpike::db::models::UsageRow;
use turnpike::db::queries;

const T: Duration = Duration::from_secs(20);

fn create(directive: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "Say hello to the billing edge cases, please.", "metadata": {"sim": directive}})
}

fn last_type(events: &[Value]) -> String {
    events
        .last()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// One turn: "completed", or the error code it ended with.
fn turn(c: &mut Client, directive: &str) -> String {
    c.send(&create(directive));
    let events = c.until_terminal(T);
    match last_type(&events).as_str() {
        "error" => events.last().unwrap()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string(),
        other => other.trim_start_matches("response.").to_string(),
    }
}

fn all_rows(s: &Stack) -> Vec<UsageRow> {
    block(async { queries::usage::by_key(&s.db.pool(), s.key_id).await }).unwrap()
}

/// Rows per response id: every id in `seen` must have exactly one.
fn assert_one_row_each(rows: &[UsageRow], seen: &[String], what: &str) {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for r in rows {
        *count
            .entry(r.response_id.as_deref().unwrap_or_default())
            .or_default() += 1;
    }
    for id in seen {
        assert_eq!(
            count.get(id.as_str()),
            Some(&1),
            "{what}: turn {id} has exactly one row"
        );
    }
}

/// A migrated database's first user and key: (the key, its id).
fn user_with_key(db: &TestDb) -> (String, i64) {
    let pool = block(db.migrated_pool());
    block(async {
        let user = queries::users::create(&pool, "u", None).await.unwrap();
        let (key, row) = turnpike::auth::create_key(&pool, user.id, &Default::default())
            .await
            .unwrap();
        (key, row.id)
    })
}

fn count_lines(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

/// The spool directory is replaced by a file while turns run: the database takes every record
/// directly (each turn a client saw complete has its row), the state is logged once, readiness
/// stays ready but names the spool error, and the spool comes back once the path is free.
#[test]
fn spool_replaced_by_a_file_mid_load() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                max_conns: 8,
                ..StackOptions::default()
            },
        );
        let spool = s.spool_dir();
        let (addr, key) = (s.addr.clone(), s.key.clone());
        let loader = std::thread::spawn(move || load(&addr, &key, 4, 12, "deltas=3"));
        std::thread::sleep(Duration::from_millis(400));
        std::fs::remove_dir_all(&spool).unwrap();
        std::fs::write(&spool, b"not a directory").unwrap();
        let during = loader.join().unwrap();
        // Eight more turns, one after the other, with the spool still gone.
        let mut c = s.client();
        let after: Vec<String> = (0..8).map(|_| turn(&mut c, "")).collect();
        assert!(
            after.iter().all(|t| t == "completed"),
            "{backend}: {after:?}"
        );
        assert_eq!(during.completed.len(), 48, "{backend}: {:?}", during.errors);
        let (code, body) = http_get(&s.addr, "/readyz");
        assert_eq!(
            code, 200,
            "{backend}: the database carries the records: {body}"
        );
        assert!(body["spool_error"].is_string(), "{body}");
        // Every turn a client saw complete has its row, now.
        let rows = all_rows(&s);
        assert_eq!(rows.len(), 48 + 8, "{backend}");
        assert_one_row_each(&rows, &during.completed, backend);
        // The path is free again: the spool reopens and acknowledges again.
        std::fs::remove_file(&spool).unwrap();
        let mut log = Vec::new();
        assert!(
            wait_log(
                &s.relay,
                "spool usable again",
                Duration::from_secs(10),
                &mut log
            ),
            "{backend}: {log:?}"
        );
        assert_eq!(turn(&mut c, ""), "completed");
        let sums = wait_rows(&s.db, 57);
        assert_eq!(sums.usage_rows, 57);
        assert_invariant(&sums);
        assert!(spool.is_dir());
        log.extend(s.relay.log.try_iter());
        assert_eq!(
            count_lines(&log, "spool unusable"),
            1,
            "{backend}: one line when it starts: {log:?}"
        );
        s.finish();
    }
}

/// Spool and database both down: no `response.completed` reaches any client (the turn that
/// reached the upstream ends with `accounting_unavailable`, later turns are refused before the
/// upstream), `/readyz` is 503 naming both causes, one log line when it starts and one when it
/// ends; when both return, everything lands, the refused turns' records too.
#[test]
fn spool_and_database_down() {
    let env = [
        ("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "300"),
        ("TURNPIKE_ACCOUNTING__ACK_TIMEOUT_MS", "1500"),
    ];
    let Some((s, proxy)) = Stack::behind_pg_proxy(&env) else {
        eprintln!("PostgreSQL not configured: skipped (SQLite is embedded: it cannot be cut)");
        return;
    };
    let mut c = s.client();
    assert_eq!(turn(&mut c, ""), "completed");
    wait_rows(&s.db, 1);
    let spool = s.spool_dir();
    proxy.cut();
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::write(&spool, b"not a directory").unwrap();
    let outcomes: Vec<String> = (0..5).map(|_| turn(&mut c, "")).collect();
    assert!(
        outcomes.iter().all(|o| o == "accounting_unavailable"),
        "never a terminal without a durable record: {outcomes:?}"
    );
    let upstream_turns = s.sim_stats()["responses"].as_u64().unwrap_or(0);
    let (code, body) = http_get(&s.addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("accounting unavailable") && msg.contains("spool"),
        "{msg}"
    );
    // More refused turns do not reach the upstream.
    assert_eq!(turn(&mut c, ""), "accounting_unavailable");
    assert_eq!(
        s.sim_stats()["responses"].as_u64().unwrap_or(0),
        upstream_turns
    );
    // Both come back.
    std::fs::remove_file(&spool).unwrap();
    proxy.restore();
    let mut log = Vec::new();
    assert!(
        wait_log(
            &s.relay,
            "accounting available again",
            Duration::from_secs(20),
            &mut log
        ),
        "{log:?}"
    );
    let deadline = std::time::Instant::now() + T;
    while http_get(&s.addr, "/readyz").0 != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(turn(&mut c, ""), "completed");
    // 1 before + 6 during (1 that reached the upstream, 5 refused) + 1 after.
    let sums = wait_rows(&s.db, 8);
    assert_eq!(sums.usage_rows, 8, "{sums:?}");
    assert_invariant(&sums);
    let rows = all_rows(&s);
    let billed_during = rows
        .iter()
        .filter(|r| r.status == "completed" && r.cost_nanousd > 0)
        .count();
    assert_eq!(
        billed_during, 3,
        "the turn that reached the upstream is billed: {rows:?}"
    );
    assert_eq!(rows.iter().filter(|r| r.status == "rejected").count(), 5);
    log.extend(s.relay.log.try_iter());
    assert_eq!(
        count_lines(&log, "accounting unavailable: neither"),
        1,
        "{log:?}"
    );
    assert_eq!(
        count_lines(&log, "accounting available again"),
        1,
        "{log:?}"
    );
    s.finish();
}

/// A PostgreSQL that accepts connections but never answers is an outage like any other:
/// flushes time out, turns keep flowing from the spool, `/readyz` says so, everything lands
/// when it answers again.
#[test]
fn blackholed_postgres() {
    let env = [
        ("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "500"),
        ("TURNPIKE_DATABASE__STATEMENT_TIMEOUT_MS", "800"),
        ("TURNPIKE_ACCOUNTING__MAX_IN_MEMORY", "8"),
    ];
    let Some((s, proxy)) = Stack::behind_pg_proxy(&env) else {
        eprintln!("PostgreSQL not configured: skipped");
        return;
    };
    let clients: Vec<Client> = (0..4).map(|_| s.client()).collect();
    let mut warm = s.client();
    assert_eq!(turn(&mut warm, ""), "completed");
    wait_rows(&s.db, 1);
    proxy.blackhole();
    let t0 = std::time::Instant::now();
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            std::thread::spawn(move || (0..5).map(|_| turn(&mut c, "")).collect::<Vec<_>>())
        })
        .collect();
    let outcomes: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let took = t0.elapsed();
    assert!(outcomes.iter().all(|o| o == "completed"), "{outcomes:?}");
    assert!(
        took < Duration::from_secs(30),
        "turns flow during the blackhole: {took:?}"
    );
    let (code, body) = http_get(&s.addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        sums(&s.db).usage_rows,
        1,
        "nothing reached the blackholed database"
    );
    proxy.restore();
    let sums = wait_rows(&s.db, 21);
    assert_eq!(sums.usage_rows, 21, "{:?}", s.problems());
    assert_invariant(&sums);
    s.finish();
}

/// An upstream restarted between turns numbers its responses again: both turns are billed,
/// once each (the idempotency key is the relay's turn id, not the upstream's response id).
#[test]
fn upstream_restart_repeating_ids_bills_every_turn() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let mut s = Stack::start(
            db,
            StackOptions {
                sim_args: &["--id-seed", "5eed"],
                ..StackOptions::default()
            },
        );
        let mut first = s.client();
        assert_eq!(turn(&mut first, ""), "completed");
        drop(first);
        // The upstream restarts on the same port with the same id seed.
        let port_arg = s.sim_addr.clone();
        s.sim.child.kill().unwrap();
        s.sim.child.wait().unwrap();
        let mut cmd = common::turnpike();
        cmd.args(["sim", "--id-seed", "5eed", "--bind", &port_arg]);
        let restarted = common::Proc::spawn(cmd);
        restarted.listening_addr();
        drop(std::mem::replace(&mut s.sim, restarted));
        let mut second = s.client();
        assert_eq!(turn(&mut second, ""), "completed");
        let sums = wait_rows(&s.db, 2);
        let rows = all_rows(&s);
        assert_eq!(rows.len(), 2, "{backend}: {rows:?}");
        assert_eq!(
            rows[0].response_id, rows[1].response_id,
            "the upstream repeated its id"
        );
        assert_ne!(rows[0].request_id, rows[1].request_id);
        assert_eq!(sums.ledger, rows[0].cost_nanousd + rows[1].cost_nanousd);
        assert_invariant(&sums);
        s.finish();
    }
}

/// Cancelling after the answer arrived is never cheaper than completing it; a preempted turn
/// that reached the upstream bills its input.
#[test]
fn cancel_and_preempt_after_the_answer() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_SESSION__ON_OVERLAP", "preempt")],
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        assert_eq!(turn(&mut c, ""), "completed");
        // The answer arrives, the terminal is held back; the client cancels.
        c.send(&create("terminal_delay_ms=3000"));
        loop {
            if c.next_event(T)["type"] == "response.output_item.done" {
                break;
            }
        }
        c.send(&json!({"type": "response.cancel"}));
        assert_eq!(last_type(&c.until_terminal(T)), "response.cancelled");
        // The same after the answer, preempted by a new turn.
        c.send(&create("terminal_delay_ms=3000"));
        loop {
            if c.next_event(T)["type"] == "response.output_item.done" {
                break;
            }
        }
        c.send(&create(""));
        let events = c.until_terminal(T);
        assert_eq!(
            events.last().unwrap()["error"]["code"],
            "response_preempted",
            "{events:?}"
        );
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        let sums = wait_rows(&s.db, 4);
        let mut rows = all_rows(&s);
        rows.sort_by_key(|r| r.turn_index);
        let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(
            statuses,
            ["completed", "cancelled", "preempted", "completed"],
            "{backend}"
        );
        let completed = &rows[0];
        for cut in &rows[1..3] {
            assert!(cut.input_tokens > 0, "{backend}: input billed: {cut:?}");
            assert!(
                cut.cost_nanousd >= completed.cost_nanousd,
                "{backend}: cutting after the answer is never cheaper: {cut:?} vs {completed:?}"
            );
        }
        assert_invariant(&sums);
        s.finish();
    }
}

/// A relay running in this process over a spool filesystem the test can break.
mod in_process {
    use super::*;
    use turnpike::accounting::faults::{FaultFs, Faults};
    use turnpike::accounting::spool::DirFs;

    pub struct Relay {
        pub addr: String,
        pub faults: Arc<Faults>,
        _dir: tempfile::TempDir,
    }

    /// A relay over a spool directory whose operations the test can make fail.
    pub fn start(db_url: &str, sim_addr: &str, ack_timeout_ms: u64) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let faults = Arc::new(Faults::default());
        let fs = FaultFs {
            inner: DirFs::new(dir.path().join("spool")).unwrap(),
            faults: faults.clone(),
        };
        let addr = serve(
            db_url,
            sim_addr,
            move |s| s.accounting.ack_timeout_ms = ack_timeout_ms,
            Box::new(fs),
        );
        Relay {
            addr,
            faults,
            _dir: dir,
        }
    }

    /// Starts `serve`'s wiring in this process on a free port, with the sim at `sim_addr` as
    /// upstream and `fs` as the spool; returns the address once it accepts connections.
    pub fn serve(
        db_url: &str,
        sim_addr: &str,
        tweak: impl FnOnce(&mut turnpike::config::Settings),
        fs: Box<dyn turnpike::accounting::spool::SpoolFs>,
    ) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut settings = turnpike::config::Settings::default();
        settings.database.url = db_url.to_string();
        settings.server.bind = format!("127.0.0.1:{port}").parse().unwrap();
        settings.server.workers = 2;
        settings.accounting.flush_interval_ms = 50;
        settings.accounts = vec![turnpike::config::AccountSettings {
            api_key: Some("sk-upstream".into()),
            max_conns: 4,
            ..turnpike::config::AccountSettings::new("sim", &format!("http://{sim_addr}/v1"))
        }];
        tweak(&mut settings);
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let db = turnpike::app::open_database(&settings, true).await.unwrap();
                let deps = turnpike::app::start_relay_with(settings, db, fs).unwrap();
                let _ = turnpike::app::run_server(deps, listener).await;
            })
        });
        let addr = format!("127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + T;
        while std::net::TcpStream::connect(&addr).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        addr
    }
}

/// A power cut under a running relay (a filesystem that forgets every byte not fsynced): a
/// second relay started over what the disk kept writes a row for every turn a client saw
/// complete — each was acknowledged only after its fsync.
#[test]
fn power_cut_keeps_every_acknowledged_turn() {
    use turnpike::accounting::faults::SharedFs;
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let (key, key_id) = user_with_key(&db);
        let (_sim, sim_addr) = start_sim(&[]);
        let disk = SharedFs::default();
        // The first relay never flushes: what clients saw finish is only in its spool.
        let first = in_process::serve(
            &db.url,
            &sim_addr,
            |s| s.accounting.flush_interval_ms = 600_000,
            Box::new(disk.clone()),
        );
        let seen = load(&first, &key, 4, 6, "deltas=2");
        assert_eq!(seen.completed.len(), 24, "{backend}: {:?}", seen.errors);
        assert_eq!(sums(&db).usage_rows, 0, "{backend}: nothing flushed yet");
        // The power cut: only synced bytes survive; a new relay starts over them.
        let survivor = disk.crashed_copy();
        let _second = in_process::serve(&db.url, &sim_addr, |_| {}, Box::new(survivor));
        let deadline = std::time::Instant::now() + T;
        let rows = loop {
            let rows = block(async { queries::usage::by_key(&db.pool(), key_id).await }).unwrap();
            if rows.len() >= 24 || std::time::Instant::now() > deadline {
                break rows;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_one_row_each(&rows, &seen.completed, backend);
        assert_invariant(&sums(&db));
        block(db.cleanup());
    }
}

/// fsync (then append, then segment creation) fails inside a running relay: no terminal ever
/// reaches a client without a durable record — the database takes the records directly — and
/// the spool is used again once the faults stop.
#[test]
fn injected_spool_faults_through_the_relay() {
    use std::sync::atomic::Ordering;
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let (key, key_id) = user_with_key(&db);
        let (_sim, sim_addr) = start_sim(&[]);
        let relay = in_process::start(&db.url, &sim_addr, 2000);
        let mut c = Client::bearer(&relay.addr, &key);
        let mut completed = Vec::new();
        let run = |c: &mut Client, completed: &mut Vec<String>| {
            c.send(&create(""));
            let events = c.until_terminal(T);
            if last_type(&events) == "response.completed" {
                completed.push(
                    events.last().unwrap()["response"]["id"]
                        .as_str()
                        .unwrap()
                        .to_string(),
                );
            } else {
                panic!("{backend}: the database was up, the turn must complete: {events:?}");
            }
        };
        run(&mut c, &mut completed);
        for flag in [
            &relay.faults.fail_sync,
            &relay.faults.fail_append,
            &relay.faults.fail_create,
        ] {
            flag.store(true, Ordering::SeqCst);
            for _ in 0..3 {
                run(&mut c, &mut completed);
            }
            flag.store(false, Ordering::SeqCst);
        }
        assert!(relay.faults.injected.load(Ordering::Relaxed) > 0);
        // Faults off: the spool is reopened (with backoff) and acknowledges again.
        std::thread::sleep(Duration::from_millis(800));
        run(&mut c, &mut completed);
        let s = wait_rows(&db, completed.len() as i64);
        assert_eq!(s.usage_rows, completed.len() as i64, "{backend}");
        let rows = block(async { queries::usage::by_key(&db.pool(), key_id).await }).unwrap();
        assert_one_row_each(&rows, &completed, backend);
        assert_invariant(&s);
        block(db.cleanup());
    }
}

/// Database writes that keep failing while the database still answers a ping (here: every
/// usage insert outlasts the statement timeout) make `/readyz` answer 503 `billing stuck`
/// after `accounting.stuck_after_ms`; it recovers when writes pass again.
#[test]
fn readiness_reports_stuck_billing() {
    let Ok(base) = std::env::var(common::PG_ENV) else {
        eprintln!("PostgreSQL not configured: skipped (needs pg_sleep in a trigger)");
        return;
    };
    let db = block(TestDb::postgres(&base));
    let s = Stack::start(
        db,
        StackOptions {
            env: &[
                ("TURNPIKE_ACCOUNTING__STUCK_AFTER_MS", "1000"),
                ("TURNPIKE_DATABASE__STATEMENT_TIMEOUT_MS", "300"),
            ],
            ..StackOptions::default()
        },
    );
    common::ledger::exec(
        &s.db,
        "CREATE FUNCTION slow_usage() RETURNS trigger AS $$ BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$ LANGUAGE plpgsql; \
         CREATE TRIGGER slow_usage BEFORE INSERT ON usage_logs FOR EACH ROW EXECUTE FUNCTION slow_usage();",
    );
    let mut c = s.client();
    assert_eq!(turn(&mut c, ""), "completed", "the spool takes it");
    let deadline = std::time::Instant::now() + T;
    let body = loop {
        let (code, body) = http_get(&s.addr, "/readyz");
        if code == 503 || std::time::Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("billing stuck"), "{body}");
    common::ledger::exec(&s.db, "DROP TRIGGER slow_usage ON usage_logs;");
    let sums = wait_rows(&s.db, 1);
    assert_eq!(sums.usage_rows, 1);
    let deadline = std::time::Instant::now() + T;
    while http_get(&s.addr, "/readyz").0 != 200 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(http_get(&s.addr, "/readyz").0, 200);
    s.finish();
}

/// An upstream reporting absurd usage (10^19 input, u64::MAX-ish output, 10^18 output) is never
/// billed at face value (docs/DESIGN.md#usage-bounds): each turn is billed from the relay's
/// estimate (`estimated`, more than zero), the report is kept in `usage_quarantine` with its
/// reason, no compensation dies, and the money adds up — on a key without limits too.
#[test]
fn absurd_usage_is_quarantined_and_billed_estimated() {
    for db in block(TestDb::all()) {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        let absurd = [
            "report_input=10000000000000000000",
            "report_output=9223372036854775807",
            "report_output=1000000000000000000",
        ];
        for d in absurd {
            assert_eq!(turn(&mut c, d), "completed", "{d}");
        }
        // A plausible turn after them is billed as reported.
        assert_eq!(turn(&mut c, ""), "completed");
        let rows = s.rows(4);
        assert_eq!(rows.len(), 4);
        for r in &rows[..3] {
            assert_eq!(r.usage_source, "estimated", "{r:?}");
            assert!(r.input_tokens > 0 && r.input_tokens < 1_000, "{r:?}");
            assert!(r.output_tokens > 0 && r.output_tokens < 1_000, "{r:?}");
            assert!(r.cost_nanousd > 0 && r.cost_nanousd < 1_000_000, "{r:?}");
        }
        assert_eq!(rows[3].usage_source, "reported");
        let kept = block(async { queries::billing::quarantined(&s.db.pool()).await }).unwrap();
        assert_eq!(kept.len(), 3, "{kept:?}");
        for ((request_id, key, reason), row) in kept.iter().zip(&rows) {
            assert_eq!((request_id, *key), (&row.request_id, s.key_id));
            assert!(
                reason.contains("max_tokens_per_response"),
                "the reason names the bound: {reason}"
            );
        }
        let sums = sums(&s.db);
        assert_invariant(&sums);
        assert_eq!(sums.unsettled, 0, "no compensation: {sums:?}");
        let dead = block(async {
            queries::billing::compensations(
                &s.db.pool(),
                Some(turnpike::record::CompensationStatus::Dead),
                None,
            )
            .await
        })
        .unwrap();
        assert!(dead.is_empty());
        s.finish();
    }
}
