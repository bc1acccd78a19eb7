//! Embedded migrations, one directory per backend with the same version names.
//!
//! `AsyncMigrationHarness` panics on actix-rt, and a sync `PgConnection` would need libpq, so
//! one pooled connection is detached and driven through `AsyncConnectionWrapper` on a blocking
//! thread (the runtime thread keeps driving its I/O meanwhile).

use std::collections::HashSet;

use deadpool::managed::Object;
use diesel::QueryableByName;
use diesel::backend::Backend;
use diesel::migration::{Migration, MigrationSource};
use diesel::sql_types::Text;
use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use super::{DbError, DbPool, SqliteConn};

pub const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
pub const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Applies pending migrations; returns the versions applied now (empty when up to date).
pub async fn run_pending(pool: &DbPool) -> Result<Vec<String>, DbError> {
    match pool {
        DbPool::Postgres(p) => {
            let conn = Object::take(p.get().await?);
            tokio::task::spawn_blocking(move || {
                let mut w = AsyncConnectionWrapper::<AsyncPgConnection>::from(conn);
                apply(&mut w, POSTGRES)
            })
            .await?
        }
        DbPool::Sqlite(p) => {
            let conn = Object::take(p.get().await?);
            tokio::task::spawn_blocking(move || {
                let mut w = AsyncConnectionWrapper::<SqliteConn>::from(conn);
                apply(&mut w, SQLITE)
            })
            .await?
        }
    }
}

fn apply<DB: Backend>(
    harness: &mut impl MigrationHarness<DB>,
    source: EmbeddedMigrations,
) -> Result<Vec<String>, DbError> {
    harness
        .run_pending_migrations(source)
        .map(|done| done.iter().map(ToString::to_string).collect())
        .map_err(|e| DbError::Migration(e.to_string()))
}

#[derive(QueryableByName)]
struct AppliedVersion {
    #[diesel(sql_type = Text)]
    version: String,
}

/// Whether a database with `pending` migrations pending holds no turnpike schema yet (every
/// migration pending).
pub fn is_fresh_given(pool: &DbPool, pending: usize) -> Result<bool, DbError> {
    let embedded = match pool {
        DbPool::Postgres(_) => versions::<diesel::pg::Pg>(POSTGRES)?.len(),
        DbPool::Sqlite(_) => versions::<diesel::sqlite::Sqlite>(SQLITE)?.len(),
    };
    Ok(pending == embedded)
}

/// Embedded migrations not yet applied to the database (readiness checks this).
pub async fn pending(pool: &DbPool) -> Result<Vec<String>, DbError> {
    const Q: &str = "SELECT version FROM __diesel_schema_migrations";
    let applied: Vec<AppliedVersion> = with_conn!(pool, |c| {
        match diesel::sql_query(Q).load(c).await {
            Ok(rows) => rows,
            Err(e) if is_missing_table(&e) => Vec::new(),
            Err(e) => return Err(e.into()),
        }
    });
    let embedded = match pool {
        DbPool::Postgres(_) => versions::<diesel::pg::Pg>(POSTGRES)?,
        DbPool::Sqlite(_) => versions::<diesel::sqlite::Sqlite>(SQLITE)?,
    };
    let applied: HashSet<String> = applied.into_iter().map(|a| a.version).collect();
    Ok(embedded
        .into_iter()
        .filter(|v| !applied.contains(v))
        .collect())
}

fn versions<DB: Backend>(source: EmbeddedMigrations) -> Result<Vec<String>, DbError>
where
    EmbeddedMigrations: MigrationSource<DB>,
{
    let migrations: Vec<Box<dyn Migration<DB>>> = source
        .migrations()
        .map_err(|e| DbError::Migration(e.to_string()))?;
    Ok(migrations
        .iter()
        .map(|m| m.name().version().to_string())
        .collect())
}

fn is_missing_table(e: &diesel::result::Error) -> bool {
    let text = e.to_string();
    text.contains("__diesel_schema_migrations")
        && (text.contains("does not exist") || text.contains("no such table"))
}
