//! `fleet_slots` (docs/DESIGN.md#fleet-slots): open sessions and turns in flight per key,
//! counted across every relay sharing the database.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::db::schema::{api_keys, fleet_slots as f};
use crate::db::{DbError, DbPool};

/// A slot to take.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = crate::db::schema::fleet_slots)]
pub struct NewFleetSlot {
    pub slot_id: String,
    pub api_key_id: i64,
    pub kind: &'static str,
    pub relay_id: String,
    pub created_at: NaiveDateTime,
    pub expires_at: NaiveDateTime,
}

/// Takes `n` if fewer than `limit` live slots of its kind hold the key (under the key's row
/// lock, so relays taking slots at once see each other's). `Ok(false)`: the key is full.
/// PostgreSQL only: a SQLite database has one relay, whose in-memory count is the count.
pub async fn take(pool: &DbPool, n: &NewFleetSlot, limit: i64) -> Result<bool, DbError> {
    let DbPool::Postgres(p) = pool else {
        return Ok(true);
    };
    let mut c = p.get().await?;
    let n = n.clone();
    c.transaction::<_, DbError, _>(async |tx| {
        api_keys::table
            .filter(api_keys::id.eq(n.api_key_id))
            .select(api_keys::id)
            .for_update()
            .execute(tx)
            .await?;
        let live: i64 = f::table
            .filter(f::api_key_id.eq(n.api_key_id))
            .filter(f::kind.eq(n.kind))
            .filter(f::expires_at.gt(n.created_at))
            .count()
            .get_result(tx)
            .await?;
        if live >= limit {
            return Ok(false);
        }
        diesel::insert_into(f::table).values(&n).execute(tx).await?;
        Ok(true)
    })
    .await
}

/// Gives a slot back.
pub async fn release(pool: &DbPool, slot_id: &str) -> Result<(), DbError> {
    with_conn!(pool, |c| {
        diesel::delete(f::table.filter(f::slot_id.eq(slot_id)))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Keeps a relay's slots alive until `until`; returns how many it holds.
pub async fn heartbeat(
    pool: &DbPool,
    relay_id: &str,
    until: NaiveDateTime,
) -> Result<usize, DbError> {
    Ok(with_conn!(pool, |c| {
        diesel::update(f::table.filter(f::relay_id.eq(relay_id)))
            .set(f::expires_at.eq(until))
            .execute(c)
            .await?
    }))
}

/// Drops a relay's slots (it stops) or every expired one (`relay_id: None`).
pub async fn purge(
    pool: &DbPool,
    relay_id: Option<&str>,
    before: NaiveDateTime,
) -> Result<usize, DbError> {
    Ok(with_conn!(pool, |c| {
        match relay_id {
            Some(r) => {
                diesel::delete(f::table.filter(f::relay_id.eq(r)))
                    .execute(c)
                    .await?
            }
            None => {
                diesel::delete(f::table.filter(f::expires_at.le(before)))
                    .execute(c)
                    .await?
            }
        }
    }))
}
