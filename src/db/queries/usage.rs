//! `usage_logs`: one row per turn, idempotent on `(request_id, api_key_id)`.

use diesel::prelude::*;
use diesel_async::RunQueryDsl;

use crate::db::models::{NewUsage, UsageRow};
use crate::db::schema::usage_logs;
use crate::db::{DbError, DbPool, now};
use crate::record::TurnRecord;

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The `usage_logs` row of a record.
pub fn row_of(r: &TurnRecord) -> NewUsage<'_> {
    NewUsage {
        request_id: &r.request_id,
        api_key_id: r.api_key_id,
        user_id: r.user_id,
        session_id: &r.session_id,
        turn_index: r.turn_index,
        account: &r.account,
        model: &r.model,
        status: &r.status,
        usage_source: &r.usage_source,
        warmup: r.warmup,
        input_tokens: count(r.usage.input_tokens),
        cached_input_tokens: count(r.usage.cached_input_tokens),
        cache_write_tokens: count(r.usage.cache_write_tokens),
        output_tokens: count(r.usage.output_tokens),
        reasoning_tokens: count(r.usage.reasoning_tokens),
        total_tokens: count(r.usage.total()),
        cost_nanousd: r.cost_nanousd,
        upstream_wait_ms: r.timing.upstream_wait_ms,
        first_event_ms: r.timing.first_event_ms,
        first_token_ms: r.timing.first_token_ms,
        duration_ms: r.timing.duration_ms,
        error_code: r.error_code.as_deref(),
        accepted_at: r.accepted_at,
        created_at: now(),
        response_id: r.response_id.as_deref(),
    }
}

/// Writes the row of a turn; a second write of the same key is ignored. `true` when written.
pub async fn insert(pool: &DbPool, r: &TurnRecord) -> Result<bool, DbError> {
    let row = row_of(r);
    let n = with_conn!(pool, |c| usage_insert!(&row).execute(c).await?);
    Ok(n == 1)
}

/// Rows of a key, oldest first.
pub async fn by_key(pool: &DbPool, api_key_id: i64) -> Result<Vec<UsageRow>, DbError> {
    Ok(with_conn!(pool, |c| {
        usage_logs::table
            .filter(usage_logs::api_key_id.eq(api_key_id))
            .order(usage_logs::id)
            .select(UsageRow::as_select())
            .load(c)
            .await?
    }))
}
