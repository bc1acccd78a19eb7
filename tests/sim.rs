//! `turnpike sim` driven by a plain WebSocket client: every behaviour of the simulated upstream.

mod common;

use std::time::{Duration, Instant};

use common::ws::{Client, Recv};
use common::{http_get, start_sim};
use serde_json::{Value, json};
use turnpike::sim::monotonic_ns;

const T: Duration = Duration::from_secs(5);

fn create(input: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "input": input})
}

fn with_sim(directive: &str) -> Value {
    let mut r = create("hello");
    r["metadata"] = json!({"sim": directive});
    r
}

fn types(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?"))
        .collect()
}

#[test]
fn handshake_auth_and_silence_on_connect() {
    let (_sim, addr) = start_sim(&["--api-key", "sk-good", "--api-key", "sk-other"]);
    let refused = Client::connect(&addr, "/v1/responses", &[])
        .err()
        .expect("no key");
    assert_eq!(refused.0, 401);
    let body: Value = serde_json::from_str(&refused.1).unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let wrong = Client::connect(
        &addr,
        "/v1/responses",
        &[("authorization", "Bearer sk-bad")],
    );
    assert_eq!(wrong.err().unwrap().0, 401);

    let mut c = Client::bearer(&addr, "sk-other");
    assert!(
        matches!(c.recv(Duration::from_millis(300)), Recv::Timeout),
        "nothing on connect"
    );
    // The alternative path works too.
    let mut c2 =
        Client::connect(&addr, "/responses", &[("authorization", "Bearer sk-good")]).unwrap();
    c2.send(&create("x"));
    assert_eq!(
        c2.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    let (_, stats) = http_get(&addr, "/sim/stats");
    assert_eq!(
        (stats["open"].as_u64(), stats["rejected"].as_u64()),
        (Some(2), Some(2))
    );

    // Without --api-key any non-empty bearer key is accepted.
    let (_sim2, addr2) = start_sim(&[]);
    Client::bearer(&addr2, "anything");
    assert_eq!(
        Client::connect(&addr2, "/v1/responses", &[("authorization", "Bearer ")])
            .err()
            .unwrap()
            .0,
        401
    );
}

#[test]
fn text_turn_full_sequence() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let sent_at = monotonic_ns();
    c.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false, "stream": true,
        "input": "Say hello", "client_metadata": {"x": "y"}}),
    );
    let ev = c.until_terminal(T);
    let received_at = monotonic_ns();
    let t = types(&ev);
    assert_eq!(
        &t[..4],
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added"
        ]
    );
    assert!(
        t.iter()
            .filter(|t| **t == "response.output_text.delta")
            .count()
            >= 3
    );
    assert_eq!(
        &t[t.len() - 4..],
        [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, e) in ev.iter().enumerate() {
        assert_eq!(e["sequence_number"], i, "{e}");
        let ts = e["sim_ts_ns"].as_u64().expect("timestamp");
        assert!(
            sent_at <= ts && ts <= received_at,
            "monotonic stamps comparable across processes"
        );
    }
    let id = ev[0]["response"]["id"].as_str().unwrap();
    assert!(id.starts_with("resp_"));
    for d in ev
        .iter()
        .filter(|e| e["type"] == "response.output_text.delta")
    {
        assert!(d.get("response").is_none(), "deltas carry no response id");
    }
    let done = &ev.last().unwrap()["response"];
    assert_eq!(
        (done["id"].as_str(), done["status"].as_str()),
        (Some(id), Some("completed"))
    );
    let u = &done["usage"];
    let text: String = ev.iter().filter_map(|e| e["delta"].as_str()).collect();
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert_eq!(u["input_tokens"], 3); // "Say hello": 9 chars
    assert_eq!(
        u["output_tokens"].as_u64(),
        Some((text.len() as u64).div_ceil(4))
    );
    assert_eq!(u["input_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["output_tokens_details"]["reasoning_tokens"], 0);
    assert_eq!(
        u["total_tokens"],
        u["input_tokens"].as_u64().unwrap() + u["output_tokens"].as_u64().unwrap()
    );
}

#[test]
fn warmup_then_chain_and_creates_queue_fifo() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let mut w = create("prepare");
    w["generate"] = json!(false);
    c.send(&w);
    let ev = c.until_terminal(T);
    assert_eq!(types(&ev), ["response.created", "response.completed"]);
    assert_eq!(ev[1]["response"]["usage"]["output_tokens"], 0);
    let warm_id = ev[1]["response"]["id"].as_str().unwrap().to_string();

    let mut next = with_sim("terminal_delay_ms=300");
    next["previous_response_id"] = json!(warm_id);
    c.send(&next);
    assert_eq!(c.next_event(T)["type"], "response.created");
    // A second create on the same (default) lane waits for the first (FIFO), then runs.
    c.send(&create("queued"));
    let mut completed = Vec::new();
    while completed.len() < 2 {
        let e = c.next_event(T);
        assert_ne!(e["type"], "error", "{e}");
        if e["type"] == "response.completed" {
            completed.push(e["response"]["previous_response_id"].clone());
        }
    }
    assert_eq!(completed[0], json!(warm_id), "the first create ends first");
    assert_eq!(completed[1], Value::Null);
}

/// Lanes (`stream_id`): run concurrently, each FIFO; every event of a named lane carries its
/// `stream_id`; bad ids and the 33rd named lane are refused with the upstream's codes.
#[test]
fn lanes_run_concurrently_and_are_limited() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let slow = |lane: &str| {
        let mut v = with_sim("first_delay_ms=300");
        v["stream_id"] = json!(lane);
        v
    };
    c.send(&slow("alpha"));
    c.send(&slow("beta"));
    let mut default = create("plain");
    default["stream_id"] = Value::Null;
    c.send(&default);
    let mut ends: Vec<String> = Vec::new();
    let mut lanes_of_events = std::collections::HashMap::new();
    while ends.len() < 3 {
        let e = c.next_event(T);
        let lane = e["stream_id"].as_str().unwrap_or("").to_string();
        *lanes_of_events.entry(lane.clone()).or_insert(0) += 1;
        if e["type"] == "response.completed" {
            ends.push(lane);
        }
    }
    // The default lane did not wait for the slow named lanes.
    assert_eq!(ends[0], "");
    assert!(lanes_of_events["alpha"] > 3 && lanes_of_events["beta"] > 3);
    let mut bad = create("x");
    bad["stream_id"] = json!("no spaces");
    c.send(&bad);
    assert_eq!(c.next_event(T)["error"]["code"], "invalid_stream_id");
    for i in 0..30 {
        let mut v = create("x");
        v["stream_id"] = json!(format!("lane{i}"));
        c.send(&v);
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
    }
    let mut over = create("x");
    over["stream_id"] = json!("one-too-many");
    c.send(&over);
    let e = c.next_event(T);
    assert_eq!(e["error"]["code"], "websocket_stream_limit_reached", "{e}");
    assert_eq!(e["stream_id"], "one-too-many");
}

#[test]
fn connection_local_cache_and_store() {
    let (_sim, addr) = start_sim(&[]);
    let mut a = Client::bearer(&addr, "k");
    a.send(&create("one"));
    let id = a.until_terminal(T).last().unwrap()["response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut follow = create("two");
    follow["previous_response_id"] = json!(id);
    a.send(&follow);
    assert_eq!(
        a.until_terminal(T).last().unwrap()["type"],
        "response.completed",
        "same socket knows it"
    );

    let mut b = Client::bearer(&addr, "k");
    b.send(&follow);
    let e = b.next_event(T);
    assert_eq!(
        (e["type"].as_str(), e["status"].as_u64()),
        (Some("error"), Some(400))
    );
    assert_eq!(e["error"]["code"], "previous_response_not_found");
    assert_eq!(e["error"]["param"], "previous_response_id");

    // store:true responses are found from any socket.
    let mut stored = create("kept");
    stored["store"] = json!(true);
    a.send(&stored);
    let kept = a.until_terminal(T).last().unwrap()["response"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut cont = create("more");
    cont["previous_response_id"] = json!(kept);
    b.send(&cont);
    assert_eq!(
        b.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
}

#[test]
fn connection_age_limit() {
    let (_sim, addr) = start_sim(&["--max-age-ms", "300"]);
    let mut c = Client::bearer(&addr, "k");
    let t0 = Instant::now();
    let e = c.next_event(T);
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!(e["error"]["code"], "websocket_connection_limit_reached");
    assert_eq!(e["status"], 400);
    assert!(matches!(c.recv(T), Recv::Close(1000)));
}

#[test]
fn tool_call_loop() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let mut req = create("please run something [[sim: tool]]");
    req["tools"] = json!([{"type": "function", "name": "exec_command", "parameters": {}}]);
    c.send(&req);
    let ev = c.until_terminal(T);
    assert!(types(&ev).contains(&"response.function_call_arguments.delta"));
    assert!(types(&ev).contains(&"response.function_call_arguments.done"));
    let resp = &ev.last().unwrap()["response"];
    let call = &resp["output"][0];
    assert_eq!(
        (call["type"].as_str(), call["name"].as_str()),
        (Some("function_call"), Some("exec_command"))
    );
    let call_id = call["call_id"].as_str().unwrap();

    let mut out = create("");
    out["previous_response_id"] = resp["id"].clone();
    out["input"] =
        json!([{"type": "function_call_output", "call_id": call_id, "output": "sim-tool-ran\n"}]);
    c.send(&out);
    let ev = c.until_terminal(T);
    assert_eq!(ev.last().unwrap()["type"], "response.completed");
    assert_eq!(
        ev.last().unwrap()["response"]["output"][0]["type"],
        "message"
    );

    // An output whose call this socket never made.
    let mut orphan = create("");
    orphan["input"] =
        json!([{"type": "function_call_output", "call_id": "call_nope", "output": "x"}]);
    c.send(&orphan);
    let e = c.next_event(T);
    assert_eq!(e["status"], 400);
    assert_eq!(
        e["error"]["message"],
        "No tool call found for function call output with call_id call_nope."
    );
}

#[test]
fn scripted_delays() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let t0 = Instant::now();
    c.send(&with_sim(
        "first_delay_ms=150 delta_delay_ms=20 terminal_delay_ms=300 deltas=3 delta_size=5",
    ));
    // Lower bounds from the client's clock (it cannot see an event before it was sent); gaps
    // between events from the sim's own send stamps (`sim_ts_ns`), which a busy machine does
    // not blur the way it can delay one observation more than another.
    let mut first_delta: Option<(Duration, u64)> = None;
    let mut created = None;
    loop {
        let e = c.next_event(T);
        let at = t0.elapsed();
        let stamp = e["sim_ts_ns"].as_u64().unwrap();
        match e["type"].as_str().unwrap() {
            "response.created" => created = Some(at),
            "response.output_text.delta" => {
                assert_eq!(e["delta"].as_str().unwrap().len(), 5);
                first_delta.get_or_insert((at, stamp));
            }
            "response.completed" => {
                assert!(
                    created.unwrap() >= Duration::from_millis(150),
                    "{created:?}"
                );
                let (seen, sent) = first_delta.unwrap();
                assert!(seen >= Duration::from_millis(150));
                let gap = Duration::from_nanos(stamp - sent);
                assert!(
                    gap >= Duration::from_millis(340),
                    "2×20 ms + 300 ms between the first delta and the terminal: {gap:?}"
                );
                break;
            }
            _ => {}
        }
    }
}

#[test]
fn scripted_usage_and_terminals() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    let mut run = |d: &str| {
        c.send(&with_sim(d));
        c.until_terminal(T)
    };
    assert!(run("usage=missing").last().unwrap()["response"]["usage"].is_null());
    assert!(
        run("usage=malformed").last().unwrap()["response"]["usage"]["input_tokens"].is_string()
    );
    let split = run("usage=split");
    assert!(
        split[1]["response"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        split.last().unwrap()["response"]["usage"]["input_tokens"],
        0
    );
    let failed = run("terminal=failed reason=server_error");
    assert_eq!(failed.last().unwrap()["type"], "response.failed");
    assert_eq!(
        failed.last().unwrap()["response"]["error"]["code"],
        "server_error"
    );
    let inc = run("terminal=incomplete reason=content_filter");
    assert_eq!(
        inc.last().unwrap()["response"]["incomplete_details"]["reason"],
        "content_filter"
    );
    let err = run("error=rate_limit_exceeded status=429 after=2");
    assert_eq!(
        types(&err),
        ["response.created", "response.in_progress", "error"]
    );
    assert_eq!(err[2]["status"], 429);
    assert_eq!(err[2]["error"]["type"], "rate_limit_error");
    let bad = run("bogus=1");
    assert_eq!(bad[0]["error"]["code"], "invalid_sim_directive");
    // The socket is still usable after all of that.
    assert_eq!(run("").last().unwrap()["type"], "response.completed");
}

#[test]
fn scripted_close_codes_after_k_events() {
    let (_sim, addr) = start_sim(&[]);
    for code in [1000u16, 1001, 1011, 1012, 1013] {
        let mut c = Client::bearer(&addr, "k");
        c.send(&with_sim(&format!("close={code} after=3")));
        for _ in 0..3 {
            c.next_event(T);
        }
        match c.recv(T) {
            Recv::Close(got) => assert_eq!(got, code),
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

#[test]
fn scripted_drop_stall_and_bad_frames() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    c.send(&with_sim("drop after=2"));
    c.next_event(T);
    c.next_event(T);
    match c.recv(T) {
        Recv::Gone(_) => {}
        other => panic!("expected a bare TCP end, got {other:?}"),
    }

    let mut c = Client::bearer(&addr, "k");
    c.send(&with_sim("stall after=1"));
    c.next_event(T);
    assert!(matches!(c.recv(Duration::from_millis(500)), Recv::Timeout));

    let mut c = Client::bearer(&addr, "k");
    c.send(&with_sim("binary after=1"));
    c.next_event(T);
    assert!(matches!(c.recv(T), Recv::Binary(_)));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );

    c.send(&with_sim("invalid_json after=0"));
    assert!(matches!(c.recv(T), Recv::Text(_)));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );

    c.send(&with_sim("oversize=100000 after=4"));
    let ev = c.until_terminal(T);
    let big = ev.iter().map(|e| e.to_string().len()).max().unwrap();
    assert!(big >= 99_000, "largest event {big} bytes");
}

#[test]
fn pings_and_pong_timeout() {
    let (_sim, addr) = start_sim(&["--ping-interval-ms", "100", "--pong-timeout-ms", "400"]);
    let mut deaf = Client::bearer(&addr, "k");
    // A reader answers pings (tungstenite queues the pong) and stays connected.
    let mut alive = Client::bearer(&addr, "k");
    let mut pings = 0;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(1200) {
        match alive.recv(Duration::from_millis(50)) {
            Recv::Ping => {
                pings += 1;
                alive.ws.flush().ok();
            }
            Recv::Timeout => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(pings >= 5, "pinged {pings} times");
    alive.send(&create("still here"));
    assert_eq!(
        alive.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    // The socket that read nothing for 1.2 s never answered: closed with 1011. (The client may
    // only see a broken pipe: its queued pongs are written before the close frame is read.)
    let mut ended = false;
    for _ in 0..50 {
        match deaf.recv(Duration::from_millis(100)) {
            Recv::Close(code) => {
                assert_eq!(code, 1011);
                ended = true;
                break;
            }
            Recv::Gone(_) => {
                ended = true;
                break;
            }
            Recv::Ping | Recv::Timeout => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(ended);
    let (_, conns) = http_get(&addr, "/sim/connections");
    let deaf_frames = conns[0]["frames"].as_array().unwrap();
    assert!(
        deaf_frames.iter().any(|f| f["text"] == "<close 1011>"),
        "{deaf_frames:?}"
    );
    assert!(conns[0]["closed_ns"].as_u64().is_some());
    assert!(
        conns[1]["closed_ns"].is_null(),
        "the answering socket stays open"
    );
}

#[test]
fn ignore_pings_directive() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    c.ws.send(tungstenite::Message::Ping(b"a".to_vec().into()))
        .unwrap();
    assert!(matches!(c.recv(T), Recv::Pong));
    c.send(&with_sim("ignore_pings"));
    c.until_terminal(T);
    c.ws.send(tungstenite::Message::Ping(b"b".to_vec().into()))
        .unwrap();
    assert!(matches!(c.recv(Duration::from_millis(400)), Recv::Timeout));
}

#[test]
fn inspection_log_and_counts() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::connect(
        &addr,
        "/v1/responses",
        &[
            ("authorization", "Bearer sk-inspect"),
            ("openai-beta", "responses_websockets=2026-02-06"),
            ("x-codex-turn-metadata", "{\"a\":1}"),
        ],
    )
    .unwrap();
    let frame = r#"{"type":"response.create","model":"gpt-test","input":"exact bytes","unknown_field":[1,2]}"#;
    c.send_text(frame);
    let ev = c.until_terminal(T);
    let (_, stats) = http_get(&addr, "/sim/stats");
    assert_eq!(
        (stats["open"].as_u64(), stats["responses"].as_u64()),
        (Some(1), Some(1))
    );

    let (_, conns) = http_get(&addr, "/sim/connections");
    let conn = &conns[0];
    let header = |name: &str| {
        conn["headers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h[0] == name)
            .map(|h| h[1].as_str().unwrap().to_string())
    };
    assert_eq!(
        header("openai-beta").as_deref(),
        Some("responses_websockets=2026-02-06")
    );
    assert_eq!(
        header("x-codex-turn-metadata").as_deref(),
        Some("{\"a\":1}")
    );
    assert_eq!(
        header("authorization").as_deref(),
        Some("Bearer sk-inspect")
    );
    let frames = conn["frames"].as_array().unwrap();
    let inbound: Vec<&str> = frames
        .iter()
        .filter(|f| f["dir"] == "in")
        .map(|f| f["text"].as_str().unwrap())
        .collect();
    assert_eq!(inbound, [frame], "frames are logged byte for byte");
    let outbound = frames.iter().filter(|f| f["dir"] == "out").count();
    assert_eq!(outbound, ev.len());

    c.ws.close(None).unwrap();
    while !matches!(
        c.recv(Duration::from_millis(200)),
        Recv::Close(_) | Recv::Gone(_) | Recv::Timeout
    ) {}
    std::thread::sleep(Duration::from_millis(100));
    let (_, stats) = http_get(&addr, "/sim/stats");
    assert_eq!(stats["open"], 0);
    let (_, conns) = http_get(&addr, "/sim/connections");
    assert!(conns[0]["closed_ns"].as_u64().is_some());
}

#[test]
fn cancel_ends_the_response() {
    let (_sim, addr) = start_sim(&[]);
    let mut c = Client::bearer(&addr, "k");
    c.send(&with_sim("terminal_delay_ms=5000"));
    assert_eq!(c.next_event(T)["type"], "response.created");
    c.send(&json!({"type": "response.cancel"}));
    let ev = c.until_terminal(T);
    assert_eq!(ev.last().unwrap()["type"], "response.cancelled");
    c.send(&create("next"));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
}
