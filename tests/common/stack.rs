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
    /// More TOML lines for the account.
    pub account_extra: &'a str,
    /// The database URL the relay uses, when not the test database's own (e.g. through a proxy).
    pub relay_db_url: Option<String>,
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
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("relay.toml");
        std::fs::write(
            &config,
            format!(
                "[[accounts]]\nname = \"sim\"\nbase_url = \"http://{sim_addr}/v1\"\napi_key = \"sk-upstream\"\nmax_conns = {}\n{}\n",
                opts.max_conns, opts.account_extra
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
            _config: dir,
        }
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

    pub fn finish(self) {
        let Stack { db, relay, sim, .. } = self;
        drop(relay);
        drop(sim);
        block(db.cleanup());
    }
}
