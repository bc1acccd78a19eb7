//! Lanes (`stream_id`) and overlapping creates (docs/DESIGN.md#overlap): creates on one lane
//! run in order, every `response.create` gets exactly one answer in every `on_overlap` mode,
//! every event of a named lane carries its `stream_id`, and each turn is billed what the
//! upstream reported for its response.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::TestDb;
use common::stack::{Stack, StackOptions, block};
use common::ws::{Client, Recv, is_terminal};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn create(lane: Option<&str>, directive: &str) -> Value {
    let mut v = json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "lanes", "metadata": {"sim": directive}});
    if let Some(l) = lane {
        v["stream_id"] = json!(l);
    }
    v
}

/// Events until `n` answers (terminals or error events) were seen.
fn answers(c: &mut Client, n: usize) -> (Vec<Value>, Vec<Value>) {
    let (mut all, mut ends) = (Vec::new(), Vec::new());
    while ends.len() < n {
        let e = c.next_event(T);
        if is_terminal(&e) {
            ends.push(e.clone());
        }
        all.push(e);
    }
    (all, ends)
}

/// Creates on lanes `lane0`…`lane{n-1}`, back to back: every one completes. Their terminals.
fn lanes_complete(c: &mut Client, n: usize, directive: &str) -> Vec<Value> {
    for i in 0..n {
        c.send(&create(Some(&format!("lane{i}")), directive));
    }
    let (_, ends) = answers(c, n);
    assert!(
        ends.iter().all(|e| e["type"] == "response.completed"),
        "{ends:?}"
    );
    ends
}

/// A relay with the settings of `env`.
fn with_env(env: &[(&str, &str)]) -> Stack {
    Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env,
            ..StackOptions::default()
        },
    )
}

/// Nothing more arrives for a while (no second answer to any create).
fn assert_quiet(c: &mut Client) {
    match c.recv(Duration::from_millis(500)) {
        Recv::Timeout | Recv::Ping | Recv::Pong => {}
        other => panic!("an extra frame: {other:?}"),
    }
}

/// The usage each completed response reported to the client, by response id.
fn reported(ends: &[Value]) -> HashMap<String, (i64, i64)> {
    ends.iter()
        .filter(|e| e["type"] == "response.completed")
        .map(|e| {
            let u = &e["response"]["usage"];
            (
                e["response"]["id"].as_str().unwrap().to_string(),
                (
                    u["input_tokens"].as_i64().unwrap(),
                    u["output_tokens"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

fn assert_rows_match(s: &Stack, ends: &[Value]) {
    let want = reported(ends);
    let rows = s.rows(want.len());
    assert_eq!(rows.len(), want.len(), "one row per turn");
    for r in &rows {
        let id = r.response_id.as_deref().unwrap();
        assert_eq!(
            want.get(id),
            Some(&(r.input_tokens, r.output_tokens)),
            "row of {id}"
        );
        assert_eq!(r.usage_source, "reported");
    }
}

/// Two creates on lane `main` back to back (the guide's pattern): both run, in order, both are
/// billed; every event carries `stream_id: "main"`.
#[test]
fn fifo_on_one_lane() {
    for db in block(TestDb::all()) {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create(Some("main"), "delta_delay_ms=20"));
        c.send(&create(Some("main"), ""));
        let (all, ends) = answers(&mut c, 2);
        assert!(all.iter().all(|e| e["stream_id"] == "main"), "{all:?}");
        assert!(ends.iter().all(|e| e["type"] == "response.completed"));
        // In order: every event of the first response comes before the second's.
        let first = ends[0]["response"]["id"].as_str().unwrap();
        let last_of_first = all
            .iter()
            .rposition(|e| e.to_string().contains(first))
            .unwrap();
        let second_created = all
            .iter()
            .position(|e| e["type"] == "response.created" && !e.to_string().contains(first))
            .unwrap();
        assert!(last_of_first < second_created);
        assert_quiet(&mut c);
        assert_rows_match(&s, &ends);
        s.finish();
    }
}

/// Creates on lanes `alpha`, `beta` and the default lane, back to back: three completions
/// (in whatever order they finish),
/// each response's events tagged with its own lane (the default lane's with none), each row
/// billed what the upstream reported for that response.
#[test]
fn three_lanes_back_to_back() {
    for db in block(TestDb::all()) {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create(Some("alpha"), ""));
        c.send(&create(Some("beta"), ""));
        c.send(&create(None, ""));
        let (all, ends) = answers(&mut c, 3);
        // Side by side: they end in any order, one answer per lane.
        let mut lanes: Vec<String> = ends.iter().map(|e| e["stream_id"].to_string()).collect();
        lanes.sort();
        assert_eq!(lanes, ["\"alpha\"", "\"beta\"", "null"]);
        let mut lane_of: HashMap<String, Value> = HashMap::new();
        for e in &all {
            if let Some(id) = e["response"]["id"].as_str() {
                let lane = lane_of
                    .entry(id.to_string())
                    .or_insert(e["stream_id"].clone());
                assert_eq!(*lane, e["stream_id"], "one lane per response: {e}");
            }
        }
        assert_quiet(&mut c);
        assert_rows_match(&s, &ends);
        s.finish();
    }
}

/// 200 creates back to back: exactly 200 answers in every mode, then silence.
#[test]
fn every_create_is_answered_in_every_mode() {
    for (mode, expect) in [
        ("queue", ["response.completed", "lane_queue_full"]),
        ("preempt", ["response.completed", "response_preempted"]),
        (
            "reject",
            ["response.completed", "response_already_in_flight"],
        ),
    ] {
        let env = [("TURNPIKE_SESSION__ON_OVERLAP", mode)];
        let s = with_env(&env);
        let mut c = s.client();
        for i in 0..200 {
            let lane = format!("l{}", i % 3);
            c.send(&create(Some(&lane), ""));
        }
        let (_, ends) = answers(&mut c, 200);
        let mut kinds: HashMap<String, usize> = HashMap::new();
        for e in &ends {
            let kind = match e["type"].as_str().unwrap() {
                "error" => e["error"]["code"].as_str().unwrap().to_string(),
                t => t.to_string(),
            };
            assert!(
                e["stream_id"].is_string(),
                "{mode}: an answer without its lane: {e}"
            );
            *kinds.entry(kind).or_default() += 1;
        }
        for k in kinds.keys() {
            assert!(
                expect.contains(&k.as_str()),
                "{mode}: unexpected {k}: {kinds:?}"
            );
        }
        assert!(
            kinds.get("response.completed").is_some_and(|n| *n >= 1),
            "{mode}: {kinds:?}"
        );
        assert_quiet(&mut c);
        if mode == "queue" {
            // Lanes l0 and l1 get 67 creates, l2 66: each runs 1 and queues lane_queue_max 64.
            assert_eq!(
                kinds["response.completed"], 195,
                "per lane: 1 running + lane_queue_max 64"
            );
        }
        let completed = kinds["response.completed"];
        let rows = s.rows(completed);
        assert_eq!(
            rows.iter().filter(|r| r.status == "completed").count(),
            completed,
            "{mode}"
        );
        s.finish();
    }
}

/// A bad `stream_id` is refused (`invalid_stream_id`), nothing goes upstream, the session
/// goes on.
#[test]
fn invalid_stream_id_is_refused() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    for bad in [
        json!(""),
        json!("with space"),
        json!(7),
        json!("x".repeat(257)),
    ] {
        let mut v = create(None, "");
        v["stream_id"] = bad.clone();
        c.send(&v);
        let e = c.next_event(T);
        assert_eq!(e["error"]["code"], "invalid_stream_id", "{bad}: {e}");
        assert_eq!(e["status"], 400);
    }
    c.send(&create(Some("ok.lane-1_x"), ""));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    assert_eq!(s.sim_stats()["responses"], 1);
    s.finish();
}

/// Sends a create on `lane`, waits for its `response.created`, and returns its response id.
fn started(c: &mut Client, lane: &str, directive: &str) -> String {
    c.send(&create(Some(lane), directive));
    loop {
        let e = c.next_event(T);
        if e["type"] == "response.created" {
            return e["response"]["id"].as_str().unwrap().to_string();
        }
    }
}

fn steer(c: &mut Client, id: &str, text: &str) {
    c.send(&json!({"type": "response.steer", "previous_response_id": id, "input": text}));
}

fn rows_by_turn(s: &Stack, n: usize) -> Vec<turnpike::db::models::UsageRow> {
    let mut rows = s.rows(n);
    rows.sort_by_key(|r| r.turn_index);
    rows
}

/// `response.steer` mid-response: accepted, the steered response ends `incomplete`
/// (`steered`) and is billed, the upstream's automatic successor reaches the client on the
/// same socket (never dropped) and is billed as a turn of its own (`origin = 'steer'`); a create
/// sent meanwhile runs after the successor. Money adds up.
#[test]
fn steering_bills_the_steered_response_and_its_successor() {
    for db in block(TestDb::all()) {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        let steered = started(&mut c, "main", "delta_delay_ms=100");
        steer(&mut c, &steered, "Keep it short.");
        c.send(&create(Some("main"), ""));
        let (all, ends) = answers(&mut c, 3);
        assert!(
            all.iter().any(|e| e["type"] == "response.steer.accepted"),
            "{all:?}"
        );
        assert_eq!(ends[0]["type"], "response.incomplete", "{:?}", ends[0]);
        assert_eq!(
            ends[0]["response"]["incomplete_details"]["reason"],
            "steered"
        );
        assert_eq!(ends[1]["type"], "response.completed");
        assert_eq!(ends[1]["response"]["previous_response_id"], json!(steered));
        assert_eq!(ends[2]["type"], "response.completed");
        assert!(ends.iter().all(|e| e["stream_id"] == "main"));
        assert_quiet(&mut c);
        let rows = rows_by_turn(&s, 3);
        let got: Vec<(&str, &str, Option<&str>)> = rows
            .iter()
            .map(|r| {
                (
                    r.status.as_str(),
                    r.origin.as_str(),
                    r.response_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("incomplete", "create", Some(steered.as_str())),
                ("completed", "steer", ends[1]["response"]["id"].as_str()),
                ("completed", "create", ends[2]["response"]["id"].as_str()),
            ]
        );
        for (row, end) in rows.iter().zip(&ends) {
            assert_eq!(
                row.output_tokens,
                end["response"]["usage"]["output_tokens"].as_i64().unwrap()
            );
            assert_eq!(row.usage_source, "reported");
        }
        // The successor is timed from its own response.created.
        assert_eq!(rows[1].first_event_ms, Some(0));
        let sums = common::ledger::sums(&s.db);
        common::ledger::assert_invariant(&sums);
        s.finish();
    }
}

/// A successor after a normal completion (the steer arrived too late to cut it) is a turn too.
#[test]
fn a_successor_after_a_normal_completion() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    let id = started(&mut c, "main", "steer_completes delta_delay_ms=50");
    steer(&mut c, &id, "Also mention the weather.");
    let (_, ends) = answers(&mut c, 2);
    assert_eq!(ends[0]["type"], "response.completed");
    assert_eq!(ends[1]["type"], "response.completed");
    assert_eq!(ends[1]["response"]["previous_response_id"], json!(id));
    let rows = rows_by_turn(&s, 2);
    assert_eq!(rows[1].origin, "steer");
    assert_eq!(rows[1].status, "completed");
    s.finish();
}

/// A key that cannot pay for another turn: the relay answers the steer with a
/// `response.steer.failed`-shaped refusal and nothing goes upstream; the response goes on.
#[test]
fn a_steer_the_key_cannot_pay_for_goes_nowhere() {
    for db in block(TestDb::all()) {
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        // Long enough to outlast the standing cache's second below.
        let id = started(&mut c, "main", "deltas=30 delta_delay_ms=100");
        common::ledger::exec(
            &s.db,
            "UPDATE api_keys SET quota_nanousd = 1, spent_nanousd = 1",
        );
        // A standing change takes effect within `limits.standing_cache_ms` (1 s).
        std::thread::sleep(Duration::from_millis(1100));
        steer(&mut c, &id, "More!");
        let (all, ends) = answers(&mut c, 1);
        let refused = all
            .iter()
            .find(|e| e["type"] == "response.steer.failed")
            .expect("the refusal");
        assert_eq!(refused["error"]["code"], "quota_exhausted");
        assert_eq!(refused["steer"]["input"], "More!");
        assert_eq!(refused["stream_id"], "main");
        assert_eq!(ends[0]["type"], "response.completed");
        assert_quiet(&mut c);
        let sent_upstream = s.sim_connections().to_string();
        assert!(
            !sent_upstream.contains("response.steer"),
            "nothing upstream"
        );
        assert_eq!(s.rows(1).len(), 1);
        s.finish();
    }
}

/// 32 named lanes are served; the 33rd is refused `websocket_stream_limit_reached` (by the
/// relay, with the upstream's code) and the lanes already open go on.
#[test]
fn a_33rd_named_lane_is_refused_and_the_others_go_on() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    lanes_complete(&mut c, 32, "");
    c.send(&create(Some("lane32"), ""));
    let e = c.next_event(T);
    assert_eq!(e["error"]["code"], "websocket_stream_limit_reached", "{e}");
    assert_eq!(e["stream_id"], "lane32");
    c.send(&create(Some("lane7"), ""));
    let again = c.until_terminal(T);
    assert_eq!(again.last().unwrap()["type"], "response.completed");
    assert_eq!(again.last().unwrap()["stream_id"], "lane7");
    assert_eq!(s.sim_stats()["responses"], 33);
    s.finish();
}

/// What live reservations hold together (a block's row and what it gave back included).
fn held(db: &TestDb) -> i64 {
    block(async {
        turnpike::db::queries::reservations::live(&db.pool())
            .await
            .unwrap()
            .1
    })
}

/// A limited key's steer reserves its successor's expected cost (docs/DESIGN.md#steering):
/// with room, the successor runs and its record settles the reservation (none left); without
/// room for another turn, the steer is refused `quota_exhausted` and nothing goes upstream.
#[test]
fn a_limited_keys_steer_reserves_its_successor() {
    for db in block(TestDb::all()) {
        let s = Stack::start(
            db,
            StackOptions {
                key: turnpike::auth::KeyRequest {
                    quota_nanousd: Some(1_000_000_000),
                    ..Default::default()
                },
                ..StackOptions::default()
            },
        );
        let mut c = s.client();
        let id = started(&mut c, "main", "delta_delay_ms=100");
        steer(&mut c, &id, "Shorter.");
        let (_, ends) = answers(&mut c, 2);
        assert_eq!(ends[1]["type"], "response.completed", "{ends:?}");
        let rows = rows_by_turn(&s, 2);
        assert_eq!(rows[1].origin, "steer");
        let deadline = std::time::Instant::now() + T;
        while held(&s.db) != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(held(&s.db), 0, "settled by the records");

        // Room for this turn (16 output tokens reserved) but not for a successor (4,096).
        common::ledger::exec(
            &s.db,
            &format!(
                "UPDATE api_keys SET quota_nanousd = spent_nanousd + 400000 WHERE id = {}",
                s.key_id
            ),
        );
        // A standing change takes effect within `limits.standing_cache_ms` (1 s).
        std::thread::sleep(Duration::from_millis(1100));
        let mut small = create(Some("main"), "delta_delay_ms=100");
        small["max_output_tokens"] = json!(16);
        c.send(&small);
        let id = loop {
            let e = c.next_event(T);
            if e["type"] == "response.created" {
                break e["response"]["id"].as_str().unwrap().to_string();
            }
        };
        steer(&mut c, &id, "And more.");
        let (all, ends) = answers(&mut c, 1);
        let refused = all
            .iter()
            .find(|e| e["type"] == "response.steer.failed")
            .expect("refused");
        assert_eq!(refused["error"]["code"], "quota_exhausted");
        assert_eq!(ends[0]["type"], "response.completed");
        assert_quiet(&mut c);
        let steers = s
            .sim_connections()
            .to_string()
            .matches("response.steer\\\"")
            .count();
        assert_eq!(steers, 1, "only the first steer went upstream");
        s.finish();
    }
}

/// Three lanes run side by side on the session's one upstream connection: the lane whose
/// response is quickest ends first whatever the order they were sent in, and each turn's
/// first token is its own lane's (a delta of one lane never marks another's).
#[test]
fn lanes_run_side_by_side_each_timed_by_its_own_events() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(db, StackOptions::default());
        let mut c = s.client();
        c.send(&create(Some("slow"), "first_delay_ms=900 deltas=3"));
        c.send(&create(
            Some("quick"),
            "first_delay_ms=50 deltas=8 delta_delay_ms=30",
        ));
        c.send(&create(None, "first_delay_ms=450 deltas=3"));
        let (all, ends) = answers(&mut c, 3);
        let order: Vec<Value> = ends.iter().map(|e| e["stream_id"].clone()).collect();
        assert_eq!(
            order,
            [json!("quick"), Value::Null, json!("slow")],
            "{backend}: run side by side, not in turn"
        );
        // Each response's events stay on its lane.
        for e in &all {
            let meta = e["response"]["metadata"]["sim"]
                .as_str()
                .unwrap_or_default();
            if meta.starts_with("first_delay_ms=900") {
                assert_eq!(e["stream_id"], "slow", "{backend}: {e}");
            }
        }
        assert_rows_match(&s, &ends);
        let rows = s.rows(3);
        let ttft = |lane_end: &Value| {
            let id = lane_end["response"]["id"].as_str().unwrap();
            rows.iter()
                .find(|r| r.response_id.as_deref() == Some(id))
                .and_then(|r| r.first_token_ms)
                .unwrap()
        };
        let (quick, default, slow) = (ttft(&ends[0]), ttft(&ends[1]), ttft(&ends[2]));
        assert!(
            quick < default && default < slow && slow >= 900,
            "{backend}: first tokens quick {quick} ms, default {default} ms, slow {slow} ms"
        );
        assert_eq!(
            s.sim_stats()["accepted"],
            1,
            "{backend}: one upstream connection"
        );
        assert_quiet(&mut c);
        s.finish();
    }
}

/// 17 lanes at once: 16 run (the upstream's limit per connection), the 17th waits and runs
/// when one ends — none is refused.
#[test]
fn a_seventeenth_lane_waits_its_turn() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    let ends = lanes_complete(&mut c, 17, "first_delay_ms=300");
    assert_eq!(
        ends.last().unwrap()["stream_id"],
        "lane16",
        "the 17th started after the first 16"
    );
    assert_rows_match(&s, &ends);
    s.finish();
}

/// `preempt` and `reject` act per lane: a second create on a busy lane preempts (or is refused
/// on) that lane only; the other lane's response runs on untouched; every turn that reached
/// the upstream is billed.
#[test]
fn preempt_and_reject_act_per_lane() {
    for mode in ["preempt", "reject"] {
        let env = [("TURNPIKE_SESSION__ON_OVERLAP", mode)];
        let s = with_env(&env);
        let mut c = s.client();
        c.send(&create(Some("a"), "deltas=40 delta_delay_ms=20"));
        c.send(&create(Some("b"), "deltas=20 delta_delay_ms=20"));
        // Both are running before the overlap.
        let mut seen = Vec::new();
        while ["a", "b"].iter().any(|l| {
            !seen
                .iter()
                .any(|e: &Value| e["type"] == "response.created" && e["stream_id"] == *l)
        }) {
            seen.push(c.next_event(T));
        }
        c.send(&create(Some("a"), ""));
        let (all, ends) = answers(&mut c, 3);
        let outcome = |lane: &str| -> Vec<String> {
            ends.iter()
                .filter(|e| e["stream_id"] == lane)
                .map(|e| match e["type"].as_str().unwrap() {
                    "error" => e["error"]["code"].as_str().unwrap().to_string(),
                    t => t.to_string(),
                })
                .collect()
        };
        assert_eq!(outcome("b"), ["response.completed"], "{mode}: {all:?}");
        let a = outcome("a");
        match mode {
            "preempt" => assert_eq!(
                a,
                ["response_preempted", "response.completed"],
                "{mode}: {all:?}"
            ),
            _ => assert_eq!(
                a.iter()
                    .filter(|o| *o == "response_already_in_flight")
                    .count(),
                1,
                "{mode}: {a:?}"
            ),
        }
        assert_quiet(&mut c);
        // Every response that reached the upstream has its row (the preempted one too, billed
        // from its drained terminal).
        let responses = s.sim_stats()["responses"].as_u64().unwrap();
        let rows = s.rows(usize::try_from(responses).unwrap());
        assert_eq!(rows.len() as u64, responses, "{mode}: {rows:?}");
        s.finish();
    }
}

/// One lane's response stalls while another lane is answered on the same connection: the stalled
/// turn alone ends (`upstream_connection_lost`, after `upstream.read_timeout_ms`); the other
/// lane completes on the connection it was using.
#[test]
fn a_stalled_lane_ends_alone() {
    let env = [("TURNPIKE_UPSTREAM__READ_TIMEOUT_MS", "600")];
    let s = with_env(&env);
    let mut c = s.client();
    c.send(&create(Some("stuck"), "stall after=3"));
    c.send(&create(Some("busy"), "deltas=40 delta_delay_ms=50"));
    let (_, ends) = answers(&mut c, 2);
    let by_lane = |lane: &str| {
        ends.iter()
            .find(|e| e["stream_id"] == lane)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_lane("stuck")["error"]["code"],
        "upstream_connection_lost",
        "{ends:?}"
    );
    assert_eq!(by_lane("busy")["type"], "response.completed", "{ends:?}");
    assert_eq!(
        s.sim_stats()["accepted"],
        1,
        "the busy lane was never moved"
    );
    assert_eq!(s.rows(2).len(), 2);
    s.finish();
}

/// Lanes `a` and `b` both end with the error `code`.
fn both_lanes_end(c: &mut Client, code: &str) {
    let (_, ends) = answers(c, 2);
    for lane in ["a", "b"] {
        let end = ends.iter().find(|e| e["stream_id"] == lane).unwrap();
        assert_eq!(end["error"]["code"], code, "{lane}: {ends:?}");
    }
}

/// The upstream sends an error of no lane while only named lanes run: it concerns the
/// connection, so every turn on it ends at once (nothing waits for a timeout) and each is
/// recorded.
#[test]
fn an_error_of_no_lane_ends_the_turns_on_the_connection() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    c.send(&create(
        Some("a"),
        "first_delay_ms=400 connection_error=server_error after=3",
    ));
    c.send(&create(Some("b"), "deltas=100 delta_delay_ms=50"));
    both_lanes_end(&mut c, "upstream_connection_lost");
    assert_eq!(s.rows(2).len(), 2);
    s.finish();
}

/// The upstream restarts (close 1012) while two lanes stream on its connection: both turns end
/// `upstream_restarting` (each had forwarded events, so neither is retried), each is recorded,
/// and the session goes on with a fresh connection.
#[test]
fn an_upstream_restart_ends_every_lane_on_the_connection() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    c.send(&create(Some("a"), "first_delay_ms=300 close=1012 after=3"));
    c.send(&create(Some("b"), "deltas=100 delta_delay_ms=50"));
    both_lanes_end(&mut c, "upstream_restarting");
    assert_eq!(s.rows(2).len(), 2);
    c.send(&create(Some("a"), ""));
    let again = c.until_terminal(T);
    assert_eq!(again.last().unwrap()["type"], "response.completed");
    assert_eq!(s.sim_stats()["accepted"], 2, "a fresh connection");
    s.finish();
}

/// Waiting creates are bounded in bytes, not only in count: with 2,500 bytes allowed, two
/// creates of about 1 KiB wait behind a slow turn and a third is refused `lane_queue_full`
/// (nothing else changes); the two run when the lane frees, each billed once.
#[test]
fn waiting_creates_are_bounded_in_bytes() {
    let s = with_env(&[("TURNPIKE_SESSION__LANE_QUEUE_MAX_BYTES", "2500")]);
    let mut c = s.client();
    c.send(&create(Some("a"), "deltas=4 delta_delay_ms=150"));
    let padded = |n: usize| {
        let mut v = create(Some("a"), "");
        v["input"] = json!(format!("{n} {}", "x".repeat(900)));
        v
    };
    for n in 0..3 {
        c.send(&padded(n));
    }
    let (_, ends) = answers(&mut c, 4);
    let kinds: Vec<(&str, &str)> = ends
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or(""),
                e["error"]["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("error", "lane_queue_full"),
            ("response.completed", ""),
            ("response.completed", ""),
            ("response.completed", ""),
        ],
        "{ends:?}"
    );
    assert!(
        ends[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2500 bytes")
    );
    assert_eq!(s.rows(3).len(), 3);
    assert_quiet(&mut c);
    s.finish();
}

/// The upstream keeps a lane's name for its connection's life (32 at most): a connection that
/// carried named lanes is closed when its session gives it back, never lent to the next
/// session — whose first named lane then runs (and is billed as a completed turn), not
/// `websocket_stream_limit_reached` on another tenant's leftovers. Default-lane connections are
/// still reused.
#[test]
fn named_lanes_never_leak_to_the_next_session() {
    let s = with_env(&[]);
    let mut first = s.client();
    lanes_complete(&mut first, 32, "");
    drop(first);
    std::thread::sleep(Duration::from_millis(300));
    let mut next = s.client();
    next.send(&create(Some("fresh"), ""));
    let (_, ends) = answers(&mut next, 1);
    assert_eq!(ends[0]["type"], "response.completed", "{ends:?}");
    drop(next);
    std::thread::sleep(Duration::from_millis(300));
    // Two default-lane sessions in a row share one connection.
    for _ in 0..2 {
        let mut c = s.client();
        c.send(&create(None, ""));
        let (_, ends) = answers(&mut c, 1);
        assert_eq!(ends[0]["type"], "response.completed", "{ends:?}");
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(s.sim_stats()["accepted"], 3, "{}", s.sim_stats());
    let rows = s.rows(35);
    assert_eq!(rows.len(), 35);
    assert!(rows.iter().all(|r| r.status == "completed"), "{rows:?}");
    s.finish();
}
