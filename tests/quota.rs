//! Quota and balance under concurrency (docs/DESIGN.md#reservations): 20 sessions firing turns
//! at once against a key worth about three turns, on one relay and on two relays sharing one
//! PostgreSQL database. What is spent never exceeds the quota by more than one turn's excess
//! over its reservation, and the money adds up.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::TestDb;
use common::ledger::{assert_invariant, exec, reservation_rows};
use common::stack::{Stack, StackOptions, block};
use common::ws::{Client, Recv};
use serde_json::json;
use turnpike::auth::KeyRequest;

const T: Duration = Duration::from_secs(20);
/// What one turn of this test costs at the default prices, about: 2 input tokens ("go!!"
/// and the sim's count) and 7 output tokens — 2 × 1,250 + 7 × 10,000 nano-USD.
const TURN: i64 = 72_500;
/// What one such turn reserves: 1 input token estimated (4 bytes a token) and its 16 output
/// tokens.
const RESERVED: i64 = 1_250 + 16 * 10_000;

/// `sessions` clients on `addrs` (round robin), each sending `turns` turns one after another
/// with `max_output_tokens = 16`; returns (completed, refused by quota or balance).
fn fire(addrs: &[String], key: &str, sessions: usize, turns: usize) -> (usize, usize) {
    let handles: Vec<_> = (0..sessions)
        .map(|i| {
            let (addr, key) = (addrs[i % addrs.len()].clone(), key.to_string());
            std::thread::spawn(move || {
                let mut c = Client::bearer(&addr, &key);
                let (mut done, mut refused) = (0, 0);
                for _ in 0..turns {
                    c.send(
                        &json!({"type": "response.create", "model": "gpt-test", "store": false,
                        "input": "go!!", "max_output_tokens": 16}),
                    );
                    loop {
                        match c.recv(T) {
                            Recv::Json(e) if e["type"] == "response.completed" => {
                                done += 1;
                                break;
                            }
                            Recv::Json(e) if e["type"] == "error" => {
                                let code = e["error"]["code"].as_str().unwrap_or("").to_string();
                                assert!(
                                    code == "quota_exhausted" || code == "balance_exhausted",
                                    "unexpected refusal {e}"
                                );
                                refused += 1;
                                break;
                            }
                            Recv::Json(_) | Recv::Ping | Recv::Pong => {}
                            other => panic!("connection ended: {other:?}"),
                        }
                    }
                }
                (done, refused)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

/// 20 sessions × 3 turns on `addrs` against a key or user limited to `limit`: some turns run,
/// some are refused, the money adds up and stays within the limit. (completed turns, sums)
fn run_against(
    s: &Stack,
    addrs: &[String],
    limit: i64,
    what: &str,
) -> (usize, common::ledger::Sums) {
    let (done, refused) = fire(addrs, &s.key, 20, 3);
    assert!(
        done >= 1 && refused >= 1,
        "{what}: {done} completed, {refused} refused"
    );
    let sums = common::ledger::wait_rows(&s.db, 60);
    assert_invariant(&sums);
    assert_bounded(sums.spent, limit, what);
    (done, sums)
}

/// The most one turn may cost over its reservation here: none (16 output tokens reserved,
/// 7 used), so spend stays within the limit itself.
fn assert_bounded(spent: i64, limit: i64, what: &str) {
    assert!(
        spent <= limit,
        "{what}: spent {spent} over the limit {limit}"
    );
    assert!(
        spent >= limit - 2 * 125_000,
        "{what}: the limit was used ({spent} of {limit})"
    );
}

/// One turn like `fire`'s; its terminal event (or error).
fn small_turn(c: &mut Client) -> serde_json::Value {
    c.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "go!!", "max_output_tokens": 16}),
    );
    c.until_terminal(T).pop().unwrap_or_default()
}

/// What the key's live reservation rows hold together.
fn held(db: &TestDb) -> i64 {
    block(async { turnpike::db::queries::reservations::live(&db.pool()).await })
        .unwrap()
        .1
}

/// A stack with room for 20 concurrent turns, its key limited to `quota`.
fn stack_with_quota(db: TestDb, quota: Option<i64>) -> Stack {
    Stack::start(
        db,
        StackOptions {
            max_conns: 20,
            key: KeyRequest {
                quota_nanousd: quota,
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    )
}

#[test]
fn twenty_sessions_never_overspend_a_quota() {
    for db in block(TestDb::all()) {
        let quota = 3 * TURN + TURN / 2;
        let s = stack_with_quota(db, Some(quota));
        let (done, sums) = run_against(&s, std::slice::from_ref(&s.addr), quota, "quota");
        let per_turn = sums.ledger / done as i64;
        assert!(
            (TURN - 5_000..=TURN + 5_000).contains(&per_turn),
            "every completed turn billed: {done} turns, {} nano-USD",
            sums.ledger
        );
        s.finish();
    }
}

#[test]
fn twenty_sessions_never_overspend_a_balance() {
    for db in block(TestDb::all()) {
        let s = stack_with_quota(db, None);
        let balance = 3 * TURN + TURN / 2;
        exec(
            &s.db,
            &format!("UPDATE users SET balance_nanousd = {balance}"),
        );
        run_against(&s, std::slice::from_ref(&s.addr), balance, "balance");
        s.finish();
    }
}

#[test]
fn two_relays_on_one_database_hold_one_quota() {
    let Some(pg) = block(TestDb::all())
        .into_iter()
        .find(|d| d.url.starts_with("postgres"))
    else {
        eprintln!("PostgreSQL not reachable: two relays on one database not tested");
        return;
    };
    let quota = 3 * TURN + TURN / 2;
    let s = stack_with_quota(pg, Some(quota));
    let (second, addr2, _dir) = s.second_relay(&[]);
    run_against(
        &s,
        &[s.addr.clone(), addr2],
        quota,
        "quota across two relays",
    );
    drop(second);
    s.finish();
}

/// docs/DESIGN.md#reservation-blocks: a limited key's turns on one relay draw from one block —
/// one reservation in the database for six turns, not six — and when the block closes nothing
/// is held: each record took its draw off the block's row, the unused part came back as a
/// row of its own. The money adds up — on each backend.
#[test]
fn a_limited_keys_turns_draw_from_one_block() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                // Long enough for six turns on a loaded machine, then given back.
                env: &[("TURNPIKE_BILLING__RESERVATION_BLOCK_MS", "4000")],
                key: KeyRequest {
                    quota_nanousd: Some(1_000_000_000),
                    ..KeyRequest::default()
                },
                ..StackOptions::default()
            },
        );
        let started = std::time::Instant::now();
        let mut c = Client::bearer(&s.addr, &s.key);
        for _ in 0..6 {
            let end = small_turn(&mut c);
            assert_eq!(end["type"], "response.completed", "{backend}: {end}");
        }
        let sums = common::ledger::wait_rows(&s.db, 6);
        assert_invariant(&sums);
        assert_eq!(sums.usage_rows, 6, "{backend}");
        let rows = reservation_rows(&s.db);
        assert!(
            started.elapsed() >= Duration::from_millis(4000)
                || (rows.len() == 1 && rows[0].0.starts_with("blk_")),
            "{backend}: one block for six turns, no row of a turn's own: {rows:?}"
        );
        // The block closes: its unused part comes back; nothing is held.
        let deadline = std::time::Instant::now() + T;
        let mut rows = reservation_rows(&s.db);
        while rows.iter().map(|r| r.1).sum::<i64>() != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            rows = reservation_rows(&s.db);
        }
        assert_eq!(
            rows.iter().map(|r| r.1).sum::<i64>(),
            0,
            "{backend}: {rows:?}"
        );
        let block = &rows[0].0;
        assert_eq!(rows.len(), 2, "{backend}: {rows:?}");
        assert_eq!(rows[1].0, format!("{block}.unused"), "{backend}: {rows:?}");
        assert!(
            rows[0].1 > 0 && rows[1].1 == -rows[0].1,
            "{backend}: {rows:?}"
        );
        s.finish();
    }
}

/// docs/DESIGN.md#reservation-blocks: while the database is away, the turns an open block
/// covers are served (their money is reserved; their records wait in the spool); the turn that
/// needs the next block is refused `accounting_unavailable` before the upstream. When the
/// database returns every record lands, each takes its draw off the block's row, and once the
/// block closes nothing is held.
#[test]
fn an_open_block_serves_its_turns_through_a_database_outage() {
    let env = [
        ("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "300"),
        ("TURNPIKE_BILLING__RESERVATION_BLOCK_MS", "8000"),
        ("TURNPIKE_LIMITS__STANDING_CACHE_MS", "8000"),
    ];
    let Some((s, proxy)) = Stack::behind_pg_proxy(&env) else {
        return;
    };
    let change = turnpike::db::queries::keys::KeyChange {
        quota_nanousd: Some(Some(1_000_000_000)),
        ..Default::default()
    };
    let pool = s.db.pool();
    assert!(
        block(turnpike::db::queries::keys::update(
            &pool, s.key_id, &change
        ))
        .unwrap()
    );
    let started = std::time::Instant::now();
    let mut c = s.client();
    assert_eq!(small_turn(&mut c)["type"], "response.completed");
    common::ledger::wait_rows(&s.db, 1);
    proxy.cut();
    // Each ended turn leaves its block the difference between its reservation and its cost:
    // the block of eight reservations serves more than eight of these turns.
    let mut outcomes = Vec::new();
    while outcomes.last().is_none_or(|o| o == "response.completed") && outcomes.len() < 40 {
        let end = small_turn(&mut c);
        outcomes.push(match end["type"].as_str() {
            Some("error") => end["error"]["code"].as_str().unwrap_or("").to_string(),
            other => other.unwrap_or("").to_string(),
        });
    }
    // The first turn, and all but the last during the outage.
    let served = outcomes.len() as u64;
    let upstream_turns = s.sim_stats()["responses"].as_u64().unwrap_or(0);
    let in_time = started.elapsed() < Duration::from_millis(7000);
    proxy.restore();
    assert_eq!(
        outcomes.last().map(String::as_str),
        Some("accounting_unavailable"),
        "{outcomes:?}"
    );
    assert_eq!(
        upstream_turns, served,
        "the refused turn did not reach the upstream"
    );
    // The refused turn has a record too.
    let sums = common::ledger::wait_rows(&s.db, served as i64 + 1);
    assert_eq!(sums.usage_rows, served as i64 + 1, "{sums:?}");
    assert_invariant(&sums);
    if in_time {
        // Served while the block covered the next turn's reservation, not one turn longer.
        assert!(served >= 8, "at least the block's eight: {outcomes:?}");
        assert!(
            7 * RESERVED < sums.spent && sums.spent <= 8 * RESERVED,
            "{sums:?}"
        );
    }
    let deadline = std::time::Instant::now() + T;
    while held(&s.db) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rows = reservation_rows(&s.db);
    assert_eq!(rows.iter().map(|r| r.1).sum::<i64>(), 0, "{rows:?}");
    s.finish();
}

/// docs/DESIGN.md#reservation-blocks: a relay killed (`kill -9`) with an open block leaves
/// held exactly what the block had unused — its turns' records took their costs off it — and
/// no more; a relay on the same database keeps serving the key, and the row stops counting at
/// `billing.reservation_ttl_s` — on each backend.
#[test]
fn a_killed_relays_block_holds_only_its_unused_part_until_it_expires() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let ttl = ("TURNPIKE_BILLING__RESERVATION_TTL_S", "4");
        let mut s = Stack::start(
            db,
            StackOptions {
                env: &[ttl, ("TURNPIKE_BILLING__RESERVATION_BLOCK_MS", "3000")],
                key: KeyRequest {
                    quota_nanousd: Some(1_000_000_000),
                    ..KeyRequest::default()
                },
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        let started = std::time::Instant::now();
        for _ in 0..3 {
            assert_eq!(
                small_turn(&mut c)["type"],
                "response.completed",
                "{backend}"
            );
        }
        let sums = common::ledger::wait_rows(&s.db, 3);
        s.relay.child.kill().unwrap();
        s.relay.child.wait().unwrap();
        let rows = reservation_rows(&s.db);
        if started.elapsed() < Duration::from_millis(2500) {
            assert_eq!(
                rows.iter()
                    .map(|r| (r.0.starts_with("blk_"), r.1))
                    .collect::<Vec<_>>(),
                [(true, 8 * RESERVED - sums.spent)],
                "{backend}: eight turns' reservation less the three turns' costs: {rows:?}"
            );
        }
        // Another relay serves the key meanwhile.
        let (second, addr2, _dir) = s.second_relay(&[ttl]);
        let mut c2 = Client::bearer(&addr2, &s.key);
        assert_eq!(
            small_turn(&mut c2)["type"],
            "response.completed",
            "{backend}"
        );
        // Past the TTL the killed relay's block counts for nothing (and the second relay's
        // block, closed after its second, holds nothing).
        std::thread::sleep(Duration::from_millis(4500).saturating_sub(started.elapsed()));
        let deadline = std::time::Instant::now() + T;
        while held(&s.db) != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(held(&s.db), 0, "{backend}: {:?}", reservation_rows(&s.db));
        let sums = common::ledger::wait_rows(&s.db, 4);
        assert_eq!(sums.usage_rows, 4, "{backend}");
        assert_invariant(&sums);
        drop(second);
        s.finish();
    }
}

/// The quota is spent by 20 sessions on two relays whose turns draw from blocks while the
/// quota has room for them and reserve one by one near its end: never above it, and most of
/// it used (docs/DESIGN.md#reservation-blocks).
#[test]
fn blocks_hold_a_quota_across_relays() {
    let Some(pg) = postgres() else { return };
    // About 40 turns' reservations: blocks of 8 at first, then turn by turn.
    spend_across_relays(pg, 20, 6, 40);
}

/// The same with 200 sessions of the key at once (blocks grow to serve them, docs/DESIGN.md#reservation-blocks):
/// the quota holds, most of it is used, and once the blocks close nothing stays reserved.
#[test]
fn two_hundred_sessions_spend_a_quota_through_growing_blocks() {
    let Some(pg) = postgres() else { return };
    spend_across_relays(pg, 200, 3, 200);
}

/// `sessions` clients on two relays, `turns` turns each, against a quota of `quota_turns`
/// turns' reservations: spent ≤ quota and ≥ half of it, the money adds up, nothing held after.
fn spend_across_relays(pg: TestDb, sessions: usize, turns: usize, quota_turns: i64) {
    let quota = quota_turns * RESERVED;
    let s = Stack::start(
        pg,
        StackOptions {
            max_conns: sessions,
            key: KeyRequest {
                quota_nanousd: Some(quota),
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    );
    let (second, addr2, _dir) = s.second_relay(&[]);
    let (done, refused) = fire(&[s.addr.clone(), addr2], &s.key, sessions, turns);
    assert!(refused >= 1, "{done} completed, {refused} refused");
    let sums = common::ledger::wait_rows(&s.db, done as i64);
    assert_invariant(&sums);
    assert!(
        sums.spent <= quota,
        "spent {} over the quota {quota}",
        sums.spent
    );
    // Each turn costs about 72,500 of its 161,250 reserved: at least half the quota is spent.
    assert!(
        sums.spent >= quota / 2,
        "blocks kept turns out: {done} completed, spent {} of {quota}",
        sums.spent
    );
    let deadline = std::time::Instant::now() + T;
    while held(&s.db) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(held(&s.db), 0, "{:?}", reservation_rows(&s.db));
    drop(second);
    s.finish();
}

/// The first PostgreSQL test database, if PostgreSQL is configured.
fn postgres() -> Option<TestDb> {
    let pg = block(TestDb::all())
        .into_iter()
        .find(|d| d.url.starts_with("postgres"));
    if pg.is_none() {
        eprintln!("PostgreSQL not reachable: fleet caps not tested");
    }
    pg
}

fn try_connect(addr: &str, key: &str) -> Result<Client, u16> {
    let auth = format!("Bearer {key}");
    Client::connect(addr, "/v1/responses", &[("authorization", &auth)]).map_err(|e| e.0)
}

/// `default_max_sessions_per_key = 2` with two relays on one PostgreSQL: two sessions in all,
/// whichever relays they reach; a closed session frees its place; a relay killed with -9
/// stops holding its places after the slot TTL (docs/DESIGN.md#fleet-slots).
#[test]
fn two_relays_share_one_session_cap() {
    let Some(pg) = postgres() else { return };
    let env = [
        ("TURNPIKE_LIMITS__DEFAULT_MAX_SESSIONS_PER_KEY", "2"),
        ("TURNPIKE_LIMITS__FLEET_SLOT_TTL_MS", "1500"),
    ];
    let s = Stack::start(
        pg,
        StackOptions {
            env: &env,
            ..StackOptions::default()
        },
    );
    let (mut second, addr2, _dir) = s.second_relay(&env);
    let a = try_connect(&s.addr, &s.key).expect("first session");
    let b = try_connect(&addr2, &s.key).expect("second session, other relay");
    assert_eq!(try_connect(&s.addr, &s.key).err(), Some(429));
    assert_eq!(try_connect(&addr2, &s.key).err(), Some(429));
    drop(a);
    // Its place is given back once the relay saw the close.
    let deadline = std::time::Instant::now() + T;
    let c = loop {
        match try_connect(&addr2, &s.key) {
            Ok(c) => break c,
            Err(429) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(code) => panic!("no place freed: {code}"),
        }
    };
    assert_eq!(try_connect(&s.addr, &s.key).err(), Some(429));
    // The second relay dies without a word: its two sessions stop counting after the TTL.
    second.child.kill().unwrap();
    second.child.wait().unwrap();
    drop((b, c));
    let deadline = std::time::Instant::now() + T;
    let mut open = Vec::new();
    while open.len() < 2 && std::time::Instant::now() < deadline {
        match try_connect(&s.addr, &s.key) {
            Ok(c) => open.push(c),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    assert_eq!(open.len(), 2, "the dead relay's places expired");
    assert_eq!(try_connect(&s.addr, &s.key).err(), Some(429));
    drop(open);
    s.finish();
}

/// A key with `max_concurrent_turns = 1` and two relays: while a slow turn runs on one, a turn
/// on the other is refused `concurrency_limit_exceeded`; after it, the other relay serves.
#[test]
fn two_relays_share_one_turn_cap() {
    let Some(pg) = postgres() else { return };
    let s = Stack::start(
        pg,
        StackOptions {
            key: KeyRequest {
                max_concurrent_turns: Some(1),
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    );
    let (_second, addr2, _dir) = s.second_relay(&[]);
    let mut slow = Client::bearer(&s.addr, &s.key);
    slow.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "slow", "metadata": {"sim": "first_delay_ms=1500"}}),
    );
    // The slow turn is admitted before the other one is sent.
    std::thread::sleep(Duration::from_millis(500));
    let mut other = Client::bearer(&addr2, &s.key);
    other.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "x"}),
    );
    let refused = other.until_terminal(T);
    assert_eq!(
        refused.last().unwrap()["error"]["code"],
        "concurrency_limit_exceeded",
        "{refused:?}"
    );
    assert_eq!(
        slow.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    let deadline = std::time::Instant::now() + T;
    loop {
        other.send(
            &json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "x"}),
        );
        let last = other.until_terminal(T).last().unwrap().clone();
        if last["type"] == "response.completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{last}");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.finish();
}

/// docs/DESIGN.md#database-checkout: a pooled connection is lent without a test query when it
/// was used within the last second, so one the server has closed must be recognised as broken
/// and never lent. PostgreSQL ends every backend of the relay between two turns of a key with a
/// quota; the next turns (each reserves in the database first, failing closed) are served at
/// once, not refused `accounting_unavailable`, and billed.
#[test]
fn turns_after_the_database_ended_the_relays_connections_are_served() {
    let Some(db) = block(TestDb::all())
        .into_iter()
        .find(|d| d.backend == "postgres")
    else {
        return;
    };
    let s = stack_with_quota(db, Some(100 * TURN));
    let mut c = s.client();
    assert_eq!(small_turn(&mut c)["type"], "response.completed");
    exec(
        &s.db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    );
    // Well under the second after which a connection would get a test query anyway.
    std::thread::sleep(Duration::from_millis(200));
    for n in 2..=4 {
        let last = small_turn(&mut c);
        assert_eq!(last["type"], "response.completed", "turn {n}: {last}");
    }
    let sums = common::ledger::wait_rows(&s.db, 4);
    assert_eq!(sums.usage_rows, 4, "{sums:?}");
    assert_invariant(&sums);
    s.finish();
}

/// A turn of 50,000 input and 100 output tokens the upstream reported ($0.0635), reserved at
/// about $0.0002 (16 output tokens, a short prompt).
fn dear_turn(c: &mut Client, previous: Option<&str>) -> serde_json::Value {
    let mut create = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "go", "max_output_tokens": 16,
        "metadata": {"sim": "report_input=50000 report_output=100"}});
    if let Some(p) = previous {
        create["previous_response_id"] = json!(p);
    }
    c.send(&create);
    c.until_terminal(T).pop().unwrap()
}

const DEAR: i64 = 50_000 * 1_250 + 100 * 10_000;

/// docs/DESIGN.md#reservations: a turn that ended holds its cost, not its estimate, until its
/// record lands — every admission counts it at once. With records held in the spool (a slow
/// flush), a turn that cost far more than it reserved leaves too little quota for the next
/// turn's reservation: refused, where the estimate alone let it through — on each backend.
#[test]
fn an_ended_turn_counts_at_its_cost_before_its_record_lands() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "8000")],
                key: KeyRequest {
                    quota_nanousd: Some(DEAR + 100_000),
                    ..KeyRequest::default()
                },
                ..StackOptions::default()
            },
        );
        let mut c = Client::bearer(&s.addr, &s.key);
        assert_eq!(
            dear_turn(&mut c, None)["type"],
            "response.completed",
            "{backend}"
        );
        // Held by the block the turn drew from and a row for what the block could not cover
        // (docs/DESIGN.md#reservation-blocks).
        assert_eq!(
            held(&s.db),
            DEAR,
            "{backend}: the reservations hold the cost"
        );
        let refused = dear_turn(&mut c, None);
        assert_eq!(
            refused["error"]["code"], "quota_exhausted",
            "{backend}: {refused}"
        );
        let sums = common::ledger::wait_rows(&s.db, 2);
        assert_invariant(&sums);
        assert_eq!(sums.spent, DEAR, "{backend}");
        s.finish();
    }
}

/// A continuation is billed its previous response's context again as input, which its own
/// request does not show: its reservation counts that context (as the relay billed it), so a
/// quota that covers the first turn but not a second of the same size refuses the second
/// before the upstream — on each backend.
#[test]
fn a_continuation_reserves_the_context_it_carries() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack_with_quota(db, Some(DEAR + DEAR / 2));
        let mut c = Client::bearer(&s.addr, &s.key);
        let first = dear_turn(&mut c, None);
        assert_eq!(first["type"], "response.completed", "{backend}");
        common::ledger::wait_rows(&s.db, 1);
        let id = first["response"]["id"].as_str().unwrap().to_string();
        let refused = dear_turn(&mut c, Some(&id));
        assert_eq!(
            refused["error"]["code"], "quota_exhausted",
            "{backend}: {refused}"
        );
        let sums = common::ledger::wait_rows(&s.db, 2);
        assert_invariant(&sums);
        assert!(sums.spent <= DEAR + DEAR / 2, "{backend}: {}", sums.spent);
        s.finish();
    }
}
