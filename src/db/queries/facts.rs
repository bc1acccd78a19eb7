//! `account_facts`: what relays learnt of each upstream account's transport — a 426 to the
//! WebSocket handshake, a refused `stream_id`, a 1009 frame limit — shared by every relay on the
//! database (docs/DESIGN.md#learnt-facts).

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::RunQueryDsl;

use crate::db::schema::account_facts as af;
use crate::db::{DbError, DbPool};

/// One account's facts as stored.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct Facts {
    pub account: String,
    pub http_only: bool,
    pub lanes_refused: bool,
    /// The smallest request frame refused with 1009; 0: none.
    pub refused_frame_bytes: i64,
    pub learnt_at: NaiveDateTime,
}

/// Every account's facts.
pub async fn all(pool: &DbPool) -> Result<Vec<Facts>, DbError> {
    Ok(with_conn!(pool, |c| {
        af::table
            .select((
                af::account,
                af::http_only,
                af::lanes_refused,
                af::refused_frame_bytes,
                af::learnt_at,
            ))
            .order(af::account)
            .load(c)
            .await?
    }))
}

/// Writes `f` — already merged with what the database held — as the account's facts.
pub async fn store(pool: &DbPool, f: &Facts) -> Result<(), DbError> {
    with_conn!(pool, |c| {
        diesel::insert_into(af::table)
            .values((
                af::account.eq(&f.account),
                af::http_only.eq(f.http_only),
                af::lanes_refused.eq(f.lanes_refused),
                af::refused_frame_bytes.eq(f.refused_frame_bytes),
                af::learnt_at.eq(f.learnt_at),
            ))
            .on_conflict(af::account)
            .do_update()
            .set((
                af::http_only.eq(excluded(af::http_only)),
                af::lanes_refused.eq(excluded(af::lanes_refused)),
                af::refused_frame_bytes.eq(excluded(af::refused_frame_bytes)),
                af::learnt_at.eq(excluded(af::learnt_at)),
            ))
            .execute(c)
            .await?
    });
    Ok(())
}

/// Forgets `account`'s facts if they were learnt at or before `learnt_at` (a relay that
/// learnt them again meanwhile keeps them).
pub async fn forget(pool: &DbPool, account: &str, learnt_at: NaiveDateTime) -> Result<(), DbError> {
    with_conn!(pool, |c| {
        diesel::delete(
            af::table
                .filter(af::account.eq(account))
                .filter(af::learnt_at.le(learnt_at)),
        )
        .execute(c)
        .await?
    });
    Ok(())
}
