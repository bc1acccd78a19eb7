//! Billing tables. The writers come with the accounting actor; the backlog view is read here.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::{BacklogRow, NewCompensation};
use crate::db::schema::billing_compensation_backlog as backlog;
use crate::db::schema::billing_compensations;
use crate::db::{DbError, DbPool};

/// The compensation backlog by status (`pending`, `settled`, `dead`), from the view.
pub async fn compensation_backlog(pool: &DbPool) -> Result<Vec<BacklogRow>, DbError> {
    Ok(with_conn!(pool, |c| {
        backlog::table
            .select((
                backlog::status,
                backlog::rows_count,
                backlog::amount_nanousd,
                backlog::oldest_created_at,
                backlog::oldest_age_s,
                backlog::max_attempts,
            ))
            .order(backlog::status)
            .load::<BacklogRow>(c)
            .await?
    }))
}

/// Records a debit that could not be applied; a second record for the same
/// `(request_id, api_key_id)` is ignored. Returns whether a row was written.
pub async fn insert_compensation(
    pool: &DbPool,
    row: &NewCompensation<'_>,
) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::insert_into(billing_compensations::table)
            .values(row)
            .on_conflict((
                billing_compensations::request_id,
                billing_compensations::api_key_id,
            ))
            .do_nothing()
            .execute(c)
            .await?
    });
    Ok(n == 1)
}
