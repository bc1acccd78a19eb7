//! Test harness shared by the integration tests: a fresh database per test on each backend
//! (SQLite always; PostgreSQL when `TURNPIKE_TEST_PG_URL` is set), and helpers to run the real
//! binary.
#![allow(dead_code)] // each test file uses its own subset

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

    pub async fn cleanup(self) {
        if let Some((base, name)) = &self.pg_admin
            && let Ok(mut admin) = AsyncPgConnection::establish(base).await
        {
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
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
