//! The real binary: key management, configuration errors, and `serve`'s probes and shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers outside #[test]: a panic is a failed test

mod common;

use std::process::Output;
use std::time::Duration;

use common::{Proc, TestDb, http_get, turnpike};
use turnpike::auth::{self, AuthError};

fn run(db: &TestDb, args: &[&str]) -> Output {
    turnpike()
        .env("TURNPIKE_DATABASE__URL", &db.url)
        .args(args)
        .output()
        .expect("run turnpike")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[actix_web::test]
async fn key_lifecycle_through_the_binary() {
    for db in TestDb::all().await {
        let b = db.backend;
        let out = run(
            &db,
            &[
                "--create",
                "users",
                "create",
                "alice",
                "--balance-usd",
                "12.5",
            ],
        );
        assert!(out.status.success(), "{b}: {}", stderr(&out));
        assert!(
            stdout(&out).is_empty(),
            "users create prints nothing on stdout"
        );

        let out = run(
            &db,
            &[
                "keys",
                "create",
                "--user",
                "alice",
                "--quota-usd",
                "3",
                "--max-sessions",
                "2",
                "--models",
                "gpt-a,gpt-b",
                "--service-tiers",
                "standard,flex",
            ],
        );
        assert!(out.status.success(), "{b}: {}", stderr(&out));
        let printed = stdout(&out);
        // stdout is the key and nothing else.
        let key = printed.strip_suffix('\n').expect("newline-terminated");
        assert!(key.starts_with(auth::KEY_SCHEME) && !key.contains(char::is_whitespace));
        assert!(
            !stderr(&out).contains(key),
            "the key must not reach the log"
        );

        let listing = stdout(&run(&db, &["keys", "list"]));
        assert!(
            listing.contains("alice") && listing.contains("active"),
            "{listing}"
        );
        assert!(listing.contains(&key[..12]), "prefix shown: {listing}");
        assert!(
            listing.contains("MODELS") && listing.contains("gpt-a,gpt-b"),
            "allow-lists shown: {listing}"
        );
        assert!(listing.contains("standard,flex"), "{listing}");
        assert!(!listing.contains(key), "full key never listed");
        let users = stdout(&run(&db, &["users", "list"]));
        assert!(users.contains("alice") && users.contains("12.5"), "{users}");

        // The server's own lookup accepts the key…
        let pool = db.pool();
        let p = auth::authenticate(&pool, key)
            .await
            .expect("fresh key authenticates");
        assert_eq!((p.user_name.as_str(), p.max_sessions), ("alice", Some(2)));
        let id = p.key_id.to_string();

        // …until it is revoked.
        let out = run(&db, &["keys", "revoke", &id]);
        assert!(out.status.success(), "{b}: {}", stderr(&out));
        assert!(matches!(
            auth::authenticate(&pool, key).await,
            Err(AuthError::Revoked)
        ));
        assert!(stdout(&run(&db, &["keys", "list"])).contains("revoked"));

        let again = run(&db, &["keys", "revoke", &id]);
        assert_eq!(again.status.code(), Some(1), "{b}");
        let err = stderr(&again);
        assert!(err.starts_with("database: "), "{err}");
        assert_eq!(
            err.lines().count(),
            2,
            "the database, then one error line: {err}"
        );

        // Balance 0 refuses the (new) key of the user.
        let key2 = stdout(&run(&db, &["keys", "create", "--user", "alice"]));
        let out = run(&db, &["users", "set-balance", "alice", "0"]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(matches!(
            auth::authenticate(&pool, key2.trim()).await,
            Err(AuthError::BalanceExhausted)
        ));
        let out = run(&db, &["users", "set-balance", "alice", "none"]);
        assert!(out.status.success());
        auth::authenticate(&pool, key2.trim())
            .await
            .expect("no balance limit");
        drop(pool);
        db.cleanup().await;
    }
}

/// A write command on a database without turnpike tables (a forgotten `--config`) refuses,
/// names the database, and creates nothing; `--create` or `migrate` create it.
#[test]
fn write_commands_refuse_a_new_database() {
    let db = TestDb::sqlite();
    let path = db.url.trim_start_matches("sqlite://").to_string();
    let out = run(&db, &["users", "create", "x"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("database: SQLite {path}")), "{err}");
    assert!(err.contains("holds no turnpike tables"), "{err}");
    assert!(!std::path::Path::new(&path).exists(), "nothing created");
    let listed = run(&db, &["users", "list"]);
    assert_eq!(listed.status.code(), Some(1), "{}", stderr(&listed));
    assert!(
        !std::path::Path::new(&path).exists(),
        "not by a read either"
    );
    let out = run(&db, &["--create", "users", "create", "x"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(run(&db, &["users", "create", "y"]).status.success());
}

#[test]
fn management_errors_are_one_line() {
    let db = TestDb::sqlite();
    assert!(run(&db, &["migrate"]).status.success());
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["keys", "create", "--user", "nobody"],
            1,
            "no user named \"nobody\"",
        ),
        (&["users", "set-balance", "nobody", "1"], 1, "no user named"),
        (
            &["users", "create", "x", "--balance-usd", "1.2.3"],
            2,
            "--balance-usd",
        ),
        (
            &["users", "create", "x", "--balance-usd", "-4"],
            2,
            "must not be negative",
        ),
        (&["users", "create", "  "], 2, "must not be empty"),
    ];
    for (args, code, needle) in cases {
        let out = run(&db, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {err}");
        // The database the command used is named on a line of its own.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("database: "))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(needle),
            "{args:?}: {err}"
        );
    }
    let out = run(&db, &["users", "create", "x"]);
    assert!(out.status.success());
    let out = run(
        &db,
        &[
            "keys",
            "create",
            "--user",
            "x",
            "--quota-usd",
            "0.0000000001",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("more than 9 decimals"));
    assert!(stdout(&out).is_empty(), "no key printed on failure");
}

fn config_error(toml: Option<&str>, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = turnpike();
    cmd.current_dir(dir.path()).arg("migrate");
    if let Some(text) = toml {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(&path);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (out.status.code(), stderr(&out))
}

/// (file text, environment, expected words of the error line)
type ConfigCase<'a> = (Option<&'a str>, &'a [(&'a str, &'a str)], &'a str);

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let cases: &[ConfigCase] = &[
        (
            Some("[server]\nbnd = \"127.0.0.1:1\"\n"),
            &[],
            "server.bnd: unknown key",
        ),
        (
            Some("[sever]\nbind = \"127.0.0.1:1\"\n"),
            &[],
            "sever: unknown key",
        ),
        (Some("[server]\nbind = \"nope\"\n"), &[], "server.bind:"),
        (
            Some("[accounting]\nbatch_max_rows = 6000\n"),
            &[],
            "accounting.batch_max_rows: must be between 1 and 5000",
        ),
        (
            Some("[billing]\nmax_tokens_per_response = 0\n"),
            &[],
            "billing.max_tokens_per_response: must be at least 1",
        ),
        (
            Some(
                "[pricing.default]\ninput_usd_per_mtok = \"1\"\noutput_usd_per_mtok = \"100000\"\n",
            ),
            &[],
            "billing.max_tokens_per_response: at the dearest configured price",
        ),
        (
            Some("[database]\npool_max_size = -1\n"),
            &[],
            "database.pool_max_size:",
        ),
        (
            Some("[database]\nurl = \"mysql://x\"\n"),
            &[],
            "database.url:",
        ),
        (Some("[log]\nformat = \"xml\"\n"), &[], "log.format:"),
        (
            Some("[[accounts]]\nname = \"a\"\nbase_url = \"ftp://x\"\napi_key = \"k\"\n"),
            &[],
            "accounts[0].base_url:",
        ),
        (
            Some("[[accounts]]\nbase_url = \"http://x\"\n"),
            &[],
            "accounts",
        ),
        (Some("this is [not toml"), &[], "config:"),
        (None, &[("TURNPIKE_SERVER__BIND", "x:y")], "server.bind:"),
        (
            None,
            &[("TURNPIKE_ADMIN__BOGUS", "1")],
            "admin.bogus: unknown key",
        ),
        (
            None,
            &[("TURNPIKE_ADMIN_TOKEN", "0123456789abcdef0123456789abcdef")],
            "TURNPIKE_ADMIN_TOKEN: not a setting: section and key are separated by a double underscore (TURNPIKE_ADMIN__TOKEN)",
        ),
        (
            Some("[admin]\ntoken = \"x\"\n"),
            &[],
            "admin.token: at least 32 characters (this one has 1)",
        ),
        (
            Some("[server]\nbind = \"no-such-host.invalid:8080\"\n"),
            &[],
            "server.bind: \"no-such-host.invalid:8080\" is neither IP:port nor a host:port that resolves",
        ),
    ];
    for (toml, env, needle) in cases {
        let (code, err) = config_error(*toml, env);
        assert_eq!(code, Some(2), "{toml:?} {env:?}: {err}");
        assert_eq!(err.lines().count(), 1, "one line, got: {err}");
        assert!(
            err.contains(needle),
            "{toml:?} {env:?}: expected {needle:?} in {err}"
        );
    }
    let (code, err) = config_error(None, &[("TURNPIKE_CONFIG", "/nonexistent/turnpike.toml")]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no such file"), "{err}");
}

/// A listener given as `host:port` is resolved; variables that are no setting but look nothing
/// like one (`TURNPIKE_KEY`, the Codex snippet's key variable) are left alone.
#[test]
fn host_names_bind_and_foreign_variables_pass() {
    let dir = tempfile::tempdir().unwrap();
    let out = turnpike()
        .current_dir(dir.path())
        .env("TURNPIKE_SERVER__BIND", "localhost:0")
        .env("TURNPIKE_ADMIN__BIND", "localhost:0")
        .env("TURNPIKE_KEY", "tpk_for_codex")
        .env(
            "TURNPIKE_DATABASE__URL",
            format!("sqlite://{}/t.db", dir.path().display()),
        )
        .arg("migrate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn shipped_configs_load() {
    for file in ["config/turnpike.toml", "config/demo.toml"] {
        let dir = tempfile::tempdir().unwrap();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = turnpike()
            .current_dir(dir.path())
            .env(
                "TURNPIKE_DATABASE__URL",
                format!("sqlite://{}/t.db", dir.path().display()),
            )
            .arg("--config")
            .arg(&path)
            .arg("migrate")
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", stderr(&out));
    }
}

/// `turnpike serve` on a free port, with one upstream account (never dialled here).
fn start_server(db_url: &str, extra_env: &[(&str, &str)]) -> (Proc, String) {
    start_server_with(
        db_url,
        extra_env,
        "[[accounts]]\nname = \"a\"\nbase_url = \"http://127.0.0.1:9/v1\"\napi_key = \"sk-x\"\n",
    )
}

fn start_server_with(db_url: &str, extra_env: &[(&str, &str)], config: &str) -> (Proc, String) {
    let spool = std::env::temp_dir().join(format!(
        "tp-cli-spool-{}-{}",
        std::process::id(),
        turnpike::sim::monotonic_ns()
    ));
    std::fs::create_dir_all(&spool).unwrap();
    let config_path = spool.with_extension("toml");
    std::fs::write(&config_path, config).unwrap();
    let mut cmd = turnpike();
    cmd.arg("--config").arg(&config_path);
    cmd.env("TURNPIKE_ACCOUNTING__SPOOL_DIR", &spool);
    cmd.env("TURNPIKE_DATABASE__URL", db_url)
        .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
        .env("TURNPIKE_SERVER__WORKERS", "1")
        .env("TURNPIKE_SERVER__SHUTDOWN_GRACE_MS", "2000")
        .arg("serve");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let proc = Proc::spawn(cmd);
    let addr = proc.listening_addr();
    (proc, addr)
}

#[actix_web::test]
async fn serve_probes_and_graceful_stop() {
    for db in TestDb::all().await {
        let (mut server, addr) = start_server(&db.url, &[]);
        let (code, body) = http_get(&addr, "/healthz");
        assert_eq!((code, body["status"].as_str()), (200, Some("ok")));
        let (code, body) = http_get(&addr, "/readyz");
        assert_eq!(code, 200, "{}: {body}", db.backend);
        assert_eq!(body["database"], db.backend);
        let probe = turnpike()
            .env("TURNPIKE_SERVER__BIND", &addr)
            .arg("healthcheck")
            .output()
            .unwrap();
        assert!(probe.status.success(), "{}", stderr(&probe));
        let (code, status, log) = server.terminate();
        assert_eq!(code, Some(0), "{log:?}");
        assert!(status < Duration::from_secs(10), "stop took {status:?}");
        assert!(log.iter().any(|l| l.contains("SIGTERM")), "{log:?}");
        db.cleanup().await;
    }
}

#[test]
fn readyz_reports_pending_migrations() {
    let db = TestDb::sqlite();
    let (mut server, addr) =
        start_server(&db.url, &[("TURNPIKE_DATABASE__MIGRATE_ON_START", "false")]);
    // Not ready throughout; on a loaded machine the first probe may find the database's first
    // connections still opening (a 503 for that), so the reason is awaited, not the first answer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = http_get(&addr, "/readyz");
        assert_eq!(code, 503, "{body}");
        assert_eq!(body["error"]["code"], "not_ready");
        assert_eq!(body["error"]["type"], "service_unavailable");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        if message.contains("migrations pending") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        eprintln!("not ready for another reason first: {message}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(http_get(&addr, "/healthz").0, 200, "alive while not ready");

    // Migrating from the side makes the running server ready.
    let out = run(&db, &["migrate"]);
    assert!(out.status.success());
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    server.terminate();
}

/// No `[[accounts]]`: not ready, and the reason says so.
#[test]
fn readyz_without_accounts() {
    let db = TestDb::sqlite();
    let (mut server, addr) = start_server_with(&db.url, &[], "");
    let (code, body) = http_get(&addr, "/readyz");
    assert_eq!(code, 503, "{body}");
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("no upstream accounts"), "{msg}");
    // The container's HEALTHCHECK says the same: exit 1 with the reason.
    let probe = turnpike()
        .env("TURNPIKE_SERVER__BIND", &addr)
        .arg("healthcheck")
        .output()
        .unwrap();
    assert_eq!(probe.status.code(), Some(1));
    assert!(
        stderr(&probe).contains("not ready") && stderr(&probe).contains("no upstream accounts"),
        "{}",
        stderr(&probe)
    );
    // A turn gets the clear error, not a misleading `account_busy`; the session stays open.
    assert!(run(&db, &["users", "create", "u"]).status.success());
    let key = stdout(&run(&db, &["keys", "create", "--user", "u"]))
        .trim()
        .to_string();
    let mut c = common::ws::Client::bearer(&addr, &key);
    let turn = serde_json::json!({"type": "response.create", "model": "m", "input": "hi"});
    for _ in 0..2 {
        c.send(&turn);
        let e = c.next_event(Duration::from_secs(10));
        assert_eq!(e["error"]["code"], "no_upstream_accounts", "{e}");
        assert_eq!(e["status"], 503);
    }
    server.terminate();
}

/// Two relays on one spool directory: the second refuses to start and names the directory.
#[test]
fn second_process_on_one_spool_refuses_to_start() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let spool_s = spool.to_string_lossy().into_owned();
    let env = [("TURNPIKE_ACCOUNTING__SPOOL_DIR", spool_s.as_str())];
    let (mut first, _) = start_server(&db.url, &env);
    let out = turnpike()
        .env("TURNPIKE_DATABASE__URL", &db.url)
        .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
        .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", &spool)
        .arg("serve")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&spool_s) && err.contains("locked"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, _, _) = first.terminate();
    assert_eq!(code, Some(0));
}

/// A port in use is one clear error naming the address — no panic — for `serve` and `demo`,
/// and `demo` makes no key when it cannot start.
#[test]
fn busy_port_is_one_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/t.db", dir.path().display());
    for args in [vec!["serve"], vec!["demo", "--sim-bind", "127.0.0.1:0"]] {
        let out = turnpike()
            .current_dir(dir.path())
            .env("TURNPIKE_DATABASE__URL", &db_url)
            .env("TURNPIKE_SERVER__BIND", &addr)
            .args(&args)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!("server.bind {addr}")),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: no key printed");
    }
    // Nothing was created: not even the database file.
    assert!(!dir.path().join("t.db").exists());
}

/// Each `demo` revokes the key of the one before: demo keys do not pile up.
#[test]
fn demo_revokes_earlier_demo_keys() {
    let dir = tempfile::tempdir().unwrap();
    let db_url = format!("sqlite://{}/t.db", dir.path().display());
    for _ in 0..2 {
        let (mut child, _) = common::run_demo(
            dir.path(),
            &[
                ("TURNPIKE_DATABASE__URL", &db_url),
                ("TURNPIKE_SERVER__BIND", "127.0.0.1:0"),
            ],
        );
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    let out = turnpike()
        .env("TURNPIKE_DATABASE__URL", &db_url)
        .args(["keys", "list", "--user", "demo"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    let rows: Vec<&str> = listing.lines().filter(|l| l.contains("tpk_")).collect();
    assert_eq!(rows.len(), 2, "{listing}");
    assert_eq!(
        rows.iter().filter(|l| l.contains("revoked")).count(),
        1,
        "the first demo key is revoked: {listing}"
    );
}

/// `users create` for an existing user exits 1; commands that only read do not migrate (and
/// say so on a fresh database); database errors name the database.
#[test]
fn management_exit_codes_read_only_commands_and_database_errors() {
    let db = TestDb::sqlite();
    for cmd in [
        &["users", "list"][..],
        &["keys", "list"],
        &["compensations", "list"],
    ] {
        let out = run(&db, cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("turnpike migrate"),
            "{cmd:?}: {}",
            stderr(&out)
        );
    }
    assert!(run(&db, &["migrate"]).status.success());
    assert!(run(&db, &["users", "create", "ann"]).status.success());
    let again = run(&db, &["users", "create", "ann"]);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    assert!(stderr(&again).contains("exists already"));
    // A PostgreSQL that cannot be reached: the error names host and database, not the user.
    let out = turnpike()
        .env(
            "TURNPIKE_DATABASE__URL",
            "postgres://someone:secret@127.0.0.1:9/nodb",
        )
        .env("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "500")
        .args(["users", "list"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("127.0.0.1:9/nodb"), "{err}");
    assert!(!err.contains("secret"), "{err}");
}

/// `serve` whose database cannot be opened at start says which one (the SQLite path, or the
/// PostgreSQL host:port/db — never the user or a password): an unusable SQLite file stops it;
/// an unreachable PostgreSQL is waited for (docs/DESIGN.md#database-at-start).
#[test]
fn serve_names_the_database_it_cannot_open() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "x").unwrap();
    let out = turnpike()
        .current_dir(dir.path())
        .env(
            "TURNPIKE_DATABASE__URL",
            format!("sqlite://{}/t.db", blocker.display()),
        )
        .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
        .arg("serve")
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    let named = format!("SQLite {}/t.db", blocker.display());
    assert!(err.contains(&named), "{named} in: {err}");

    let mut cmd = turnpike();
    cmd.current_dir(dir.path())
        .env(
            "TURNPIKE_DATABASE__URL",
            "postgres://postgres:secret@127.0.0.1:1/nodb",
        )
        .env("TURNPIKE_DATABASE__CONNECT_TIMEOUT_MS", "500")
        .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
        .arg("serve");
    let relay = Proc::spawn(cmd);
    let mut seen = Vec::new();
    let waiting = common::stack::wait_log(
        &relay,
        "database unreachable at start",
        Duration::from_secs(20),
        &mut seen,
    );
    assert!(waiting, "{seen:?}");
    let line = seen.last().unwrap();
    assert!(line.contains("PostgreSQL 127.0.0.1:1/nodb"), "{line}");
    assert!(!seen.iter().any(|l| l.contains("secret")), "{seen:?}");
    drop(relay);
}

/// A PostgreSQL server that cannot be reached is named with the operating system's reason
/// (the driver's own message alone says only "error connecting to server").
#[test]
fn an_unreachable_postgresql_says_why() {
    let out = turnpike()
        .env(
            "TURNPIKE_DATABASE__URL",
            "postgres://postgres:secret@127.0.0.1:1/x",
        )
        .args(["users", "list"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PostgreSQL 127.0.0.1:1/x") && err.contains("Connection refused"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
}

/// `migrate` says in one line what it applied, or that nothing was pending.
#[test]
fn migrate_says_one_line() {
    let db = TestDb::sqlite();
    let first = stderr(&run(&db, &["migrate"]));
    assert_eq!(first.lines().count(), 1, "{first}");
    assert!(
        first.starts_with("migrations applied (sqlite): 20261122000001, "),
        "{first}"
    );
    let again = stderr(&run(&db, &["migrate"]));
    assert_eq!(again.trim(), "migrations up to date (sqlite)");
}

/// The CLI's changes are audited like the admin API's, as `cli:<user>` from `local`; a top-up
/// adds to the balance.
#[actix_web::test]
async fn cli_changes_are_audited() {
    for db in TestDb::all().await {
        let ok = |args: &[&str]| {
            let out = run(&db, args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            out
        };
        ok(&["--create", "users", "create", "erin", "--balance-usd", "2"]);
        let out = ok(&["users", "top-up", "erin", "0.25"]);
        assert!(
            stderr(&out).contains("balance of erin: 2.25"),
            "{}",
            stderr(&out)
        );
        let key_out = ok(&["keys", "create", "--user", "erin"]);
        let key = stdout(&key_out).trim().to_string();
        let out = run(&db, &["users", "top-up", "nobody", "1"]);
        assert_eq!(out.status.code(), Some(1));
        let rows = turnpike::db::queries::audit::recent(&db.pool(), 10)
            .await
            .unwrap();
        let actions: Vec<&str> = rows.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["keys.create", "users.balance", "users.create"]);
        for r in &rows {
            assert!(r.actor.starts_with("cli:"), "{r:?}");
            assert_eq!(r.peer, "local");
            assert!(!r.detail.contains(&key));
        }
        db.cleanup().await;
    }
}

fn usage_record(
    id: &str,
    key: i64,
    user: i64,
    model: &str,
    days_ago: i64,
) -> turnpike::record::TurnRecord {
    turnpike::record::TurnRecord {
        response_id: Some(format!("resp_{id}")),
        model: model.into(),
        usage: turnpike::protocol::usage::Usage {
            input_tokens: 100,
            cached_input_tokens: 40,
            output_tokens: 7,
            total_tokens: 107,
            ..Default::default()
        },
        accepted_at: turnpike::db::now() - chrono::Duration::days(days_ago),
        service_tier: "standard".into(),
        ..common::turn_record(id, key, user, 1_000 + days_ago)
    }
}

/// Usage rows exported as CSV and JSON lines that say what the table says; daily rollups kept by
/// the database and intact after a purge; the purge spares a row whose debit is unsettled and
/// is audited (docs/DESIGN.md#retention). On each backend.
#[actix_web::test]
async fn usage_export_rollups_and_purge() {
    use turnpike::db::queries;
    for db in TestDb::all().await {
        let pool = db.migrated_pool().await;
        let user = queries::users::create(&pool, "ursula", None).await.unwrap();
        let (_, key) = auth::create_key(&pool, user.id, &turnpike::auth::KeyRequest::default())
            .await
            .unwrap();
        let mut old = usage_record("turn_old_1", key.id, user.id, "m1", 40);
        old.error_code = Some("=1+1,\"x\"".into());
        let records = vec![
            old,
            usage_record("turn_old_2", key.id, user.id, "m1", 40),
            usage_record("turn_old_3", key.id, user.id, "m2", 39),
            usage_record("turn_new_1", key.id, user.id, "m1", 0),
            usage_record("turn_new_2", key.id, user.id, "m2", 0),
        ];
        queries::billing::record_batch(&pool, &records)
            .await
            .unwrap();
        // An old turn whose debit failed: its row must outlive the purge.
        let unsettled = usage_record("turn_old_unsettled", key.id, user.id, "m1", 40);
        queries::billing::record_with_compensation(&pool, &unsettled, "db down")
            .await
            .unwrap();
        let rows = queries::usage::by_key(&pool, key.id).await.unwrap();
        assert_eq!(rows.len(), 6, "{}", db.backend);

        // Rollups: what the rows sum to, per day, key and model.
        let daily = queries::usage::daily(&pool, None, None, None)
            .await
            .unwrap();
        let m1_old = daily
            .iter()
            .find(|(d, _)| d.model == "m1" && d.day == records[0].accepted_at.date())
            .unwrap();
        assert_eq!(
            (
                m1_old.0.turns,
                m1_old.0.input_tokens,
                m1_old.0.cached_input_tokens
            ),
            (3, 300, 120)
        );
        assert_eq!(m1_old.0.cost_nanousd, 3 * 1_040, "{}", db.backend);
        let total: i64 = daily.iter().map(|(d, _)| d.cost_nanousd).sum();
        assert_eq!(total, rows.iter().map(|r| r.cost_nanousd).sum::<i64>());

        // CSV: a header and a line per row, in id order, the formula defused and quoted.
        let out = run(&db, &["usage", "export"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let csv = stdout(&out);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 7, "{csv}");
        assert!(
            lines[0].starts_with("id,request_id,accepted_at,key_prefix,user,"),
            "{}",
            lines[0]
        );
        let ids: Vec<String> = lines[1..]
            .iter()
            .map(|l| l.split(',').next().unwrap().to_string())
            .collect();
        let want: Vec<String> = rows.iter().map(|r| r.id.to_string()).collect();
        assert_eq!(ids, want);
        assert!(lines[1].contains(",\"'=1+1,\"\"x\"\"\","), "{}", lines[1]);
        assert!(
            lines[1].contains(&format!(",{},ursula,", key.key_prefix)),
            "{}",
            lines[1]
        );

        // JSON lines, filtered: the new rows of the key, each what the table holds.
        let today = turnpike::db::now().date().to_string();
        let out = run(
            &db,
            &[
                "usage",
                "export",
                "--format",
                "jsonl",
                "--key",
                &key.key_prefix,
                "--from",
                &today,
            ],
        );
        let got: Vec<serde_json::Value> = stdout(&out)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(got.len(), 2, "{}", stdout(&out));
        for g in &got {
            let row = rows
                .iter()
                .find(|r| r.request_id == g["request_id"])
                .unwrap();
            assert_eq!(g["cost_nanousd"], row.cost_nanousd);
            assert_eq!(g["cached_input_tokens"], row.cached_input_tokens);
            assert!(g["accepted_at"].as_str().unwrap().ends_with('Z'));
        }
        let out = run(&db, &["usage", "export", "--format", "xml"]);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

        // Purge in batches of one: the three settled old rows go, the unsettled one stays, the
        // rollups do not move.
        let cutoff = (turnpike::db::now() - chrono::Duration::days(10))
            .date()
            .to_string();
        let out = run(
            &db,
            &["usage", "purge", "--before", &cutoff, "--batch", "1"],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("purged 3 usage rows"),
            "{}",
            stderr(&out)
        );
        let left: Vec<String> = queries::usage::by_key(&pool, key.id)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect();
        assert_eq!(
            left,
            ["turn_new_1", "turn_new_2", "turn_old_unsettled"],
            "{}",
            db.backend
        );
        let after = queries::usage::daily(&pool, None, None, None)
            .await
            .unwrap();
        assert_eq!(after, daily, "rollups kept");
        let audit = queries::audit::recent(&pool, 1).await.unwrap();
        assert_eq!(audit[0].action, "usage.purge");
        assert!(audit[0].detail.contains("\"rows\":3"), "{:?}", audit[0]);
        drop(pool);
        db.cleanup().await;
    }
}
