//! OpenTelemetry traces (docs/DESIGN.md#traces): the relay, run with `telemetry.otlp_endpoint`,
//! exports one span per turn — a WebSocket turn and an HTTP one — over OTLP/HTTP to a receiver
//! this test starts (`tests/otel/receiver.py`, decoding with the protocol's own definitions),
//! carrying the GenAI attributes and the turn's phases that its usage row holds; spans still
//! batched when the relay stops are exported before it exits.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::{Duration, Instant};

use common::post::Conn;
use common::stack::{Stack, StackOptions};
use common::{Proc, TestDb};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

/// The receiver, and the file it writes spans to.
fn receiver() -> (Proc, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let (p, addr) = receiver_on(&dir, 0);
    (p, addr, dir)
}

/// A receiver on `port` (0: any) writing into `dir`.
fn receiver_on(dir: &tempfile::TempDir, port: u16) -> (Proc, String) {
    let out = dir.path().join("spans.jsonl");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/otel/receiver.py");
    let mut cmd = std::process::Command::new("python3");
    cmd.arg(script).arg(&out).arg(port.to_string());
    let p = Proc::spawn(cmd);
    let addr = p.listening_addr();
    (p, addr)
}

fn turn(s: &Stack) {
    let mut c = s.client();
    c.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "traced", "metadata": {"sim": "deltas=2"}}),
    );
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
}

fn spans(dir: &tempfile::TempDir, n: usize) -> Vec<Value> {
    let path = dir.path().join("spans.jsonl");
    let deadline = Instant::now() + T;
    loop {
        let got: Vec<Value> = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if got.len() >= n || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn every_turn_is_a_trace_with_its_genai_attributes() {
    let (_receiver, addr, dir) = receiver();
    let endpoint = format!("http://{addr}/v1/traces");
    let env: Vec<(&'static str, &'static str)> = vec![
        (
            "TURNPIKE_TELEMETRY__OTLP_ENDPOINT",
            Box::leak(endpoint.into_boxed_str()),
        ),
        ("TURNPIKE_TELEMETRY__SERVICE_NAME", "turnpike-ci"),
        // The SDK's batch delay (5 s by default), longer than the test: the spans arrive
        // because the relay flushes them when it stops.
        ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
    ];
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: Box::leak(env.into_boxed_slice()),
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "traced", "metadata": {"sim": "deltas=3"}}),
    );
    let events = c.until_terminal(T);
    assert_eq!(events.last().unwrap()["type"], "response.completed");
    drop(c);
    let mut h = Conn::open(&s.addr);
    let head = h.post(
        "/v1/responses",
        &s.key,
        &json!({"model": "gpt-test", "store": false, "input": "traced over http", "stream": true}),
    );
    assert_eq!(head.status, 200);
    assert_eq!(
        h.events().last().unwrap().data["type"],
        "response.completed"
    );

    let rows = s.rows(2);
    let mut s = s;
    let (code, _, log) = s.relay.terminate();
    assert_eq!(code, Some(0), "{log:?}");
    let got = spans(&dir, 2);
    assert_eq!(got.len(), 2, "one span per turn, nothing else: {got:?}");
    for (span, name) in got.iter().zip(["turn", "http_turn"]) {
        assert_eq!(span["name"], name, "{span}");
        assert_eq!(
            span["parent_span_id"], "",
            "a turn is a trace of its own: {span}"
        );
        assert_eq!(span["resource"]["service.name"], "turnpike-ci");
        let a = &span["attributes"];
        let row = rows
            .iter()
            .find(|r| Some(r.request_id.as_str()) == a["request_id"].as_str())
            .unwrap_or_else(|| panic!("no row for {span}"));
        assert_eq!(a["gen_ai.system"], "openai");
        assert_eq!(a["gen_ai.request.model"], "gpt-test");
        assert_eq!(a["gen_ai.response.id"].as_str(), row.response_id.as_deref());
        assert_eq!(a["gen_ai.usage.input_tokens"], row.input_tokens);
        assert_eq!(a["gen_ai.usage.output_tokens"], row.output_tokens);
        assert_eq!(a["turnpike.status"], "completed");
        assert_eq!(a["turnpike.cost_nanousd"], row.cost_nanousd);
        assert_eq!(a["turnpike.account"], "sim");
        // The phases, in order, as the row has them.
        assert_eq!(a["turnpike.first_token_ms"].as_i64(), row.first_token_ms);
        assert_eq!(a["turnpike.duration_ms"], row.duration_ms);
        let first_event = a["turnpike.first_event_ms"].as_i64().unwrap();
        assert!(
            first_event <= row.first_token_ms.unwrap()
                && row.first_token_ms.unwrap() < row.duration_ms
        );
        assert!(span["end_ns"].as_u64() > span["start_ns"].as_u64());
    }
    assert_ne!(got[0]["trace_id"], got[1]["trace_id"]);
    s.finish();
}

/// A collector that is away: one log line when exports start failing, one (with the spans lost)
/// when they work again — not one per batch; turns are served all along.
#[test]
fn a_collector_away_is_one_line_and_its_return_another() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}/v1/traces");
    let env: Vec<(&'static str, &'static str)> = vec![
        (
            "TURNPIKE_TELEMETRY__OTLP_ENDPOINT",
            Box::leak(endpoint.into_boxed_str()),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
    ];
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: Box::leak(env.into_boxed_slice()),
            ..StackOptions::default()
        },
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        turn(&s);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        common::stack::wait_log(
            &s.relay,
            "export to telemetry.otlp_endpoint failed",
            T,
            &mut seen
        ),
        "{seen:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let (_receiver, _) = receiver_on(&dir, port);
    turn(&s);
    assert!(
        common::stack::wait_log(&s.relay, "works again", T, &mut seen),
        "{seen:?}"
    );
    let failed = seen
        .iter()
        .filter(|l| l.contains("failed; spans are dropped"))
        .count();
    assert_eq!(failed, 1, "one line for the whole outage: {seen:?}");
    let back = seen.iter().find(|l| l.contains("works again")).unwrap();
    // Each span of the outage is counted once, lost or delivered: none twice.
    let lost: usize = back
        .split("lost=")
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{back}"));
    let delivered = spans(&dir, 4 - lost);
    assert!(lost >= 1, "{back}");
    assert_eq!(
        lost + delivered.len(),
        4,
        "4 turns: {lost} lost, {delivered:?}"
    );
    s.finish();
}
