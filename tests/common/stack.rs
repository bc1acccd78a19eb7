//! A whole stack for end-to-end tests: `turnpike sim` and `turnpike serve` as real processes on
//! free ports, a fresh database, a user and a key.

use std::time::Duration;

use serde_json::Value;
use turnpike::auth::{self, KeyRequest};
use turnpike::db::models::UsageRow;
use turnpike::db::{DbPool, queries};

/// Runs `f` with a fresh pool on the stack's database (one runtime per call).
pub fn with_db<T>(db: &TestDb, f: impl AsyncFnOnce(&DbPool) -> T) -> T {
    block(async {
        let pool = db.pool();
        f(&pool).await
    })
}

use super::ws::Client;
use super::{Proc, TestDb, http_get, start_sim, turnpike};

pub struct Stack {
    pub db: TestDb,
    pub sim: Proc,
    pub sim_addr: String,
    pub relay: Proc,
    pub addr: String,
    pub key: String,
    pub key_id: i64,
    /// The proxy between relay and sim (`StackOptions::upstream_proxy`).
    pub upstream_proxy: Option<super::proxy::Proxy>,
    _config: tempfile::TempDir,
}

/// Runs an async DB call from a sync test.
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    actix_web::rt::System::new().block_on(f)
}

pub struct StackOptions<'a> {
    pub sim_args: &'a [&'a str],
    /// `TURNPIKE_…` overrides for the relay.
    pub env: &'a [(&'a str, &'a str)],
    pub max_conns: usize,
    /// More TOML lines for the account (`SIM_ADDR` stands for the sim's address: more
    /// `[[accounts]]` on the same sim).
    pub account_extra: &'a str,
    /// The database URL the relay uses, when not the test database's own (e.g. through a proxy).
    pub relay_db_url: Option<String>,
    /// A proxy in front of the sim: the relay's account reaches the sim through it.
    pub upstream_proxy: bool,
    pub key: KeyRequest,
}

impl Default for StackOptions<'_> {
    fn default() -> Self {
        Self {
            sim_args: &[],
            env: &[],
            max_conns: 4,
            account_extra: "",
            relay_db_url: None,
            upstream_proxy: false,
            key: KeyRequest::default(),
        }
    }
}

impl Stack {
    pub fn start(db: TestDb, opts: StackOptions<'_>) -> Stack {
        let (key, key_id) = block(async {
            let pool = db.migrated_pool().await;
            let user = queries::users::create(&pool, "tester", None)
                .await
                .expect("user");
            let (key, row) = auth::create_key(&pool, user.id, &opts.key)
                .await
                .expect("key");
            (key, row.id)
        });
        let (sim, sim_addr) = start_sim(opts.sim_args);
        let upstream_proxy = opts
            .upstream_proxy
            .then(|| super::proxy::Proxy::start(&sim_addr));
        let upstream_addr = upstream_proxy
            .as_ref()
            .map_or(sim_addr.clone(), |p| p.addr.clone());
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[[accounts]]\nname = \"sim\"\nbase_url = \"http://{upstream_addr}/v1\"\napi_key = \"sk-upstream\"\nmax_conns = {}\n{}\n",
                opts.max_conns,
                opts.account_extra.replace("SIM_ADDR", &upstream_addr)
            ),
        )
        .expect("config");
        let mut cmd = turnpike();
        cmd.arg("--config")
            .arg(&config)
            .env(
                "TURNPIKE_DATABASE__URL",
                opts.relay_db_url.as_deref().unwrap_or(&db.url),
            )
            .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
            .env("TURNPIKE_SERVER__WORKERS", "2")
            .env("TURNPIKE_SERVER__SHUTDOWN_GRACE_MS", "3000")
            .env("TURNPIKE_LOG__LEVEL", "info,turnpike=debug")
            .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", dir.path().join("spool"))
            .env("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "50")
            .arg("serve");
        for (k, v) in opts.env {
            cmd.env(k, v);
        }
        let relay = Proc::spawn(cmd);
        let addr = relay.listening_addr();
        Stack {
            db,
            sim,
            sim_addr,
            relay,
            addr,
            key,
            key_id,
            upstream_proxy,
            _config: dir,
        }
    }

    /// A stack whose relay reaches a fresh PostgreSQL database through a proxy the test can cut
    /// or blackhole (`None` without PostgreSQL). `env`: more relay settings.
    pub fn behind_pg_proxy(env: &[(&str, &str)]) -> Option<(Stack, super::proxy::Proxy)> {
        let (db, proxy, via_proxy) = super::postgres_behind_proxy()?;
        let s = Stack::start(
            db,
            StackOptions {
                relay_db_url: Some(via_proxy),
                env,
                max_conns: 8,
                ..StackOptions::default()
            },
        );
        Some((s, proxy))
    }

    /// A second relay on this stack's database and config (a spool of its own), with `env`.
    pub fn second_relay(&self, env: &[(&str, &str)]) -> (Proc, String, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = turnpike();
        cmd.envs(env.iter().copied());
        cmd.arg("--config")
            .arg(self.config_path())
            .env("TURNPIKE_DATABASE__URL", &self.db.url)
            .env("TURNPIKE_SERVER__BIND", "127.0.0.1:0")
            .env("TURNPIKE_ACCOUNTING__SPOOL_DIR", dir.path().join("spool"))
            .env("TURNPIKE_ACCOUNTING__FLUSH_INTERVAL_MS", "50")
            .arg("serve");
        let p = Proc::spawn(cmd);
        let addr = p.listening_addr();
        (p, addr, dir)
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self._config.path().join("relay.toml")
    }

    pub fn spool_dir(&self) -> std::path::PathBuf {
        self._config.path().join("spool")
    }

    pub fn client(&self) -> Client {
        Client::bearer(&self.addr, &self.key)
    }

    /// Usage rows of the test key, oldest first, once `n` of them exist (rows land after the
    /// terminal event's acknowledgement, but give the writer a moment).
    pub fn rows(&self, n: usize) -> Vec<UsageRow> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let rows = block(async {
                let pool = self.db.pool();
                queries::usage::by_key(&pool, self.key_id).await
            })
            .expect("rows");
            if rows.len() >= n || std::time::Instant::now() > deadline {
                return rows;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn sim_stats(&self) -> Value {
        http_get(&self.sim_addr, "/sim/stats").1
    }

    pub fn sim_connections(&self) -> Value {
        http_get(&self.sim_addr, "/sim/connections").1
    }

    /// The relay's warnings and errors so far (for failure messages).
    pub fn problems(&self) -> Vec<String> {
        self.relay
            .log
            .try_iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect()
    }

    /// What the relay logged that explains an extra upstream dial: warnings, errors, and the
    /// info lines of a lost connection or a retried turn (at most 20 lines).
    pub fn dial_notes(&self) -> Vec<String> {
        self.relay
            .log
            .try_iter()
            .filter(|l| {
                ["WARN", "ERROR", "lost", "retrying", "failover"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .take(20)
            .collect()
    }

    pub fn finish(self) {
        let Stack { db, relay, sim, .. } = self;
        drop(relay);
        drop(sim);
        block(db.cleanup());
    }
}

/// What the clients of a `load` saw.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Response ids of the turns that ended with `response.completed`.
    pub completed: Vec<String>,
    /// Error codes of the turns that ended with an error event.
    pub errors: Vec<String>,
}

/// `sessions` clients × `turns` turns, each client on its own thread.
pub fn load(
    addr: &str,
    key: &str,
    sessions: usize,
    turns: usize,
    directive: &'static str,
) -> LoadOutcome {
    use super::ws::Recv;
    const T: Duration = Duration::from_secs(20);
    let handles: Vec<_> = (0..sessions)
        .map(|_| {
            let (addr, key) = (addr.to_string(), key.to_string());
            std::thread::spawn(move || {
                let mut seen = LoadOutcome::default();
                let auth = format!("Bearer {key}");
                let mut c = match Client::connect(&addr, "/v1/responses", &[("authorization", &auth)]) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("connect refused: {e:?}");
                        return seen;
                    }
                };
                for _ in 0..turns {
                    c.send(&serde_json::json!({"type": "response.create", "model": "gpt-test", "store": false, "input": "count me", "metadata": {"sim": directive}}));
                    loop {
                        match c.recv(T) {
                            Recv::Json(e) if e["type"] == "response.completed" => {
                                seen.completed.push(e["response"]["id"].as_str().unwrap_or_default().to_string());
                                break;
                            }
                            Recv::Json(e) if e["type"] == "error" => {
                                seen.errors.push(e["error"]["code"].as_str().unwrap_or_default().to_string());
                                break;
                            }
                            Recv::Json(_) | Recv::Ping | Recv::Pong => {}
                            _ => return seen,
                        }
                    }
                }
                seen
            })
        })
        .collect();
    let mut out = LoadOutcome::default();
    for h in handles {
        let o = h.join().unwrap_or_default();
        out.completed.extend(o.completed);
        out.errors.extend(o.errors);
    }
    out
}

/// Collects a process's log lines until one contains `needle` (or `limit` passes); returns
/// whether it was seen. Every line read is appended to `seen`.
pub fn wait_log(p: &Proc, needle: &str, limit: Duration, seen: &mut Vec<String>) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match p.log.recv_timeout(left) {
            Ok(line) => {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}
