//! The admin API (docs/DESIGN.md#admin) through the real binary: the token on every route, actor restarts
//! during load (nothing lost, twice in a row), a pool restart with a turn in flight, ending a
//! session, compensations.

mod common;

use std::time::Duration;

use common::admin::{TOKEN, scrape};
use common::ledger::{assert_invariant, wait_rows};
use common::stack::{Stack, StackOptions, block, load};
use common::ws::Recv;
use common::{TestDb, http};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(20);

fn create(directive: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "hi",
        "metadata": {"sim": directive}})
}

/// A stack with the admin API on; returns it and the admin address.
fn stack_with_admin(db: TestDb) -> (Stack, String) {
    common::admin::start(
        db,
        &[],
        StackOptions {
            max_conns: 8,
            ..StackOptions::default()
        },
    )
}

/// Every route the admin API serves (its OpenAPI description lists the same), with sample
/// parameters.
fn routes() -> Vec<(&'static str, String)> {
    turnpike::admin::ROUTES
        .iter()
        .map(|(m, p)| {
            let p = p
                .replace("{name}", "compensator")
                .replace("{id}/retry", "999/retry")
                .replace("{id}", "sess_none")
                .replace("{asset}", "app.js");
            (*m, p)
        })
        .collect()
}

#[test]
fn every_route_needs_the_admin_token() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    for (method, path) in routes() {
        if path == "/metrics" {
            // Scrapeable without the token unless admin.metrics_require_token.
            assert_eq!(http(&admin, method, &path, None).0, 200);
            continue;
        }
        if path.starts_with("/admin/console") {
            // The console's page and assets hold no data: the page asks for the token.
            assert_eq!(http(&admin, method, &path, None).0, 200, "{path}");
            continue;
        }
        for bad in [None, Some("wrong"), Some(&s.key[..])] {
            let (code, body) = http(&admin, method, &path, bad);
            assert_eq!(code, 401, "{method} {path} with {bad:?}: {body}");
            assert_eq!(body["error"]["code"], "admin_unauthorized");
        }
        let (code, body) = http(&admin, method, &path, Some(TOKEN));
        // Routes that change something want a body: without one, a clear 400.
        let refused_body = code == 400 && body["error"]["code"] == "invalid_admin_request";
        assert!(
            code == 200 || code == 404 || refused_body,
            "{method} {path}: {code} {body}"
        );
    }
    // Every refusal above is counted (the log has one line for them, not one each).
    let refusals = common::admin::metric(&admin, "turnpike_admin_refused_total");
    assert!(refusals >= 3.0, "{refusals}");
    let lines = s.problems();
    let logged = lines.iter().filter(|l| l.contains("admin API")).count();
    assert_eq!(logged, 1, "{lines:?}");
    let (code, doc) = http(&admin, "GET", "/admin/openapi.json", Some(TOKEN));
    assert_eq!((code, doc["openapi"].as_str()), (200, Some("3.0.3")));
    // The client listener does not serve the admin API.
    assert_eq!(http(&s.addr, "GET", "/admin/actors", Some(TOKEN)).0, 404);
    s.finish();
}

/// Restarting accounting twice in a row, the compensator, and the pool twice, during load,
/// loses nothing and keeps the sessions streaming; an unknown actor is a 404.
#[test]
fn actor_restarts_during_load_lose_nothing() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let (s, admin) = stack_with_admin(db);
        let (code, body) = http(&admin, "GET", "/admin/actors", Some(TOKEN));
        assert_eq!(code, 200, "{body}");
        let names: Vec<&str> = body["actors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["accounting", "compensator", "pool:sim"]);
        let (addr, key) = (s.addr.clone(), s.key.clone());
        let loader = std::thread::spawn(move || load(&addr, &key, 4, 15, "deltas=3"));
        for n in 1..=2 {
            std::thread::sleep(Duration::from_millis(150));
            let (code, status) = http(
                &admin,
                "POST",
                "/admin/actors/accounting/restart",
                Some(TOKEN),
            );
            assert_eq!(code, 200, "{status}");
            assert_eq!(
                status["restarts"], n,
                "{backend}: two restarts in a row: {status}"
            );
            assert_eq!(status["state"], "running");
        }
        let (code, status) = http(
            &admin,
            "POST",
            "/admin/actors/compensator/restart",
            Some(TOKEN),
        );
        assert_eq!((code, status["restarts"].as_u64()), (200, Some(1)));
        for n in 1..=2 {
            std::thread::sleep(Duration::from_millis(100));
            let (code, status) = http(
                &admin,
                "POST",
                "/admin/actors/pool:sim/restart",
                Some(TOKEN),
            );
            assert_eq!(
                (code, status["restarts"].as_u64()),
                (200, Some(n)),
                "{status}"
            );
        }
        let seen = loader.join().unwrap();
        assert_eq!(seen.completed.len(), 60, "{backend}: {:?}", seen.errors);
        let sums = wait_rows(&s.db, 60);
        assert_eq!(sums.usage_rows, 60, "{backend}");
        assert_invariant(&sums);
        let (code, body) = http(&admin, "POST", "/admin/actors/nope/restart", Some(TOKEN));
        assert_eq!(
            (code, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        s.finish();
    }
}

/// A pool restart with a turn in flight: the turn completes on its connection, which is then
/// retired; the session's next turn runs on a new connection.
#[test]
fn pool_restart_with_a_turn_in_flight() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let mut c = s.client();
    c.send(&create("terminal_delay_ms=600"));
    assert_eq!(c.next_event(T)["type"], "response.created");
    let (code, status) = http(
        &admin,
        "POST",
        "/admin/actors/pool:sim/restart",
        Some(TOKEN),
    );
    assert_eq!(
        (code, status["restarts"].as_u64()),
        (200, Some(1)),
        "{status}"
    );
    let done = c.until_terminal(T);
    assert_eq!(done.last().unwrap()["type"], "response.completed");
    c.send(&create(""));
    assert_eq!(
        c.until_terminal(T).last().unwrap()["type"],
        "response.completed"
    );
    let stats = s.sim_stats();
    assert_eq!(
        stats["accepted"], 2,
        "the second turn ran on a new connection: {stats}"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        s.sim_stats()["open"],
        1,
        "the retired connection was closed"
    );
    s.finish();
}

/// Sessions listed; one ended by an operator: a terminal error event, then close 1001.
#[test]
fn sessions_listed_and_ended() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let mut a = s.client();
    a.send(&create(""));
    a.until_terminal(T);
    let _b = s.client();
    std::thread::sleep(Duration::from_millis(100));
    let (code, body) = http(&admin, "GET", "/admin/sessions", Some(TOKEN));
    assert_eq!(code, 200);
    let list = body["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{body}");
    let with_turn = list.iter().find(|x| x["turns"] == 1).expect("a's session");
    assert_eq!(with_turn["state"], "idle");
    assert_eq!(with_turn["key_prefix"], &s.key[..12]);
    let id = with_turn["id"].as_str().unwrap();
    let (code, _) = http(
        &admin,
        "DELETE",
        &format!("/admin/sessions/{id}"),
        Some(TOKEN),
    );
    assert_eq!(code, 200);
    assert_eq!(a.next_event(T)["error"]["code"], "session_ended");
    match a.recv(T) {
        Recv::Close(code) => assert_eq!(code, 1001),
        other => panic!("{other:?}"),
    }
    let (code, _) = http(
        &admin,
        "DELETE",
        &format!("/admin/sessions/{id}"),
        Some(TOKEN),
    );
    assert_eq!(code, 404, "gone");
    s.finish();
}

/// Every metric is on `/metrics` from the start, at zero, with the label values known then
/// (dashboards and alerts see 0, not "no data").
#[test]
fn every_metric_exists_from_the_start() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let text = scrape(&admin);
    for name in turnpike::telemetry::metric::ALL {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing at start:\n{text}"
        );
    }
    for series in [
        r#"turnpike_compensations{status="dead"} 0"#,
        r#"turnpike_upstream_dial_failures_total{account="sim"} 0"#,
        r#"turnpike_turns_total{status="completed",transport="ws",upstream_transport="ws"} 0"#,
        r#"turnpike_turns_total{status="completed",transport="http",upstream_transport="ws"} 0"#,
        r#"turnpike_turns_total{status="completed",transport="http",upstream_transport="http"} 0"#,
        r#"turnpike_upstream_account_http{account="sim",reason="lanes_refused"} 0"#,
        "turnpike_http_requests_in_flight 0",
        r#"turnpike_handshakes_refused_total{reason="invalid_api_key"} 0"#,
    ] {
        assert!(text.contains(series), "{series} missing at start:\n{text}");
    }
    s.finish();
}

/// `GET /metrics` (Prometheus text, no token needed by default) reflects what the test did:
/// turns by status, sessions open, upstream connections, dials, errors, the accounting backlog.
#[test]
fn metrics_match_what_happened() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let mut c = s.client();
    // The failed turn's connection is dropped (a server error); the next one is dialled and
    // kept by the session between turns.
    for directive in ["error=server_error status=500", "", ""] {
        c.send(&create(directive));
        c.until_terminal(T);
    }
    let _idle = s.client();
    std::thread::sleep(Duration::from_millis(100));
    let text = scrape(&admin);
    let value = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
    };
    assert_eq!(
        value(r#"turnpike_turns_total{status="completed",transport="ws",upstream_transport="ws"}"#),
        2.0
    );
    assert_eq!(
        value(r#"turnpike_turns_total{status="failed",transport="ws",upstream_transport="ws"}"#),
        1.0
    );
    assert_eq!(value("turnpike_sessions_open"), 2.0);
    assert_eq!(
        value(r#"turnpike_upstream_dials_total{account="sim"}"#),
        2.0
    );
    assert_eq!(
        value(r#"turnpike_upstream_connections{account="sim",state="leased"}"#),
        1.0
    );
    assert_eq!(
        value(r#"turnpike_upstream_errors_total{code="server_error"}"#),
        1.0
    );
    assert_eq!(value("turnpike_turn_duration_ms_count"), 3.0);
    assert_eq!(value("turnpike_first_token_ms_count"), 2.0);
    assert_eq!(value("turnpike_accounting_unavailable"), 0.0);
    assert!(
        text.contains("turnpike_accounting_backlog_records"),
        "{text}"
    );
    s.finish();
}

/// The metric names a text queries (`turnpike_…` identifiers).
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("turnpike_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The deploy kit's dashboard and alert rules query only series a running relay exposes
/// (so a renamed metric breaks CI, not a dashboard); every one of them is on `/metrics` of a
/// fresh relay.
#[test]
fn the_deploy_kit_queries_metrics_that_exist() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let text = scrape(&admin);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in [
        "deploy/grafana/turnpike.json",
        "deploy/prometheus/turnpike-rules.yml",
    ] {
        let queried = metric_names(&std::fs::read_to_string(root.join(file)).unwrap());
        assert!(queried.len() >= 8, "{file}: {queried:?}");
        for name in &queried {
            let exposed = text
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")));
            assert!(
                exposed,
                "{file} queries {name}, which /metrics lacks:\n{text}"
            );
        }
    }
    s.finish();
}

/// Users and keys managed through the admin API (docs/DESIGN.md#audit): a user created and
/// topped up, a key created and used, its limits changed and then revoked — each change felt by
/// the relay and written to the audit trail with who and from where; refused changes say why
/// and leave no trace. On each backend.
#[test]
fn users_and_keys_are_managed_and_audited() {
    for db in block(TestDb::all()) {
        let backend = db.backend;
        let (s, admin) = stack_with_admin(db);
        let call = |method: &str, path: &str, body: Value| {
            common::http_with(
                &admin,
                method,
                path,
                Some(TOKEN),
                "X-Turnpike-Operator: alice-ops\r\nContent-Type: application/json\r\n",
                &body.to_string(),
            )
        };
        let (code, user) = call(
            "POST",
            "/admin/users",
            json!({"name": "carol", "balance_usd": "1.00"}),
        );
        assert_eq!(code, 201, "{backend}: {user}");
        assert_eq!(user["balance_nanousd"], 1_000_000_000);
        // Refused changes: taken name, unknown field, no such user, bad amount.
        let (code, e) = call("POST", "/admin/users", json!({"name": "carol"}));
        assert_eq!(
            (code, e["error"]["code"].as_str()),
            (409, Some("already_exists")),
            "{e}"
        );
        let (code, e) = call(
            "POST",
            "/admin/users",
            json!({"name": "dan", "balanse_usd": "1"}),
        );
        assert_eq!(
            (code, e["error"]["code"].as_str()),
            (400, Some("invalid_admin_request"))
        );
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("balanse_usd"),
            "{e}"
        );
        let (code, _) = call(
            "POST",
            "/admin/users/nobody/balance",
            json!({"add_usd": "1"}),
        );
        assert_eq!(code, 404);
        let (code, e) = call(
            "POST",
            "/admin/users/carol/balance",
            json!({"add_usd": "-1"}),
        );
        assert_eq!(code, 400, "{e}");

        let (code, b) = call(
            "POST",
            "/admin/users/carol/balance",
            json!({"add_usd": "0.50"}),
        );
        assert_eq!(
            (code, &b["balance_nanousd"]),
            (200, &json!(1_500_000_000)),
            "{b}"
        );

        let (code, k) = call(
            "POST",
            "/admin/keys",
            json!({"user": "carol", "quota_usd": "2", "allowed_models": ["gpt-test"], "label": "ci"}),
        );
        assert_eq!(code, 201, "{k}");
        let key = k["key"].as_str().unwrap().to_string();
        let id = k["id"].as_i64().unwrap();
        // The new key serves a turn.
        let mut c = common::ws::Client::bearer(&s.addr, &key);
        c.send(&create(""));
        let events = c.until_terminal(T);
        assert_eq!(
            events.last().unwrap()["type"],
            "response.completed",
            "{events:?}"
        );

        // Limits: out of range refused; a new allow-list felt by the relay within its cache.
        let (code, _) = call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            json!({"max_sessions": 0}),
        );
        assert_eq!(code, 400);
        let (code, e) = call("PATCH", &format!("/admin/keys/{id}"), json!({}));
        assert_eq!(code, 400, "{e}");
        let (code, _) = call("PATCH", "/admin/keys/999999", json!({"label": "x"}));
        assert_eq!(code, 404);
        let (code, k2) = call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            json!({"allowed_models": ["gpt-other"], "quota_usd": null}),
        );
        assert_eq!(code, 200, "{k2}");
        assert_eq!(k2["allowed_models"], json!(["gpt-other"]));
        assert_eq!(k2["quota_nanousd"], Value::Null);
        let deadline = std::time::Instant::now() + T;
        let refused = loop {
            c.send(&create(""));
            let last = c.until_terminal(T).pop().unwrap();
            if last["error"]["code"] == "model_not_allowed" || std::time::Instant::now() > deadline
            {
                break last;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(refused["error"]["code"], "model_not_allowed", "{refused}");
        drop(c);

        // Revoked: the key opens no session any more.
        let (code, _) = call("POST", &format!("/admin/keys/{id}/revoke"), json!({}));
        assert_eq!(code, 200);
        let (code, _) = call("POST", &format!("/admin/keys/{id}/revoke"), json!({}));
        assert_eq!(code, 404, "revoked once");
        let auth = format!("Bearer {key}");
        let deadline = std::time::Instant::now() + T;
        let status = loop {
            match common::ws::Client::connect(&s.addr, "/v1/responses", &[("authorization", &auth)])
            {
                Err((status, body)) => break (status, body),
                Ok(_) if std::time::Instant::now() > deadline => {
                    panic!("{backend}: still admitted")
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        assert_eq!(status.0, 401, "{status:?}");
        assert!(status.1.contains("api_key_revoked"), "{status:?}");

        // The user's spend is what their key was billed.
        // (Every turn's record was durable before its client heard the end.)
        let sums = wait_rows(&s.db, 1);
        let (_, users) = call("GET", "/admin/users", json!({}));
        let carol = users["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == "carol")
            .unwrap()
            .clone();
        assert_eq!(carol["keys"], 1);
        assert_eq!(carol["active_keys"], 0);
        assert!(
            carol["created_at"].as_str().unwrap().ends_with('Z'),
            "{carol}"
        );
        assert!(sums.spent > 0, "{sums:?}");
        assert_eq!(carol["spent_nanousd"], sums.spent, "{carol}");

        // An actor restart is an audited action too.
        let (code, _) = call("POST", "/admin/actors/compensator/restart", json!({}));
        assert_eq!(code, 200);

        // The trail: the six actions, newest first, by who and from where; nothing refused.
        let (_, audit) = call("GET", "/admin/audit", json!({}));
        let all = audit["audit"].as_array().unwrap();
        let actions: Vec<&str> = all.iter().map(|r| r["action"].as_str().unwrap()).collect();
        assert_eq!(
            actions,
            [
                "actors.restart",
                "keys.revoke",
                "keys.update",
                "keys.create",
                "users.balance",
                "users.create"
            ],
            "{backend}: {audit}"
        );
        assert_eq!(all[0]["target"], "compensator");
        let rows = &all[1..];
        for r in all {
            assert_eq!(r["actor"], "alice-ops");
            assert!(r["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{r}");
            assert!(r["at"].as_str().unwrap().ends_with('Z'), "{r}");
        }
        assert_eq!(
            rows[0]["target"],
            format!("key {id} ({})", k["key_prefix"].as_str().unwrap())
        );
        assert_eq!(
            rows[1]["detail"],
            json!({"allowed_models": ["gpt-other"], "quota_nanousd": null})
        );
        assert_eq!(rows[3]["detail"]["added_nanousd"], 500_000_000);
        assert!(
            !audit.to_string().contains(&key),
            "the key itself is never in the trail"
        );
        s.finish();
    }
}

/// The admin API's export streams what the table holds (CSV and JSON lines), and the daily
/// rollups count the same turns and cost (docs/DESIGN.md#retention).
#[test]
fn usage_export_and_daily_on_the_admin_api() {
    let (s, admin) = stack_with_admin(TestDb::sqlite());
    let mut c = s.client();
    for _ in 0..3 {
        c.send(&create(""));
        let events = c.until_terminal(T);
        assert_eq!(events.last().unwrap()["type"], "response.completed");
    }
    drop(c);
    let rows = s.rows(3);
    assert_eq!(rows.len(), 3);
    let get = |path: &str| {
        use std::io::{Read, Write};
        let mut conn = std::net::TcpStream::connect(&admin).unwrap();
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        conn.read_to_string(&mut raw).unwrap();
        raw
    };
    let raw = get("/admin/usage/export?format=csv");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "streamed: {raw}"
    );
    assert!(raw.contains("content-type: text/csv"), "{raw}");
    for r in &rows {
        let line = format!("{},{},", r.id, r.request_id);
        assert!(raw.contains(&line), "{line} in {raw}");
    }
    let (code, _) = common::http(&admin, "GET", "/admin/usage/export?format=xml", Some(TOKEN));
    assert_eq!(code, 400);
    let (code, e) = common::http(
        &admin,
        "GET",
        "/admin/usage/export?from=yesterday",
        Some(TOKEN),
    );
    assert_eq!(
        (code, e["error"]["code"].as_str()),
        (400, Some("invalid_admin_request")),
        "{e}"
    );

    let raw = get("/admin/usage/export?format=jsonl&model=gpt-test");
    let body = common::dechunk(raw.split_once("\r\n\r\n").unwrap().1);
    let got: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), 3, "{raw}");
    for (g, r) in got.iter().zip(&rows) {
        assert_eq!(g["request_id"], r.request_id.as_str());
        assert_eq!(g["cost_nanousd"], r.cost_nanousd);
        assert_eq!(g["output_tokens"], r.output_tokens);
    }

    let (code, daily) = common::http(&admin, "GET", "/admin/usage/daily", Some(TOKEN));
    assert_eq!(code, 200, "{daily}");
    let days = daily["days"].as_array().unwrap();
    assert_eq!(days.len(), 1, "{daily}");
    assert_eq!(days[0]["turns"], 3);
    assert_eq!(days[0]["model"], "gpt-test");
    assert_eq!(
        days[0]["cost_nanousd"],
        rows.iter().map(|r| r.cost_nanousd).sum::<i64>()
    );
    assert_eq!(
        days[0]["input_tokens"],
        rows.iter().map(|r| r.input_tokens).sum::<i64>()
    );
    s.finish();
}
