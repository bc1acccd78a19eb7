//! The database layer's error.

use diesel::result::{DatabaseErrorKind, Error as QueryError};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{}", pool_message(.0))]
    Pool(#[from] diesel_async::pooled_connection::deadpool::PoolError),
    #[error("database pool setup: {0}")]
    Build(#[from] diesel_async::pooled_connection::deadpool::BuildError),
    #[error("database query: {0}")]
    Query(#[from] QueryError),
    #[error("database connection: {0}")]
    Connection(#[from] diesel::ConnectionError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("migrations: {0}")]
    Migration(String),
    #[error("database I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("blocking task: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("database did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The rows do not say what they must (a DBA's edit, a partial restore): nothing is written.
    #[error("{0}")]
    Integrity(String),
}

/// A pool error in an operator's words: what failed and why, with the causes the driver keeps
/// in its source chain ("error connecting to server" alone says nothing).
fn pool_message(e: &diesel_async::pooled_connection::deadpool::PoolError) -> String {
    use diesel_async::pooled_connection::deadpool::PoolError;
    let mut text = match e {
        PoolError::Backend(inner) => format!("cannot connect: {inner}"),
        PoolError::Timeout(_) => "no database connection within database.connect_timeout_ms".into(),
        other => format!("database pool: {other}"),
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let words = cause.to_string();
        if !text.contains(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        source = cause.source();
    }
    text
}

/// Messages of database errors that concern the statement's data, not the database's health.
const CONTENT_MESSAGES: [&str; 5] = [
    "invalid byte sequence",
    "value too long",
    "out of range",
    "invalid input syntax",
    "string or blob too big",
];

impl DbError {
    /// The database refused the statement for its content (a constraint, bytes it cannot
    /// store): sending the same statement again fails again. Everything else — pool and
    /// connection errors, timeouts, locks, serialization failures — may pass on a retry.
    pub fn is_content(&self) -> bool {
        match self {
            DbError::Query(QueryError::DatabaseError(kind, info)) => match kind {
                DatabaseErrorKind::UniqueViolation
                | DatabaseErrorKind::ForeignKeyViolation
                | DatabaseErrorKind::NotNullViolation
                | DatabaseErrorKind::CheckViolation => true,
                _ => {
                    let m = info.message().to_ascii_lowercase();
                    CONTENT_MESSAGES.iter().any(|c| m.contains(c))
                }
            },
            DbError::Query(QueryError::SerializationError(_)) => true,
            _ => false,
        }
    }

    /// The database could not be reached or did not answer: no statement can succeed now.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            DbError::Pool(_)
                | DbError::Connection(_)
                | DbError::Io(_)
                | DbError::Join(_)
                | DbError::Timeout(_)
                | DbError::Query(QueryError::DatabaseError(
                    DatabaseErrorKind::ClosedConnection,
                    _
                ))
                | DbError::Query(QueryError::BrokenTransactionManager)
        )
    }

    pub fn is_unique_violation(&self) -> bool {
        matches!(
            self,
            DbError::Query(QueryError::DatabaseError(
                DatabaseErrorKind::UniqueViolation,
                _
            ))
        )
    }
}
