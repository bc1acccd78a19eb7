//! Upstream accounts as a fleet (docs/DESIGN.md#accounts): an account whose upstream refuses the
//! handshake (its credential is refused: 401) does not stop the service while another account is
//! healthy — turns move to it transparently, the failing account cools down instead of being
//! redialled for every turn, and operators see why.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::admin::TOKEN;
use common::post::post_json;
use common::stack::{Stack, StackOptions, block};
use common::{TestDb, http};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_refused_account_fails_over_to_a_healthy_one() {
    // The sim accepts only `sk-good`: the first account ("sim", `sk-upstream`) gets 401. It is
    // preferred (`good` has a lower priority), so the refusal is met, not routed around by luck.
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[],
        StackOptions {
            sim_args: &["--api-key", "sk-good"],
            account_extra: "\n[[accounts]]\nname = \"good\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-good\"\npriority = 1\n",
            ..StackOptions::default()
        },
    );
    // 20 turns over 4 sessions: every one completes.
    for _ in 0..4 {
        let mut c = s.client();
        for _ in 0..5 {
            c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}));
            let end = c.until_terminal(T);
            assert_eq!(end.last().unwrap()["type"], "response.completed", "{end:?}");
        }
    }
    let rows = s.rows(20);
    assert_eq!(rows.len(), 20);
    assert!(rows.iter().all(|r| r.account == "good"), "{rows:?}");
    // The refused account was not redialled for every turn: it cooled down.
    let refused = s.sim_stats()["rejected"].as_u64().unwrap();
    assert!((1..=4).contains(&refused), "handshakes refused: {refused}");
    let bad = pool(&admin, "sim");
    assert!(bad["failures"].as_u64().unwrap() >= 1, "{bad}");
    let why = bad["last_error"].as_str().unwrap_or_default();
    assert!(why.contains("401"), "the upstream's status is shown: {why}");
    assert!(
        !why.contains("sk-upstream") && !why.contains("sk-good"),
        "no secrets: {why}"
    );
    s.finish();
}

/// With every account refused, turns get `upstream_unavailable` (nothing to fail over to) and
/// `/readyz` says 503 naming each account and why; while one account works it stays ready.
#[test]
fn readiness_names_the_accounts_that_are_out() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            sim_args: &["--api-key", "sk-only-this"],
            ..StackOptions::default()
        },
    );
    assert_eq!(http(&s.addr, "GET", "/readyz", None).0, 200);
    let mut c = s.client();
    c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}));
    let end = c.until_terminal(T);
    assert_eq!(
        end.last().unwrap()["error"]["code"],
        "upstream_unavailable",
        "{end:?}"
    );
    let (code, body) = http(&s.addr, "GET", "/readyz", None);
    assert_eq!(code, 503, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no upstream account can serve")
            && message.contains("sim: failing")
            && message.contains("HTTP 401"),
        "{message}"
    );
    let rows = s.rows(1);
    assert_eq!(
        rows[0].account, "sim",
        "the refused row names the account tried"
    );
    s.finish();
}

/// The upstream answers a turn `rate_limit_exceeded` before anything of it was forwarded: the
/// turn moves to the other account and completes there; the client never sees the error.
#[test]
fn an_in_band_rate_limit_fails_over() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            account_extra: "\n[[accounts]]\nname = \"spare\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-spare\"\n",
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    // `once`: the sim refuses the first time it sees the directive (the first account), not the
    // retry.
    c.send(
        &json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi",
        "metadata": {"sim": "error=rate_limit_exceeded status=429 once"}}),
    );
    let events = c.until_terminal(T);
    assert_eq!(
        events.last().unwrap()["type"],
        "response.completed",
        "{events:?}"
    );
    assert!(events.iter().all(|e| e["type"] != "error"), "{events:?}");
    let rows = s.rows(1);
    assert_eq!(rows.len(), 1, "one turn, one row");
    assert_eq!(rows[0].status, "completed");
    // Both accounts were dialled: the one that refused, then the one that served.
    let conns = s.sim_connections();
    let mut keys: Vec<String> = conns
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| {
            let h = c["headers"].as_array()?;
            let auth = h.iter().find(|kv| kv[0] == "authorization")?;
            Some(auth[1].as_str()?.to_string())
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys, ["Bearer sk-spare", "Bearer sk-upstream"], "{conns}");
    s.finish();
}

/// An operator takes an account out (`POST /admin/accounts/{name}/disable`): its turns go to
/// the other account and it is never dialled; enabled again, it serves again.
#[test]
fn an_operator_disables_and_enables_an_account() {
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[],
        StackOptions {
            account_extra: "\n[[accounts]]\nname = \"spare\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-spare\"\n",
            ..StackOptions::default()
        },
    );
    let turn = |c: &mut common::ws::Client| {
        c.send(
            &json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}),
        );
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
    };
    let (code, body) = http(&admin, "POST", "/admin/accounts/sim/disable", Some(TOKEN));
    assert_eq!(
        (code, body["health"].as_str()),
        (200, Some("disabled")),
        "{body}"
    );
    for _ in 0..3 {
        turn(&mut s.client());
    }
    let rows = s.rows(3);
    assert!(rows.iter().all(|r| r.account == "spare"), "{rows:?}");
    let (code, body) = http(&admin, "POST", "/admin/accounts/sim/enable", Some(TOKEN));
    assert_eq!(
        (code, body["health"].as_str()),
        (200, Some("healthy")),
        "{body}"
    );
    // With the other one out, the enabled account serves again.
    let (code, _) = http(&admin, "POST", "/admin/accounts/spare/disable", Some(TOKEN));
    assert_eq!(code, 200);
    turn(&mut s.client());
    let rows = s.rows(4);
    assert_eq!(rows[3].account, "sim", "the first account serves again");
    let (code, _) = http(&admin, "POST", "/admin/accounts/nope/disable", Some(TOKEN));
    assert_eq!(code, 404);
    s.finish();
}

fn refuse(s: &Stack, key: &str, status: Option<u16>, retry_after: Option<u64>) {
    let body = json!({"key": key, "status": status, "retry_after": retry_after}).to_string();
    let mut c = common::post::Conn::open(&s.sim_addr);
    let head = c.send("POST", "/sim/refuse", None, body.as_bytes(), &[]);
    assert_eq!(head.status, 200);
}

/// `/admin/pools`' entry of `account`.
fn pool(admin: &str, account: &str) -> serde_json::Value {
    let (code, pools) = http(admin, "GET", "/admin/pools", Some(TOKEN));
    assert_eq!(code, 200);
    pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["account"] == account)
        .unwrap()
        .clone()
}

fn refused_count(s: &Stack, key: &str) -> u64 {
    s.sim_stats()["refused"][key].as_u64().unwrap_or(0)
}

/// `sim` (where the tests inject failures) and a backup, `second` (priority 1): turns go to
/// `sim` while it can take them, so each test meets the failure it sets up rather than being
/// routed around it by the weighted choice.
fn two_accounts() -> StackOptions<'static> {
    StackOptions {
        account_extra: "\n[[accounts]]\nname = \"second\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-2\"\npriority = 1\n",
        ..StackOptions::default()
    }
}

/// An account answering 429 with `Retry-After: 2` (HTTP surface): every request completes on
/// the other account, the refusing one is asked once per cooldown, shows `cooling` with its
/// next probe, and serves again after it — on each backend.
#[test]
fn retry_after_sets_the_cooldown() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let (s, admin) = common::admin::start(db, &[], two_accounts());
        refuse(&s, "sk-upstream", Some(429), Some(2));
        let ask = |n: usize| {
            for _ in 0..n {
                let (code, body) = post_json(
                    &s.addr,
                    "/v1/responses",
                    &s.key,
                    &json!({"model": "gpt-test", "input": "hi", "store": false}),
                );
                assert_eq!(code, 200, "{backend}: {body}");
            }
        };
        ask(20);
        let rows = s.rows(20);
        assert!(
            rows.iter().all(|r| r.account == "second"),
            "{backend}: {rows:?}"
        );
        assert_eq!(
            refused_count(&s, "sk-upstream"),
            1,
            "{backend}: asked once per cooldown"
        );
        let sim = pool(&admin, "sim");
        assert_eq!(sim["health"], "cooling", "{sim}");
        let next = sim["next_probe_ms"].as_u64().unwrap();
        assert!(
            (1..=2000).contains(&next),
            "Retry-After, not the 1 s backoff: {sim}"
        );
        assert!(sim["since"].is_string(), "{sim}");
        refuse(&s, "sk-upstream", None, None);
        std::thread::sleep(Duration::from_millis(2100));
        ask(20);
        let rows = s.rows(40);
        assert!(
            rows[20..].iter().any(|r| r.account == "sim"),
            "{backend}: serves again: {rows:?}"
        );
        s.finish();
    }
}

/// A WebSocket handshake refused 429 with `Retry-After: 3`: the turns complete on the other
/// account, the refusing one is dialled once in its cooldown, which lasts what the upstream
/// asked (not the 1 s first backoff), and serves again after it.
#[test]
fn a_refused_handshakes_retry_after_sets_the_cooldown() {
    let (s, admin) = common::admin::start(TestDb::sqlite(), &[], two_accounts());
    refuse(&s, "sk-upstream", Some(429), Some(3));
    let turns = |n: usize| {
        let mut c = s.client();
        for _ in 0..n {
            c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}));
            let end = c.until_terminal(T);
            assert_eq!(end.last().unwrap()["type"], "response.completed", "{end:?}");
        }
    };
    for _ in 0..4 {
        turns(5);
    }
    let rows = s.rows(20);
    assert!(rows.iter().all(|r| r.account == "second"), "{rows:?}");
    assert_eq!(
        refused_count(&s, "sk-upstream"),
        1,
        "dialled once per cooldown"
    );
    let sim = pool(&admin, "sim");
    assert_eq!(sim["health"], "cooling", "{sim}");
    let next = sim["next_probe_ms"].as_u64().unwrap();
    // The first backoff is 1 s ± 20 %: longer than that is the upstream's 3 s.
    assert!((1300..=3000).contains(&next), "Retry-After: {sim}");
    refuse(&s, "sk-upstream", None, None);
    std::thread::sleep(Duration::from_millis(next + 200));
    for _ in 0..4 {
        turns(5);
    }
    let rows = s.rows(40);
    assert!(
        rows[20..].iter().any(|r| r.account == "sim"),
        "serves again: {rows:?}"
    );
    s.finish();
}

/// A refused credential (401) disables the account: the turn completes on the other one, the
/// account is not redialled, operators see `disabled` / `credential_refused` (admin and
/// metrics) and enable it again; all accounts out → `upstream_unavailable` naming the wait.
#[test]
fn a_refused_credential_disables_the_account() {
    // The second account is the backup (priority 1): the first is tried first. HTTP requests
    // go upstream over HTTP: the sim refuses new requests and handshakes of a key, not frames
    // on a socket it already opened (where the last part's request would be served).
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[("TURNPIKE_UPSTREAM__HTTP_TRANSPORT", "http")],
        StackOptions {
            account_extra: "\n[[accounts]]\nname = \"second\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-2\"\npriority = 1\n",
            ..StackOptions::default()
        },
    );
    refuse(&s, "sk-upstream", Some(401), None);
    for _ in 0..4 {
        let mut c = s.client();
        c.send(
            &json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}),
        );
        assert_eq!(
            c.until_terminal(T).last().unwrap()["type"],
            "response.completed"
        );
    }
    assert!(s.rows(4).iter().all(|r| r.account == "second"));
    assert_eq!(
        refused_count(&s, "sk-upstream"),
        1,
        "tried first, then never redialled: {}",
        s.sim_stats()
    );
    let sim = pool(&admin, "sim");
    assert_eq!(
        (sim["health"].as_str(), sim["reason"].as_str()),
        (Some("disabled"), Some("credential_refused")),
        "{sim}"
    );
    let state = common::admin::metric(
        &admin,
        "turnpike_upstream_account_state{account=\"sim\",state=\"disabled\"}",
    );
    assert_eq!(state, 1.0);
    // The other one refused too: nothing can serve, and the client is told when to retry.
    refuse(&s, "sk-2", Some(429), Some(30));
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &json!({"model": "gpt-test", "input": "hi"}),
    );
    assert_eq!(code, 429, "the upstream's own refusal: {body}");
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &json!({"model": "gpt-test", "input": "hi"}),
    );
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (503, Some("upstream_unavailable")),
        "{body}"
    );
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("retry in"), "{msg}");
    // Fixed and enabled by an operator: it serves again.
    refuse(&s, "sk-upstream", None, None);
    let (code, body) = http(&admin, "POST", "/admin/accounts/sim/enable", Some(TOKEN));
    assert_eq!(
        (code, body["health"].as_str()),
        (200, Some("healthy")),
        "{body}"
    );
    let (code, _) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &json!({"model": "gpt-test", "input": "hi"}),
    );
    assert_eq!(code, 200);
    s.finish();
}

/// In-band `usage_limit_reached` on the first event of a chained turn: the turn moves to the
/// other account and its conversation is replayed there (the client sees it complete); a chain
/// whose history holds a tool output fails closed instead (`continuation_unavailable`), never a
/// silently broken chain.
#[test]
fn a_chained_turn_fails_over_by_replay_or_fails_closed() {
    let s = Stack::start(TestDb::sqlite(), two_accounts());
    let mut c = s.client();
    let send = |c: &mut common::ws::Client, body: serde_json::Value| {
        let mut frame = json!({"type": "response.create", "model": "gpt-test", "store": false});
        for (k, v) in body.as_object().unwrap() {
            frame[k] = v.clone();
        }
        c.send(&frame);
        c.until_terminal(T).last().unwrap().clone()
    };
    let t1 = send(&mut c, json!({"input": "hello"}));
    assert_eq!(t1["type"], "response.completed");
    let t2 = send(
        &mut c,
        json!({"previous_response_id": t1["response"]["id"], "input": "again",
               "metadata": {"sim": "error=usage_limit_reached status=429 once"}}),
    );
    assert_eq!(t2["type"], "response.completed", "{t2}");
    let rows = s.rows(2);
    assert_ne!(
        rows[0].account, rows[1].account,
        "moved to the other account"
    );
    // What the other account got: the conversation replayed, no previous_response_id.
    let conns = s.sim_connections();
    let replayed = conns
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c["frames"].as_array().unwrap().iter())
        .filter(|f| f["dir"] == "in")
        .filter_map(|f| serde_json::from_str::<serde_json::Value>(f["text"].as_str()?).ok())
        .find(|v| {
            v["type"] == "response.create"
                && v.get("previous_response_id").is_none()
                && v["input"].is_array()
        })
        .expect("a replayed create");
    assert_eq!(replayed["input"].as_array().unwrap().len(), 3, "{replayed}");

    // A chain holding a tool output cannot be replayed: it fails closed.
    let mut c = s.client();
    let t1 = send(
        &mut c,
        json!({"input": "run it", "metadata": {"sim": "tool"}}),
    );
    let call = t1["response"]["output"][0]["call_id"].clone();
    let t2 = send(
        &mut c,
        json!({"previous_response_id": t1["response"]["id"],
               "input": [{"type": "function_call_output", "call_id": call, "output": "ok"}],
               // A directive of its own: `once` fires once per directive text.
               "metadata": {"sim": "error=usage_limit_reached status=429 once after=0"}}),
    );
    assert_eq!(t2["error"]["code"], "continuation_unavailable", "{t2}");
    s.finish();
}

/// An account whose upstream accepts the TCP connection and never answers the handshake
/// (hung) holds a turn only for the lease timeout: the turn then fails over to the healthy
/// account instead of answering `upstream_unavailable`, and completes there.
#[test]
fn a_hung_handshake_fails_over() {
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    // Accepts and holds every connection, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in hung.incoming().flatten() {
            held.push(conn);
        }
    });
    let extra = format!(
        "\n[[accounts]]\nname = \"hung\"\nbase_url = \"http://{hung_addr}/v1\"\napi_key = \"sk-h\"\npriority = -1\n"
    );
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "800"),
                ("TURNPIKE_UPSTREAM__CONNECT_TIMEOUT_MS", "10000"),
            ],
            account_extra: &extra,
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"}));
    let end = c.until_terminal(T);
    assert_eq!(end.last().unwrap()["type"], "response.completed", "{end:?}");
    let rows = s.rows(1);
    assert_eq!(
        (rows.len(), rows[0].account.as_str()),
        (1, "sim"),
        "{rows:?}"
    );
    s.finish();
}

/// HTTP requests an account refuses count as its dial failures, as refused WebSocket dials do:
/// the no-upstream alert fires for HTTP-only traffic too.
#[test]
fn http_refusals_count_as_dial_failures() {
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[("TURNPIKE_UPSTREAM__HTTP_TRANSPORT", "http")],
        StackOptions {
            sim_args: &["--api-key", "sk-other"],
            ..StackOptions::default()
        },
    );
    let failures = || {
        common::admin::metric(
            &admin,
            "turnpike_upstream_dial_failures_total{account=\"sim\"}",
        )
    };
    assert_eq!(failures(), 0.0);
    let (code, body) = post_json(
        &s.addr,
        "/v1/responses",
        &s.key,
        &json!({"model": "gpt-test", "store": false, "input": "hi"}),
    );
    assert_eq!(code, 503, "{body}");
    assert!(failures() >= 1.0, "the refused request counted");
    s.finish();
}
