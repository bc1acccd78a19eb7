//! `admin_audit`: operator actions, appended, never updated (docs/DESIGN.md#audit).

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::{AuditRow, NewAudit};
use crate::db::schema::admin_audit;
use crate::db::{DbError, DbPool};

pub async fn insert(pool: &DbPool, row: &NewAudit<'_>) -> Result<(), DbError> {
    with_conn!(pool, |c| {
        diesel::insert_into(admin_audit::table)
            .values(row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// The latest actions, newest first.
pub async fn recent(pool: &DbPool, limit: i64) -> Result<Vec<AuditRow>, DbError> {
    Ok(with_conn!(pool, |c| {
        admin_audit::table
            .order(admin_audit::id.desc())
            .limit(limit)
            .select(AuditRow::as_select())
            .load(c)
            .await?
    }))
}
