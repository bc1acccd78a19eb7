//! Continuation end to end (docs/DESIGN.md#continuation), against the sim's connection-local response cache:
//! chains on one socket, chains whose connection is gone (replayed once, or failed closed when
//! tool outputs are involved — the seed `003_…` case), `previous_response_not_found`
//! recovered once, and the last response id injected for a bare tool output.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::TestDb;
use common::stack::{Stack, StackOptions};
use common::ws::Client;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

/// One turn; the terminal (or error) event.
fn turn(c: &mut Client, frame: Value) -> Value {
    c.send(&frame);
    c.until_terminal(T).pop().unwrap()
}

fn create(extra: Value) -> Value {
    let mut f = json!({"type": "response.create", "model": "gpt-test", "store": false});
    for (k, v) in extra.as_object().unwrap() {
        f[k] = v.clone();
    }
    f
}

fn call_id(terminal: &Value) -> String {
    terminal["response"]["output"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["type"] == "function_call")
        .expect("a function call")["call_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// `response.create` frames the sim received, per connection, parsed.
fn creates_seen(s: &Stack) -> Vec<Vec<Value>> {
    s.sim_connections()
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            c["frames"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["dir"] == "in")
                .filter_map(|f| serde_json::from_str::<Value>(f["text"].as_str()?).ok())
                .filter(|v| v["type"] == "response.create")
                .collect()
        })
        .collect()
}

fn stack(max_age_s: &'static str) -> Stack {
    Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[("TURNPIKE_POOL__MAX_AGE_S", max_age_s)],
            ..StackOptions::default()
        },
    )
}

/// A Codex-style tool loop chained with `previous_response_id` on one socket.
#[test]
fn tool_chain_on_one_socket() {
    let s = stack("3300");
    let mut c = s.client();
    let t1 = turn(
        &mut c,
        create(json!({"input": "run it", "metadata": {"sim": "tool"}})),
    );
    assert_eq!(t1["type"], "response.completed");
    let t2 = turn(
        &mut c,
        create(json!({"previous_response_id": t1["response"]["id"],
            "input": [{"type": "function_call_output", "call_id": call_id(&t1), "output": "ok"}]})),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    let t3 = turn(
        &mut c,
        create(json!({"previous_response_id": t2["response"]["id"], "input": "thanks"})),
    );
    assert_eq!(t3["type"], "response.completed", "{t3}");
    let seen = creates_seen(&s);
    assert_eq!(seen.len(), 1, "one upstream socket");
    assert_eq!(seen[0][2]["previous_response_id"], t2["response"]["id"]);
    assert_eq!(seen[0][2]["input"], "thanks", "sent as the client sent it");
    s.finish();
}

/// The connection is gone between turns (recycled at `pool.max_age_s`); no tool output in the
/// conversation: `previous_response_id` is dropped and the conversation replayed, once.
#[test]
fn lost_connection_replays_a_plain_conversation() {
    let s = stack("1");
    let mut c = s.client();
    let t1 = turn(&mut c, create(json!({"input": "hello"})));
    assert_eq!(t1["type"], "response.completed");
    std::thread::sleep(Duration::from_millis(1200));
    let t2 = turn(
        &mut c,
        create(json!({"previous_response_id": t1["response"]["id"], "input": "again"})),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    let seen = creates_seen(&s);
    assert_eq!(seen.len(), 2, "a fresh connection for the second turn");
    let replay = &seen[1][0];
    assert!(replay.get("previous_response_id").is_none(), "{replay}");
    let input = replay["input"].as_array().unwrap();
    assert_eq!(input.len(), 3, "hello, the answer, again: {replay}");
    assert_eq!(input[0]["content"][0]["text"], "hello");
    assert_eq!(input[1]["role"], "assistant");
    assert_eq!(input[2]["content"][0]["text"], "again");
    assert_eq!(
        (&replay["model"], &replay["store"]),
        (&json!("gpt-test"), &json!(false)),
        "other fields survive"
    );
    s.finish();
}

/// Lanes fork each other: a lane continuing another lane's response whose connection is gone
/// is replayed with its own lineage — the fork's parent and the fork — never the other lane's
/// later turns.
#[test]
fn a_fork_on_another_lane_replays_its_own_lineage() {
    let s = stack("1");
    let mut c = s.client();
    let on = |lane: &str, extra: Value| {
        let mut f = create(extra);
        f["stream_id"] = json!(lane);
        f
    };
    let t1 = turn(&mut c, on("a", json!({"input": "hello"})));
    let t2 = turn(
        &mut c,
        on(
            "a",
            json!({"previous_response_id": t1["response"]["id"], "input": "more"}),
        ),
    );
    let t3 = turn(
        &mut c,
        on(
            "b",
            json!({"previous_response_id": t1["response"]["id"], "input": "fork"}),
        ),
    );
    for t in [&t1, &t2, &t3] {
        assert_eq!(t["type"], "response.completed", "{t}");
    }
    std::thread::sleep(Duration::from_millis(1200));
    let t4 = turn(
        &mut c,
        on(
            "b",
            json!({"previous_response_id": t3["response"]["id"], "input": "again"}),
        ),
    );
    assert_eq!(t4["type"], "response.completed", "{t4}");
    assert_eq!(t4["stream_id"], "b");
    let seen = creates_seen(&s);
    assert_eq!(seen.len(), 2, "a fresh connection for the last turn");
    let replay = &seen[1][0];
    assert!(replay.get("previous_response_id").is_none(), "{replay}");
    let said: Vec<&str> = replay["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["role"] == "user")
        .map(|i| i["content"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(said, ["hello", "fork", "again"], "{replay}");
    assert_eq!(
        replay["input"].as_array().unwrap().len(),
        5,
        "with the two answers"
    );
    s.finish();
}

/// The seed `003_…` case: the tool output is only in an earlier turn; this turn is plain input
/// with `previous_response_id`; the connection is gone → `continuation_unavailable`, nothing
/// reaches the upstream, the session stays open. A tool output in the frame itself too.
#[test]
fn lost_connection_with_tool_outputs_fails_closed() {
    let s = stack("1");
    let mut c = s.client();
    let t1 = turn(
        &mut c,
        create(json!({"input": "run it", "metadata": {"sim": "tool"}})),
    );
    let t2 = turn(
        &mut c,
        create(json!({"previous_response_id": t1["response"]["id"],
            "input": [{"type": "function_call_output", "call_id": call_id(&t1), "output": "ok"}]})),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    std::thread::sleep(Duration::from_millis(1200));
    let t3 = turn(
        &mut c,
        create(json!({"previous_response_id": t2["response"]["id"], "input": "thanks"})),
    );
    assert_eq!(t3["error"]["code"], "continuation_unavailable", "{t3}");
    assert_eq!(t3["status"], 409);
    let t3b = turn(
        &mut c,
        create(json!({"previous_response_id": t2["response"]["id"],
            "input": [{"type": "function_call_output", "call_id": "call_x", "output": "late"}]})),
    );
    assert_eq!(t3b["error"]["code"], "continuation_unavailable", "{t3b}");
    let sent: usize = creates_seen(&s).iter().map(Vec::len).sum();
    assert_eq!(sent, 2, "the refused turns sent nothing upstream");
    // The session goes on: a new chain works.
    let t4 = turn(&mut c, create(json!({"input": "start over"})));
    assert_eq!(t4["type"], "response.completed");
    let rows = s.rows(5);
    assert_eq!(
        rows.iter()
            .filter(|r| r.error_code.as_deref() == Some("continuation_unavailable"))
            .count(),
        2
    );
    s.finish();
}

/// `previous_response_not_found` before anything was forwarded: one retry with the replay input
/// on the same connection.
#[test]
fn previous_response_not_found_is_recovered_once() {
    let s = stack("3300");
    let mut c = s.client();
    let t1 = turn(&mut c, create(json!({"input": "hello"})));
    let t2 = turn(
        &mut c,
        create(
            json!({"previous_response_id": t1["response"]["id"], "input": "again",
            "metadata": {"sim": "error=previous_response_not_found once"}}),
        ),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    let seen = creates_seen(&s);
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].len(),
        3,
        "the turn, the refused chained request, the replay"
    );
    assert!(seen[0][2].get("previous_response_id").is_none());
    assert_eq!(seen[0][2]["input"].as_array().unwrap().len(), 3);
    s.finish();
}

/// A tool output without `previous_response_id`, whose call is not in the frame, on the live
/// connection: the session's last response id is injected. A self-contained frame is not
/// touched.
#[test]
fn last_response_id_injected_for_a_bare_tool_output() {
    let s = stack("3300");
    let mut c = s.client();
    let t1 = turn(
        &mut c,
        create(json!({"input": "run it", "metadata": {"sim": "tool"}})),
    );
    let call = call_id(&t1);
    let t2 = turn(
        &mut c,
        create(
            json!({"input": [{"type": "function_call_output", "call_id": call, "output": "ok"}]}),
        ),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    let t3 = turn(
        &mut c,
        create(json!({"input": [
            {"type": "function_call", "call_id": "call_self", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_self", "output": "ok"}]})),
    );
    assert_eq!(t3["type"], "response.completed", "{t3}");
    let seen = creates_seen(&s);
    assert_eq!(seen[0][1]["previous_response_id"], t1["response"]["id"]);
    assert!(seen[0][2].get("previous_response_id").is_none());
    s.finish();
}

/// Idle sessions never starve busy ones (docs/DESIGN.md#idle-reclaim): with `max_conns = 2`, five sessions that
/// ran a turn each and sit idle, a sixth session's turn completes at once (connections held
/// between turns are reclaimed, the one parked longest first), and a reclaimed session's next
/// turn continues its chain by replay.
#[test]
fn idle_sessions_are_reclaimed_and_continue_by_replay() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: 2,
            env: &[("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "5000")],
            ..StackOptions::default()
        },
    );
    let mut idle: Vec<(Client, Value)> = Vec::new();
    for i in 0..5 {
        let mut c = s.client();
        let t = turn(&mut c, create(json!({"input": format!("session {i}")})));
        assert_eq!(t["type"], "response.completed", "session {i}: {t}");
        idle.push((c, t));
    }
    let mut sixth = s.client();
    let t0 = std::time::Instant::now();
    let t = turn(&mut sixth, create(json!({"input": "busy"})));
    let took = t0.elapsed();
    assert_eq!(t["type"], "response.completed", "{t}");
    // Completing at all shows the reclaim (else: upstream_unavailable after the 5 s lease
    // timeout); the bound only keeps a busy machine from hiding a wait for it.
    assert!(
        took < Duration::from_millis(4_500),
        "no wait for the lease timeout: {took:?}"
    );
    assert_eq!(
        s.sim_stats()["accepted"],
        2,
        "never more than max_conns sockets"
    );
    // The first session's connection went to others: its chain continues by replay.
    let (c, first) = &mut idle[0];
    let again = turn(
        c,
        create(json!({"previous_response_id": first["response"]["id"], "input": "still there?"})),
    );
    assert_eq!(again["type"], "response.completed", "{again}");
    let replayed = creates_seen(&s)
        .into_iter()
        .flatten()
        .find(|f| f["input"].as_array().is_some_and(|i| i.len() == 3))
        .expect("a replayed request");
    assert!(replayed.get("previous_response_id").is_none());
    assert_eq!(replayed["input"][0]["content"][0]["text"], "session 0");
    s.finish();
}

/// `store:true`: a response is bound to its account and key (`response_bindings`), so its chain
/// continues on that account from another relay process sharing the database; another key's
/// continuation is refused; expired bindings are cleaned up.
#[test]
fn stored_chain_continues_from_a_second_relay() {
    use turnpike::db::queries;
    for db in common::stack::block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(db, StackOptions::default());
        let (other_key, _) = common::stack::with_db(&s.db, async |p| {
            let user = queries::users::by_name(p, "tester").await.unwrap().unwrap();
            let stale = turnpike::db::now() - chrono::Duration::seconds(5);
            queries::bindings::bind(p, "resp_stale", "sim", s.key_id, stale)
                .await
                .unwrap();
            turnpike::auth::create_key(p, user.id, &Default::default())
                .await
                .unwrap()
        });
        let mut c = s.client();
        let first = turn(
            &mut c,
            json!({"type": "response.create", "model": "gpt-test",
            "store": true, "input": "remember this"}),
        );
        assert_eq!(first["type"], "response.completed", "{first}");
        // A second relay: another account listed first (an upstream that never saw the
        // response), then the same account name as the first relay's.
        let (_other_sim, other_addr) = common::start_sim(&[]);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("relay2.toml");
        std::fs::write(
            &config,
            format!(
                "[[accounts]]\nname = \"other\"\nbase_url = \"http://{other_addr}/v1\"\napi_key = \"k\"\n\
                 [[accounts]]\nname = \"sim\"\nbase_url = \"http://{}/v1\"\napi_key = \"k\"\n",
                s.sim_addr
            ),
        )
        .unwrap();
        let mut cmd = common::turnpike();
        cmd.arg("--config")
            .arg(&config)
            .env("TURNPIKE_DATABASE__URL", &s.db.url)
            .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
            .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", dir.path().join("spool"))
            .arg("serve");
        let relay2 = common::Proc::spawn(cmd);
        let addr2 = relay2.listening_addr();
        let next = json!({"type": "response.create", "model": "gpt-test", "store": true,
            "previous_response_id": first["response"]["id"], "input": "what was it?"});
        let mut c2 = Client::bearer(&addr2, &s.key);
        let second = turn(&mut c2, next.clone());
        assert_eq!(
            second["type"], "response.completed",
            "{backend}: continued on the account holding the response: {second}"
        );
        let mut stranger = Client::bearer(&addr2, &other_key);
        let refused = turn(&mut stranger, next);
        assert_eq!(
            refused["error"]["code"], "previous_response_forbidden",
            "{refused}"
        );
        assert_eq!(refused["status"], 403);
        // The second relay deleted the expired binding when it started.
        let left = common::stack::with_db(&s.db, async |p| {
            queries::bindings::purge_expired(p).await.unwrap()
        });
        assert_eq!(left, 0, "expired bindings already cleaned up");
        let other_stats = common::http_get(&other_addr, "/sim/stats").1;
        assert_eq!(
            other_stats["responses"], 0,
            "the other account never served it"
        );
        drop(relay2);
        s.finish();
    }
}

/// A continuation the upstream refuses (4xx) evicts the response it continued from the socket's
/// cache (as the service does, and the sim): the next continuation of that response is replayed
/// at once — one request, no `previous_response_not_found` round trip — and completes.
#[test]
fn a_failed_continuation_makes_the_next_one_replay() {
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    let first = turn(&mut c, create(json!({"input": "remember 7"})));
    assert_eq!(first["type"], "response.completed");
    let r1 = first["response"]["id"].as_str().unwrap().to_string();
    let refused = turn(
        &mut c,
        create(json!({"input": "and?", "previous_response_id": r1,
            "metadata": {"sim": "error=invalid_value status=400"}})),
    );
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["error"]["code"], "invalid_value");
    let again = turn(
        &mut c,
        create(json!({"input": "what was it?", "previous_response_id": r1})),
    );
    assert_eq!(again["type"], "response.completed", "{again}");
    let creates: Vec<Value> = creates_seen(&s).into_iter().flatten().collect();
    assert_eq!(creates.len(), 3, "{creates:?}");
    let last = &creates[2];
    assert!(
        last.get("previous_response_id").is_none(),
        "replayed: {last}"
    );
    let replayed = last["input"].to_string();
    assert!(
        replayed.contains("remember 7") && replayed.contains("what was it?"),
        "{replayed}"
    );
    s.finish();
}
