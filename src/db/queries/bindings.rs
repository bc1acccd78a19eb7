//! `response_bindings`: a `store:true` response id → the upstream account that holds it and
//! the key that created it, so a chain continues on the same account, from any relay instance
//! sharing the database.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::schema::response_bindings as rb;
use crate::db::{DbError, DbPool, now};

/// Binds `response_id` (a second write for the same id is ignored).
pub async fn bind(
    pool: &DbPool,
    response_id: &str,
    account: &str,
    api_key_id: i64,
    expires_at: NaiveDateTime,
) -> Result<(), DbError> {
    let at = now();
    with_conn!(pool, |c| {
        diesel::insert_into(rb::table)
            .values((
                rb::response_id.eq(response_id),
                rb::account.eq(account),
                rb::api_key_id.eq(api_key_id),
                rb::created_at.eq(at),
                rb::expires_at.eq(expires_at),
            ))
            .on_conflict(rb::response_id)
            .do_nothing()
            .execute(c)
            .await?
    });
    Ok(())
}

/// The live binding of `response_id`: (account, api_key_id).
pub async fn lookup(pool: &DbPool, response_id: &str) -> Result<Option<(String, i64)>, DbError> {
    let at = now();
    Ok(with_conn!(pool, |c| {
        rb::table
            .filter(rb::response_id.eq(response_id))
            .filter(rb::expires_at.gt(at))
            .select((rb::account, rb::api_key_id))
            .get_result(c)
            .await
            .optional()?
    }))
}

/// Deletes expired bindings; returns how many.
pub async fn purge_expired(pool: &DbPool) -> Result<usize, DbError> {
    let at = now();
    Ok(with_conn!(pool, |c| {
        diesel::delete(rb::table.filter(rb::expires_at.le(at)))
            .execute(c)
            .await?
    }))
}
