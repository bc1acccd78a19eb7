//! Database access on SQLite (embedded default) and PostgreSQL through one pool enum.
//! `queries` is the only place that builds SQL; everything else calls its functions.

/// Runs `$body` with `$c` bound to a pooled connection of the pool's concrete backend type.
/// The body is expanded once per backend, so one query function serves both.
macro_rules! with_conn {
    ($pool:expr, |$c:ident| $body:expr) => {
        match $pool {
            $crate::db::DbPool::Postgres(p) => {
                let mut obj = p.get().await?;
                let $c: &mut ::diesel_async::AsyncPgConnection = &mut obj;
                $body
            }
            $crate::db::DbPool::Sqlite(p) => {
                let mut obj = p.get().await?;
                let $c: &mut $crate::db::SqliteConn = &mut obj;
                $body
            }
        }
    };
}

/// A turn's `usage_logs` row(s), ignored when `(request_id, api_key_id)` exists already.
macro_rules! usage_insert {
    ($rows:expr) => {
        diesel::insert_into($crate::db::schema::usage_logs::table)
            .values($rows)
            .on_conflict((
                $crate::db::schema::usage_logs::request_id,
                $crate::db::schema::usage_logs::api_key_id,
            ))
            .do_nothing()
    };
}

pub mod error;
pub mod migrate;
pub mod models;
pub mod pool;
pub mod queries;
pub mod schema;
pub mod tls;

pub use error::DbError;
pub use pool::{DbPool, SqliteConn};

/// Latency-sensitive reads (a turn's admission, a connect's key lookup, readiness) give up
/// after this long: a database that accepts connections but never answers must not hang
/// turns; they fall back to what was read last.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs a database call with a deadline; a call that does not finish in time is an outage
/// (`DbError::Timeout`). The call runs as a task of its own and is never dropped half-way: a
/// late call finishes (and its result is discarded) — dropping an in-flight diesel-async
/// SQLite call panics, and a dropped PostgreSQL call loses its connection.
pub async fn within<T: 'static>(
    limit: std::time::Duration,
    fut: impl Future<Output = Result<T, DbError>> + 'static,
) -> Result<T, DbError> {
    let task = actix_web::rt::spawn(fut);
    match tokio::time::timeout(limit, task).await {
        Ok(Ok(done)) => done,
        Ok(Err(join)) => Err(DbError::Join(join)),
        Err(_) => Err(DbError::Timeout(limit)),
    }
}

/// Current UTC time as stored in `TIMESTAMP` columns on both backends.
pub fn now() -> chrono::NaiveDateTime {
    chrono::Utc::now().naive_utc()
}

/// Why a server cannot be connected to, in the operating system's words (the PostgreSQL driver
/// keeps only "error connecting to server").
pub fn tcp_probe(endpoint: &str) -> String {
    use std::net::ToSocketAddrs;
    let addr = match endpoint.to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => return format!("{endpoint} resolves to no address"),
        Err(e) => return format!("{endpoint}: {e}"),
    };
    match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
        Ok(_) => format!("TCP {endpoint} accepts connections: the server refused the session"),
        Err(e) => format!("TCP {endpoint}: {e}"),
    }
}
