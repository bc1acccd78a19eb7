//! Client churn: clients that connect, send a turn and vanish within milliseconds must never
//! leave an upstream connection leased to nobody (docs/DESIGN.md#leases), and every response
//! the upstream finished is billed exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::TestDb;
use common::admin::TOKEN;
use common::http;
use common::stack::{Stack, StackOptions, block};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn create(directive: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "churn",
        "metadata": {"sim": directive}})
}

/// A tiny xorshift, so the churn is varied but needs no crate.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// `loops` threads, each connecting, sending one turn — or, with `lanes` > 1, one on each of
/// `lanes` lanes side by side, one of them cancelled now and then — and going away 0–50 ms later
/// (a close frame or a dropped socket), for `run`.
fn churn(addr: &str, key: &str, loops: usize, run: Duration, lanes: usize) -> usize {
    let handles: Vec<_> = (0..loops)
        .map(|i| {
            let (addr, key) = (addr.to_string(), key.to_string());
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
                let end = Instant::now() + run;
                let mut n = 0;
                while Instant::now() < end {
                    let auth = format!("Bearer {key}");
                    let Ok(mut c) = common::ws::Client::connect(
                        &addr,
                        "/v1/responses",
                        &[("authorization", &auth)],
                    ) else {
                        continue;
                    };
                    let delay = next(&mut seed) % 51;
                    let directive = if next(&mut seed).is_multiple_of(2) {
                        "delta_delay_ms=5"
                    } else {
                        "first_delay_ms=20"
                    };
                    if lanes == 1 {
                        c.send(&create(directive));
                    } else {
                        for l in 0..lanes {
                            let mut frame = create(directive);
                            frame["stream_id"] = json!(format!("l{l}"));
                            c.send(&frame);
                        }
                        if next(&mut seed).is_multiple_of(3) {
                            c.send(&json!({"type": "response.cancel", "stream_id": "l0"}));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(delay));
                    if next(&mut seed).is_multiple_of(2) {
                        let _ = c.ws.close(None);
                        let _ = c.ws.flush();
                    }
                    drop(c);
                    n += 1;
                }
                n
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

fn pools(admin: &str) -> Value {
    let (code, body) = http(admin, "GET", "/admin/pools", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    body["pools"][0].clone()
}

fn sessions(admin: &str) -> usize {
    let (_, body) = http(admin, "GET", "/admin/sessions", Some(TOKEN));
    body["sessions"].as_array().map_or(0, Vec::len)
}

/// Response ids the sim ended with a terminal event (what the upstream bills).
fn finished_upstream(s: &Stack) -> HashSet<String> {
    let mut ids = HashSet::new();
    for conn in s.sim_connections().as_array().unwrap() {
        for f in conn["frames"].as_array().unwrap() {
            if f["dir"] != "out" {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(f["text"].as_str().unwrap_or("")) else {
                continue;
            };
            if matches!(
                v["type"].as_str(),
                Some("response.completed" | "response.incomplete" | "response.failed")
            ) {
                ids.insert(v["response"]["id"].as_str().unwrap().to_string());
            }
        }
    }
    ids
}

/// `loops` churning clients for `run` against a relay with `max_conns` upstream sockets; the
/// key limited to `quota` (its turns reserve) when one is given, with reservation blocks of
/// `block_turns` turns.
fn storm(
    db: TestDb,
    loops: usize,
    run: Duration,
    max_conns: usize,
    lanes: usize,
    quota: Option<(i64, &'static str)>,
) {
    let block_turns = quota.map_or("8", |q| q.1);
    let quota = quota.map(|q| q.0);
    let (s, admin) = common::admin::start(
        db,
        &[
            ("TURNPIKE_LOG__LEVEL", "info"),
            ("TURNPIKE_BILLING__RESERVATION_BLOCK_TURNS", block_turns),
        ],
        StackOptions {
            max_conns,
            key: turnpike::auth::KeyRequest {
                quota_nanousd: quota,
                ..Default::default()
            },
            ..StackOptions::default()
        },
    );
    let sent = churn(&s.addr, &s.key, loops, run, lanes);
    assert!(sent > loops, "the churn ran ({sent} connections)");

    // Within the drain window every session is gone and no connection is leased.
    let deadline = Instant::now() + T;
    let mut p = pools(&admin);
    while (p["leased"] != 0 || sessions(&admin) != 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        p = pools(&admin);
    }
    assert_eq!(p["leased"], 0, "a lease outlived its session: {p}");
    assert_eq!(sessions(&admin), 0);

    // The account still serves.
    let mut c = s.client();
    c.send(&create(""));
    let events = c.until_terminal(T);
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "{events:?}"
    );
    drop(c);

    // Every response the upstream finished is billed, once.
    let finished = finished_upstream(&s);
    // Rows land a flush after the client heard the end: wait for them.
    let deadline = Instant::now() + T;
    let mut rows = s.rows(0);
    while Instant::now() < deadline
        && !finished
            .iter()
            .all(|id| rows.iter().any(|r| r.response_id.as_deref() == Some(id)))
    {
        std::thread::sleep(Duration::from_millis(50));
        rows = s.rows(0);
    }
    let billed: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.response_id.as_deref())
        .collect();
    let unique: HashSet<&str> = billed.iter().copied().collect();
    assert_eq!(unique.len(), billed.len(), "a response billed twice");
    for id in &finished {
        if !unique.contains(id.as_str()) {
            let conns = s.sim_connections();
            let conn = conns
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c.to_string().contains(id.as_str()));
            let anonymous: Vec<_> = rows
                .iter()
                .filter(|r| r.response_id.is_none())
                .map(|r| (&r.status, &r.usage_source, r.input_tokens))
                .collect();
            panic!(
                "{id} finished upstream, not billed; its connection: {conn:?}; rows without a response id: {anonymous:?}"
            );
        }
    }
    let ids: HashSet<&str> = rows.iter().map(|r| r.request_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "one row per turn");
    if quota.is_some() {
        // Every turn's reservation was settled by its record or released, and every block's
        // unused part given back (docs/DESIGN.md#reservation-blocks): nothing stays held.
        let held = || {
            block(async { turnpike::db::queries::reservations::live(&s.db.pool()).await }).unwrap()
        };
        let deadline = Instant::now() + T;
        while held().1 != 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if held().1 != 0 {
            let rows = common::ledger::reservation_rows(&s.db);
            panic!("reservations held after the churn: {:?}: {rows:?}", held());
        }
        let spent: i64 = rows.iter().map(|r| r.cost_nanousd).sum();
        assert!(spent > 0 && spent <= quota.unwrap_or(0), "spent {spent}");
    }
    s.finish();
}

#[test]
fn churn_with_one_connection_leaks_no_lease() {
    for db in block(TestDb::all()) {
        storm(db, 2, Duration::from_secs(5), 1, 1, None);
    }
}

#[test]
fn churn_of_twenty_loops_leaks_no_lease() {
    for db in block(TestDb::all()) {
        storm(db, 20, Duration::from_secs(10), 4, 1, None);
    }
}

/// The same churn with three lanes side by side per client (one cancelled now and then): no
/// lease outlives its session and every response the upstream finished is billed once.
#[test]
fn churn_with_lanes_leaks_no_lease() {
    for db in block(TestDb::all()) {
        storm(db, 10, Duration::from_secs(8), 2, 3, None);
    }
}

/// The churn with lanes against a key with a quota: its turns reserve — from reservation
/// blocks (growing: many sessions at once), and turn by turn — are cut and cancelled mid-turn,
/// and their clients vanish, some while their reservation is being taken (a reservation taken
/// for a session that had stopped was once held until the TTL: 124 of them in one run);
/// afterwards every response is billed once and nothing stays reserved.
#[test]
fn churn_of_a_limited_key_leaves_nothing_reserved() {
    for block_turns in ["8", "1"] {
        for db in block(TestDb::all()) {
            let quota = Some((1_000_000_000_000, block_turns));
            storm(db, 20, Duration::from_secs(5), 4, 3, quota);
        }
    }
}

/// The client's close handshake completes at once: the relay answers the close frame and ends
/// the TCP connection, idle or after a turn (a client waiting for the server's EOF, as
/// RFC 6455 §7.1.1 asks, must not wait for a timer).
#[test]
fn client_close_completes_without_a_wait() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    for turn_first in [false, true] {
        let mut c = s.client();
        if turn_first {
            c.send(&create(""));
            c.until_terminal(T);
        }
        let t0 = Instant::now();
        c.ws.close(None).unwrap();
        let mut code = None;
        loop {
            match c.recv(T) {
                common::ws::Recv::Close(k) => code = Some(k),
                common::ws::Recv::Gone(_) => break,
                common::ws::Recv::Timeout => panic!("no EOF after the close handshake"),
                _ => {}
            }
        }
        let took = t0.elapsed();
        eprintln!("close handshake (turn first: {turn_first}): {took:?}");
        assert_eq!(code, Some(1005), "the close frame is echoed");
        // The old relay took a whole second here (actix-http's linger); now well under 1 ms.
        assert!(
            took < Duration::from_millis(100),
            "close took {took:?} (turn first: {turn_first})"
        );
    }
    s.finish();
}

/// 20,000 handshakes with bad keys from four threads: each is refused (401), counted in a metric,
/// and the log holds a few summary lines, not one line each; a valid client connects and
/// runs a turn in the middle of it (docs/DESIGN.md#refusals).
#[test]
fn a_storm_of_bad_keys_is_counted_not_logged() {
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[
            ("TURNPIKE_LOG__REFUSAL_SUMMARY_S", "1"),
            ("TURNPIKE_LIMITS__REFUSED_HANDSHAKES_BEFORE_DELAY", "0"),
        ],
        StackOptions::default(),
    );
    let mut seen = Vec::new();
    // Whatever the start-up wrote.
    common::stack::wait_log(
        &s.relay,
        "never printed",
        Duration::from_millis(300),
        &mut seen,
    );
    let t0 = Instant::now();
    let storm: Vec<_> = (0..4)
        .map(|_| {
            let addr = s.addr.clone();
            std::thread::spawn(move || {
                for _ in 0..5_000 {
                    let refused = common::ws::Client::connect(
                        &addr,
                        "/v1/responses",
                        &[("authorization", "Bearer tpk_not_a_real_key")],
                    );
                    assert_eq!(refused.err().map(|e| e.0), Some(401));
                }
            })
        })
        .collect();
    let mut c = s.client();
    c.send(&create(""));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    for t in storm {
        t.join().unwrap();
    }
    let mut lines = Vec::new();
    common::stack::wait_log(
        &s.relay,
        "never printed",
        Duration::from_millis(2_500),
        &mut lines,
    );
    let refusal_lines: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("refused") || l.contains("invalid_api_key"))
        .collect();
    // One summary line per second of storm (the interval), whatever the machine's speed:
    // a bound set by time, never by the number of refusals.
    let most = t0.elapsed().as_secs() as usize + 4;
    assert!(
        !refusal_lines.is_empty() && refusal_lines.len() <= most,
        "{} refusal lines for {most} intervals: {:?}",
        refusal_lines.len(),
        refusal_lines.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        refusal_lines
            .iter()
            .all(|l| l.contains("handshakes refused: invalid_api_key=")
                && l.contains("127.0.0.0/24=")),
        "{refusal_lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l.contains("tpk_not_a_real_key")),
        "keys never logged"
    );
    assert_eq!(
        common::admin::metric(
            &admin,
            "turnpike_handshakes_refused_total{reason=\"invalid_api_key\"}"
        ),
        20_000.0
    );
    s.finish();
}

/// Past `limits.refused_handshakes_before_delay` refusals from one prefix, each further refusal
/// waits `limits.refused_handshake_delay_ms`; a valid key is never delayed.
#[test]
fn repeated_refusals_from_one_prefix_are_slowed() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_LIMITS__REFUSED_HANDSHAKES_BEFORE_DELAY", "5"),
                ("TURNPIKE_LIMITS__REFUSED_HANDSHAKE_DELAY_MS", "400"),
                ("TURNPIKE_LOG__REFUSAL_SUMMARY_S", "60"),
            ],
            ..StackOptions::default()
        },
    );
    let bad = || {
        let t0 = Instant::now();
        let r = common::ws::Client::connect(
            &s.addr,
            "/v1/responses",
            &[("authorization", "Bearer tpk_wrong")],
        );
        assert_eq!(r.err().map(|e| e.0), Some(401));
        t0.elapsed()
    };
    for _ in 0..5 {
        bad();
    }
    for _ in 0..2 {
        let took = bad();
        assert!(
            took >= Duration::from_millis(400),
            "the 6th refusal waited: {took:?}"
        );
    }
    // The valid key from the same address is served without the delay.
    let mut c = s.client();
    c.send(&create(""));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    s.finish();
}
