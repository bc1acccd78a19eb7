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
        status: r.status.as_str(),
        usage_source: r.usage_source.as_str(),
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
        origin: r.origin.as_str(),
        transport: r.transport.as_str(),
        upstream_transport: r.upstream_transport.as_str(),
        service_tier: &r.service_tier,
        cache_write_30m_tokens: count(r.usage.cache_write_30m_tokens),
        cache_write_12h_tokens: count(r.usage.cache_write_12h_tokens),
    }
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

/// The latest `limit` usage rows, newest first, with their key's display prefix; of one key
/// (by its prefix) when `key_prefix` is given.
pub async fn recent(
    pool: &DbPool,
    key_prefix: Option<&str>,
    limit: i64,
) -> Result<Vec<(UsageRow, String)>, DbError> {
    use crate::db::schema::api_keys;
    Ok(with_conn!(pool, |c| {
        let mut q = usage_logs::table
            .inner_join(api_keys::table)
            .select((UsageRow::as_select(), api_keys::key_prefix))
            .order(usage_logs::id.desc())
            .limit(limit)
            .into_boxed();
        if let Some(prefix) = key_prefix {
            q = q.filter(api_keys::key_prefix.eq(prefix.to_string()));
        }
        q.load(c).await?
    }))
}

/// PostgreSQL: usage rows as one array per column (`INSERT … SELECT FROM UNNEST`). The
/// statement text is the same for every batch size and has 31 parameters, where a multi-row
/// `VALUES` has 31 × rows and a text of its own per size, parsed and planned each time.
/// Returns the (request_id, api_key_id) of the rows written (not those already present).
pub async fn insert_pg(
    tx: &mut diesel_async::AsyncPgConnection,
    rows: &[NewUsage<'_>],
) -> diesel::QueryResult<Vec<(String, i64)>> {
    use diesel::sql_types::{Array, BigInt, Bool, Integer, Nullable, Text, Timestamp};
    use diesel_async::RunQueryDsl;

    const SQL: &str = "INSERT INTO usage_logs (request_id, api_key_id, user_id, session_id, \
        turn_index, account, model, status, usage_source, warmup, input_tokens, \
        cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, total_tokens, \
        cost_nanousd, upstream_wait_ms, first_event_ms, first_token_ms, duration_ms, error_code, \
        accepted_at, created_at, response_id, origin, transport, upstream_transport, \
        service_tier, cache_write_30m_tokens, cache_write_12h_tokens) \
        SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::int4[], \
        $6::text[], $7::text[], $8::text[], $9::text[], $10::bool[], $11::int8[], $12::int8[], \
        $13::int8[], $14::int8[], $15::int8[], $16::int8[], $17::int8[], $18::int8[], \
        $19::int8[], $20::int8[], $21::int8[], $22::text[], $23::timestamp[], \
        $24::timestamp[], $25::text[], $26::text[], $27::text[], $28::text[], $29::text[], \
        $30::int8[], $31::int8[]) \
        ON CONFLICT (request_id, api_key_id) DO NOTHING \
        RETURNING request_id, api_key_id";
    let written: Vec<WrittenKey> = diesel::sql_query(SQL)
        .bind::<Array<Text>, _>(column(rows, |r| r.request_id))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.api_key_id))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.user_id))
        .bind::<Array<Text>, _>(column(rows, |r| r.session_id))
        .bind::<Array<Integer>, _>(column(rows, |r| r.turn_index))
        .bind::<Array<Text>, _>(column(rows, |r| r.account))
        .bind::<Array<Text>, _>(column(rows, |r| r.model))
        .bind::<Array<Text>, _>(column(rows, |r| r.status))
        .bind::<Array<Text>, _>(column(rows, |r| r.usage_source))
        .bind::<Array<Bool>, _>(column(rows, |r| r.warmup))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.input_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.cached_input_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.cache_write_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.output_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.reasoning_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.total_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.cost_nanousd))
        .bind::<Array<Nullable<BigInt>>, _>(column(rows, |r| r.upstream_wait_ms))
        .bind::<Array<Nullable<BigInt>>, _>(column(rows, |r| r.first_event_ms))
        .bind::<Array<Nullable<BigInt>>, _>(column(rows, |r| r.first_token_ms))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.duration_ms))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.error_code))
        .bind::<Array<Timestamp>, _>(column(rows, |r| r.accepted_at))
        .bind::<Array<Timestamp>, _>(column(rows, |r| r.created_at))
        .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.response_id))
        .bind::<Array<Text>, _>(column(rows, |r| r.origin))
        .bind::<Array<Text>, _>(column(rows, |r| r.transport))
        .bind::<Array<Text>, _>(column(rows, |r| r.upstream_transport))
        .bind::<Array<Text>, _>(column(rows, |r| r.service_tier))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.cache_write_30m_tokens))
        .bind::<Array<BigInt>, _>(column(rows, |r| r.cache_write_12h_tokens))
        .load(tx)
        .await?;
    Ok(WrittenKey::pairs(written))
}

/// One column of a batch, as the array an `UNNEST` statement binds.
pub fn column<'r, R, T>(rows: &'r [R], f: impl Fn(&'r R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// A `RETURNING request_id, api_key_id` row of a raw statement.
#[derive(diesel::QueryableByName)]
pub struct WrittenKey {
    #[diesel(sql_type = diesel::sql_types::Text)]
    request_id: String,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    api_key_id: i64,
}

impl WrittenKey {
    pub fn pairs(rows: Vec<WrittenKey>) -> Vec<(String, i64)> {
        rows.into_iter()
            .map(|w| (w.request_id, w.api_key_id))
            .collect()
    }
}

/// Which rows an export takes (docs/DESIGN.md#retention): accepted in `[from, to)`, of one key
/// (by its display prefix), of one model.
#[derive(Debug, Clone, Default)]
pub struct ExportFilter {
    pub from: Option<chrono::NaiveDateTime>,
    pub to: Option<chrono::NaiveDateTime>,
    pub key_prefix: Option<String>,
    pub model: Option<String>,
}

/// A usage row with its key's display prefix and its user's name.
#[derive(Debug, Clone)]
pub struct ExportRow {
    pub usage: UsageRow,
    pub key_prefix: String,
    pub user: String,
}

/// Up to `limit` rows of the filter with an id above `after`, by id.
pub async fn export_page(
    pool: &DbPool,
    f: &ExportFilter,
    after: i64,
    limit: i64,
) -> Result<Vec<ExportRow>, DbError> {
    use crate::db::schema::{api_keys, users};
    let rows: Vec<(UsageRow, String, String)> = with_conn!(pool, |c| {
        let mut q = usage_logs::table
            .inner_join(api_keys::table.inner_join(users::table))
            .select((UsageRow::as_select(), api_keys::key_prefix, users::name))
            .filter(usage_logs::id.gt(after))
            .order(usage_logs::id)
            .limit(limit)
            .into_boxed();
        if let Some(from) = f.from {
            q = q.filter(usage_logs::accepted_at.ge(from));
        }
        if let Some(to) = f.to {
            q = q.filter(usage_logs::accepted_at.lt(to));
        }
        if let Some(prefix) = &f.key_prefix {
            q = q.filter(api_keys::key_prefix.eq(prefix.clone()));
        }
        if let Some(model) = &f.model {
            q = q.filter(usage_logs::model.eq(model.clone()));
        }
        q.load(c).await?
    });
    Ok(rows
        .into_iter()
        .map(|(usage, key_prefix, user)| ExportRow {
            usage,
            key_prefix,
            user,
        })
        .collect())
}

/// Deletes up to `batch` rows accepted before `before`, oldest first, keeping any whose debit
/// is not settled (its compensation needs the row). The daily rollups keep their sums. Returns
/// how many went.
pub async fn purge_batch(
    pool: &DbPool,
    before: chrono::NaiveDateTime,
    batch: i64,
) -> Result<usize, DbError> {
    use crate::db::schema::billing_compensations as comp;
    use diesel::dsl::{exists, not};
    Ok(with_conn!(pool, |c| {
        let unsettled = comp::table
            .filter(comp::request_id.eq(usage_logs::request_id))
            .filter(comp::api_key_id.eq(usage_logs::api_key_id))
            .filter(comp::status.ne(crate::record::CompensationStatus::Settled.as_str()));
        // The ids first: diesel cannot delete through a correlated subquery. A compensation is
        // only ever written with its usage row, so an old row cannot gain one in between.
        let ids: Vec<i64> = usage_logs::table
            .filter(usage_logs::accepted_at.lt(before))
            .filter(not(exists(unsettled)))
            .select(usage_logs::id)
            .order(usage_logs::id)
            .limit(batch)
            .load(c)
            .await?;
        if ids.is_empty() {
            0
        } else {
            diesel::delete(usage_logs::table.filter(usage_logs::id.eq_any(&ids)))
                .execute(c)
                .await?
        }
    }))
}

/// Daily rollups (`usage_daily`) of days in `[from, to)`, of one key by its prefix, by day.
pub async fn daily(
    pool: &DbPool,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    key_prefix: Option<&str>,
) -> Result<Vec<(crate::db::models::DailyRow, String)>, DbError> {
    use crate::db::models::DailyRow;
    use crate::db::schema::{api_keys, usage_daily};
    Ok(with_conn!(pool, |c| {
        let mut q = usage_daily::table
            .inner_join(api_keys::table.on(api_keys::id.eq(usage_daily::api_key_id)))
            .select((DailyRow::as_select(), api_keys::key_prefix))
            .order((
                usage_daily::day,
                usage_daily::api_key_id,
                usage_daily::model,
            ))
            .into_boxed();
        if let Some(from) = from {
            q = q.filter(usage_daily::day.ge(from));
        }
        if let Some(to) = to {
            q = q.filter(usage_daily::day.lt(to));
        }
        if let Some(prefix) = key_prefix {
            q = q.filter(api_keys::key_prefix.eq(prefix.to_string()));
        }
        q.load(c).await?
    }))
}
