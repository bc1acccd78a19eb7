//! End to end through real sockets: client → `turnpike serve` → `turnpike sim`, on SQLite and
//! (when `TURNPIKE_TEST_PG_URL` is set) PostgreSQL.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::TestDb;
use common::stack::{Stack, StackOptions, block, with_db};
use common::ws::{Client, Recv};
use serde_json::{Value, json};
use turnpike::auth::KeyRequest;
use turnpike::db::queries;

const T: Duration = Duration::from_secs(10);

fn backends() -> Vec<TestDb> {
    block(TestDb::all())
}

fn create(directive: &str) -> Value {
    let mut r = json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "Say hello"});
    if !directive.is_empty() {
        r["metadata"] = json!({"sim": directive});
    }
    r
}

fn last_type(events: &[Value]) -> String {
    events
        .last()
        .and_then(|e| e["type"].as_str())
        .unwrap_or("?")
        .to_string()
}

fn expect_close(c: &mut Client) -> u16 {
    for _ in 0..100 {
        match c.recv(T) {
            Recv::Close(code) => return code,
            Recv::Ping | Recv::Pong => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    panic!("no close frame");
}

#[test]
fn text_turn_byte_for_byte_and_one_row() {
    for db in backends() {
        let backend = db.backend;
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        let frame = r#"{"type":"response.create","model":"gpt-test","store":false,"input":"Say hello","unknown_field":{"kept":[1,2]}}"#;
        c.send_text(frame);
        let got = c.until_terminal(T);
        assert_eq!(last_type(&got), "response.completed", "{backend}");

        // What the sim sent is exactly what the client got, and the client's frame reached the
        // sim unchanged.
        let conns = s.sim_connections();
        let frames = conns[0]["frames"].as_array().unwrap();
        let sent: Vec<Value> = frames
            .iter()
            .filter(|f| f["dir"] == "out" && f["text"].as_str().unwrap().starts_with('{'))
            .map(|f| serde_json::from_str(f["text"].as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(sent, got, "{backend}: events byte-for-byte");
        let received: Vec<&str> = frames
            .iter()
            .filter(|f| f["dir"] == "in" && f["text"].as_str().unwrap().starts_with('{'))
            .map(|f| f["text"].as_str().unwrap())
            .collect();
        assert_eq!(received, [frame]);
        // The account's credential went upstream, never the client's key.
        let auth = conns[0]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == "authorization")
            .unwrap()[1]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(auth, "Bearer sk-upstream");

        let rows = s.rows(1);
        assert_eq!(rows.len(), 1, "{backend}");
        let r = &rows[0];
        let resp = &got.last().unwrap()["response"];
        assert_eq!(r.response_id.as_deref(), resp["id"].as_str());
        assert!(r.request_id.starts_with("turn_"), "{}", r.request_id);
        assert_eq!(
            (
                r.status.as_str(),
                r.usage_source.as_str(),
                r.account.as_str(),
                r.model.as_str()
            ),
            ("completed", "reported", "sim", "gpt-test")
        );
        assert_eq!(
            r.input_tokens,
            resp["usage"]["input_tokens"].as_i64().unwrap()
        );
        assert_eq!(
            r.output_tokens,
            resp["usage"]["output_tokens"].as_i64().unwrap()
        );
        assert_eq!(
            r.total_tokens,
            resp["usage"]["total_tokens"].as_i64().unwrap()
        );
        assert_eq!(r.turn_index, 1);
        s.finish();
    }
}

#[test]
fn timing_order_with_sim_delays() {
    for db in backends() {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create("first_delay_ms=150 terminal_delay_ms=300 deltas=3"));
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        let r = &s.rows(1)[0];
        let (wait, fe, ft, d) = (
            r.upstream_wait_ms.unwrap(),
            r.first_event_ms.unwrap(),
            r.first_token_ms.unwrap(),
            r.duration_ms,
        );
        // What the spec promises, from the relay's own marks: their order, and lower bounds
        // the upstream's delays impose (the relay cannot see an event before it was sent).
        // No upper bound and no gap between two relay marks: a busy machine may delay one
        // observation more than another.
        assert!(wait <= fe && fe <= ft && ft < d, "{wait} {fe} {ft} {d}");
        assert!(ft >= 150, "first token after the 150 ms delay: {ft}");
        assert!(d >= 150 + 300, "terminal after both delays: {d}");
        // The model is reused on a later turn that omits it, and the relay adds it upstream.
        c.send(&json!({"type": "response.create", "input": "again", "store": false}));
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        let rows = s.rows(2);
        assert_eq!(
            (rows[1].model.as_str(), rows[1].turn_index),
            ("gpt-test", 2)
        );
        let frames = s.sim_connections()[0]["frames"].clone();
        let second = frames
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["dir"] == "in")
            .nth(1)
            .unwrap()["text"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(second.starts_with(r#"{"model":"gpt-test","#), "{second}");
        s.finish();
    }
}

#[test]
fn pre_upgrade_errors() {
    let db = TestDb::sqlite();
    let s = Stack::start(
        db,
        StackOptions {
            key: KeyRequest {
                max_sessions: Some(1),
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    );
    let refuse = |path: &str, headers: &[(&str, &str)]| -> (u16, Value) {
        let (status, body) = Client::connect(&s.addr, path, headers)
            .err()
            .expect("refused");
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    };
    let (st, b) = refuse("/v1/responses", &[]);
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("missing_api_key"))
    );
    let (st, b) = refuse("/v1/responses", &[("authorization", "Bearer tpk_nope")]);
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    assert_eq!(b["error"]["type"], "authentication_error");
    let (st, b) = refuse(&format!("/v1/responses?api_key={}", s.key), &[]);
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("api_key_in_query"))
    );
    // x-api-key works too, on every route.
    for path in ["/responses", "/backend-api/codex/responses"] {
        let c = Client::connect(&s.addr, path, &[("x-api-key", &s.key)]).expect("x-api-key");
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Plain HTTP with a good key: 426.
    let (st, b) = {
        use std::io::{Read, Write};
        let mut t = std::net::TcpStream::connect(&s.addr).unwrap();
        write!(t, "GET /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n", s.key).unwrap();
        let mut raw = String::new();
        t.read_to_string(&mut raw).unwrap();
        (raw[9..12].parse::<u16>().unwrap(), raw)
    };
    assert_eq!(st, 426, "{b}");
    assert!(b.contains("upgrade_required"));
    // A WebSocket handshake on a path that is not one of ours: the app's 404 JSON.
    let (st, b) = refuse(
        "/v1/chat/completions",
        &[("authorization", &format!("Bearer {}", s.key))],
    );
    assert_eq!((st, b["error"]["code"].as_str()), (404, Some("not_found")));
    // max_sessions = 1: the second socket is refused with 429 and Retry-After.
    let first = s.client();
    let (st, b) = refuse(
        "/v1/responses",
        &[("authorization", &format!("Bearer {}", s.key))],
    );
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (429, Some("too_many_sessions"))
    );
    drop(first);
    std::thread::sleep(Duration::from_millis(200));
    let _second = s.client();
    // Revoked key and disabled user.
    with_db(&s.db, async |p| {
        queries::users::set_enabled(p, "tester", false)
            .await
            .unwrap();
    });
    let (st, b) = refuse(
        "/v1/responses",
        &[("authorization", &format!("Bearer {}", s.key))],
    );
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (403, Some("user_disabled"))
    );
    with_db(&s.db, async |p| {
        queries::users::set_enabled(p, "tester", true)
            .await
            .unwrap();
        queries::keys::revoke(p, s.key_id).await.unwrap();
    });
    let (st, b) = refuse(
        "/v1/responses",
        &[("authorization", &format!("Bearer {}", s.key))],
    );
    assert_eq!(
        (st, b["error"]["code"].as_str()),
        (401, Some("api_key_revoked"))
    );
    s.finish();
}

/// A client that sends its first frame in the same write as its handshake, before the 101 (the
/// upgrade service hands the session the bytes read past the request's head): the turn runs.
#[test]
fn a_first_frame_sent_with_the_handshake_is_read() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let auth = format!("Bearer {}", s.key);
    let frame = create("").to_string();
    let mut c = Client::with_first_frame(&s.addr, &[("Authorization", &auth)], &frame);
    let got = c.until_terminal(T);
    assert_eq!(last_type(&got), "response.completed");
    assert_eq!(s.rows(1).len(), 1);
    s.finish();
}

#[test]
fn protocol_errors_close_with_their_codes() {
    let db = TestDb::sqlite();
    let s = Stack::start(
        db,
        StackOptions {
            env: &[("TURNPIKE_LIMITS__CLIENT_FRAME_MAX_BYTES", "4096")],
            ..StackOptions::default()
        },
    );
    let cases: &[(&str, &str, u16)] = &[
        ("{not json", "invalid_json", 1008),
        (
            r#"{"type":"response.create","model":5}"#,
            "invalid_model",
            1008,
        ),
        // A name that could not be priced, stored and sent as one and the same.
        (
            r#"{"type":"response.create","model":"gpt-p3\u0000"}"#,
            "invalid_model",
            1008,
        ),
        (
            r#"{"type":"response.create","model":"m","previous_response_id":"msg_123"}"#,
            "invalid_previous_response_id",
            1008,
        ),
    ];
    for (frame, code, close) in cases {
        let mut c = s.client();
        c.send_text(frame);
        let e = c.next_event(T);
        assert_eq!(
            (e["type"].as_str(), e["error"]["code"].as_str()),
            (Some("error"), Some(*code)),
            "{frame}"
        );
        assert_eq!(e["status"], 400);
        assert_eq!(expect_close(&mut c), *close, "{frame}");
    }
    let mut c = s.client();
    c.ws.send(tungstenite::Message::Binary(vec![1, 2, 3].into()))
        .unwrap();
    assert_eq!(c.next_event(T)["error"]["code"], "binary_frame");
    assert_eq!(expect_close(&mut c), 1008);

    let mut c = s.client();
    c.send(&json!({"type": "response.create", "model": "m", "input": "x".repeat(5000)}));
    assert_eq!(c.next_event(T)["error"]["code"], "frame_too_large");
    assert_eq!(expect_close(&mut c), 1009);

    // Per-turn refusals keep the session open.
    let mut c = s.client();
    c.send(&json!({"type": "response.create", "input": "no model yet"}));
    assert_eq!(c.next_event(T)["error"]["code"], "model_required");
    c.send(&json!({"type": "response.steer", "input": []}));
    assert_eq!(c.next_event(T)["error"]["code"], "no_active_response");
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    s.finish();
}

#[test]
fn preempt_and_reject() {
    for db in backends() {
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_SESSION__ON_OVERLAP", "preempt")],
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        c.send(&create("terminal_delay_ms=3000"));
        assert_eq!(c.next_event(T)["type"], "response.created");
        c.send(&create(""));
        let mut seen = Vec::new();
        loop {
            let e = c.next_event(T);
            let done = e["type"] == "response.completed";
            seen.push(e);
            if done {
                break;
            }
        }
        let preempted = seen
            .iter()
            .position(|e| e["error"]["code"] == "response_preempted")
            .expect("preempted error");
        assert_eq!(seen[preempted]["status"], 409);
        let created = seen
            .iter()
            .position(|e| e["type"] == "response.created")
            .unwrap();
        assert!(
            preempted < created,
            "the old turn's terminal error comes before the new turn"
        );
        let mut rows = s.rows(2);
        rows.sort_by_key(|r| r.turn_index);
        assert_eq!(
            (rows[0].status.as_str(), rows[1].status.as_str()),
            ("preempted", "completed")
        );
        // The preempted turn reached the upstream: its input is billed (the sim's cancelled
        // terminal carries no usage, so it is estimated from the prompt), never zero.
        assert_eq!(rows[0].usage_source, "estimated");
        assert!(
            rows[0].input_tokens > 0 && rows[0].cost_nanousd > 0,
            "{:?}",
            rows[0]
        );
        // The old response was cancelled upstream, by its id, on its own connection.
        let conns = s.sim_connections();
        let cancels: Vec<String> = conns
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|c| c["frames"].as_array().cloned().unwrap_or_default())
            .filter(|f| {
                f["dir"] == "in" && f["text"].as_str().unwrap_or("").contains("response.cancel")
            })
            .map(|f| f["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(cancels.len(), 1, "{cancels:?}");
        assert!(
            cancels[0].contains(rows[0].response_id.as_deref().unwrap()),
            "{cancels:?}"
        );
        s.finish();
    }
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_SESSION__ON_OVERLAP", "reject")],
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create("terminal_delay_ms=500"));
    assert_eq!(c.next_event(T)["type"], "response.created");
    c.send(&create(""));
    let mut codes = Vec::new();
    loop {
        let e = c.next_event(T);
        if e["type"] == "error" {
            codes.push(e["error"]["code"].as_str().unwrap().to_string());
        }
        if e["type"] == "response.completed" {
            break;
        }
    }
    assert_eq!(codes, ["response_already_in_flight"]);
    assert_eq!(s.rows(1)[0].status, "completed");
    s.finish();
}

#[test]
fn cancel_forwards_and_records() {
    for db in backends() {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create("terminal_delay_ms=5000"));
        assert_eq!(c.next_event(T)["type"], "response.created");
        c.send(&json!({"type": "response.cancel"}));
        let ev = c.until_terminal(T);
        assert_eq!(last_type(&ev), "response.cancelled");
        assert_eq!(s.rows(1)[0].status, "cancelled");
        // Nothing in flight: cancel is an error event, the session goes on.
        c.send(&json!({"type": "response.cancel"}));
        assert_eq!(c.next_event(T)["error"]["code"], "no_active_response");
        c.send(&create(""));
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        s.finish();
    }
}

#[test]
fn client_vanishing_mid_turn() {
    for db in backends() {
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_SESSION__DRAIN_MS", "1500")],
                key: KeyRequest {
                    max_concurrent_turns: Some(1),
                    ..KeyRequest::default()
                },
                ..StackOptions::default()
            },
        );
        // Terminal within the drain window: captured, connection clean and reused.
        let mut c = s.client();
        c.send(&create("terminal_delay_ms=400"));
        assert_eq!(c.next_event(T)["type"], "response.created");
        let t0 = Instant::now();
        drop(c); // no close frame, like Codex
        // The key's only turn slot is freed as soon as the relay sees the EOF (well before the
        // drained terminal at 400 ms): another session runs a turn meanwhile.
        std::thread::sleep(Duration::from_millis(100));
        let mut other = s.client();
        other.send(&create("first_delay_ms=0"));
        let ev = other.until_terminal(T);
        assert_eq!(last_type(&ev), "response.completed", "{ev:?}");
        // Completing shows the freed slot (a held one is refused at once, not waited for).
        assert!(t0.elapsed() < Duration::from_secs(10));
        let rows = s.rows(2);
        let gone = rows.iter().find(|r| {
            r.turn_index == 1
                && r.session_id
                    != rows
                        .iter()
                        .find(|x| x.status == "completed" && x.duration_ms < 300)
                        .map(|x| x.session_id.clone())
                        .unwrap_or_default()
        });
        assert!(gone.is_some());
        drop(other);
        std::thread::sleep(Duration::from_millis(300));
        let statuses: Vec<&str> = rows.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(
            statuses.iter().filter(|s| **s == "completed").count(),
            2,
            "{statuses:?}"
        );
        // Two sockets were needed (one draining, one serving); both went back to the pool.
        let mut third = s.client();
        third.send(&create(""));
        assert_eq!(last_type(&third.until_terminal(T)), "response.completed");
        assert_eq!(s.sim_stats()["accepted"], 2, "clean connections are reused");
        drop(third);

        // Terminal not within the drain window: row client_gone, connection discarded.
        let mut c = s.client();
        c.send(&create("stall after=3"));
        for _ in 0..3 {
            c.next_event(T);
        }
        drop(c);
        let rows = s.rows(4);
        assert_eq!(rows.len(), 4);
        let r = rows.last().unwrap();
        assert_eq!(
            (r.status.as_str(), r.usage_source.as_str()),
            ("client_gone", "estimated")
        );
        assert!(
            r.input_tokens > 0,
            "the request reached the upstream: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            s.sim_stats()["open"],
            1,
            "the stalled socket was closed, the clean one kept"
        );
        s.finish();
    }
}

#[test]
fn upstream_faults_before_and_after_forwarding() {
    for db in backends() {
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_UPSTREAM__READ_TIMEOUT_MS", "600")],
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        for (code, expected) in [
            (1012, "upstream_restarting"),
            (1013, "upstream_restarting"),
            (1011, "upstream_connection_lost"),
            (1001, "upstream_connection_lost"),
        ] {
            // Before anything was forwarded: retried once on a fresh connection, invisibly.
            c.send(&create(""));
            assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
            let before = s.sim_stats()["accepted"].as_u64().unwrap();
            c.send(&create(&format!("close={code} after=0 once")));
            let ev = c.until_terminal(T);
            assert_eq!(
                last_type(&ev),
                "response.completed",
                "close {code} before the first event is retried"
            );
            assert!(ev.iter().all(|e| e["type"] != "error"));
            assert_eq!(
                s.sim_stats()["accepted"].as_u64().unwrap(),
                before + 1,
                "a fresh connection"
            );
            // After two forwarded events: an error for this turn, and the session goes on.
            c.send(&create(&format!("close={code} after=2")));
            let ev = c.until_terminal(T);
            assert_eq!(ev.len(), 3, "{ev:?}");
            assert_eq!(
                (ev[2]["error"]["code"].as_str(), ev[2]["status"].as_u64()),
                (Some(expected), Some(503))
            );
        }
        for fault in ["drop after=2", "stall after=2"] {
            c.send(&create(fault));
            let ev = c.until_terminal(T);
            assert_eq!(
                ev.last().unwrap()["error"]["code"],
                "upstream_connection_lost",
                "{fault}"
            );
        }
        c.send(&create(""));
        assert_eq!(
            last_type(&c.until_terminal(T)),
            "response.completed",
            "the session is still usable"
        );
        let rows = s.rows(15);
        let lost = rows.iter().filter(|r| r.status == "upstream_lost").count();
        let done = rows.iter().filter(|r| r.status == "completed").count();
        assert_eq!((lost, done, rows.len()), (6, 9, 15));
        assert!(
            rows.iter()
                .filter(|r| r.status == "upstream_lost")
                .all(|r| r.usage_source == "estimated" && r.input_tokens > 0),
            "cut-short turns bill their input: {rows:?}"
        );
        s.finish();
    }
}

#[test]
fn pool_reuse_capacity_and_health() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            sim_args: &["--ping-interval-ms", "100", "--pong-timeout-ms", "400"],
            env: &[
                ("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "300"),
                ("TURNPIKE_SESSION__LEASE_IDLE_MS", "700"),
            ],
            max_conns: 1,
            account_extra: "max_concurrent_turns = 4",
            ..StackOptions::default()
        },
    );
    // Reuse across sessions: one socket serves both.
    let mut a = s.client();
    a.send(&create(""));
    assert_eq!(last_type(&a.until_terminal(T)), "response.completed");
    // At capacity with a turn in flight on the only connection: b's turn times out, b stays
    // open.
    a.send(&create("terminal_delay_ms=1000"));
    assert_eq!(a.next_event(T)["type"], "response.created");
    let mut b = s.client();
    b.send(&create(""));
    let e = b.next_event(T);
    assert_eq!(
        (e["error"]["code"].as_str(), e["status"].as_u64()),
        (Some("upstream_unavailable"), Some(503))
    );
    assert_eq!(last_type(&a.until_terminal(T)), "response.completed");
    // a now holds the connection between turns: b's next turn gets it at once (reclaimed,
    // docs/DESIGN.md#idle-reclaim); the idle socket answered the sim's pings (pong timeout 400 ms) meanwhile.
    std::thread::sleep(Duration::from_millis(600));
    b.send(&create(""));
    assert_eq!(last_type(&b.until_terminal(T)), "response.completed");
    let stats = s.sim_stats();
    assert_eq!(
        (stats["accepted"].as_u64(), stats["open"].as_u64()),
        (Some(1), Some(1)),
        "one socket, still alive: {stats}"
    );
    s.finish();

    // A connection the sim closes while idle is evicted and never handed out.
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            sim_args: &["--max-age-ms", "400"],
            env: &[("TURNPIKE_SESSION__LEASE_IDLE_MS", "100")],
            ..StackOptions::default()
        },
    );
    let mut a = s.client();
    a.send(&create(""));
    assert_eq!(last_type(&a.until_terminal(T)), "response.completed");
    std::thread::sleep(Duration::from_millis(800));
    a.send(&create(""));
    let ev = a.until_terminal(T);
    assert_eq!(last_type(&ev), "response.completed", "{ev:?}");
    assert_eq!(s.sim_stats()["accepted"], 2);
    s.finish();
}

#[test]
fn per_turn_standing_and_concurrency() {
    for db in backends() {
        let s = Stack::start(
            db,
            StackOptions {
                key: KeyRequest {
                    max_concurrent_turns: Some(1),
                    ..KeyRequest::default()
                },
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        c.send(&create(""));
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        with_db(&s.db, async |p| {
            queries::users::set_balance(p, "tester", Some(0))
                .await
                .unwrap();
        });
        // A standing change takes effect within `limits.standing_cache_ms` (1 s; docs/DESIGN.md#admission-cache).
        std::thread::sleep(Duration::from_millis(1100));
        c.send(&create(""));
        let e = c.next_event(T);
        assert_eq!(
            (e["error"]["code"].as_str(), e["status"].as_u64()),
            (Some("balance_exhausted"), Some(403))
        );
        with_db(&s.db, async |p| {
            queries::users::set_balance(p, "tester", None)
                .await
                .unwrap();
        });
        std::thread::sleep(Duration::from_millis(1100));
        c.send(&create(""));
        assert_eq!(
            last_type(&c.until_terminal(T)),
            "response.completed",
            "same socket, allowed again"
        );

        // One turn in flight per key: a second session is refused while the first streams.
        c.send(&create("terminal_delay_ms=800"));
        assert_eq!(c.next_event(T)["type"], "response.created");
        let mut d = s.client();
        d.send(&create(""));
        assert_eq!(
            d.next_event(T)["error"]["code"],
            "concurrency_limit_exceeded"
        );
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
        d.send(&create(""));
        assert_eq!(last_type(&d.until_terminal(T)), "response.completed");
        let rows = s.rows(6);
        let rejected: Vec<&str> = rows
            .iter()
            .filter(|r| r.status == "rejected")
            .map(|r| r.error_code.as_deref().unwrap_or(""))
            .collect();
        assert_eq!(
            rejected,
            ["balance_exhausted", "concurrency_limit_exceeded"]
        );
        s.finish();
    }
}

#[test]
fn slow_client_is_cut_off() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_LIMITS__CLIENT_SEND_BUFFER_BYTES", "300000")],
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create("deltas=20000 delta_size=200"));
    // Read nothing: the relay may not buffer 20000 events for us.
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].error_code.as_deref()),
        ("cancelled", Some("client_too_slow"))
    );
    // Reading now shows the cut: an error event and close 1008 after the events sent so far.
    let mut saw_error = false;
    loop {
        match c.recv(T) {
            Recv::Json(e) if e["type"] == "error" => {
                assert_eq!(e["error"]["code"], "client_too_slow");
                saw_error = true;
            }
            Recv::Json(_) | Recv::Ping | Recv::Pong => {}
            Recv::Close(code) => {
                assert_eq!(code, 1008);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(saw_error);
    s.finish();
}

/// SIGTERM (docs/DESIGN.md#shutdown): a turn that finishes within `server.shutdown_grace_ms` is delivered
/// and billed, one that does not ends with `shutting_down`; idle sessions close 1001 at once;
/// every row is in the database when the process has exited; upstream sockets get close frames.
#[test]
fn sigterm_finishes_turns_within_grace_then_closes_1001() {
    for db in backends() {
        let backend = db.backend;
        let mut s = Stack::start(db, StackOptions::default());
        let mut busy = s.client();
        busy.send(&create("terminal_delay_ms=10000"));
        assert_eq!(busy.next_event(T)["type"], "response.created");
        let mut finishing = s.client();
        finishing.send(&create("terminal_delay_ms=1200"));
        assert_eq!(finishing.next_event(T)["type"], "response.created");
        let mut idle = s.client();
        idle.send(&create(""));
        idle.until_terminal(T);
        let (code, took, log) = s.relay.terminate();
        assert_eq!(code, Some(0), "{log:?}");
        assert!(
            took < Duration::from_secs(20),
            "bounded by the grace, not hung: {took:?}"
        );
        assert!(
            log.iter().any(|l| l.contains("unwritten_records=0")),
            "{backend}: last flush awaited: {log:?}"
        );
        assert_eq!(expect_close(&mut idle), 1001, "idle: at once");
        let done = finishing.until_terminal(T);
        assert_eq!(
            last_type(&done),
            "response.completed",
            "{backend}: a turn within the grace finishes normally"
        );
        assert_eq!(expect_close(&mut finishing), 1001);
        let e = busy.until_terminal(T);
        assert_eq!(e.last().unwrap()["error"]["code"], "shutting_down");
        assert_eq!(expect_close(&mut busy), 1001);
        // No waiting: the rows were written before the process exited.
        let rows = block(async { queries::usage::by_key(&s.db.pool(), s.key_id).await }).unwrap();
        assert_eq!(rows.len(), 3, "{backend}: {rows:?}");
        let ended = rows
            .iter()
            .find(|r| r.error_code.as_deref() == Some("shutting_down"))
            .expect("row of the cut turn");
        assert_eq!(ended.status, "cancelled");
        assert!(ended.input_tokens > 0, "the cut turn's input is billed");
        assert_eq!(
            rows.iter().filter(|r| r.status == "completed").count(),
            2,
            "{rows:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(s.sim_stats()["open"], 0, "upstream sockets closed");
        for c in s.sim_connections().as_array().unwrap() {
            let last_in = c["frames"]
                .as_array()
                .unwrap()
                .iter()
                .rev()
                .find(|f| f["dir"] == "in")
                .map(|f| f["text"].as_str().unwrap().to_string());
            assert_eq!(
                last_in.as_deref(),
                Some("<close 1000>"),
                "{backend}: the upstream got a close frame"
            );
        }
        s.finish();
    }
}

#[test]
fn remaining_error_rows() {
    // quota 0: refused before the upgrade.
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            key: KeyRequest {
                quota_nanousd: Some(0),
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    );
    let (st, body) = Client::connect(
        &s.addr,
        "/v1/responses",
        &[("authorization", &format!("Bearer {}", s.key))],
    )
    .err()
    .unwrap();
    assert_eq!(st, 403);
    assert!(body.contains("quota_exhausted"), "{body}");
    s.finish();

    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_SESSION__IDLE_TIMEOUT_MS", "400"),
                ("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "200"),
                ("TURNPIKE_SESSION__MAX_LEASE_FAILURES", "2"),
            ],
            max_conns: 1,
            account_extra: "max_concurrent_turns = 4",
            ..StackOptions::default()
        },
    );
    // A binary frame from the upstream mid-turn.
    let mut c = s.client();
    c.send(&create("binary after=2"));
    let ev = c.until_terminal(T);
    assert_eq!(
        (
            ev.len(),
            ev[2]["error"]["code"].as_str(),
            ev[2]["status"].as_u64()
        ),
        (3, Some("upstream_protocol_error"), Some(502))
    );
    // Idle: closed with 1000 after idle_timeout_ms.
    let t0 = Instant::now();
    match c.recv(T) {
        Recv::Close(code) => assert_eq!(code, 1000),
        other => panic!("{other:?}"),
    }
    assert!(t0.elapsed() >= Duration::from_millis(300));

    // Lease timeouts: an error each turn, then close 1013 after max_lease_failures in a row.
    let mut holder = s.client();
    holder.send(&create("terminal_delay_ms=3000"));
    assert_eq!(holder.next_event(T)["type"], "response.created");
    let mut waiting = s.client();
    waiting.send(&create(""));
    assert_eq!(
        waiting.next_event(T)["error"]["code"],
        "upstream_unavailable"
    );
    waiting.send(&create(""));
    assert_eq!(
        waiting.next_event(T)["error"]["code"],
        "upstream_unavailable"
    );
    assert_eq!(expect_close(&mut waiting), 1013);
    s.finish();

    // The account's turn limit: account_busy while its only slot is taken.
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: 1,
            account_extra: "max_concurrent_turns = 1",
            ..StackOptions::default()
        },
    );
    let mut a = s.client();
    a.send(&create("terminal_delay_ms=800"));
    assert_eq!(a.next_event(T)["type"], "response.created");
    let mut b = s.client();
    b.send(&create(""));
    let e = b.next_event(T);
    assert_eq!(
        (e["error"]["code"].as_str(), e["status"].as_u64()),
        (Some("account_busy"), Some(429))
    );
    assert_eq!(last_type(&a.until_terminal(T)), "response.completed");
    // During shutdown new sockets get 503 not_ready: covered by readiness; here the table's
    // statuses are checked against what was sent.
    s.finish();
}

#[test]
fn connections_are_recycled_before_max_age() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_POOL__MAX_AGE_S", "1")],
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    std::thread::sleep(Duration::from_millis(1200));
    // The session's connection is too old now: the next turn gets a fresh one, invisibly.
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    assert_eq!(s.sim_stats()["accepted"], 2);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        s.sim_stats()["open"].as_u64().unwrap() <= 1,
        "retired connections are closed: {}",
        s.sim_stats()
    );
    s.finish();
}

#[test]
fn demo_runs_a_turn_with_its_printed_key() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind = format!("127.0.0.1:{port}");
    let (mut child, key) = common::run_demo(dir.path(), &[("TURNPIKE_SERVER__BIND", &bind)]);
    let key = key.expect("the demo prints a key");
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut c = Client::connect(
        &addr,
        "/v1/responses",
        &[("authorization", &format!("Bearer {key}"))],
    )
    .expect("the demo relay accepts its key");
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn handshake_headers_pass_through_credentials_do_not() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: "organization = \"org-operator\"\nproject = \"proj-operator\"",
            ..StackOptions::default()
        },
    );
    let auth = format!("Bearer {}", s.key);
    let codex = |session: &str| {
        Client::connect(
            &s.addr,
            "/v1/responses",
            &[
                ("authorization", &auth),
                ("openai-beta", "responses_websockets=2026-02-06"),
                ("x-codex-turn-metadata", "{\"turn\":1}"),
                ("session-id", session),
                ("originator", "codex_exec"),
                ("version", "0.171.0"),
                ("x-openai-subagent", "review"),
                ("x-responsesapi-include-timing-metrics", "true"),
                ("openai-organization", "org-client-picked"),
                ("openai-project", "proj-client-picked"),
                ("cookie", "secret=1"),
            ],
        )
        .unwrap()
    };
    let mut c = codex("sess-abc");
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    drop(c);
    // A second Codex session with its own session-id: the idle connection of the first is
    // not lent to it (its handshake named another session).
    let mut other = codex("sess-xyz");
    other.send(&create(""));
    assert_eq!(last_type(&other.until_terminal(T)), "response.completed");
    let conns = s.sim_connections();
    let headers_of = |i: usize| -> HashMap<String, String> {
        conns[i]["headers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h[0].as_str().unwrap().to_string(),
                    h[1].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    assert_eq!(
        conns.as_array().unwrap().len(),
        2,
        "one upstream handshake per session"
    );
    assert_eq!(
        headers_of(1).get("session-id").map(String::as_str),
        Some("sess-xyz")
    );
    assert_eq!(
        conns[1]["responses"], 1,
        "the second session's turn ran on its own connection"
    );
    let headers = headers_of(0);
    assert_eq!(
        headers.get("openai-organization").map(String::as_str),
        Some("org-operator"),
        "the organization is the operator's, never the client's"
    );
    assert_eq!(
        headers.get("openai-project").map(String::as_str),
        Some("proj-operator")
    );
    assert_eq!(
        headers.get("openai-beta").map(String::as_str),
        Some("responses_websockets=2026-02-06")
    );
    assert_eq!(
        headers.get("x-codex-turn-metadata").map(String::as_str),
        Some("{\"turn\":1}")
    );
    assert_eq!(
        headers.get("session-id").map(String::as_str),
        Some("sess-abc")
    );
    assert_eq!(
        headers.get("originator").map(String::as_str),
        Some("codex_exec")
    );
    for (k, v) in [
        ("version", "0.171.0"),
        ("x-openai-subagent", "review"),
        ("x-responsesapi-include-timing-metrics", "true"),
    ] {
        assert_eq!(headers.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert_eq!(
        headers.get("authorization").map(String::as_str),
        Some("Bearer sk-upstream"),
        "the account's credential"
    );
    assert!(!headers.contains_key("cookie"));
    assert!(
        !headers.contains_key("x-turnpike-dial"),
        "the relay's own marks stay inside it"
    );
    assert!(
        !headers.values().any(|v| v.contains(&s.key)),
        "the client's key never goes upstream"
    );
    s.finish();
}

/// Keys never reach a log line in any form, at debug level, whatever the client does with them;
/// a query parameter carrying a key is refused whatever its name.
#[test]
fn keys_never_logged() {
    let mut s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_LOG__LEVEL", "debug")],
            ..StackOptions::default()
        },
    );
    let auth = format!("Bearer {}", s.key);
    for query in ["api_key", "k", "foo"] {
        let path = format!("/v1/responses?{query}={}", s.key);
        // With and without the header: the query alone decides.
        for headers in [vec![("authorization", auth.as_str())], vec![]] {
            let (status, body) = Client::connect(&s.addr, &path, &headers).err().unwrap();
            assert_eq!(status, 401, "?{query}=: {body}");
            assert!(body.contains("api_key_in_query"), "{body}");
        }
    }
    let mut c = s.client();
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    drop(c);
    let (code, _, log) = s.relay.terminate();
    assert_eq!(code, Some(0));
    assert!(log.len() > 15, "debug logging was on: {log:?}");
    // Refused handshakes are summarized, the last summary written at shutdown.
    assert!(
        log.iter()
            .any(|l| l.contains("6 handshakes refused: api_key_in_query=6")),
        "{log:?}"
    );
    // The secret part: everything after the displayed prefix (`tpk_` + 8 hex digits).
    let secret = &s.key[12..];
    let hash = turnpike::auth::hash_key(&s.key);
    for line in &log {
        assert!(!line.contains(secret), "key in the log: {line}");
        assert!(!line.contains(&hash), "key hash in the log: {line}");
    }
    s.finish();
}

/// RFC 6455 on the client side (fragments reassembled, invalid UTF-8 → 1007) and garbage on
/// the upstream side (a text frame that is not a JSON event → `upstream_protocol_error`, never
/// forwarded); client errors never name the internal upstream address.
#[test]
fn rfc6455_fragments_utf8_and_upstream_garbage() {
    use tungstenite::Message;
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut s = Stack::start(TestDb::sqlite(), StackOptions::default());
    // A response.create in three fragments.
    let mut c = s.client();
    let whole = create("").to_string();
    let (a, rest) = whole.split_at(10);
    let (b, z) = rest.split_at(15);
    for (i, part) in [a, b, z].iter().enumerate() {
        let opcode = if i == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        let frame = Frame::message(part.as_bytes().to_vec(), opcode, i == 2);
        c.ws.send(Message::Frame(frame)).unwrap();
    }
    assert_eq!(
        last_type(&c.until_terminal(T)),
        "response.completed",
        "reassembled"
    );
    // Upstream garbage mid-turn: not forwarded, the turn ends, the session goes on.
    c.send(&create("invalid_json after=2"));
    let mut events = Vec::new();
    loop {
        match c.recv(T) {
            Recv::Json(e) => {
                let done = common::ws::is_terminal(&e);
                events.push(e);
                if done {
                    break;
                }
            }
            Recv::Ping | Recv::Pong => {}
            other => panic!("only JSON events reach the client: {other:?}"),
        }
    }
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[2]["error"]["code"], "upstream_protocol_error");
    assert_eq!(events[2]["status"], 502);
    assert_eq!(
        last_type(&{
            c.send(&create(""));
            c.until_terminal(T)
        }),
        "response.completed"
    );
    // Invalid UTF-8 in a text frame: an error event, then close 1007.
    let frame = Frame::message(vec![b'{', 0xff, 0xfe, b'}'], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame)).unwrap();
    assert_eq!(c.next_event(T)["error"]["code"], "invalid_json");
    assert_eq!(expect_close(&mut c), 1007);
    // The upstream is gone: the client's error does not name where it was.
    s.sim.child.kill().unwrap();
    s.sim.child.wait().unwrap();
    let mut c = s.client();
    c.send(&create(""));
    let e = c.until_terminal(T);
    let err = e.last().unwrap();
    assert_eq!(err["error"]["code"], "upstream_unavailable", "{e:?}");
    let port = s.sim_addr.rsplit(':').next().unwrap();
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains(port) && !message.contains("127.0.0.1"),
        "{message}"
    );
    s.finish();
}

/// A `response.create` that admission refuses preempts nothing: it gets its error event and
/// the turn in flight completes (docs/DESIGN.md#preemption).
#[test]
fn refused_create_preempts_nothing() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_SESSION__ON_OVERLAP", "preempt")],
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create("terminal_delay_ms=2500"));
    assert_eq!(c.next_event(T)["type"], "response.created");
    with_db(&s.db, async |p| {
        queries::users::set_enabled(p, "tester", false)
            .await
            .unwrap();
    });
    // A standing change takes effect within `limits.standing_cache_ms` (1 s).
    std::thread::sleep(Duration::from_millis(1100));
    c.send(&create(""));
    let events = c.until_terminal(T);
    assert_eq!(
        events.last().unwrap()["error"]["code"],
        "user_disabled",
        "{events:?}"
    );
    assert_eq!(
        last_type(&c.until_terminal(T)),
        "response.completed",
        "the turn in flight went on"
    );
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].status, "completed");
    s.finish();
}

/// What the relay does not know passes byte for byte: a `response.create` with fields it has
/// never seen (and a compaction trigger in its input) reaches the upstream as the client wrote
/// it, and events of types it has never seen reach the client as the upstream wrote them (that
/// they are no token for timing is `protocol::events`' unit test).
#[test]
fn unknown_fields_and_events_pass_byte_for_byte() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    let frame = r#"{"type":"response.create","model":"gpt-test","store":false,"input":[{"type":"message","role":"user","content":"hi"},{"type":"compaction_trigger"}],"prompt_cache_options":{"ttl":"12h"},"prewarm":true,"reasoning":{"effort":"low","context":"all_turns"},"client_metadata":{"x-codex-turn-metadata":"{\"turn_id\":\"t1\"}"},"metadata":{"sim":"extra=response.queued,response.metadata,response.compaction.compacting first_delay_ms=0 delta_delay_ms=30 deltas=3"}}"#;
    c.send_text(frame);
    let mut raw = Vec::new();
    loop {
        match c.recv(T) {
            common::ws::Recv::Json(v) => {
                let done = common::ws::is_terminal(&v);
                raw.push(v);
                if done {
                    break;
                }
            }
            common::ws::Recv::Ping | common::ws::Recv::Pong => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(raw.last().unwrap()["type"], "response.completed");
    let kinds: Vec<&str> = raw.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for unknown in [
        "response.queued",
        "response.metadata",
        "response.compaction.compacting",
    ] {
        let e = raw
            .iter()
            .find(|e| e["type"] == unknown)
            .unwrap_or_else(|| panic!("{unknown} missing: {kinds:?}"));
        assert_eq!(e["x_sim"]["note"], "an event type the client may not know");
    }
    // The upstream received the frame exactly as sent.
    let conns = s.sim_connections();
    let got: Vec<&str> = conns
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["frames"].as_array().unwrap())
        .filter(|f| f["dir"] == "in")
        .filter_map(|f| f["text"].as_str())
        .filter(|t| t.starts_with('{'))
        .collect();
    assert_eq!(got, [frame]);
    let row = &s.rows(1)[0];
    assert_eq!(
        (row.status.as_str(), row.usage_source.as_str()),
        ("completed", "reported")
    );
    s.finish();
}

/// An event the upstream sends after its response's terminal (Codex's `codex.rate_limits`)
/// reaches the client as it would direct, and the next turn on the lane is its own, billed
/// once — on each backend.
#[test]
fn events_after_the_terminal_reach_the_client() {
    for db in backends() {
        let backend = db.backend;
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create("trailing=codex.rate_limits,response.metadata"));
        let events = c.until_terminal(T);
        assert_eq!(last_type(&events), "response.completed", "{backend}");
        let id = events.last().unwrap()["response"]["id"].clone();
        for kind in ["codex.rate_limits", "response.metadata"] {
            let late = c.next_event(T);
            assert_eq!(
                (late["type"].as_str(), &late["response_id"]),
                (Some(kind), &id),
                "{backend}: {late}"
            );
        }
        c.send(&create(""));
        let next = c.until_terminal(T);
        assert_eq!(last_type(&next), "response.completed", "{backend}");
        assert_ne!(next.last().unwrap()["response"]["id"], id);
        let rows = s.rows(2);
        assert_eq!(rows.len(), 2, "{backend}");
        assert!(rows.iter().all(|r| r.status == "completed"), "{backend}");
        s.finish();
    }
}

/// A steer sent after its response ended gets what the upstream answers such a steer —
/// `response.steer.failed` with the input handed back — never a bare `error` that an SDK
/// cannot match to its steer.
#[test]
fn a_steer_after_the_end_fails_as_a_steer() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    c.send(&create(""));
    let events = c.until_terminal(T);
    let id = events.last().unwrap()["response"]["id"].clone();
    let input = json!([{"type": "message", "role": "user", "content": "and also this"}]);
    c.send(&json!({"type": "response.steer", "previous_response_id": id, "input": input}));
    let e = c.next_event(T);
    assert_eq!(e["type"], "response.steer.failed", "{e}");
    assert_eq!(e["steer"]["input"], input, "{e}");
    assert_eq!(e["steer"]["previous_response_id"], id, "{e}");
    assert_eq!(e["error"]["code"], "no_active_response", "{e}");
    assert_eq!(s.rows(1).len(), 1, "nothing billed for the steer");
    s.finish();
}

/// A terminal of another response arriving mid-turn (an upstream repeating an old one, usage
/// 999/999) is relayed as sent but neither ends the turn nor is billed: the turn's own
/// terminal ends it, one row at its own usage — over the WebSocket and over HTTP SSE, on each
/// backend.
#[test]
fn a_stray_terminal_neither_ends_nor_bills_the_turn() {
    for db in backends() {
        let backend = db.backend;
        let s = Stack::start(
            db,
            StackOptions {
                env: &[("TURNPIKE_UPSTREAM__HTTP_TRANSPORT", "http")],
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        c.send(&create("stray deltas=3"));
        let mut events = Vec::new();
        loop {
            let e = c.next_event(T);
            let own_end = e["type"] == "response.completed"
                && e["response"]["id"]
                    == events
                        .first()
                        .map_or(Value::Null, |f: &Value| f["response"]["id"].clone());
            events.push(e);
            if own_end {
                break;
            }
        }
        let stray = events
            .iter()
            .filter(|e| e["type"] == "response.completed")
            .count();
        assert_eq!(
            stray, 2,
            "{backend}: the stray is relayed, then the turn's own: {events:?}"
        );
        assert!(
            events
                .iter()
                .any(|e| e["type"] == "response.output_text.delta"),
            "{backend}: the turn went on after the stray"
        );
        let mut body = create("stray deltas=3");
        body.as_object_mut().unwrap().remove("type");
        body["stream"] = json!(true);
        let mut h = common::post::Conn::open(&s.addr);
        let head = h.post("/v1/responses", &s.key, &body);
        assert_eq!(head.status, 200);
        let seen = h.events();
        assert_eq!(
            seen.last().unwrap().data["type"],
            "response.completed",
            "{backend}"
        );
        let rows = s.rows(2);
        assert_eq!(rows.len(), 2, "{backend}: one row each");
        for r in &rows {
            assert_eq!(r.status, "completed", "{backend}");
            assert!(
                r.input_tokens < 999 && r.output_tokens < 999,
                "{backend}: {r:?}"
            );
            assert!(
                r.response_id
                    .as_deref()
                    .is_some_and(|id| !id.ends_with("_stray")),
                "{backend}: {r:?}"
            );
        }
        s.finish();
    }
}

/// What a client sees through turnpike is what it would see straight from the upstream (#41):
/// the same creates sent to the upstream directly and through the relay give the same events, in
/// the same order, byte for byte but for the ids and timestamps each response gets — text, events
/// of types no client knows yet before and after the terminal, a tool call, a request-level
/// error, an incomplete response.
#[test]
fn events_through_the_relay_are_the_upstreams() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let directives = [
        "deltas=3 extra=response.queued,response.metadata trailing=codex.rate_limits",
        "tool",
        "error=invalid_prompt status=400",
        "terminal=incomplete deltas=2",
    ];
    let run = |c: &mut Client| -> Vec<Value> {
        let mut all = Vec::new();
        for d in directives {
            c.send(
                &json!({"type": "response.create", "model": "gpt-test", "store": false,
                "input": "hello", "metadata": {"sim": d}}),
            );
            all.extend(c.until_terminal(Duration::from_secs(30)));
        }
        all
    };
    let mut direct = Client::connect(
        &s.sim_addr,
        "/v1/responses",
        &[("authorization", "Bearer sk-upstream")],
    )
    .unwrap();
    let mut relayed = s.client();
    let (d, r) = (run(&mut direct), run(&mut relayed));
    assert!(d.len() > 12, "{d:?}");
    let (d, r): (Vec<Value>, Vec<Value>) = (
        d.iter().map(common::normalized).collect(),
        r.iter().map(common::normalized).collect(),
    );
    for (i, (a, b)) in d.iter().zip(&r).enumerate() {
        assert_eq!(a, b, "event {i} differs");
    }
    assert_eq!(d.len(), r.len());
    s.finish();
}
