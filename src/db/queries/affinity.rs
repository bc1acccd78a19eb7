//! `account_affinity`: a key's prompt cache or client session → the account that served its
//! last turn (docs/DESIGN.md#routing), with a TTL, shared by every relay on the database.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use crate::db::schema::account_affinity as aa;
use crate::db::{DbError, DbPool, now};

/// The live affinity of (`api_key_id`, `key`): (account, when it was last written).
pub async fn lookup(
    pool: &DbPool,
    api_key_id: i64,
    key: &str,
) -> Result<Option<(String, NaiveDateTime)>, DbError> {
    let at = now();
    Ok(with_conn!(pool, |c| {
        aa::table
            .filter(aa::api_key_id.eq(api_key_id))
            .filter(aa::affinity_key.eq(key))
            .filter(aa::expires_at.gt(at))
            .select((aa::account, aa::updated_at))
            .get_result(c)
            .await
            .optional()?
    }))
}

/// Records that `account` served (`api_key_id`, `key`), until `expires_at`.
pub async fn remember(
    pool: &DbPool,
    api_key_id: i64,
    key: &str,
    account: &str,
    expires_at: NaiveDateTime,
) -> Result<(), DbError> {
    let at = now();
    with_conn!(pool, |c| {
        diesel::insert_into(aa::table)
            .values((
                aa::api_key_id.eq(api_key_id),
                aa::affinity_key.eq(key),
                aa::account.eq(account),
                aa::updated_at.eq(at),
                aa::expires_at.eq(expires_at),
            ))
            .on_conflict((aa::api_key_id, aa::affinity_key))
            .do_update()
            .set((
                aa::account.eq(excluded(aa::account)),
                aa::updated_at.eq(excluded(aa::updated_at)),
                aa::expires_at.eq(excluded(aa::expires_at)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Deletes expired affinities; returns how many.
pub async fn purge_expired(pool: &DbPool) -> Result<usize, DbError> {
    let at = now();
    Ok(with_conn!(pool, |c| {
        diesel::delete(aa::table.filter(aa::expires_at.le(at)))
            .execute(c)
            .await?
    }))
}
