//! Money in every dimension the upstream bills (docs/DESIGN.md#pricing, #key-limits,
//! #codex-usage): service tiers, cache writes by lifetime, compaction turns, a key's model
//! and tier allow-lists, and Codex's quota endpoint — over both transports, on each backend,
//! the money invariant holding.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::time::Duration;

use common::TestDb;
use common::ledger::{assert_invariant, exec, wait_rows};
use common::post::post_json;
use common::stack::{Stack, StackOptions, block};
use serde_json::{Value, json};
use turnpike::auth::KeyRequest;

const T: Duration = Duration::from_secs(20);

/// A model of its own prices: cache writes of 12 hours dearer than those of 30 minutes.
const PRICES: &str = r#"
[pricing.models."gpt-cache"]
input_usd_per_mtok = "2"
cached_input_usd_per_mtok = "0.2"
cache_write_usd_per_mtok = "2.5"
cache_write_12h_usd_per_mtok = "4"
output_usd_per_mtok = "8"
[pricing.models."gpt-cache".tiers.priority]
input_usd_per_mtok = "5"
output_usd_per_mtok = "30"
"#;

fn stack(db: TestDb, key: KeyRequest) -> Stack {
    Stack::start(
        db,
        StackOptions {
            account_extra: PRICES,
            key,
            ..StackOptions::default()
        },
    )
}

/// A create of 1,000 input and 100 output tokens as the upstream reports them, with `extra`
/// fields.
fn create(model: &str, directive: &str, extra: Value) -> Value {
    let mut v = json!({"type": "response.create", "model": model, "store": false, "input": "hi",
        "metadata": {"sim": format!("report_input=1000 report_output=100 {directive}")}});
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// 1,000 input and 100 output tokens at the default standard prices ($1.25 and $10 per million).
const STANDARD: i64 = 1000 * 1_250 + 100 * 10_000;

/// The tier billed is the one the upstream reports for the response, else the one asked
/// for: a priority turn pays twice standard, a flex one half, a turn asking nothing that the
/// upstream served at priority pays priority; a model's own priority table wins over the
/// multiplier. Over the WebSocket and over HTTP, on each backend.
#[test]
fn each_turn_is_billed_at_the_tier_that_served_it() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(db, KeyRequest::default());
        let mut c = s.client();
        let turns = [
            create("gpt-test", "", json!({"service_tier": "priority"})),
            create("gpt-test", "", json!({"service_tier": "flex"})),
            create("gpt-test", "served_tier=priority", json!({})),
            create("gpt-test", "", json!({"service_tier": "auto"})),
            create("gpt-cache", "", json!({"service_tier": "priority"})),
        ];
        for t in &turns {
            c.send(t);
            let last = c.until_terminal(T).pop().unwrap();
            assert_eq!(last["type"], "response.completed", "{backend}: {last}");
        }
        let mut body = create("gpt-test", "", json!({"service_tier": "priority"}));
        body.as_object_mut().unwrap().remove("type");
        let (code, answer) = post_json(&s.addr, "/v1/responses", &s.key, &body);
        assert_eq!(code, 200, "{backend}: {answer}");
        assert_eq!(answer["service_tier"], "priority");
        let rows = s.rows(6);
        let billed: Vec<(&str, i64, &str)> = rows
            .iter()
            .map(|r| {
                (
                    r.service_tier.as_str(),
                    r.cost_nanousd,
                    r.transport.as_str(),
                )
            })
            .collect();
        assert_eq!(
            billed,
            [
                ("priority", 2 * STANDARD, "ws"),
                ("flex", STANDARD / 2, "ws"),
                ("priority", 2 * STANDARD, "ws"),
                ("standard", STANDARD, "ws"),
                ("priority", 1000 * 5_000 + 100 * 30_000, "ws"),
                ("priority", 2 * STANDARD, "http"),
            ],
            "{backend}"
        );
        assert_invariant(&wait_rows(&s.db, 6));
        s.finish();
    }
}

/// Cache writes reported by lifetime are billed at their prices (30 minutes at the cache
/// write price, 12 hours at its own), cached and plain input at theirs; the row keeps the
/// split — on each backend.
#[test]
fn cache_writes_are_billed_by_lifetime() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(db, KeyRequest::default());
        let mut c = s.client();
        c.send(&create(
            "gpt-cache",
            "cached=100 cache_write_30m=200 cache_write_12h=300",
            json!({"prompt_cache_options": {"ttl": "12h"}}),
        ));
        let last = c.until_terminal(T).pop().unwrap();
        let details = &last["response"]["usage"]["input_tokens_details"];
        assert_eq!(details["cache_write_tokens"], 500, "{backend}: {last}");
        let r = &s.rows(1)[0];
        assert_eq!(
            (
                r.cached_input_tokens,
                r.cache_write_tokens,
                r.cache_write_30m_tokens,
                r.cache_write_12h_tokens
            ),
            (100, 500, 200, 300),
            "{backend}"
        );
        // 400 plain × $2 + 100 cached × $0.2 + 200 × $2.5 + 300 × $4 + 100 out × $8.
        let expected = 400 * 2_000 + 100 * 200 + 200 * 2_500 + 300 * 4_000 + 100 * 8_000;
        assert_eq!(r.cost_nanousd, expected, "{backend}");
        assert_invariant(&wait_rows(&s.db, 1));
        s.finish();
    }
}

/// A `compaction_trigger` item makes a turn a compaction (`origin = 'compaction'`), billed as
/// reported, over the WebSocket and over HTTP — on each backend.
#[test]
fn compaction_turns_are_billed_rows() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(db, KeyRequest::default());
        let mut c = s.client();
        let trigger = json!({"input": [{"type": "message", "role": "user", "content": "long"},
            {"type": "compaction_trigger"}]});
        c.send(&create("gpt-test", "", trigger.clone()));
        let last = c.until_terminal(T).pop().unwrap();
        assert_eq!(last["type"], "response.completed", "{backend}: {last}");
        let mut body = create("gpt-test", "", trigger);
        body.as_object_mut().unwrap().remove("type");
        let (code, answer) = post_json(&s.addr, "/v1/responses", &s.key, &body);
        assert_eq!(code, 200, "{backend}: {answer}");
        let rows = s.rows(2);
        for (r, transport) in rows.iter().zip(["ws", "http"]) {
            assert_eq!(
                (r.origin.as_str(), r.transport.as_str(), r.cost_nanousd),
                ("compaction", transport, STANDARD),
                "{backend}"
            );
        }
        s.finish();
    }
}

/// A key limited to some models and tiers is refused the others before the upstream is
/// asked — a clear error on the socket (which stays open) and over HTTP, nothing billed —
/// while what it may use runs; `auto` asks for no tier in particular.
#[test]
fn a_key_is_held_to_its_models_and_tiers() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(
            db,
            KeyRequest {
                allowed_models: Some(vec!["gpt-test".into()]),
                allowed_service_tiers: Some(vec!["standard".into(), "flex".into()]),
                ..KeyRequest::default()
            },
        );
        let mut c = s.client();
        let refused = [
            (create("gpt-cache", "", json!({})), "model_not_allowed"),
            (
                create("gpt-test", "", json!({"service_tier": "priority"})),
                "service_tier_not_allowed",
            ),
        ];
        for (frame, code) in &refused {
            c.send(frame);
            let e = c.next_event(T);
            assert_eq!(e["type"], "error", "{backend}: {e}");
            assert_eq!(e["error"]["code"], *code, "{backend}: {e}");
            assert_eq!(e["status"], 403, "{backend}: {e}");
            let mut body = frame.clone();
            body.as_object_mut().unwrap().remove("type");
            let (status, answer) = post_json(&s.addr, "/v1/responses", &s.key, &body);
            assert_eq!(
                (status, answer["error"]["code"].as_str()),
                (403, Some(*code)),
                "{backend}: {answer}"
            );
        }
        assert_eq!(
            s.sim_stats()["responses"],
            0,
            "{backend}: nothing reached the upstream"
        );
        for tier in ["auto", "flex", "default"] {
            c.send(&create("gpt-test", "", json!({"service_tier": tier})));
            let last = c.until_terminal(T).pop().unwrap();
            assert_eq!(
                last["type"], "response.completed",
                "{backend} {tier}: {last}"
            );
        }
        let rows = s.rows(7);
        let billed: Vec<_> = rows.iter().filter(|r| r.cost_nanousd > 0).collect();
        assert_eq!(billed.len(), 3, "{backend}: {rows:?}");
        assert!(
            rows.iter()
                .filter(|r| r.cost_nanousd == 0)
                .all(|r| r.status == "rejected" && r.usage_source == "none"),
            "{backend}: {rows:?}"
        );
        assert_invariant(&wait_rows(&s.db, rows.len() as i64));
        s.finish();
    }
}

/// A reservation is taken at the tier's price: a quota that covers a standard turn's
/// reservation but not a priority one's refuses the priority turn before the upstream.
#[test]
fn reservations_use_the_tiers_price() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        // 1,000 output tokens reserved: $0.01 standard, $0.02 priority.
        let s = stack(
            db,
            KeyRequest {
                quota_nanousd: Some(15_000_000),
                ..KeyRequest::default()
            },
        );
        let mut c = s.client();
        let ask = |tier: &str| {
            create(
                "gpt-test",
                "",
                json!({"service_tier": tier, "max_output_tokens": 1000}),
            )
        };
        c.send(&ask("priority"));
        let e = c.next_event(T);
        assert_eq!(e["error"]["code"], "quota_exhausted", "{backend}: {e}");
        c.send(&ask("default"));
        let last = c.until_terminal(T).pop().unwrap();
        assert_eq!(last["type"], "response.completed", "{backend}: {last}");
        s.finish();
    }
}

/// Codex's `/status` reads the key's quota and the user's balance from the gateway: both
/// paths answer the presented key's standing in the shape Codex parses, and move as turns
/// are billed; without a key, 401.
#[test]
fn codex_usage_answers_the_keys_quota() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(
            db,
            KeyRequest {
                quota_nanousd: Some(100 * STANDARD),
                ..KeyRequest::default()
            },
        );
        exec(&s.db, "UPDATE users SET balance_nanousd = 1000000000");
        let get = |path: &str| common::http(&s.addr, "GET", path, Some(&s.key));
        let (code, before) = get("/api/codex/usage");
        assert_eq!(code, 200, "{backend}: {before}");
        assert_eq!(before["rate_limit"]["primary_window"]["used_percent"], 0);
        assert_eq!(before["rate_limit"]["allowed"], true);
        assert_eq!(before["credits"]["balance"], "1");
        let mut c = s.client();
        for _ in 0..3 {
            c.send(&create("gpt-test", "", json!({})));
            c.until_terminal(T);
        }
        wait_rows(&s.db, 3);
        let (code, after) = get("/backend-api/wham/usage");
        assert_eq!(code, 200, "{backend}: {after}");
        let w = &after["rate_limit"]["primary_window"];
        assert_eq!(w["used_percent"], 3, "{backend}: {after}");
        for f in ["limit_window_seconds", "reset_after_seconds", "reset_at"] {
            assert!(w[f].is_i64(), "{backend}: {f} in {after}");
        }
        assert!(after["plan_type"].is_string());
        assert_eq!(
            after["credits"]["balance"],
            turnpike::billing::money::format_usd(1_000_000_000 - 3 * STANDARD)
        );
        assert_eq!(after["rate_limit"]["secondary_window"]["used_percent"], 1);
        let (code, refused) = common::http(&s.addr, "GET", "/api/codex/usage", None);
        assert_eq!(
            (code, refused["error"]["code"].as_str()),
            (401, Some("missing_api_key"))
        );
        s.finish();
    }
}

/// Operators see a key's allow-lists (`/admin/keys`) and each turn's tier (`/admin/turns`).
#[test]
fn operators_see_allow_lists_and_tiers() {
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[],
        StackOptions {
            account_extra: PRICES,
            key: KeyRequest {
                allowed_models: Some(vec!["gpt-test".into(), "gpt-cache".into()]),
                ..KeyRequest::default()
            },
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    c.send(&create(
        "gpt-cache",
        "cache_write_12h=30",
        json!({"service_tier": "priority"}),
    ));
    c.until_terminal(T);
    s.rows(1);
    let token = Some(common::admin::TOKEN);
    let (code, body) = common::http(&admin, "GET", "/admin/keys", token);
    assert_eq!(code, 200, "{body}");
    let key = &body["keys"][0];
    assert_eq!(key["allowed_models"], json!(["gpt-test", "gpt-cache"]));
    assert!(key["allowed_service_tiers"].is_null());
    assert_eq!(key["revoked"], false);
    let (_, body) = common::http(&admin, "GET", "/admin/turns", token);
    let turn = &body["turns"][0];
    assert_eq!(turn["service_tier"], "priority", "{turn}");
    assert_eq!(turn["cache_write_12h_tokens"], 30, "{turn}");
    // Spend by tier in the metrics: the priority table's 1,000 × $5 + 100 × $30 per million.
    let billed = |tier: &str| {
        common::admin::metric(
            &admin,
            &format!("turnpike_billed_nanousd_total{{service_tier=\"{tier}\"}}"),
        )
    };
    assert_eq!((billed("priority"), billed("standard")), (8_000_000.0, 0.0));
    s.finish();
}

/// Warm-ups (`generate: false`) are billed as the upstream reports them: a warm-up reporting
/// 118,762 input tokens is not free, one over HTTP whose upstream ignored the flag pays its
/// output too, and one reporting nothing used pays nothing — on each backend.
#[test]
fn warmups_are_billed_as_reported() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let s = stack(db, KeyRequest::default());
        let mut c = s.client();
        let warm = |directive: &str| {
            let mut v = create("gpt-test", "", json!({"generate": false}));
            v["metadata"]["sim"] = json!(directive);
            v
        };
        for directive in ["report_input=118762", "report_input=0 report_output=0"] {
            c.send(&warm(directive));
            let last = c.until_terminal(T).pop().unwrap();
            assert_eq!(last["type"], "response.completed", "{backend}: {last}");
        }
        let mut body = warm("report_input=1000 report_output=50");
        body.as_object_mut().unwrap().remove("type");
        let (code, answer) = post_json(&s.addr, "/v1/responses", &s.key, &body);
        assert_eq!(code, 200, "{backend}: {answer}");
        let rows = s.rows(3);
        let billed: Vec<(bool, &str, i64)> = rows
            .iter()
            .map(|r| (r.warmup, r.usage_source.as_str(), r.cost_nanousd))
            .collect();
        assert_eq!(
            billed,
            [
                (true, "reported", 118_762 * 1_250),
                (true, "reported", 0),
                (true, "reported", 1000 * 1_250 + 50 * 10_000),
            ],
            "{backend}"
        );
        assert_invariant(&wait_rows(&s.db, 3));
        s.finish();
    }
}
