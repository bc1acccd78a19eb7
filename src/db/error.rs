//! The database layer's error.

use diesel::result::{DatabaseErrorKind, Error as QueryError};

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database pool: {0}")]
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
}

impl DbError {
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
