//! The backend enum: one `Clone + Send + Sync` value shared by every worker and actor.

use std::time::Duration;

use deadpool::Runtime;
use deadpool::managed::{Manager, Metrics, RecycleError, RecycleResult};
use diesel::SqliteConnection;
use diesel_async::pooled_connection::{
    AsyncDieselConnectionManager, ManagerConfig, PoolError, PoolableConnection,
};
use diesel_async::sync_connection_wrapper::SyncConnectionWrapper;
use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures_util::FutureExt;

use super::DbError;
use crate::config::{DatabaseSettings, DatabaseTarget};

pub type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

pub type Pool<C> = deadpool::managed::Pool<Checked<C>>;

#[derive(Clone)]
pub enum DbPool {
    Postgres(Pool<AsyncPgConnection>),
    Sqlite(Pool<SqliteConn>),
}

/// A PostgreSQL connection used within this long is lent without a test query
/// (docs/DESIGN.md#database-checkout).
const PG_VERIFY_AFTER_IDLE: Duration = Duration::from_secs(1);

/// diesel-async's manager, with a cheaper check on lending (docs/DESIGN.md#database-checkout):
/// a connection that is broken (an open transaction left behind; for PostgreSQL, a socket the
/// server closed) is never lent; a test query (`SELECT 1`) runs only on a connection idle for
/// `verify_after` — on a busy relay that query doubled every read's round trips.
pub struct Checked<C> {
    inner: AsyncDieselConnectionManager<C>,
    /// `None`: never (a SQLite file has no peer to lose).
    verify_after: Option<Duration>,
}

/// Whether a connection last lent `idle` ago gets the test query.
fn needs_test_query(idle: Duration, verify_after: Option<Duration>) -> bool {
    verify_after.is_some_and(|after| idle >= after)
}

impl<C> Manager for Checked<C>
where
    C: PoolableConnection + Send + 'static,
    AsyncDieselConnectionManager<C>: Manager<Type = C, Error = PoolError>,
{
    type Type = C;
    type Error = PoolError;

    async fn create(&self) -> Result<C, PoolError> {
        self.inner.create().await
    }

    async fn recycle(&self, conn: &mut C, metrics: &Metrics) -> RecycleResult<PoolError> {
        if !needs_test_query(metrics.last_used(), self.verify_after) {
            if conn.is_broken() {
                return Err(RecycleError::message("broken connection"));
            }
            return Ok(());
        }
        self.inner.recycle(conn, metrics).await
    }
}

/// A pool of `max` connections whose every wait (for a free one, to open one, to check one)
/// is bounded by `timeout`.
fn bounded<C>(
    inner: AsyncDieselConnectionManager<C>,
    verify_after: Option<Duration>,
    max: usize,
    timeout: Option<Duration>,
) -> Result<Pool<C>, deadpool::managed::BuildError>
where
    C: PoolableConnection + Send + 'static,
    AsyncDieselConnectionManager<C>: Manager<Type = C, Error = PoolError>,
{
    let manager = Checked {
        inner,
        verify_after,
    };
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
                let (url, tls) = super::tls::split(&url)?;
                let client = tls.client_config()?;
                let mut config = ManagerConfig::<AsyncPgConnection>::default();
                config.custom_setup = Box::new(move |url| tls.connect(url, client.clone()));
                let manager =
                    AsyncDieselConnectionManager::<AsyncPgConnection>::new_with_config(url, config);
                Ok(Self::Postgres(bounded(
                    manager,
                    Some(PG_VERIFY_AFTER_IDLE),
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
                    None,
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
    fn only_a_postgres_connection_idle_for_a_while_gets_a_test_query() {
        let ms = Duration::from_millis;
        assert!(!needs_test_query(ms(999), Some(PG_VERIFY_AFTER_IDLE)));
        assert!(needs_test_query(ms(1000), Some(PG_VERIFY_AFTER_IDLE)));
        assert!(!needs_test_query(Duration::from_secs(3600), None));
    }

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
