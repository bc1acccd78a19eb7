//! Account selection (docs/DESIGN.md#routing): sticky routing keeps turns of one prompt cache
//! (`prompt_cache_key`) or client session on the account that served the last one — across
//! reconnects, transports and relays — and accounts without an affinity share turns by weight.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::admin::TOKEN;
use common::post::post_json;
use common::stack::{Stack, StackOptions, block};
use common::ws::Client;
use common::{TestDb, http};
use serde_json::json;

const T: Duration = Duration::from_secs(20);

fn three_accounts() -> StackOptions<'static> {
    StackOptions {
        account_extra: "\n[[accounts]]\nname = \"second\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-2\"\n\n[[accounts]]\nname = \"third\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-3\"\n",
        ..StackOptions::default()
    }
}

fn ws_turn(c: &mut Client, extra: serde_json::Value) {
    let mut body =
        json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    c.send(&body);
    let end = c.until_terminal(T);
    assert_eq!(end.last().unwrap()["type"], "response.completed", "{end:?}");
}

fn accounts_of(s: &Stack, n: usize) -> HashMap<String, usize> {
    let mut by = HashMap::new();
    for r in s.rows(n) {
        *by.entry(r.account).or_insert(0) += 1;
    }
    by
}

/// 20 turns with one `prompt_cache_key` over 4 reconnects (and two over HTTP) land on one of
/// three accounts; a second relay on the same database sends them there too (PostgreSQL).
#[test]
fn one_prompt_cache_stays_on_one_account() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = Stack::start(db, three_accounts());
        for _ in 0..4 {
            let mut c = s.client();
            for _ in 0..5 {
                ws_turn(&mut c, json!({"prompt_cache_key": "repo-42"}));
            }
        }
        for stream in [false, true] {
            let (code, _) = post_json(
                &s.addr,
                "/v1/responses",
                &s.key,
                &json!({"model": "gpt-test", "input": "hi", "store": false, "prompt_cache_key": "repo-42", "stream": stream}),
            );
            assert_eq!(code, 200);
        }
        let by = accounts_of(&s, 22);
        assert_eq!(by.len(), 1, "{backend}: {by:?}");
        let home = by.keys().next().unwrap().clone();
        if backend == "postgres" {
            let (_relay, addr2, _dir) = s.second_relay(&[]);
            let mut c = Client::bearer(&addr2, &s.key);
            for _ in 0..3 {
                ws_turn(&mut c, json!({"prompt_cache_key": "repo-42"}));
            }
            let by = accounts_of(&s, 25);
            assert_eq!(by.get(&home), Some(&25), "{by:?}");
        }
        s.finish();
    }
}

/// Codex's session id is an affinity too: turns of one `session-id` over reconnects stay on one
/// account; when that account is taken out, the turn moves (counted), and stays on the new one.
#[test]
fn a_session_moves_only_when_its_account_cannot_serve() {
    let (s, admin) = common::admin::start(TestDb::sqlite(), &[], three_accounts());
    let auth = format!("Bearer {}", s.key);
    let open = || {
        Client::connect(
            &s.addr,
            "/v1/responses",
            &[("authorization", &auth), ("session-id", "codex-sess-1")],
        )
        .unwrap()
    };
    for _ in 0..3 {
        let mut c = open();
        ws_turn(&mut c, json!({}));
        ws_turn(&mut c, json!({}));
    }
    let by = accounts_of(&s, 6);
    assert_eq!(by.len(), 1, "{by:?}");
    let home = by.keys().next().unwrap().clone();
    let (code, _) = http(
        &admin,
        "POST",
        &format!("/admin/accounts/{home}/disable"),
        Some(TOKEN),
    );
    assert_eq!(code, 200);
    for _ in 0..2 {
        let mut c = open();
        ws_turn(&mut c, json!({}));
        ws_turn(&mut c, json!({}));
    }
    let rows = s.rows(10);
    let after: Vec<&str> = rows[6..].iter().map(|r| r.account.as_str()).collect();
    assert!(
        after.iter().all(|a| *a == after[0] && *a != home),
        "{after:?}"
    );
    let moves = common::admin::metric(
        &admin,
        &format!("turnpike_affinity_moves_total{{from=\"{home}\"}}"),
    );
    assert_eq!(moves, 1.0, "one move, then the new account is the home");
    s.finish();
}

/// Without an affinity, accounts of one priority share sessions by weight (3:1 within ±10 %
/// over 400 sessions), and a lower-priority account gets nothing while the others serve.
#[test]
fn weights_share_and_priorities_order() {
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: 64,
            account_extra: "weight = 3\n\n[[accounts]]\nname = \"light\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-2\"\nmax_conns = 64\n\n[[accounts]]\nname = \"backup\"\nbase_url = \"http://SIM_ADDR/v1\"\napi_key = \"sk-3\"\npriority = 1\n",
            ..StackOptions::default()
        },
    );
    for _ in 0..400 {
        let mut c = s.client();
        ws_turn(&mut c, json!({}));
    }
    let by = accounts_of(&s, 400);
    let heavy = by.get("sim").copied().unwrap_or(0);
    assert!((270..=330).contains(&heavy), "3:1 expected: {by:?}");
    assert_eq!(by.get("backup"), None, "{by:?}");
    s.finish();
}
