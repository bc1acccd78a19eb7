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

/// A pool of `max` connections whose every wait (for a free one, to open one, to check one)
/// is bounded by `timeout`.
fn bounded<C>(
    manager: AsyncDieselConnectionManager<C>,
    max: usize,
    timeout: Option<Duration>,
) -> Result<Pool<C>, deadpool::managed::BuildError>
where
    C: diesel_async::pooled_connection::PoolableConnection + 'static,
    AsyncDieselConnectionManager<C>: deadpool::managed::Manager,
{
    Pool::builder(manager)
        .max_size(max)
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
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
                let url = with_pg_defaults(&url, settings.statement_timeout_ms);
                let manager = AsyncDieselConnectionManager::<AsyncPgConnection>::new(url);
                Ok(Self::Postgres(bounded(
                    manager,
                    settings.pool_max_size,
                    timeout,
                )?))
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
                Ok(Self::Sqlite(bounded(
                    manager,
                    settings.pool_max_size,
                    timeout,
                )?))
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

/// A PostgreSQL URL with the connection settings turnpike relies on, unless the URL sets them:
/// a server-side `statement_timeout` (a runaway statement is cancelled) and TCP keepalives (a
/// peer that vanished without a FIN is noticed on idle pooled connections).
pub fn with_pg_defaults(url: &str, statement_timeout_ms: u64) -> String {
    let mut out = url.to_string();
    let mut add = |param: &str, value: String| {
        if !url.contains(&format!("{param}=")) {
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(param);
            out.push('=');
            out.push_str(&value);
        }
    };
    add(
        "options",
        format!("-c%20statement_timeout%3D{statement_timeout_ms}"),
    );
    add("keepalives", "1".into());
    add("keepalives_idle", "30".into());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_defaults_are_added_unless_set() {
        assert_eq!(
            with_pg_defaults("postgres://u@h/db", 1500),
            "postgres://u@h/db?options=-c%20statement_timeout%3D1500&keepalives=1&keepalives_idle=30"
        );
        assert_eq!(
            with_pg_defaults("postgres://u@h/db?keepalives=0&options=x", 1),
            "postgres://u@h/db?keepalives=0&options=x&keepalives_idle=30"
        );
    }
}
