//! Test harness shared by the integration tests: a fresh database per test on each backend
//! (SQLite always; PostgreSQL when `TURNPIKE_TEST_PG_URL` is set), and helpers to run the real
//! binary.
#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a failed test

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use turnpike::config::DatabaseSettings;
use turnpike::db::{DbPool, migrate};

pub const PG_ENV: &str = "TURNPIKE_TEST_PG_URL";

/// A database made for one test; dropped by `cleanup`.
pub struct TestDb {
    pub url: String,
    pub backend: &'static str,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "tp_t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Replaces the database name in a `postgres://…/db?params` URL.
pub fn pg_url_with_db(base: &str, db: &str) -> String {
    let (head, query) = base.split_once('?').unwrap_or((base, ""));
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    if query.is_empty() {
        format!("{root}/{db}")
    } else {
        format!("{root}/{db}?{query}")
    }
}

/// Once per test binary, past the test harness's output capture (straight to the terminal):
/// the PostgreSQL half of the database tests did not run.
fn say_postgres_skipped() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use std::io::Write;
        if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/stderr") {
            let _ = writeln!(
                tty,
                "note: {PG_ENV} is not set: database tests ran on SQLite only (set it to a PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/test, to run them on PostgreSQL too)"
            );
        }
    });
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path: PathBuf = dir.path().join("turnpike.db");
        Self {
            url: format!("sqlite://{}", path.display()),
            backend: "sqlite",
            _dir: Some(dir),
            pg_admin: None,
        }
    }

    pub async fn postgres(base: &str) -> Self {
        let name = unique_name();
        let mut admin = AsyncPgConnection::establish(base)
            .await
            .expect("connect to TURNPIKE_TEST_PG_URL");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create test database");
        Self {
            url: pg_url_with_db(base, &name),
            backend: "postgres",
            _dir: None,
            pg_admin: Some((base.to_string(), name)),
        }
    }

    /// Every backend available here, each a fresh empty database.
    pub async fn all() -> Vec<TestDb> {
        let mut dbs = vec![Self::sqlite()];
        if let Ok(base) = std::env::var(PG_ENV)
            && !base.is_empty()
        {
            dbs.push(Self::postgres(&base).await);
        } else {
            say_postgres_skipped();
        }
        dbs
    }

    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings {
            url: self.url.clone(),
            ..DatabaseSettings::default()
        }
    }

    pub fn pool(&self) -> DbPool {
        DbPool::connect(&self.settings()).expect("pool")
    }

    pub async fn migrated_pool(&self) -> DbPool {
        let pool = self.pool();
        migrate::run_pending(&pool).await.expect("migrate");
        pool
    }

    pub async fn cleanup(mut self) {
        if let Some((base, name)) = self.pg_admin.take() {
            drop_pg_database(&base, &name).await;
        }
    }
}

async fn drop_pg_database(base: &str, name: &str) {
    if let Ok(mut admin) = AsyncPgConnection::establish(base).await {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    }
}

/// A test that fails (panics) before `cleanup` still drops its PostgreSQL database.
impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((base, name)) = self.pg_admin.take() {
            let _ = std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(drop_pg_database(&base, &name))
            })
            .join();
        }
    }
}

/// Runs `body` once per available backend on a fresh, migrated database.
pub async fn on_each_backend<F, Fut>(body: F)
where
    F: Fn(DbPool) -> Fut,
    Fut: Future<Output = ()>,
{
    for db in TestDb::all().await {
        let pool = db.migrated_pool().await;
        eprintln!("-- backend: {}", db.backend);
        body(pool).await;
        db.cleanup().await;
    }
}

/// The real `turnpike` binary, with a clean environment as far as turnpike is concerned.
pub fn turnpike() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnpike"));
    for (k, _) in std::env::vars() {
        if k.starts_with("TURNPIKE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env_remove("RUST_LOG");
    cmd
}

pub mod admin;
pub mod ledger;
pub mod post;
pub mod proxy;
pub mod stack;
pub mod ws;

/// A fresh PostgreSQL database and a proxy in front of the server: the returned URL reaches
/// the database through the proxy (cut or blackholed by the test). `None` without PostgreSQL.
pub fn postgres_behind_proxy() -> Option<(TestDb, proxy::Proxy, String)> {
    let base = std::env::var(PG_ENV).ok().filter(|b| !b.is_empty())?;
    let db = stack::block(TestDb::postgres(&base));
    let host_port = base
        .split('@')
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("127.0.0.1:5432")
        .to_string();
    let proxy = proxy::Proxy::start(&host_port);
    let db_name = db.url.rsplit('/').next().unwrap_or_default().to_string();
    let via_proxy = pg_url_with_db(&base.replace(&host_port, &proxy.addr), &db_name);
    Some((db, proxy, via_proxy))
}

/// A child process whose stderr lines are collected; killed when dropped.
pub struct Proc {
    pub child: std::process::Child,
    pub log: std::sync::mpsc::Receiver<String>,
    /// The lines `listening_addr` read on its way to the address.
    pub startup: std::cell::RefCell<Vec<String>>,
}

impl Proc {
    pub fn spawn(mut cmd: std::process::Command) -> Proc {
        use std::io::BufRead;
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("spawn");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        Proc {
            child,
            log: rx,
            startup: Default::default(),
        }
    }

    /// Waits for the log line `… listening on http://ADDR …` and returns ADDR; a process that
    /// ends first fails the test with its log (a busy port, a bad setting).
    pub fn listening_addr(&self) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let line = match self
                .log
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            {
                Ok(line) => line,
                Err(e) => panic!(
                    "process did not report its address ({e}); its log:\n{}",
                    self.startup.borrow().join("\n")
                ),
            };
            let addr = line
                .split("listening on http://")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .map(str::to_string);
            self.startup.borrow_mut().push(line);
            if let Some(addr) = addr {
                return addr;
            }
        }
    }

    /// The address after `marker` in a line read before the listening line (e.g. the admin
    /// listener's `admin API on http://`).
    pub fn startup_addr(&self, marker: &str) -> Option<String> {
        self.startup.borrow().iter().find_map(|l| {
            let rest = l.split(marker).nth(1)?;
            Some(rest.split(['/', ' ']).next()?.to_string())
        })
    }

    /// SIGTERM, then wait; returns the exit code, how long it took, and the rest of the log.
    pub fn terminate(&mut self) -> (Option<i32>, std::time::Duration, Vec<String>) {
        let t0 = std::time::Instant::now();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success());
        let status = self.child.wait().expect("wait");
        // The reader thread ends at EOF, after the child's last line.
        let log = self.log.iter().collect();
        (status.code(), t0.elapsed(), log)
    }
}

impl Drop for Proc {
    /// A failed assertion must not leave a process running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A plain HTTP/1.1 GET: (status, JSON body or Null).
pub fn http_get(addr: &str, path: &str) -> (u16, serde_json::Value) {
    http(addr, "GET", path, None)
}

/// A plain HTTP/1.1 request with an optional bearer token: (status, JSON body or Null).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
) -> (u16, serde_json::Value) {
    http_with(addr, method, path, bearer, "", "")
}

/// A plain HTTP/1.1 request with more header lines (`extra`, each ending in CRLF) and a body.
pub fn http_with(
    addr: &str,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    extra: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    let auth = bearer.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let status = raw[9..12].parse().expect("status");
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or("");
    let body = if raw
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

pub fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `turnpike demo` in `dir` with these `TURNPIKE_…` settings: the running child and the key
/// it printed, once it printed everything (the line ending in `Ctrl-C stops.`).
pub fn run_demo(
    dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (std::process::Child, Option<String>) {
    use std::io::BufRead;
    let mut cmd = turnpike();
    cmd.current_dir(dir)
        .args(["demo", "--sim-bind", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn demo");
    let stdout = child.stdout.take().expect("stdout");
    let mut key = None;
    for line in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        if let Some(k) = line.trim().strip_prefix("tpk_") {
            key = Some(format!("tpk_{k}"));
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    (child, key)
}

/// `turnpike sim` on a free port, with extra arguments.
pub fn start_sim(args: &[&str]) -> (Proc, String) {
    let mut cmd = turnpike();
    cmd.args(["sim", "--bind", "127.0.0.1:0"]).args(args);
    let p = Proc::spawn(cmd);
    let addr = p.listening_addr();
    (p, addr)
}

/// A finished turn's record as accounting gets it (tests vary the fields they look at).
pub fn turn_record(id: &str, key: i64, user: i64, cost: i64) -> turnpike::record::TurnRecord {
    turnpike::record::TurnRecord {
        request_id: id.into(),
        response_id: None,
        api_key_id: key,
        user_id: user,
        session_id: "sess".into(),
        turn_index: 1,
        account: "sim".into(),
        model: "m".into(),
        status: turnpike::record::TurnStatus::Completed,
        usage_source: turnpike::record::UsageSource::Reported,
        warmup: false,
        usage: turnpike::protocol::usage::Usage {
            input_tokens: 10,
            cache_write_tokens: 5,
            cache_write_30m_tokens: 2,
            cache_write_12h_tokens: 3,
            output_tokens: 4,
            total_tokens: 14,
            ..Default::default()
        },
        cost_nanousd: cost,
        timing: turnpike::record::Timing {
            upstream_wait_ms: Some(1),
            first_event_ms: Some(2),
            first_token_ms: Some(3),
            duration_ms: 9,
        },
        error_code: None,
        accepted_at: turnpike::db::now(),
        set_aside: None,
        block: None,
        origin: turnpike::record::Origin::Create,
        transport: turnpike::record::Transport::Ws,
        upstream_transport: turnpike::record::Transport::Ws,
        service_tier: "priority".into(),
    }
}

/// `v` with what differs between two runs of the same requests — the sim's per-response tags
/// in ids (`resp_sim…`, `msg_sim…`, `call_sim…`, numbered in order of appearance) and the
/// timestamps — made equal, so a direct run and a relayed one compare as a whole.
pub fn normalized(v: &serde_json::Value) -> serde_json::Value {
    fn tags(s: &str, seen: &mut Vec<String>) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(at) = rest.find("sim") {
            let after = &rest[at + 3..];
            let hex = after.bytes().take_while(u8::is_ascii_hexdigit).count();
            if hex < 8 {
                out.push_str(&rest[..at + 3]);
                rest = after;
                continue;
            }
            let tag = &after[..hex];
            let n = seen.iter().position(|t| t == tag).unwrap_or_else(|| {
                seen.push(tag.to_string());
                seen.len() - 1
            });
            out.push_str(&rest[..at]);
            out.push_str(&format!("<tag {n}>"));
            rest = &after[hex..];
        }
        out.push_str(rest);
        out
    }
    fn walk(v: &serde_json::Value, seen: &mut Vec<String>) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::String(s) => Value::String(tags(s, seen)),
            Value::Array(a) => Value::Array(a.iter().map(|x| walk(x, seen)).collect()),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| {
                        let x = match k.as_str() {
                            "created_at" | "completed_at" | "sim_ts_ns" if x.is_number() => {
                                Value::from(0)
                            }
                            _ => walk(x, seen),
                        };
                        (k.clone(), x)
                    })
                    .collect(),
            ),
            other => other.clone(),
        }
    }
    walk(v, &mut Vec::new())
}
