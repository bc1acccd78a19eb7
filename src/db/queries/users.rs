//! `users`: who owns keys, and the prepaid balance.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::{NewUser, User};
use crate::db::schema::users;
use crate::db::{DbError, DbPool, now};

/// Creates a user; a taken name is a unique violation (`DbError::is_unique_violation`).
pub async fn create(
    pool: &DbPool,
    name: &str,
    balance_nanousd: Option<i64>,
) -> Result<User, DbError> {
    let at = now();
    let row = NewUser {
        name,
        enabled: true,
        balance_nanousd,
        created_at: at,
        updated_at: at,
    };
    Ok(with_conn!(pool, |c| {
        diesel::insert_into(users::table)
            .values(&row)
            .returning(User::as_returning())
            .get_result(c)
            .await?
    }))
}

pub async fn by_name(pool: &DbPool, name: &str) -> Result<Option<User>, DbError> {
    Ok(with_conn!(pool, |c| {
        users::table
            .filter(users::name.eq(name))
            .select(User::as_select())
            .get_result(c)
            .await
            .optional()?
    }))
}

pub async fn list(pool: &DbPool) -> Result<Vec<User>, DbError> {
    Ok(with_conn!(pool, |c| {
        users::table
            .order(users::id)
            .select(User::as_select())
            .load(c)
            .await?
    }))
}

/// Sets (or with `None` removes) the balance limit; `false` when no such user.
pub async fn set_balance(
    pool: &DbPool,
    name: &str,
    balance_nanousd: Option<i64>,
) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::update(users::table.filter(users::name.eq(name)))
            .set((
                users::balance_nanousd.eq(balance_nanousd),
                users::updated_at.eq(now()),
            ))
            .execute(c)
            .await?
    });
    Ok(n == 1)
}

/// Enables or disables every key of a user at once; `false` when no such user.
pub async fn set_enabled(pool: &DbPool, name: &str, enabled: bool) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::update(users::table.filter(users::name.eq(name)))
            .set((users::enabled.eq(enabled), users::updated_at.eq(now())))
            .execute(c)
            .await?
    });
    Ok(n == 1)
}

/// Adds `delta` to a user's balance; the new balance, `None` when no such user or the user has
/// no balance limit (nothing to top up).
pub async fn add_balance(pool: &DbPool, name: &str, delta: i64) -> Result<Option<i64>, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::update(
            users::table
                .filter(users::name.eq(name))
                .filter(users::balance_nanousd.is_not_null()),
        )
        .set((
            users::balance_nanousd.eq(users::balance_nanousd + delta),
            users::updated_at.eq(now()),
        ))
        .returning(users::balance_nanousd)
        .get_result::<Option<i64>>(c)
        .await
        .optional()?
        .flatten()
    }))
}
