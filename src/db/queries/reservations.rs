//! `turn_reservations` (docs/DESIGN.md#reservations): taken at admission under row locks of the
//! key and the user, so concurrent turns on any number of relays see each other's; settled by
//! the batch that writes the turn's record; expired ones count for nothing and are purged.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::billing::blocks::GiveBack;
use crate::billing::reservation::{Holdings, Refusal, Taken, choose};
use crate::db::schema::{api_keys, turn_reservations as r, users};
use crate::db::{DbError, DbPool, now};

/// A reservation to take.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = crate::db::schema::turn_reservations)]
pub struct NewReservation {
    pub request_id: String,
    pub api_key_id: i64,
    pub user_id: i64,
    pub amount_nanousd: i64,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

impl NewReservation {
    /// The row that gives part of a reservation block back: its negative amount, expiring with
    /// the block's row (docs/DESIGN.md#reservation-blocks).
    pub fn given_back(b: &GiveBack) -> Self {
        Self {
            request_id: b.row_id.clone(),
            api_key_id: b.holder.key,
            user_id: b.holder.user,
            amount_nanousd: -b.amount,
            created_at: now(),
            expires_at: b.holder.expires_at,
        }
    }
}

/// The statements of a reservation, for the async and the blocking connection types.
macro_rules! key_row {
    ($n:expr) => {
        api_keys::table
            .filter(api_keys::id.eq($n.api_key_id))
            .select((api_keys::quota_nanousd, api_keys::spent_nanousd))
    };
}
/// A row written once: a second write of the same id (a retry) changes nothing.
macro_rules! insert_new {
    ($n:expr) => {
        diesel::insert_into(r::table)
            .values($n)
            .on_conflict((r::request_id, r::api_key_id))
            .do_nothing()
    };
}
macro_rules! user_row {
    ($n:expr) => {
        users::table
            .filter(users::id.eq($n.user_id))
            .select(users::balance_nanousd)
    };
}
macro_rules! reserved_by {
    ($column:expr, $id:expr, $at:expr) => {
        r::table
            .filter($column.eq($id))
            .filter(r::expires_at.gt($at))
            .select(r::amount_nanousd)
    };
}

/// What a locked read found: `None` when the key or the user is gone.
fn holdings(
    key: Option<(Option<i64>, i64)>,
    balance: Option<Option<i64>>,
    key_reserved: &[i64],
    user_reserved: &[i64],
) -> Option<Holdings> {
    let (quota, spent) = key?;
    // A total beyond 64 bits counts as the largest amount: it refuses, never admits.
    let total = |v: &[i64]| {
        i64::try_from(v.iter().map(|a| i128::from(*a)).sum::<i128>()).unwrap_or(i64::MAX)
    };
    Some(Holdings {
        quota,
        spent,
        key_reserved: total(key_reserved),
        balance: balance?,
        user_reserved: total(user_reserved),
    })
}

/// Takes `n` if it fits the key's quota and the user's balance with every live reservation —
/// or, asked for `block` (its id and largest size), a block instead when `choose` says so —
/// after writing `given_back` (what the key's previous block left unused); `Ok(Err(_))` says
/// what does not fit. One transaction holding the key's and the user's rows (PostgreSQL:
/// `FOR UPDATE`, key before user as every writer does; SQLite: `BEGIN IMMEDIATE`).
pub async fn reserve(
    pool: &DbPool,
    n: &NewReservation,
    block: Option<(&str, i64)>,
    given_back: Option<&NewReservation>,
) -> Result<Result<Taken, Refusal>, DbError> {
    let given_back = given_back.cloned();
    let at = n.created_at;
    let size = block.map(|(_, size)| size);
    let block = block.map(|(id, _)| id.to_string());
    // The row taken: the turn's own, or the block's.
    let row = move |n: &NewReservation, taken: Taken| match (&block, taken) {
        (Some(id), Taken::Block(size)) => NewReservation {
            request_id: id.clone(),
            amount_nanousd: size,
            ..n.clone()
        },
        _ => n.clone(),
    };
    match pool {
        DbPool::Postgres(p) => {
            let mut c = p.get().await?;
            let n = n.clone();
            c.transaction::<_, DbError, _>(async |tx| {
                let key = key_row!(n).for_update().get_result(tx).await.optional()?;
                let balance = user_row!(n).for_update().get_result(tx).await.optional()?;
                if let Some(g) = &given_back {
                    insert_new!(g).execute(tx).await?;
                }
                let key_reserved: Vec<i64> = reserved_by!(r::api_key_id, n.api_key_id, at)
                    .load(tx)
                    .await?;
                let user_reserved: Vec<i64> =
                    reserved_by!(r::user_id, n.user_id, at).load(tx).await?;
                let Some(h) = holdings(key, balance, &key_reserved, &user_reserved) else {
                    return Ok(Err(Refusal::Quota));
                };
                let taken = match choose(&h, n.amount_nanousd, size) {
                    Ok(taken) => taken,
                    Err(why) => return Ok(Err(why)),
                };
                diesel::insert_into(r::table)
                    .values(&row(&n, taken))
                    .execute(tx)
                    .await?;
                Ok(Ok(taken))
            })
            .await
        }
        DbPool::Sqlite(p) => {
            let mut c = p.get().await?;
            let n = n.clone();
            Ok(c.spawn_blocking(move |conn| {
                use diesel::RunQueryDsl as Sync;
                conn.immediate_transaction::<_, diesel::result::Error, _>(|tx| {
                    let key = Sync::get_result(key_row!(n), tx).optional()?;
                    let balance = Sync::get_result(user_row!(n), tx).optional()?;
                    if let Some(g) = &given_back {
                        Sync::execute(insert_new!(g), tx)?;
                    }
                    let key_reserved: Vec<i64> =
                        Sync::load(reserved_by!(r::api_key_id, n.api_key_id, at), tx)?;
                    let user_reserved: Vec<i64> =
                        Sync::load(reserved_by!(r::user_id, n.user_id, at), tx)?;
                    let Some(h) = holdings(key, balance, &key_reserved, &user_reserved) else {
                        return Ok(Err(Refusal::Quota));
                    };
                    let taken = match choose(&h, n.amount_nanousd, size) {
                        Ok(taken) => taken,
                        Err(why) => return Ok(Err(why)),
                    };
                    Sync::execute(diesel::insert_into(r::table).values(&row(&n, taken)), tx)?;
                    Ok(Ok(taken))
                })
            })
            .await?)
        }
    }
}

/// The reservation of a turn that ended now holds its cost instead of its estimate, until the
/// record that debits it lands (docs/DESIGN.md#reservations); `0` rows when it landed first.
pub async fn settle(
    pool: &DbPool,
    request_id: &str,
    api_key_id: i64,
    cost_nanousd: i64,
) -> Result<usize, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::update(
            r::table
                .filter(r::request_id.eq(request_id))
                .filter(r::api_key_id.eq(api_key_id)),
        )
        .set(r::amount_nanousd.eq(cost_nanousd))
        .execute(c)
        .await?
    }))
}

/// Writes `n` unless a row of its id is there: what a turn that ended costs beyond its draw on
/// a block, or a part of a block given back (docs/DESIGN.md#reservation-blocks).
pub async fn hold(pool: &DbPool, n: &NewReservation) -> Result<usize, DbError> {
    let n = n.clone();
    Ok(with_conn!(pool, |c| insert_new!(&n).execute(c).await?))
}

/// Drops the reservation of a turn that ended before it was taken.
pub async fn release(pool: &DbPool, request_id: &str) -> Result<usize, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::delete(r::table.filter(r::request_id.eq(request_id)))
            .execute(c)
            .await?
    }))
}

/// Drops reservations that expired before `before`; returns how many.
pub async fn purge_expired(pool: &DbPool, before: NaiveDateTime) -> Result<usize, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::delete(r::table.filter(r::expires_at.le(before)))
            .execute(c)
            .await?
    }))
}

/// Live reservation rows and what they hold together: (rows, nano-USD).
pub async fn live(pool: &DbPool) -> Result<(i64, i64), DbError> {
    let at = now();
    let rows: Vec<i64> = with_conn!(pool, |c| {
        r::table
            .filter(r::expires_at.gt(at))
            .select(r::amount_nanousd)
            .load(c)
            .await?
    });
    Ok((
        i64::try_from(rows.len()).unwrap_or(i64::MAX),
        rows.iter().fold(0i64, |sum, a| sum.saturating_add(*a)),
    ))
}
