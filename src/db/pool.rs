//! The backend enum: one `Clone + Send + Sync` value shared by every worker and actor.

use std::time::Duration;

use deadpool::Runtime;
use diesel::SqliteConnection;
use diesel_async::pooled_connection::deadpool::Pool;
use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;

use super::DbError;
use crate::config::{DatabaseSettings, DatabaseTarget};

pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

#[derive(Clone)]
pub enum DbPool {
    Postgres(Pool<AsyncPgConnection>),
    Sqlite(Pool<SqliteConn>),
}

impl std::fmt::Debug for DbPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.backend())
    }
}

impl DbPool {
    /// Builds the pool for `database.url`. Connections open lazily; a SQLite file's parent
    /// directory is created.
    pub fn connect(settings: &DatabaseSettings) -> Result<Self, DbError> {
        let timeout = Some(Duration::from_millis(settings.connect_timeout_ms));
        match DatabaseTarget::parse(&settings.url)? {
            DatabaseTarget::Postgres(url) => {
                let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
                let pool = Pool::builder(manager)
                    .max_size(settings.pool_max_size)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(timeout)
                    .create_timeout(timeout)
                    .build()?;
                Ok(Self::Postgres(pool))
            }
            DatabaseTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let busy_ms = settings.sqlite_busy_timeout_ms;
                let mut config = ManagerConfig::<SqliteConn>::default();
                config.custom_setup = Box::new(move |url| {
                    let url = url.to_string();
                    async move {
                        let mut conn = SqliteConn::establish(&url).await?;
                        // busy_timeout first: even `journal_mode=WAL` takes a lock, and a new
                        // connection opened beside a writer must wait, not fail. WAL lets
                        // readers run beside the writer; FULL makes a commit durable (the
                        // billing path depends on it).
                        conn.batch_execute(&format!(
                            "PRAGMA busy_timeout={busy_ms}; PRAGMA journal_mode=WAL; \
                             PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;"
                        ))
                        .await
                        .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
                        Ok(conn)
                    }
                    .boxed()
                });
                let manager = AsyncDieselConnectionManager::<SqliteConn>::new_with_config(
                    path.to_string_lossy(),
                    config,
                );
                let pool = Pool::builder(manager)
                    .max_size(settings.pool_max_size)
                    .runtime(Runtime::Tokio1)
                    .wait_timeout(timeout)
                    .create_timeout(timeout)
                    .build()?;
                Ok(Self::Sqlite(pool))
            }
        }
    }

    pub fn backend(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Sqlite(_) => "sqlite",
        }
    }
}
