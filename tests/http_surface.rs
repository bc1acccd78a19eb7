//! The HTTP surface (docs/DESIGN.md#http-surface): `POST /v1/responses` (JSON and SSE) and
//! `/v1/responses/compact` are turns like WebSocket turns — relayed as they arrive, billed from
//! the upstream's usage token for token, one row each (`transport = 'http'`), estimated when
//! the stream is cut, `client_gone` with input billed when the client leaves, never a 200
//! without a durable record — here with the turns sent upstream over HTTP.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::post::{Conn, post_json};
use common::stack::{Stack, StackOptions, block};
use common::{TestDb, http, http_get};
use serde_json::{Value, json};
use turnpike::db::models::UsageRow;

fn req(extra: Value) -> Value {
    let mut body = json!({"model": "gpt-test", "store": false, "input": "hello over http"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A stack whose HTTP clients' turns go upstream over HTTP (`upstream.http_transport = "http"`):
/// this file tests that path; tests/transports.rs runs them on an upstream WebSocket.
fn start(db: TestDb, opts: StackOptions<'_>) -> Stack {
    let mut env = vec![("TURNPIKE_UPSTREAM__HTTP_TRANSPORT", "http")];
    env.extend_from_slice(opts.env);
    Stack::start(db, StackOptions { env: &env, ..opts })
}

fn sim(directive: &str) -> Value {
    json!({"metadata": {"sim": directive}})
}

fn assert_billed_as_reported(row: &UsageRow, usage: &Value) {
    assert_eq!(
        row.input_tokens,
        usage["input_tokens"].as_i64().unwrap(),
        "{row:?}"
    );
    assert_eq!(
        row.output_tokens,
        usage["output_tokens"].as_i64().unwrap(),
        "{row:?}"
    );
    assert_eq!(row.usage_source, "reported");
    assert!(row.cost_nanousd > 0, "{row:?}");
}

/// A streamed response: every event reaches the client as the upstream sends it (the first
/// delta long before the terminal), the bytes are the upstream's, and the row bills the
/// terminal's usage with the four timing marks in order — on each backend.
#[test]
fn sse_is_relayed_as_it_arrives_and_billed() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = start(db, StackOptions::default());
        let mut c = Conn::open(&s.addr);
        let head = c.post(
            "/v1/responses",
            &s.key,
            &req(json!({"stream": true, "metadata": {"sim": "deltas=6 delta_delay_ms=150"}})),
        );
        assert_eq!(head.status, 200, "{backend}");
        assert!(
            head.header("content-type")
                .unwrap()
                .starts_with("text/event-stream")
        );
        let events = c.events();
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e.data["type"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(kinds.first(), Some(&"response.created"), "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"response.completed"), "{kinds:?}");
        assert_eq!(
            kinds
                .iter()
                .filter(|k| **k == "response.output_text.delta")
                .count(),
            6
        );
        // Relayed unchanged: `event:` lines as the upstream wrote them.
        assert!(events.iter().all(|e| {
            e.raw
                .starts_with(&format!("event: {}\n", e.data["type"].as_str().unwrap()))
        }));
        let first_delta = events
            .iter()
            .find(|e| e.data["type"] == "response.output_text.delta")
            .unwrap()
            .at;
        let terminal = events.last().unwrap();
        let gap = terminal.at.duration_since(first_delta);
        assert!(
            gap >= Duration::from_millis(500),
            "{backend}: the first delta came {gap:?} before the terminal: buffered?"
        );
        let usage = &terminal.data["response"]["usage"];
        let rows = s.rows(1);
        assert_eq!(rows.len(), 1, "{backend}");
        let r = &rows[0];
        assert_billed_as_reported(r, usage);
        assert_eq!(
            (r.status.as_str(), r.transport.as_str(), r.origin.as_str()),
            ("completed", "http", "create")
        );
        assert_eq!(
            r.response_id.as_deref(),
            terminal.data["response"]["id"].as_str()
        );
        let (fe, ft) = (r.first_event_ms.unwrap(), r.first_token_ms.unwrap());
        assert!(
            r.upstream_wait_ms.unwrap() <= fe && fe <= ft && ft < r.duration_ms,
            "{r:?}"
        );
        assert!(r.duration_ms - ft >= 500, "{r:?}");
        // The connection is kept alive: a JSON request follows on it.
        let head = c.post("/v1/responses", &s.key, &req(json!({})));
        assert_eq!(head.status, 200);
        let body = c.json(&head);
        assert_eq!(body["status"], "completed", "{body}");
        let rows = s.rows(2);
        assert_billed_as_reported(&rows[1], &body["usage"]);
        // Nothing streamed: no token event, no first token.
        assert_eq!(rows[1].first_token_ms, None, "{:?}", rows[1]);
        assert!(rows[1].first_event_ms.is_some());
        s.finish();
    }
}

/// JSON and compact answers: the upstream's body, a row each billed token for token
/// (`origin = 'compaction'` for the compaction) — on each backend.
#[test]
fn json_and_compact_are_billed() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = start(db, StackOptions::default());
        let (code, body) = post_json(
            &s.addr,
            "/v1/responses",
            &s.key,
            &req(sim("cached=2 reasoning=3")),
        );
        assert_eq!(code, 200, "{backend}: {body}");
        assert_eq!(body["object"], "response");
        assert!(
            body["output"][0]["content"][0]["text"].is_string(),
            "{body}"
        );
        let (code, compacted) = post_json(
            &s.addr,
            "/v1/responses/compact",
            &s.key,
            &json!({"model": "gpt-test", "input": [{"role": "user", "content": "a long conversation to shrink"}]}),
        );
        assert_eq!(code, 200, "{backend}: {compacted}");
        assert_eq!(compacted["object"], "response.compaction");
        let rows = s.rows(2);
        assert_eq!(rows.len(), 2, "{backend}");
        assert_billed_as_reported(&rows[0], &body["usage"]);
        assert_eq!(rows[0].cached_input_tokens, 2);
        assert_eq!(rows[0].reasoning_tokens, 3);
        assert_billed_as_reported(&rows[1], &compacted["usage"]);
        assert_eq!(
            (rows[1].origin.as_str(), rows[1].transport.as_str()),
            ("compaction", "http")
        );
        assert_eq!(rows[1].response_id.as_deref(), compacted["id"].as_str());
        s.finish();
    }
}

/// A stream cut before its terminal: the client gets an SSE `error` event, the row is
/// `upstream_lost`, estimated, input billed — on each backend.
#[test]
fn a_cut_stream_is_billed_estimated_and_told() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = start(db, StackOptions::default());
        let mut c = Conn::open(&s.addr);
        let head = c.post("/v1/responses", &s.key, &req(json!({"stream": true, "metadata": {"sim": "deltas=8 delta_delay_ms=50 drop after=6"}})));
        assert_eq!(head.status, 200);
        let events = c.events();
        let last = events.last().unwrap();
        assert_eq!(last.event.as_deref(), Some("error"), "{events:?}");
        assert_eq!(
            last.data["code"], "upstream_connection_lost",
            "{:?}",
            last.data
        );
        assert_eq!(last.data["error"]["code"], "upstream_connection_lost");
        assert!(
            !events
                .iter()
                .any(|e| e.data["type"] == "response.completed")
        );
        let r = &s.rows(1)[0];
        assert_eq!(
            (r.status.as_str(), r.usage_source.as_str()),
            ("upstream_lost", "estimated"),
            "{backend}"
        );
        assert!(r.input_tokens > 0 && r.cost_nanousd > 0, "{r:?}");
        s.finish();
    }
}

/// A client that leaves mid-stream cancels the upstream request (the sim sees its connection
/// close before the response's end); the row is `client_gone` with its input billed.
#[test]
fn a_client_leaving_mid_stream_cancels_the_upstream_request() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = start(db, StackOptions::default());
        let mut c = Conn::open(&s.addr);
        let head = c.post(
            "/v1/responses",
            &s.key,
            &req(json!({"stream": true, "metadata": {"sim": "deltas=100 delta_delay_ms=100"}})),
        );
        assert_eq!(head.status, 200);
        let seen = c.events_until(|e| e.data["type"] == "response.output_text.delta");
        assert!(!seen.is_empty());
        drop(c);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while s.sim_stats()["http_abandoned"].as_u64() != Some(1) {
            assert!(
                std::time::Instant::now() < deadline,
                "{backend}: the upstream request was not cancelled: {}",
                s.sim_stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(s.sim_stats()["http_completed"], 0);
        let r = &s.rows(1)[0];
        assert_eq!(
            (r.status.as_str(), r.usage_source.as_str()),
            ("client_gone", "estimated"),
            "{backend}: {r:?}"
        );
        assert!(
            r.input_tokens > 0 && r.cost_nanousd > 0,
            "never zero once it reached the upstream: {r:?}"
        );
        s.finish();
    }
}

/// A key over its quota gets 403 `quota_exhausted` in the JSON error shape, and nothing goes
/// upstream.
#[test]
fn quota_refused_before_the_upstream() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            key: turnpike::auth::KeyRequest {
                quota_nanousd: Some(1),
                ..Default::default()
            },
            ..StackOptions::default()
        },
    );
    for stream in [false, true] {
        let (code, body) = post_json(
            &s.addr,
            "/v1/responses",
            &s.key,
            &req(json!({"stream": stream})),
        );
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["error"]["code"], "quota_exhausted");
        assert_eq!(body["error"]["type"], "insufficient_quota");
        assert!(body["error"].get("param").is_some(), "{body}");
    }
    assert_eq!(s.sim_stats()["http_requests"], 0);
    let rows = s.rows(2);
    assert!(
        rows.iter()
            .all(|r| r.status == "rejected" && r.cost_nanousd == 0),
        "{rows:?}"
    );
    s.finish();
}

/// Requests the relay refuses itself: the JSON error shape with the table's status.
#[test]
fn refusals_have_the_json_error_shape() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_LIMITS__HTTP_BODY_MAX_BYTES", "4096")],
            ..StackOptions::default()
        },
    );
    let cases: Vec<(u16, &str, Value)> = vec![
        (401, "missing_api_key", {
            let mut c = Conn::open(&s.addr);
            let h = c.send("POST", "/v1/responses", None, b"{}", &[]);
            let v = c.json(&h);
            assert_eq!(h.status, 401);
            v
        }),
        (
            401,
            "invalid_api_key",
            post_json(&s.addr, "/v1/responses", "tpk_nope", &req(json!({}))).1,
        ),
        (400, "invalid_json", {
            let mut c = Conn::open(&s.addr);
            let h = c.send("POST", "/v1/responses", Some(&s.key), b"{not json", &[]);
            c.json(&h)
        }),
        (
            400,
            "model_required",
            post_json(&s.addr, "/v1/responses", &s.key, &json!({"input": "x"})).1,
        ),
        (
            413,
            "request_body_too_large",
            post_json(
                &s.addr,
                "/v1/responses",
                &s.key,
                &req(json!({"input": "x".repeat(5000)})),
            )
            .1,
        ),
    ];
    for (_, code, body) in &cases {
        assert_eq!(body["error"]["code"], *code, "{body}");
    }
    let (status, _) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &req(json!({"input": "y".repeat(5000)})),
    );
    assert_eq!(status, 413);
    // GET without an upgrade: 426 (Codex reads it as "use HTTP"); unknown paths: 404 JSON.
    let (code, body) = http(&s.addr, "GET", "/v1/responses", Some(&s.key));
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (426, Some("upgrade_required"))
    );
    let (code, body) = http_get(&s.addr, "/v1/chat/completions");
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (404, Some("not_found"))
    );
    assert_eq!(s.sim_stats()["http_requests"], 0);
    s.finish();
}

/// Upstream connections are reused: 200 sequential requests, each on a new client connection,
/// open no more upstream connections than the account has turn slots.
#[test]
fn upstream_connections_are_kept_alive() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: 2,
            ..StackOptions::default()
        },
    );
    for i in 0..200 {
        let mut c = Conn::open(&s.addr);
        let stream = i % 2 == 0;
        let head = c.post("/v1/responses", &s.key, &req(json!({"stream": stream})));
        assert_eq!(head.status, 200);
        if stream {
            let events = c.events();
            assert_eq!(events.last().unwrap().data["type"], "response.completed");
        } else {
            assert_eq!(c.json(&head)["status"], "completed");
        }
    }
    let stats = s.sim_stats();
    assert_eq!(stats["http_requests"], 200);
    // Less the connection of this stats request itself.
    let tcp = stats["tcp_accepted"].as_u64().unwrap() - 1;
    assert!(
        tcp <= 2,
        "{tcp} upstream TCP connections for 200 requests: not reused"
    );
    assert_eq!(s.rows(200).len(), 200);
    s.finish();
}

/// 429 from an account before any byte: the request moves to another account (the client
/// never sees it); with no other account the client gets the 429 and its Retry-After, and
/// nothing is billed.
#[test]
fn rate_limited_accounts_fail_over() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: "\n[[accounts]]\nname = \"second\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-second\"\n",
            ..StackOptions::default()
        },
    );
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &req(sim("error=rate_limit_exceeded status=429 once")),
    );
    assert_eq!(code, 200, "{body}");
    let rows = s.rows(1);
    assert_eq!(rows[0].status, "completed");
    assert_eq!(s.sim_stats()["http_requests"], 2, "one refused, one served");
    s.finish();

    let s = start(TestDb::sqlite(), StackOptions::default());
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &req(sim("error=rate_limit_exceeded status=429")),
    );
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let r = &s.rows(1)[0];
    assert_eq!(
        (r.status.as_str(), r.cost_nanousd),
        ("rejected", 0),
        "{r:?}"
    );
    s.finish();
}

/// An upstream that sends headers and then nothing: the first-event timeout ends the stream
/// with an SSE error, billed estimated (the request reached the upstream).
#[test]
fn a_silent_upstream_times_out() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_UPSTREAM__FIRST_EVENT_TIMEOUT_MS", "600")],
            ..StackOptions::default()
        },
    );
    let mut c = Conn::open(&s.addr);
    let head = c.post(
        "/v1/responses",
        &s.key,
        &req(json!({"stream": true, "metadata": {"sim": "first_delay_ms=5000"}})),
    );
    assert_eq!(head.status, 200);
    let events = c.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].data["code"], "upstream_connection_lost");
    let r = &s.rows(1)[0];
    assert_eq!(
        (r.status.as_str(), r.usage_source.as_str()),
        ("upstream_lost", "estimated")
    );
    assert!(r.input_tokens > 0);
    s.finish();
}

/// The requests of one client session (its `session-id` header, as Codex sends) are its turns
/// 1, 2, 3 — numbered as a WebSocket session's — and another session counts on its own.
#[test]
fn a_client_sessions_requests_are_numbered_turns() {
    let s = start(TestDb::sqlite(), StackOptions::default());
    for session in ["codex-s1", "codex-s1", "codex-s2", "codex-s1"] {
        let mut c = Conn::open(&s.addr);
        let body = req(json!({})).to_string();
        let head = c.send(
            "POST",
            "/v1/responses",
            Some(&s.key),
            body.as_bytes(),
            &[("session-id", session)],
        );
        assert_eq!(c.json(&head)["status"], "completed");
    }
    let rows = s.rows(4);
    let seen: Vec<(&str, i32)> = rows
        .iter()
        .map(|r| (r.session_id.as_str(), r.turn_index))
        .collect();
    assert_eq!(
        seen,
        [
            ("codex-s1", 1),
            ("codex-s1", 2),
            ("codex-s2", 1),
            ("codex-s1", 3)
        ]
    );
    s.finish();
}

/// A request the upstream took but did not answer in time (no head within the first-event
/// timeout) is sent once more, as a WebSocket turn lost before any event is
/// (docs/DESIGN.md#turn-machine): the client gets the second answer, billed once as reported;
/// lost twice, the client hears `upstream_connection_lost` and the row bills the estimate.
#[test]
fn a_request_unanswered_is_sent_once_more() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_UPSTREAM__FIRST_EVENT_TIMEOUT_MS", "500")],
            ..StackOptions::default()
        },
    );
    let mut c = Conn::open(&s.addr);
    let head = c.post(
        "/v1/responses",
        &s.key,
        &req(sim("head_delay_ms=3000 once")),
    );
    let body = c.json(&head);
    assert_eq!(head.status, 200, "{body}");
    assert_eq!(body["status"], "completed", "{body}");
    assert_eq!(s.sim_stats()["http_requests"], 2, "sent twice");
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1, "billed once: {rows:?}");
    assert_billed_as_reported(&rows[0], &body["usage"]);
    assert_eq!(rows[0].response_id.as_deref(), body["id"].as_str());

    // Unanswered twice: lost, billed from its estimate (it reached the upstream).
    let mut c = Conn::open(&s.addr);
    let head = c.post("/v1/responses", &s.key, &req(sim("head_delay_ms=3000")));
    let body = c.json(&head);
    assert_eq!(head.status, 503, "{body}");
    assert_eq!(body["error"]["code"], "upstream_connection_lost");
    assert_eq!(s.sim_stats()["http_requests"], 4, "once more, not twice");
    let rows = s.rows(2);
    assert_eq!(
        (rows[1].status.as_str(), rows[1].usage_source.as_str()),
        ("upstream_lost", "estimated")
    );
    assert!(
        rows[1].input_tokens > 0 && rows[1].cost_nanousd > 0,
        "{:?}",
        rows[1]
    );
    s.finish();
}

/// Accounting unavailable (spool and database down) while a request is in flight: no 200 and
/// no terminal event — the client gets `accounting_unavailable`; later requests are refused
/// before the upstream.
#[test]
fn no_answer_without_a_durable_record() {
    let env = [
        ("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "300"),
        ("TURNPIKE_ACCOUNTING__ACK_TIMEOUT_MS", "1000"),
    ];
    let Some((s, proxy)) = Stack::behind_pg_proxy(&env) else {
        eprintln!("PostgreSQL not configured: skipped (SQLite is embedded: it cannot be cut)");
        return;
    };
    for stream in [false, true] {
        let (addr, key) = (s.addr.clone(), s.key.clone());
        let body = req(json!({"stream": stream, "metadata": {"sim": "first_delay_ms=1500"}}));
        let inflight = std::thread::spawn(move || {
            let mut c = Conn::open(&addr);
            let head = c.post("/v1/responses", &key, &body);
            if head.status == 200 && stream {
                let events = c.events();
                (
                    200,
                    events.last().map(|e| e.data.clone()).unwrap_or(Value::Null),
                )
            } else {
                let v = c.json(&head);
                (head.status, v)
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let spool = s.spool_dir();
        proxy.cut();
        let _ = std::fs::remove_dir_all(&spool);
        std::fs::write(&spool, b"not a directory").unwrap();
        let (code, last) = inflight.join().unwrap();
        if stream {
            assert_eq!(code, 200);
            assert_eq!(
                last["code"], "accounting_unavailable",
                "no terminal without a durable record: {last}"
            );
        } else {
            assert_eq!(code, 503, "no 200 without a durable record: {last}");
            assert_eq!(last["error"]["code"], "accounting_unavailable");
        }
        let before = s.sim_stats()["http_requests"].as_u64().unwrap();
        let (code, body) = post_json(&s.addr, "/v1/responses", &s.key, &req(json!({})));
        assert_eq!(code, 503, "{body}");
        assert_eq!(
            s.sim_stats()["http_requests"].as_u64().unwrap(),
            before,
            "refused before the upstream"
        );
        std::fs::remove_file(&spool).unwrap();
        proxy.restore();
        std::thread::sleep(Duration::from_secs(2));
    }
    s.finish();
}

/// Operators see HTTP requests in flight (`/admin/requests`), and the metrics count them.
#[test]
fn requests_in_flight_are_visible() {
    let (s, admin) = common::admin::start(TestDb::sqlite(), &[], StackOptions::default());
    let mut c = Conn::open(&s.addr);
    let head = c.post(
        "/v1/responses",
        &s.key,
        &req(json!({"stream": true, "metadata": {"sim": "deltas=20 delta_delay_ms=100"}})),
    );
    assert_eq!(head.status, 200);
    c.events_until(|e| e.data["type"] == "response.output_text.delta");
    let (code, body) = http(&admin, "GET", "/admin/requests", Some(common::admin::TOKEN));
    assert_eq!(code, 200);
    let list = body["requests"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{body}");
    assert_eq!(
        (
            list[0]["path"].as_str(),
            list[0]["stream"].as_bool(),
            list[0]["account"].as_str()
        ),
        (Some("/v1/responses"), Some(true), Some("sim"))
    );
    c.events();
    let (_, body) = http(&admin, "GET", "/admin/requests", Some(common::admin::TOKEN));
    assert_eq!(body["requests"].as_array().unwrap().len(), 0, "{body}");
    let m = |name: &str| common::admin::metric(&admin, name);
    assert_eq!(
        m("turnpike_turns_total{status=\"completed\",transport=\"http\","),
        1.0
    );
    assert_eq!(
        m("turnpike_turns_total{status=\"completed\",transport=\"ws\","),
        0.0
    );
    assert_eq!(m("turnpike_http_requests_in_flight"), 0.0);
    s.finish();
}

/// SIGTERM (docs/DESIGN.md#shutdown): an HTTP stream that finishes within the grace gets its
/// terminal; one that does not ends with an SSE `shutting_down` error; both rows are written
/// before the process exits.
#[test]
fn sigterm_ends_http_streams_after_the_grace() {
    let mut s = start(TestDb::sqlite(), StackOptions::default());
    let start = |directive: &str| {
        let (addr, key) = (s.addr.clone(), s.key.clone());
        let body = req(json!({"stream": true, "metadata": {"sim": directive}}));
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            let mut c = Conn::open(&addr);
            let head = c.post("/v1/responses", &key, &body);
            assert_eq!(head.status, 200);
            let mut events = c.events_until(|e| e.data["type"] == "response.created");
            tx.send(()).unwrap();
            events.extend(c.events());
            events.last().unwrap().data.clone()
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        t
    };
    let busy = start("terminal_delay_ms=10000");
    let finishing = start("terminal_delay_ms=1200");
    let (code, took, log) = s.relay.terminate();
    assert_eq!(code, Some(0), "{log:?}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    assert_eq!(finishing.join().unwrap()["type"], "response.completed");
    assert_eq!(busy.join().unwrap()["code"], "shutting_down");
    let rows = block(async { turnpike::db::queries::usage::by_key(&s.db.pool(), s.key_id).await })
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(rows.iter().any(|r| r.status == "completed"));
    assert!(
        rows.iter()
            .any(|r| r.error_code.as_deref() == Some("shutting_down") && r.input_tokens > 0),
        "{rows:?}"
    );
    s.finish();
}

/// HTTP and WebSocket turns of one key share its `max_concurrent_turns`: while a WebSocket turn
/// runs, an HTTP request of a key limited to one turn gets 429 `concurrency_limit_exceeded`.
#[test]
fn http_and_websocket_turns_share_the_keys_turn_limit() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            key: turnpike::auth::KeyRequest {
                max_concurrent_turns: Some(1),
                ..Default::default()
            },
            ..StackOptions::default()
        },
    );
    let mut ws = s.client();
    ws.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi", "metadata": {"sim": "terminal_delay_ms=1500"}}));
    assert_eq!(
        ws.next_event(Duration::from_secs(10))["type"],
        "response.created"
    );
    let (code, body) = post_json(&s.addr, "/v1/responses", &s.key, &req(json!({})));
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (429, Some("concurrency_limit_exceeded")),
        "{body}"
    );
    ws.until_terminal(Duration::from_secs(10));
    let (code, body) = post_json(&s.addr, "/v1/responses", &s.key, &req(json!({})));
    assert_eq!(code, 200, "{body}");
    s.finish();
}

/// A client that stops reading an SSE stream: what is queued for it is bounded by
/// `limits.client_send_buffer_bytes`; once it stays full for `limits.client_stall_timeout_ms`
/// the turn ends (`client_too_slow`, billed) and the upstream request is cancelled.
#[test]
fn a_client_that_stops_reading_is_bounded() {
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_LIMITS__CLIENT_SEND_BUFFER_BYTES", "262144"),
                ("TURNPIKE_LIMITS__CLIENT_STALL_TIMEOUT_MS", "1000"),
            ],
            ..StackOptions::default()
        },
    );
    let mut c = Conn::open(&s.addr);
    // 400 events of 64 KiB: far more than the socket buffers and the budget hold.
    let head = c.post(
        "/v1/responses",
        &s.key,
        &req(json!({"stream": true, "metadata": {"sim": "deltas=400 delta_size=65536"}})),
    );
    assert_eq!(head.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while s.sim_stats()["http_abandoned"].as_u64() != Some(1) {
        assert!(
            std::time::Instant::now() < deadline,
            "not bounded: {}",
            s.sim_stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = &s.rows(1)[0];
    assert_eq!(
        (r.status.as_str(), r.error_code.as_deref()),
        ("cancelled", Some("client_too_slow")),
        "{r:?}"
    );
    assert!(r.input_tokens > 0 && r.output_tokens > 0, "{r:?}");
    drop(c);
    s.finish();
}

/// An upstream that answers neither SSE nor JSON (an HTML error page from a proxy, say):
/// `upstream_protocol_error` (502), billed like a turn that reached the upstream.
#[test]
fn an_answer_that_is_neither_sse_nor_json_is_a_protocol_error() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 65536];
            let _ = conn.read(&mut buf);
            let body = "<html>bad gateway</html>";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    // The sim's account becomes the backup (priority 1): the HTML upstream is asked first.
    let extra = format!(
        "priority = 1\n\n[[accounts]]\nname = \"html\"\nbase_url = \"http://{addr}/v1\"\napi_key = \"sk-h\"\n"
    );
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: Box::leak(extra.into_boxed_str()),
            ..StackOptions::default()
        },
    );
    for stream in [false, true] {
        let (code, body) = post_json(
            &s.addr,
            "/v1/responses",
            &s.key,
            &req(json!({"stream": stream})),
        );
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (502, Some("upstream_protocol_error")),
            "{body}"
        );
    }
    let rows = s.rows(2);
    assert!(
        rows.iter()
            .all(|r| r.account == "html" && r.status == "upstream_lost" && r.input_tokens > 0),
        "{rows:?}"
    );
    s.finish();
}

/// The header policy (docs/DESIGN.md#headers), header by header, with the headers the real
/// clients send: the client's pass upstream but for its credentials and organization, and
/// the upstream's reach the client (the model that served it, the request id, rate-limit
/// usage) but for its organization and cookies — on a JSON answer, an SSE answer and an error.
#[test]
fn headers_pass_both_ways_by_the_policy() {
    let s = start(TestDb::sqlite(), StackOptions::default());
    let sent = [
        ("x-openai-subagent", "review"),
        ("version", "0.171.0"),
        ("x-responsesapi-include-timing-metrics", "true"),
        ("x-stainless-lang", "python"),
        ("originator", "codex_exec"),
        ("OpenAI-Organization", "org-client"),
        ("Cookie", "client=secret"),
    ];
    let mut c = Conn::open(&s.addr);
    for stream in [false, true] {
        let body = req(json!({"stream": stream})).to_string();
        let head = c.send(
            "POST",
            "/v1/responses",
            Some(&s.key),
            body.as_bytes(),
            &sent,
        );
        assert_eq!(head.status, 200);
        if stream {
            c.events();
        } else {
            c.json(&head);
        }
        assert_eq!(head.header("openai-model"), Some("gpt-test"), "{head:?}");
        assert!(
            head.header("x-request-id")
                .is_some_and(|v| v.starts_with("req_sim_"))
        );
        assert_eq!(head.header("x-codex-primary-used-percent"), Some("12"));
        assert_eq!(head.header("x-reasoning-included"), Some("true"));
        assert_eq!(head.header("openai-organization"), None, "{head:?}");
        assert_eq!(head.header("set-cookie"), None, "{head:?}");
    }
    // What the upstream saw: the client's headers but its credentials and organization.
    let seen = http_get(&s.sim_addr, "/sim/http").1;
    for r in seen.as_array().unwrap() {
        let h: Vec<(String, String)> = serde_json::from_value(r["headers"].clone()).unwrap();
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        for (k, v) in &sent[..5] {
            assert_eq!(get(k), Some(*v), "{k} passes: {h:?}");
        }
        assert_ne!(get("openai-organization"), Some("org-client"), "{h:?}");
        assert_eq!(get("cookie"), None, "{h:?}");
        assert_eq!(get("authorization"), Some("Bearer sk-upstream"), "{h:?}");
    }
    // An upstream error keeps its headers too (Retry-After among them).
    let body =
        req(json!({"metadata": {"sim": "error=rate_limit_exceeded status=429 retry_after=7"}}))
            .to_string();
    let head = c.send("POST", "/v1/responses", Some(&s.key), body.as_bytes(), &[]);
    c.json(&head);
    assert_eq!(
        (head.status, head.header("retry-after")),
        (429, Some("7")),
        "{head:?}"
    );
    s.finish();
}

/// Slow and stalled uploads pin a bounded amount of memory per key: a body stalled after its
/// head declared 80 kB holds the key's 100 kB budget so that a second of 50 kB is refused at
/// once (429 `request_bytes_in_flight`, `Retry-After`); the stalled one is answered 408
/// `request_body_timeout` once silent for the idle timeout, and its bytes are given back.
#[test]
fn stalled_uploads_are_bounded_per_key_and_timed_out() {
    use std::io::{Read, Write};
    let s = start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_LIMITS__HTTP_BODY_BYTES_PER_KEY", "100000"),
                ("TURNPIKE_LIMITS__HTTP_BODY_IDLE_TIMEOUT_MS", "800"),
            ],
            ..StackOptions::default()
        },
    );
    let mut stalled = std::net::TcpStream::connect(&s.addr).unwrap();
    write!(
        stalled,
        "POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 80000\r\n\r\n{{\"model\":\"gpt-test\",\"input\":\"",
        s.key
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Conn::open(&s.addr);
    let body = vec![b' '; 50_000];
    let head = c.send("POST", "/v1/responses", Some(&s.key), &body, &[]);
    let refused = c.json(&head);
    assert_eq!(
        (head.status, refused["error"]["code"].as_str()),
        (429, Some("request_bytes_in_flight")),
        "{refused}"
    );
    assert!(head.header("retry-after").is_some(), "{head:?}");
    // The stalled upload is answered once silent for the idle timeout.
    stalled
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = stalled.read(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    // Its bytes are back: a normal request runs.
    let (code, ok) = post_json(&s.addr, "/v1/responses", &s.key, &req(json!({})));
    assert_eq!(code, 200, "{ok}");
    s.finish();
}

/// What an HTTP client sees through turnpike is what it would see straight from the upstream
/// (#41), by the header policy (docs/DESIGN.md#headers): the same requests — a JSON answer, an SSE
/// stream, a request-level error — sent to the upstream directly and through the relay give the
/// same status, the same body or events (but for each response's ids and timestamps), and every
/// upstream header the policy passes with its value; the ones it withholds (the account's
/// organization, cookies, hop-by-hop) are absent, and the relay adds none of its own but framing.
#[test]
fn answers_through_the_relay_are_the_upstreams() {
    let s = start(TestDb::sqlite(), StackOptions::default());
    let bodies = [
        json!({"model": "gpt-test", "store": false, "input": "hello", "metadata": {"sim": "deltas=3"}}),
        json!({"model": "gpt-test", "store": false, "input": "hello", "stream": true,
            "metadata": {"sim": "deltas=3 extra=response.queued"}}),
        json!({"model": "gpt-test", "store": false, "input": "hello",
            "metadata": {"sim": "error=invalid_prompt status=400"}}),
    ];
    // Framing and the relay's own: the connection's, not the upstream's.
    let framing = [
        "date",
        "content-length",
        "transfer-encoding",
        "connection",
        "content-type",
    ];
    for body in bodies {
        let answer = |addr: &str, key: &str| {
            let mut c = Conn::open(addr);
            let raw = body.to_string();
            let head = c.send("POST", "/v1/responses", Some(key), raw.as_bytes(), &[]);
            let content = if body["stream"] == true {
                Value::Array(c.events().into_iter().map(|e| e.data).collect())
            } else {
                c.json(&head)
            };
            (head, common::normalized(&content))
        };
        let (direct, direct_body) = answer(&s.sim_addr, "sk-upstream");
        let (relayed, relayed_body) = answer(&s.addr, &s.key);
        assert_eq!(direct.status, relayed.status, "{body}");
        assert_eq!(direct_body, relayed_body, "{body}");
        for (name, value) in &direct.headers {
            let name = name.to_ascii_lowercase();
            if framing.contains(&name.as_str()) {
                continue;
            }
            let through = relayed.header(&name);
            if turnpike::protocol::headers::response_passes(&name) {
                let same = |v: &str| common::normalized(&json!(v));
                assert_eq!(through.map(same), Some(same(value)), "{name} of {body}");
            } else {
                assert_eq!(through, None, "{name} withheld from {body}");
            }
        }
        for (name, _) in &relayed.headers {
            let name = name.to_ascii_lowercase();
            assert!(
                framing.contains(&name.as_str()) || direct.header(&name).is_some(),
                "the relay added {name} to {body}"
            );
        }
    }
    s.finish();
}
