//! `api_keys`: only hashes are stored; lookups go by hash.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::{ApiKey, NewApiKey, User};
use crate::db::schema::{api_keys, users};
use crate::db::{DbError, DbPool, now};

pub async fn insert(pool: &DbPool, key: &NewApiKey<'_>) -> Result<ApiKey, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::insert_into(api_keys::table)
            .values(key)
            .returning(ApiKey::as_returning())
            .get_result(c)
            .await?
    }))
}

/// The key with this SHA-256 (hex) and its owner, revoked or not: the caller decides.
pub async fn by_hash(pool: &DbPool, key_hash: &str) -> Result<Option<(ApiKey, User)>, DbError> {
    Ok(with_conn!(pool, |c| {
        api_keys::table
            .inner_join(users::table)
            .filter(api_keys::key_hash.eq(key_hash))
            .select((ApiKey::as_select(), User::as_select()))
            .get_result(c)
            .await
            .optional()?
    }))
}

/// The key with this id and its owner (per-turn admission re-reads it).
pub async fn by_id(pool: &DbPool, id: i64) -> Result<Option<(ApiKey, User)>, DbError> {
    Ok(with_conn!(pool, |c| {
        api_keys::table
            .inner_join(users::table)
            .filter(api_keys::id.eq(id))
            .select((ApiKey::as_select(), User::as_select()))
            .get_result(c)
            .await
            .optional()?
    }))
}

/// All keys with their owner's name, oldest first; only one user's with `user`.
pub async fn list(pool: &DbPool, user: Option<&str>) -> Result<Vec<(ApiKey, String)>, DbError> {
    Ok(with_conn!(pool, |c| {
        let mut q = api_keys::table
            .inner_join(users::table)
            .select((ApiKey::as_select(), users::name))
            .order(api_keys::id)
            .into_boxed();
        if let Some(name) = user {
            q = q.filter(users::name.eq(name));
        }
        q.load(c).await?
    }))
}

/// Revokes a key; `false` when there is no such key or it was revoked already.
pub async fn revoke(pool: &DbPool, id: i64) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::update(
            api_keys::table
                .filter(api_keys::id.eq(id))
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(api_keys::revoked_at.eq(Some(now())))
        .execute(c)
        .await?
    });
    Ok(n == 1)
}

/// A key's limits as an operator changes them: `None` leaves a field, `Some(None)` clears it.
#[derive(Debug, Default, Clone, AsChangeset)]
#[diesel(table_name = api_keys)]
pub struct KeyChange {
    pub label: Option<Option<String>>,
    pub quota_nanousd: Option<Option<i64>>,
    pub max_sessions: Option<Option<i32>>,
    pub max_concurrent_turns: Option<Option<i32>>,
    pub allowed_models: Option<Option<String>>,
    pub allowed_service_tiers: Option<Option<String>>,
}

/// Changes a key that is not revoked; `false` when there is none with this id.
pub async fn update(pool: &DbPool, id: i64, change: &KeyChange) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::update(
            api_keys::table
                .filter(api_keys::id.eq(id))
                .filter(api_keys::revoked_at.is_null()),
        )
        .set(change)
        .execute(c)
        .await?
    });
    Ok(n == 1)
}
