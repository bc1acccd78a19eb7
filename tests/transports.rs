//! Upstream transports behind one turn (docs/DESIGN.md#upstream-transports): a WebSocket turn
//! whose request is larger than its account's WebSocket takes goes as `POST /responses` (SSE),
//! and the client sees a normal turn — the WebSocket mode's events on its lane, one row,
//! billed, `upstream_transport = 'http'`; the same session's small turns stay on the socket.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::TestDb;
use common::post::{Conn, post_json};
use common::stack::{Stack, StackOptions, block};
use common::ws::Client;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(30);

/// A relay whose clients may send 32 MiB frames, before a sim whose WebSocket takes 16 MiB
/// (and whose HTTP takes more), with the account's frame limit given (`None`: the default).
fn stack(account_frame_max: Option<usize>, sim_args: &[&str]) -> Stack {
    stack_on(TestDb::sqlite(), account_frame_max, sim_args)
}

fn stack_on(db: TestDb, account_frame_max: Option<usize>, sim_args: &[&str]) -> Stack {
    let extra = account_frame_max
        .map(|n| format!("frame_max_bytes = {n}"))
        .unwrap_or_default();
    Stack::start(
        db,
        StackOptions {
            sim_args,
            account_extra: &extra,
            env: &[("TURNPIKE_LIMITS__CLIENT_FRAME_MAX_BYTES", "33554432")],
            ..StackOptions::default()
        },
    )
}

fn create(lane: Option<&str>, input: &str, directive: &str) -> Value {
    let mut v = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": input, "metadata": {"sim": directive}});
    if let Some(l) = lane {
        v["stream_id"] = json!(l);
    }
    v
}

/// The sim's HTTP requests (path, body).
fn http_requests(s: &Stack) -> Vec<Value> {
    common::http_get(&s.sim_addr, "/sim/http")
        .1
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The text frames the sim received on its WebSockets.
fn ws_frames_in(s: &Stack) -> Vec<String> {
    let conns = s.sim_connections();
    conns
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["frames"].as_array().cloned().unwrap_or_default())
        .filter(|f| f["dir"] == "in" && f["text"].as_str().is_some_and(|t| t.starts_with('{')))
        .map(|f| f["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_101_advertises_the_largest_message_the_relay_takes() {
    let s = stack(None, &[]);
    let c = s.client();
    assert_eq!(
        c.handshake_header("x-codex-websocket-max-message-bytes"),
        Some("33554432")
    );
    s.finish();
}

#[test]
fn a_17_mib_turn_goes_over_http_on_its_lane_and_is_billed_once() {
    for db in block(TestDb::all()) {
        a_17_mib_turn_on(stack_on(db, None, &[]));
    }
}

fn a_17_mib_turn_on(s: Stack) {
    let mut c = s.client();
    let big = "x".repeat(17 * 1024 * 1024);
    c.send(&create(Some("big"), &big, "deltas=5"));
    drop(big);
    let events = c.until_terminal(T);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.completed", "{last}");
    // The WebSocket mode's events, every one on the client's lane.
    assert!(events.iter().all(|e| e["stream_id"] == "big"), "{events:?}");
    let deltas = events
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
        .count();
    assert_eq!(deltas, 5);
    assert_eq!(events[0]["type"], "response.created");

    // A small turn of the same session (another lane) rides the WebSocket.
    c.send(&create(None, "small", "deltas=2"));
    let small = c.until_terminal(T);
    assert_eq!(small.last().unwrap()["type"], "response.completed");
    assert!(small.iter().all(|e| e.get("stream_id").is_none()));

    let http = http_requests(&s);
    assert_eq!(http.len(), 1, "one HTTP request: the big turn");
    let body: Value = serde_json::from_str(http[0]["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["stream"], true);
    assert!(body.get("type").is_none() && body.get("stream_id").is_none());
    assert_eq!(body["input"].as_str().unwrap().len(), 17 * 1024 * 1024);
    // The small turn's frame went over the socket; the big one never did.
    let frames = ws_frames_in(&s);
    assert_eq!(frames.len(), 1, "{}", frames.len());
    assert!(frames[0].contains("\"small\""));

    let rows = s.rows(2);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].upstream_transport, "http");
    assert_eq!(rows[0].transport, "ws");
    assert_eq!(rows[0].status, "completed");
    assert_eq!(rows[0].usage_source, "reported");
    assert!(rows[0].input_tokens > 4_000_000, "{}", rows[0].input_tokens);
    assert!(rows[0].cost_nanousd > 0);
    assert_eq!(
        rows[0].response_id.as_deref(),
        last["response"]["id"].as_str()
    );
    // Timing of the HTTP leg, in order.
    let (fe, ft, d) = (
        rows[0].first_event_ms.unwrap(),
        rows[0].first_token_ms.unwrap(),
        rows[0].duration_ms,
    );
    assert!(rows[0].upstream_wait_ms.unwrap() <= fe && fe <= ft && ft < d);
    assert_eq!(rows[1].upstream_transport, "ws");
    assert_eq!(rows[1].status, "completed");
    s.finish();
}

#[test]
fn an_http_leg_cut_mid_response_ends_the_turn_lost_and_billed() {
    // A 1 KiB account limit: every turn of any size goes over HTTP.
    let s = stack(Some(1024), &[]);
    let mut c = s.client();
    let input = "y".repeat(4096);
    c.send(&create(
        None,
        &input,
        "deltas=6 delta_delay_ms=50 drop after=7",
    ));
    let events = c.until_terminal(T);
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{events:?} {:?}", s.problems());
    assert_eq!(
        last["error"]["code"],
        "upstream_connection_lost",
        "{events:?} {:?}",
        s.problems()
    );
    // Cut mid-response: the client had its first events, then the error.
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "response.output_text.delta"),
        "{events:?}"
    );
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].upstream_transport, "http");
    assert_eq!(
        rows[0].error_code.as_deref(),
        Some("upstream_connection_lost")
    );
    // Reached the upstream: never billed zero.
    assert!(rows[0].input_tokens >= 1000, "{}", rows[0].input_tokens);
    assert!(rows[0].cost_nanousd > 0);
    // The session goes on: the next turn completes.
    c.send(&create(None, &input, "deltas=1"));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    s.finish();
}

#[test]
fn an_http_legs_request_errors_reach_the_client_as_websocket_errors() {
    let s = stack(Some(1024), &[]);
    let mut c = s.client();
    let input = "z".repeat(4096);
    // A request-level refusal (400): the upstream's words, wrapped as the WebSocket mode does.
    c.send(&create(
        Some("l1"),
        &input,
        "error=context_length_exceeded status=400",
    ));
    let e = c.next_event(T);
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["status"], 400);
    assert_eq!(e["error"]["code"], "context_length_exceeded");
    assert_eq!(e["stream_id"], "l1");
    // An account-level refusal (429) with no other account: nothing served, nothing billed.
    c.send(&create(
        Some("l1"),
        &input,
        "error=rate_limit_exceeded status=429",
    ));
    let e = c.next_event(T);
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["status"], 429);
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(e["stream_id"], "l1");
    let rows = s.rows(2);
    assert_eq!(rows.len(), 2);
    assert_eq!(
        rows[0].error_code.as_deref(),
        Some("context_length_exceeded")
    );
    assert!(rows[0].input_tokens > 0, "a 400 reached the upstream");
    assert_eq!(rows[1].error_code.as_deref(), Some("upstream_unavailable"));
    assert_eq!(rows[1].cost_nanousd, 0, "a 429 served nothing");
    s.finish();
}

#[test]
fn a_cancel_or_a_steer_during_an_http_leg() {
    let s = stack(Some(1024), &[]);
    let mut c = s.client();
    let input = "w".repeat(4096);
    c.send(&create(None, &input, "deltas=50 delta_delay_ms=100"));
    let first = c.next_event(T);
    assert_eq!(first["type"], "response.created");
    let id = first["response"]["id"].as_str().unwrap().to_string();
    // A steer cannot ride HTTP: refused, its input handed back.
    c.send(&json!({"type": "response.steer", "input": "left", "previous_response_id": id}));
    let steer = loop {
        let e = c.next_event(T);
        if e["type"] == "response.steer.failed" || common::ws::is_terminal(&e) {
            break e;
        }
    };
    assert_eq!(steer["type"], "response.steer.failed", "{steer}");
    assert_eq!(steer["steer"]["input"], "left");
    c.send(&json!({"type": "response.cancel", "response_id": id}));
    let end = c.until_terminal(T);
    let last = end.last().unwrap();
    assert_eq!(last["type"], "response.cancelled", "{last}");
    assert_eq!(last["response"]["id"], id.as_str());
    let rows = s.rows(1);
    assert_eq!(rows[0].status, "cancelled");
    assert!(rows[0].input_tokens > 0);
    // The upstream saw its client leave (the leg was dropped).
    let deadline = std::time::Instant::now() + T;
    while s.sim_stats()["http_abandoned"] != 1 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.sim_stats()["http_abandoned"], 1, "{}", s.sim_stats());
    s.finish();
}

/// Steady clients beside a big turn: the big turn's HTTP leg does not hold the others' lanes.
#[test]
fn lanes_on_the_socket_run_beside_an_http_leg() {
    let s = stack(Some(8192), &[]);
    let mut c: Client = s.client();
    let big = "b".repeat(16 * 1024);
    c.send(&create(Some("big"), &big, "deltas=20 delta_delay_ms=50"));
    c.send(&create(Some("small"), "s", "deltas=2"));
    let mut ended = Vec::new();
    while ended.len() < 2 {
        let e = c.next_event(T);
        if common::ws::is_terminal(&e) {
            assert_eq!(e["type"], "response.completed", "{e}");
            ended.push(e["stream_id"].as_str().unwrap().to_string());
        }
    }
    // The small lane on the socket finished while the big one still streamed over HTTP.
    assert_eq!(ended, ["small", "big"]);
    let rows = s.rows(2);
    let mut by_lane: Vec<(String, i64)> = rows
        .iter()
        .map(|r| (r.upstream_transport.clone(), r.output_tokens))
        .collect();
    by_lane.sort();
    assert_eq!(by_lane.len(), 2);
    assert_eq!(by_lane[0].0, "http");
    assert_eq!(by_lane[1].0, "ws");
    s.finish();
}

/// Three WebSocket turns (default lane, a named lane, default lane) complete, each event on its
/// lane; every row went over HTTP.
fn three_turns_over_http(s: &Stack) {
    let mut c = s.client();
    for (i, lane) in [None, Some("b"), None].into_iter().enumerate() {
        c.send(&create(lane, &format!("turn {i}"), "deltas=3"));
        let events = c.until_terminal(T);
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.completed", "{events:?}");
        assert!(
            events
                .iter()
                .all(|e| e.get("stream_id").map(|v| v.as_str()) == lane.map(Some))
        );
    }
    let rows = s.rows(3);
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r.upstream_transport == "http" && r.status == "completed")
    );
}

#[test]
fn an_account_whose_upstream_answers_426_takes_its_turns_over_http() {
    let s = stack(None, &["--http-only"]);
    three_turns_over_http(&s);
    // One handshake refused, then no more dials: every turn went over HTTP.
    let stats = s.sim_stats();
    assert_eq!(stats["rejected"], 1, "{stats}");
    assert_eq!(stats["accepted"], 0, "{stats}");
    assert_eq!(http_requests(&s).len(), 3);
    s.finish();
}

/// The account's facts in the database, once `ready` says they are as awaited.
fn facts_once(
    s: &Stack,
    ready: impl Fn(&[turnpike::db::queries::facts::Facts]) -> bool,
) -> Vec<turnpike::db::queries::facts::Facts> {
    let deadline = std::time::Instant::now() + T;
    loop {
        let rows = common::stack::with_db(&s.db, async |db| {
            turnpike::db::queries::facts::all(db).await.unwrap()
        });
        if ready(&rows) || std::time::Instant::now() > deadline {
            return rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What one relay learnt of an account (its upstream answered the WebSocket handshake 426) is
/// stored, and another relay on the database — or this one restarted — takes the account's
/// turns over HTTP from its first turn, without a handshake of its own
/// (docs/DESIGN.md#learnt-facts); on each backend.
#[test]
fn a_relay_learns_what_another_learnt() {
    for db in block(TestDb::all()) {
        let env = [("TURNPIKE_UPSTREAM__LEARNT_REFRESH_MS", "100")];
        let s = Stack::start(
            db,
            StackOptions {
                sim_args: &["--http-only"],
                env: &env,
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        c.send(&create(None, "hello", "deltas=2"));
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
        assert_eq!(s.sim_stats()["rejected"], 1);
        let rows = facts_once(&s, |rows| rows.iter().any(|f| f.http_only));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (
                rows[0].account.as_str(),
                rows[0].http_only,
                rows[0].lanes_refused
            ),
            ("sim", true, false)
        );
        let (second, addr2, _dir) = s.second_relay(&env);
        let mut seen = Vec::new();
        assert!(
            common::stack::wait_log(&second, "adopted what another relay learnt", T, &mut seen),
            "{seen:?}"
        );
        let mut c = Client::bearer(&addr2, &s.key);
        c.send(&create(None, "hello again", "deltas=2"));
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
        let stats = s.sim_stats();
        assert_eq!(
            (stats["rejected"].as_i64(), stats["accepted"].as_i64()),
            (Some(1), Some(0)),
            "the second relay dialled nobody: {stats}"
        );
        let rows = s.rows(2);
        assert!(
            rows.iter().all(|r| r.upstream_transport == "http"),
            "{rows:?}"
        );
        drop(second);
        s.finish();
    }
}

/// Learnt facts are forgotten `upstream.learnt_ttl_s` after they were learnt, everywhere: the
/// next turn probes the upstream again (it may have changed).
#[test]
fn learnt_facts_expire_and_the_upstream_is_probed_again() {
    let env = [
        ("TURNPIKE_UPSTREAM__LEARNT_REFRESH_MS", "100"),
        ("TURNPIKE_UPSTREAM__LEARNT_TTL_S", "1"),
    ];
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            sim_args: &["--http-only"],
            env: &env,
            ..StackOptions::default()
        },
    );
    let turn = |text: &str| {
        let mut c = s.client();
        c.send(&create(None, text, "deltas=2"));
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
    };
    turn("one");
    assert_eq!(s.sim_stats()["rejected"], 1);
    facts_once(&s, |rows| rows.iter().any(|f| f.http_only));
    // Stored, then gone once a second old.
    let rows = facts_once(&s, <[_]>::is_empty);
    assert!(rows.is_empty(), "{rows:?}");
    std::thread::sleep(Duration::from_millis(300));
    turn("two");
    assert_eq!(s.sim_stats()["rejected"], 2, "probed again");
    s.finish();
}

/// An account declared `transport = "http"` is never dialled: WebSocket and HTTP clients' turns
/// all go as `POST /responses` from the first one, though its upstream has a WebSocket mode.
#[test]
fn an_account_declared_http_is_never_dialled() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: "transport = \"http\"",
            ..StackOptions::default()
        },
    );
    three_turns_over_http(&s);
    let mut c = Conn::open(&s.addr);
    let head = c.post("/v1/responses", &s.key, &http_req(json!({"stream": true})));
    assert_eq!(head.status, 200);
    assert_eq!(
        c.events().last().unwrap().data["type"],
        "response.completed"
    );
    let stats = s.sim_stats();
    assert_eq!(
        (stats["rejected"].as_i64(), stats["accepted"].as_i64()),
        (Some(0), Some(0)),
        "{stats}"
    );
    assert_eq!(http_requests(&s).len(), 4);
    let rows = s.rows(4);
    assert!(
        rows.iter().all(|r| r.upstream_transport == "http"),
        "{rows:?}"
    );
    s.finish();
}

// ---- HTTP clients on upstream WebSockets (`upstream.http_transport = "ws"`, the default) ----

fn http_req(extra: Value) -> Value {
    let mut body = json!({"model": "gpt-test", "store": false, "input": "hello over http",
        "prompt_cache_options": {"ttl": "12h"}, "client_metadata": {"x": "y"}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Streamed and JSON requests of one client ride one warm upstream WebSocket: the SSE events
/// are the upstream's events, the JSON answer its response object, every row billed as reported
/// with `upstream_transport = 'ws'`, and the upstream saw the body's fields byte for byte.
#[test]
fn http_clients_turns_run_on_a_pooled_upstream_websocket() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack_on(db, None, &[]);
        let mut c = Conn::open(&s.addr);
        let body =
            http_req(json!({"stream": true, "metadata": {"sim": "deltas=4 delta_delay_ms=50"}}));
        let head = c.post("/v1/responses", &s.key, &body);
        assert_eq!(head.status, 200, "{backend}");
        assert!(
            head.header("content-type")
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = c.events();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e.data["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds.first(), Some(&"response.created"), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "response.output_text.delta")
                .count(),
            4
        );
        assert!(
            events
                .iter()
                .all(|e| e.event.as_deref() == e.data["type"].as_str())
        );
        let terminal = events.last().unwrap().data.clone();
        // Then a JSON request on the same client connection.
        let head = c.post("/v1/responses", &s.key, &http_req(json!({})));
        assert_eq!(head.status, 200);
        let json_answer = c.json(&head);
        assert_eq!(json_answer["status"], "completed", "{json_answer}");
        assert_eq!(json_answer["object"], "response");

        // Both on one upstream WebSocket, none over HTTP.
        assert_eq!(http_requests(&s).len(), 0, "{backend}");
        let frames = ws_frames_in(&s);
        assert_eq!(frames.len(), 2, "{frames:?}");
        assert_eq!(s.sim_stats()["accepted"], 1, "one warm socket for both");
        let sent: Value = serde_json::from_str(&frames[0]).unwrap();
        assert_eq!(sent["type"], "response.create");
        assert!(sent.get("stream").is_none());
        assert_eq!(sent["prompt_cache_options"], json!({"ttl": "12h"}));
        assert_eq!(sent["client_metadata"], json!({"x": "y"}));

        let rows = s.rows(2);
        assert_eq!(rows.len(), 2);
        for r in &rows {
            assert_eq!(
                (
                    r.transport.as_str(),
                    r.upstream_transport.as_str(),
                    r.status.as_str()
                ),
                ("http", "ws", "completed"),
                "{backend}: {r:?}"
            );
            assert_eq!(r.usage_source, "reported");
            assert!(r.cost_nanousd > 0);
        }
        let usage = &terminal["response"]["usage"];
        assert_eq!(
            rows[0].input_tokens,
            usage["input_tokens"].as_i64().unwrap()
        );
        assert_eq!(
            rows[0].output_tokens,
            usage["output_tokens"].as_i64().unwrap()
        );
        assert_eq!(rows[1].response_id.as_deref(), json_answer["id"].as_str());
        let r = &rows[0];
        let (fe, ft) = (r.first_event_ms.unwrap(), r.first_token_ms.unwrap());
        assert!(
            r.upstream_wait_ms.unwrap() <= fe && fe <= ft && ft < r.duration_ms,
            "{r:?}"
        );
        s.finish();
    }
}

/// Errors over the socket answer as the upstream's HTTP side would: a request's 400 with its
/// status and JSON error; an account's 429 goes to the HTTP path (whose failover and answer
/// are the HTTP surface's), nothing billed.
#[test]
fn http_clients_errors_over_the_socket() {
    let s = stack(None, &[]);
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &http_req(json!({"metadata": {"sim": "error=context_length_exceeded status=400"}})),
    );
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &http_req(json!({"metadata": {"sim": "error=rate_limit_exceeded status=429"}})),
    );
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    // The 429 was tried on the socket, then over HTTP.
    assert_eq!(http_requests(&s).len(), 1);
    let rows = s.rows(2);
    assert_eq!(
        rows[0].error_code.as_deref(),
        Some("context_length_exceeded")
    );
    assert_eq!(rows[0].upstream_transport, "ws");
    assert!(rows[0].input_tokens > 0);
    assert_eq!(
        (rows[1].status.as_str(), rows[1].cost_nanousd),
        ("rejected", 0)
    );
    s.finish();
}

/// A streaming client that leaves mid-response: the response is cancelled on the socket (the
/// upstream reads `response.cancel`), the row is `client_gone` with its input billed, and the
/// connection is not lent again.
#[test]
fn an_http_client_leaving_mid_stream_cancels_the_response_on_the_socket() {
    let s = stack(None, &[]);
    let mut c = Conn::open(&s.addr);
    let head = c.post(
        "/v1/responses",
        &s.key,
        &http_req(json!({"stream": true, "metadata": {"sim": "deltas=100 delta_delay_ms=50"}})),
    );
    assert_eq!(head.status, 200);
    let seen = c.events_until(|e| e.data["type"] == "response.output_text.delta");
    assert!(!seen.is_empty());
    drop(c);
    let r = &s.rows(1)[0];
    assert_eq!(
        (r.status.as_str(), r.usage_source.as_str()),
        ("client_gone", "estimated"),
        "{r:?}"
    );
    assert!(r.input_tokens > 0 && r.cost_nanousd > 0, "{r:?}");
    let deadline = std::time::Instant::now() + T;
    while !ws_frames_in(&s)
        .iter()
        .any(|f| f.contains("response.cancel"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        ws_frames_in(&s)
            .iter()
            .any(|f| f.contains("response.cancel"))
    );
    // The next request gets a fresh socket: the old one may still carry the response.
    let (code, _) = post_json(&s.addr, "/v1/responses", &s.key, &http_req(json!({})));
    assert_eq!(code, 200);
    assert_eq!(s.sim_stats()["accepted"], 2);
    s.finish();
}

/// A socket lost before anything of the response came: the request goes over HTTP, once, and
/// the client sees one normal answer and one row.
#[test]
fn an_http_clients_turn_whose_socket_is_lost_first_goes_over_http() {
    let s = stack(None, &[]);
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &http_req(json!({"metadata": {"sim": "close=1011 after=0 once"}})),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["status"], "completed");
    assert_eq!(http_requests(&s).len(), 1);
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].status.as_str(), rows[0].upstream_transport.as_str()),
        ("completed", "http")
    );
    s.finish();
}

/// An upstream whose WebSocket closes a 2 MiB request with 1009 while its HTTP takes it (the
/// account's configured limit says 16 MiB): the turn goes over HTTP — one turn, one row, billed
/// once — and the account has learnt: the next request of that size goes straight over HTTP,
/// smaller ones stay on the socket. The same for an HTTP client's request.
#[test]
fn a_1009_teaches_the_account_its_frame_limit() {
    let s = stack(None, &["--max-frame-bytes", "1048576"]);
    let mut c = s.client();
    let big = "q".repeat(2 * 1024 * 1024);
    for lane in [Some("a"), Some("b")] {
        c.send(&create(lane, &big, "deltas=2"));
        let events = c.until_terminal(T);
        assert_eq!(
            events.last().unwrap()["type"],
            "response.completed",
            "{events:?}"
        );
    }
    c.send(&create(None, "small", "deltas=2"));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    // One socket refused the first big request; the second never went to a socket.
    let closed_too_big = s
        .sim_connections()
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            c["frames"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["text"].as_str().is_some_and(|t| t.contains("1009")))
        })
        .count();
    assert_eq!(closed_too_big, 1, "{}", s.sim_connections());
    assert_eq!(http_requests(&s).len(), 2);
    let rows = s.rows(3);
    assert_eq!(rows.len(), 3, "one row per turn");
    let got: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r.status.as_str(), r.upstream_transport.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("completed", "http"),
            ("completed", "http"),
            ("completed", "ws")
        ]
    );
    assert!(rows.iter().all(|r| r.usage_source == "reported"));
    // An HTTP client's request of that size goes over HTTP at once.
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &http_req(json!({"input": big})),
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_requests(&s).len(), 3);
    s.finish();
}

/// An upstream without lanes (it answers `stream_id` with 400 "Unsupported parameter", no lane
/// on the refusal): the refused create and every later named lane's turn go over HTTP, their
/// events on their lanes, each billed once; the default lane stays on the socket, steering
/// included.
#[test]
fn named_lanes_on_an_upstream_without_lanes_go_over_http() {
    let s = stack(None, &["--refuse-stream-id"]);
    let mut c = s.client();
    c.send(&create(None, "default first", "deltas=2"));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    // Two lanes back to back, as the SDKs' lane helpers send them.
    c.send(&create(Some("a"), "lane a", "deltas=3 delta_delay_ms=20"));
    c.send(&create(Some("b"), "lane b", "deltas=3 delta_delay_ms=20"));
    let mut ends = Vec::new();
    while ends.len() < 2 {
        let e = c.next_event(T);
        assert!(e.get("stream_id").is_some(), "every event on its lane: {e}");
        if common::ws::is_terminal(&e) {
            assert_eq!(e["type"], "response.completed", "{e}");
            ends.push(e["stream_id"].as_str().unwrap().to_string());
        }
    }
    ends.sort();
    assert_eq!(ends, ["a", "b"]);
    // The default lane still steers on the socket.
    c.send(&create(None, "steer me", "deltas=40 delta_delay_ms=20"));
    let created = c.next_event(T);
    let id = created["response"]["id"].as_str().unwrap().to_string();
    c.send(&json!({"type": "response.steer", "previous_response_id": id, "input": "shorter"}));
    let mut kinds = Vec::new();
    while !kinds.iter().any(|k| k == "response.completed") {
        let e = c.next_event(T);
        kinds.push(e["type"].as_str().unwrap().to_string());
    }
    assert!(
        kinds.iter().any(|k| k == "response.steer.accepted"),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k == "response.incomplete"),
        "{kinds:?}"
    );

    // A later named lane goes over HTTP at once.
    c.send(&create(Some("c"), "lane c", "deltas=1"));
    let last = c.until_terminal(T).pop().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["stream_id"].as_str()),
        (Some("response.completed"), Some("c"))
    );

    // The socket saw the named creates sent before its refusal came back (both lanes were
    // sent back to back), never one after; all three lanes ran over HTTP.
    let named = |s: &Stack| {
        ws_frames_in(s)
            .iter()
            .filter(|f| f.contains("\"stream_id\""))
            .count()
    };
    assert!((1..=2).contains(&named(&s)), "{}", named(&s));
    assert_eq!(http_requests(&s).len(), 3);
    let rows = s.rows(6);
    assert_eq!(rows.len(), 6, "one row per turn: {rows:?}");
    let by_transport = |t: &str| rows.iter().filter(|r| r.upstream_transport == t).count();
    assert_eq!((by_transport("http"), by_transport("ws")), (3, 3));
    assert!(
        rows.iter()
            .all(|r| r.status == "completed" || r.status == "incomplete")
    );
    s.finish();
}

/// More HTTP clients at once than the account has sockets: those that find none free go over
/// HTTP at once instead of queueing for a socket (the lease timeout here is a minute: a queued
/// one would have ridden a socket).
#[test]
fn http_clients_beyond_the_accounts_sockets_go_over_http() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: 2,
            env: &[("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "60000")],
            ..StackOptions::default()
        },
    );
    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                scope.spawn(|| {
                    post_json(
                        &s.addr,
                        "/v1/responses",
                        &s.key,
                        &http_req(json!({"metadata": {"sim": "deltas=10 delta_delay_ms=60"}})),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        answers
            .iter()
            .all(|(code, body)| *code == 200 && body["status"] == "completed"),
        "{answers:?}"
    );
    let rows = s.rows(6);
    assert_eq!(rows.len(), 6);
    let on_ws = rows.iter().filter(|r| r.upstream_transport == "ws").count();
    assert!((1..=2).contains(&on_ws), "{on_ws} on sockets: {rows:?}");
    assert_eq!(http_requests(&s).len(), 6 - on_ws);
    s.finish();
}

/// What an account's upstream taught the relay is visible to operators (`/admin/pools`, a
/// gauge per reason), and an account declared `lanes = "http"` sends named lanes over HTTP
/// from the first turn, its socket never seeing a `stream_id`.
#[test]
fn what_accounts_taught_is_visible_and_lanes_can_be_declared() {
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[],
        StackOptions {
            sim_args: &["--refuse-stream-id"],
            ..StackOptions::default()
        },
    );
    let gauge = |account: &str, reason: &str| {
        common::admin::metric(
            &admin,
            &format!("turnpike_upstream_account_http{{account=\"{account}\",reason=\"{reason}\"}}"),
        )
    };
    assert_eq!(gauge("sim", "lanes_refused"), 0.0);
    let mut c = s.client();
    c.send(&create(Some("x"), "lane x", "deltas=1"));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(gauge("sim", "lanes_refused"), 1.0);
    assert_eq!(gauge("sim", "websocket_refused"), 0.0);
    let (code, pools) = common::http(&admin, "GET", "/admin/pools", Some(common::admin::TOKEN));
    assert_eq!(code, 200);
    let sim = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["account"] == "sim")
        .unwrap();
    assert_eq!(
        (sim["lanes_refused"].as_bool(), sim["http_only"].as_bool()),
        (Some(true), Some(false))
    );
    s.finish();

    // Declared on an upstream that has lanes: no `stream_id` is ever sent to its socket.
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: "lanes = \"http\"\n",
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create(Some("y"), "lane y", "deltas=1"));
    let last = c.until_terminal(T).pop().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["stream_id"].as_str()),
        (Some("response.completed"), Some("y"))
    );
    assert!(
        ws_frames_in(&s)
            .iter()
            .all(|f| !f.contains("\"stream_id\""))
    );
    assert_eq!(http_requests(&s).len(), 1);
    s.finish();
}

/// Clients that vanish the moment their turn's response started over HTTP: each turn ends at
/// once with one row, its input billed (the request reached the upstream), and its request is
/// dropped — the upstream stops generating for nobody (docs/DESIGN.md#turn-machine).
#[test]
fn clients_vanishing_during_http_legs_leave_one_billed_row_each() {
    let s = stack(Some(1024), &[]);
    let input = "v".repeat(4096);
    for _ in 0..5 {
        let mut c = s.client();
        c.send(&create(None, &input, "deltas=20 delta_delay_ms=30"));
        // Gone without a close frame as soon as the response started.
        assert_eq!(c.next_event(T)["type"], "response.created");
        drop(c);
    }
    let rows = s.rows(5);
    assert_eq!(rows.len(), 5, "{rows:?}");
    for r in &rows {
        assert_eq!(r.upstream_transport, "http", "{r:?}");
        assert_eq!(r.status, "client_gone", "{r:?}");
        assert!(
            r.input_tokens > 0 && r.cost_nanousd > 0,
            "never zero once sent: {r:?}"
        );
    }
    // The sim notices a dropped request at its next write.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stats = loop {
        let stats = s.sim_stats();
        if stats["http_abandoned"] == 5 || std::time::Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        (&stats["http_abandoned"], &stats["http_completed"]),
        (&json!(5), &json!(0)),
        "{stats}"
    );
    s.finish();
}

/// Forty sessions at once, each turn over HTTP on one account: more legs than the account's
/// HTTP connections per worker (`max_conns` 4) — every turn completes, one row each.
#[test]
fn many_sessions_with_http_legs_at_once() {
    let s = stack(Some(1024), &[]);
    let input = "m".repeat(2048);
    let (addr, key) = (&s.addr, &s.key);
    let ends: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(|| {
                    let mut c = Client::bearer(addr, key);
                    c.send(&create(None, &input, "deltas=3 delta_delay_ms=20"));
                    c.until_terminal(T).pop().unwrap()["type"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(ends.iter().all(|e| e == "response.completed"), "{ends:?}");
    let rows = s.rows(40);
    assert_eq!(rows.len(), 40);
    assert!(
        rows.iter()
            .all(|r| r.upstream_transport == "http" && r.status == "completed")
    );
    assert_eq!(http_requests(&s).len(), 40);
    s.finish();
}
