//! Billing tables. The writers come with the accounting actor; the backlog view is read here.

use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

use crate::db::models::{BacklogRow, Compensation, NewCompensation, NewLedger};
use crate::db::queries::usage;
use crate::db::schema::billing_compensation_backlog as backlog;
use crate::db::schema::billing_compensations;
use crate::db::schema::{api_keys, billing_ledger, usage_logs, users};
use crate::db::{DbError, DbPool, now};
use crate::record::{CompensationStatus, TurnRecord};

/// The stored fields of a record's row that a replay must match (see `Fingerprint`).
macro_rules! stored_fingerprint {
    ($r:expr) => {
        usage_logs::table
            .filter(usage_logs::request_id.eq($r.request_id.as_str()))
            .filter(usage_logs::api_key_id.eq($r.api_key_id))
            .select((
                usage_logs::status,
                usage_logs::input_tokens,
                usage_logs::output_tokens,
                usage_logs::cost_nanousd,
            ))
    };
}

/// The statement that adds a debit to a key's spend (one statement for the async and the
/// blocking connection types).
macro_rules! spend_update {
    ($key:expr, $amount:expr) => {
        diesel::update(api_keys::table.filter(api_keys::id.eq($key)))
            .set(api_keys::spent_nanousd.eq(api_keys::spent_nanousd + $amount))
    };
}

/// The statement that takes a debit off a user's balance, when the user has one.
macro_rules! balance_update {
    ($user:expr, $amount:expr) => {
        diesel::update(
            users::table
                .filter(users::id.eq($user))
                .filter(users::balance_nanousd.is_not_null()),
        )
        .set(users::balance_nanousd.eq(users::balance_nanousd - $amount))
    };
}

/// The `usage_quarantine` row of a record whose reported usage was set aside: the report as
/// JSON (with the response id and model), and the reason.
struct SetAsideRow {
    payload: String,
    reason: String,
}

fn set_aside_of(r: &TurnRecord) -> Option<SetAsideRow> {
    let s = r.set_aside.as_ref()?;
    let payload = serde_json::json!({
        "reported_usage": s.reported,
        "response_id": r.response_id,
        "model": r.model,
        "billed_usage": r.usage,
        "billed_cost_nanousd": r.cost_nanousd,
    });
    Some(SetAsideRow {
        payload: payload.to_string(),
        reason: format!("implausible usage: {}", s.reason),
    })
}

/// The statement that keeps a set-aside report (one statement for both connection types).
macro_rules! set_aside_insert {
    ($r:expr, $row:expr) => {
        diesel::insert_into(crate::db::schema::usage_quarantine::table).values(
            crate::db::models::NewQuarantine {
                request_id: &$r.request_id,
                api_key_id: $r.api_key_id,
                payload: &$row.payload,
                reason: &$row.reason,
                created_at: now(),
            },
        )
    };
}

/// The statement that settles the reservations of these turn ids (docs/DESIGN.md#reservations):
/// in the transaction that writes their records, so a turn's cost is counted once — reserved,
/// then spent.
macro_rules! reservations_settle {
    ($ids:expr) => {{
        use crate::db::schema::turn_reservations as tr;
        diesel::delete(tr::table.filter(tr::request_id.eq_any($ids)))
    }};
}

/// The statement that takes a turn's draw off its reservation block's row
/// (docs/DESIGN.md#reservation-blocks): in the transaction that writes the turn's usage row, and
/// only when that row is written now, so a replayed record takes nothing twice.
macro_rules! block_settle {
    ($block:expr, $amount:expr) => {{
        use crate::db::schema::turn_reservations as tr;
        diesel::update(tr::table.filter(tr::request_id.eq($block)))
            .set(tr::amount_nanousd.eq(tr::amount_nanousd - $amount))
    }};
}

/// The draws of these records (whose usage rows are written now), summed per block.
fn block_totals<'a>(written: impl IntoIterator<Item = &'a TurnRecord>) -> Vec<(&'a str, i64)> {
    let mut by_block = std::collections::BTreeMap::<&str, i64>::new();
    for d in written.into_iter().filter_map(|r| r.block.as_ref()) {
        let t = by_block.entry(d.block.as_str()).or_insert(0);
        *t = t.saturating_add(d.amount_nanousd);
    }
    by_block.into_iter().collect()
}

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

/// What a batch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Usage rows written now (the others existed already: a replay).
    pub usage_rows: usize,
    /// Debits applied now.
    pub debits: usize,
    /// Records whose key existed already with a different payload (status, tokens or cost):
    /// a replay that does not match what was stored. Counted and logged, never applied.
    pub mismatched: usize,
}

/// The stored fields a replayed record must match.
type Fingerprint = (String, i64, i64, i64);

fn fingerprint(r: &TurnRecord) -> Fingerprint {
    let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    (
        r.status.as_str().to_string(),
        n(r.usage.input_tokens),
        n(r.usage.output_tokens),
        r.cost_nanousd,
    )
}

/// Writes a batch in one transaction: each record's usage row (`ON CONFLICT DO NOTHING`), and for
/// a row written now with a cost, its ledger row and the key's `spent` and the user's balance
/// updates. Replaying a batch changes nothing (the usage row gates the debit).
///
/// PostgreSQL: multi-row INSERTs with RETURNING and one UPDATE per key and per user. SQLite: the
/// same statements row by row on the blocking connection, in one transaction (diesel's SQLite
/// batch insert is sync-only, and an in-process database gains nothing from fewer statements).
pub async fn record_batch(pool: &DbPool, records: &[TurnRecord]) -> Result<BatchOutcome, DbError> {
    match pool {
        DbPool::Postgres(p) => {
            let mut c = p.get().await?;
            let out = c
                .transaction::<_, DbError, _>(async |tx| {
                    let rows: Vec<_> = records.iter().map(usage::row_of).collect();
                    let written = usage::insert_pg(tx, &rows).await?;
                    let ids: Vec<&str> = records.iter().map(|r| r.request_id.as_str()).collect();
                    reservations_settle!(ids).execute(tx).await?;
                    let fresh = keys_of(&written);
                    let drawn = block_totals(
                        records
                            .iter()
                            .filter(|r| fresh.contains(&(r.request_id.as_str(), r.api_key_id))),
                    );
                    for (block, amount) in drawn {
                        block_settle!(block, amount).execute(tx).await?;
                    }
                    for r in records
                        .iter()
                        .filter(|r| fresh.contains(&(r.request_id.as_str(), r.api_key_id)))
                    {
                        if let Some(row) = set_aside_of(r) {
                            set_aside_insert!(r, row).execute(tx).await?;
                        }
                    }
                    let billable = newly_written(records, &fresh);
                    let mut mismatched = 0;
                    for r in records
                        .iter()
                        .filter(|r| !fresh.contains(&(r.request_id.as_str(), r.api_key_id)))
                    {
                        let stored: Option<Fingerprint> =
                            stored_fingerprint!(r).get_result(tx).await.optional()?;
                        mismatched += usize::from(stored.is_some_and(|s| s != fingerprint(r)));
                    }
                    let ledger: Vec<NewLedger<'_>> =
                        billable.iter().map(|r| ledger_of(r)).collect();
                    let debited: Vec<(String, i64)> = if ledger.is_empty() {
                        Vec::new()
                    } else {
                        insert_ledger_pg(tx, &ledger).await?
                    };
                    let debits = newly_written(billable.iter().copied(), &keys_of(&debited));
                    let (by_key, by_user) = debit_totals(&debits);
                    for (key, amount) in &by_key {
                        spend_update!(*key, *amount).execute(tx).await?;
                    }
                    for (user, amount) in &by_user {
                        balance_update!(*user, *amount).execute(tx).await?;
                    }
                    Ok(BatchOutcome {
                        usage_rows: written.len(),
                        debits: debits.len(),
                        mismatched,
                    })
                })
                .await?;
            Ok(out)
        }
        DbPool::Sqlite(p) => {
            let mut c = p.get().await?;
            let records = records.to_vec();
            let out = c
                .spawn_blocking(move |conn| {
                    use diesel::Connection as _;
                    conn.transaction::<_, diesel::result::Error, _>(|tx| {
                        let mut out = BatchOutcome::default();
                        let ids: Vec<&str> =
                            records.iter().map(|r| r.request_id.as_str()).collect();
                        diesel::RunQueryDsl::execute(reservations_settle!(ids), tx)?;
                        let mut debits = Vec::new();
                        let mut fresh = Vec::new();
                        for r in &records {
                            let written =
                                diesel::RunQueryDsl::execute(usage_insert!(&usage::row_of(r)), tx)?;
                            if written == 0 {
                                let stored: Option<Fingerprint> =
                                    diesel::RunQueryDsl::get_result(stored_fingerprint!(r), tx)
                                        .optional()?;
                                out.mismatched +=
                                    usize::from(stored.is_some_and(|s| s != fingerprint(r)));
                                continue;
                            }
                            out.usage_rows += 1;
                            fresh.push(r);
                            if let Some(row) = set_aside_of(r) {
                                diesel::RunQueryDsl::execute(set_aside_insert!(r, row), tx)?;
                            }
                            if r.cost_nanousd == 0 {
                                continue;
                            }
                            let debited = diesel::RunQueryDsl::execute(
                                diesel::insert_into(billing_ledger::table)
                                    .values(&ledger_of(r))
                                    .on_conflict((
                                        billing_ledger::request_id,
                                        billing_ledger::api_key_id,
                                    ))
                                    .do_nothing(),
                                tx,
                            )?;
                            if debited == 1 {
                                debits.push(r.clone());
                            }
                        }
                        for (block, amount) in block_totals(fresh) {
                            diesel::RunQueryDsl::execute(block_settle!(block, amount), tx)?;
                        }
                        let (by_key, by_user) = debit_totals(&debits);
                        for (key, amount) in &by_key {
                            diesel::RunQueryDsl::execute(spend_update!(*key, *amount), tx)?;
                        }
                        for (user, amount) in &by_user {
                            diesel::RunQueryDsl::execute(balance_update!(*user, *amount), tx)?;
                        }
                        out.debits = debits.len();
                        Ok(out)
                    })
                })
                .await?;
            Ok(out)
        }
    }
}

/// PostgreSQL: ledger rows as one array per column (see `usage::insert_pg`); returns the keys
/// of the rows written.
async fn insert_ledger_pg(
    tx: &mut diesel_async::AsyncPgConnection,
    rows: &[NewLedger<'_>],
) -> diesel::QueryResult<Vec<(String, i64)>> {
    use diesel::sql_types::{Array, BigInt, Text, Timestamp};
    const SQL: &str = "INSERT INTO billing_ledger (request_id, api_key_id, user_id, \
        amount_nanousd, created_at) \
        SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::timestamp[]) \
        ON CONFLICT (request_id, api_key_id) DO NOTHING \
        RETURNING request_id, api_key_id";
    let written: Vec<usage::WrittenKey> = diesel::sql_query(SQL)
        .bind::<Array<Text>, _>(usage::column(rows, |r| r.request_id))
        .bind::<Array<BigInt>, _>(usage::column(rows, |r| r.api_key_id))
        .bind::<Array<BigInt>, _>(usage::column(rows, |r| r.user_id))
        .bind::<Array<BigInt>, _>(usage::column(rows, |r| r.amount_nanousd))
        .bind::<Array<Timestamp>, _>(usage::column(rows, |r| r.created_at))
        .load(tx)
        .await?;
    Ok(usage::WrittenKey::pairs(written))
}

fn ledger_of(r: &TurnRecord) -> NewLedger<'_> {
    NewLedger {
        request_id: &r.request_id,
        api_key_id: r.api_key_id,
        user_id: r.user_id,
        amount_nanousd: r.cost_nanousd,
        created_at: now(),
    }
}

/// The `(request_id, api_key_id)` keys a RETURNING clause gave back.
fn keys_of(written: &[(String, i64)]) -> std::collections::HashSet<(&str, i64)> {
    written.iter().map(|(r, k)| (r.as_str(), *k)).collect()
}

/// The records (with a cost) whose key is among `written`.
fn newly_written<'a>(
    records: impl IntoIterator<Item = &'a TurnRecord>,
    written: &std::collections::HashSet<(&str, i64)>,
) -> Vec<&'a TurnRecord> {
    records
        .into_iter()
        .filter(|r| r.cost_nanousd != 0 && written.contains(&(r.request_id.as_str(), r.api_key_id)))
        .collect()
}

/// (id, nano-USD) pairs.
type Totals = Vec<(i64, i64)>;

/// Debit totals per key and per user.
fn debit_totals<R: std::borrow::Borrow<TurnRecord>>(debits: &[R]) -> (Totals, Totals) {
    let mut by_key = std::collections::BTreeMap::new();
    let mut by_user = std::collections::BTreeMap::new();
    for d in debits {
        let d = d.borrow();
        *by_key.entry(d.api_key_id).or_insert(0i128) += i128::from(d.cost_nanousd);
        *by_user.entry(d.user_id).or_insert(0i128) += i128::from(d.cost_nanousd);
    }
    // Each cost is at most `MAX_COST_PER_RESPONSE_NANOUSD` (10^15) and a batch at most 5,000
    // records (both checked at start), so a total always fits.
    let fit = |m: std::collections::BTreeMap<i64, i128>| -> Totals {
        m.into_iter()
            .map(|(id, t)| (id, i64::try_from(t).unwrap_or(i64::MAX)))
            .collect()
    };
    (fit(by_key), fit(by_user))
}

/// A record whose debit failed: its usage row and a `pending` compensation, in a transaction of
/// their own. Returns whether the compensation row was written now.
pub async fn record_with_compensation(
    pool: &DbPool,
    r: &TurnRecord,
    error: &str,
) -> Result<bool, DbError> {
    let at = now();
    let history =
        serde_json::json!([{"at": at.to_string(), "attempt": 0, "error": error}]).to_string();
    Ok(with_conn!(pool, |c| {
        c.transaction::<_, DbError, _>(async |tx| {
            let written = usage_insert!(&usage::row_of(r)).execute(tx).await?;
            reservations_settle!([r.request_id.as_str()])
                .execute(tx)
                .await?;
            if written == 1 {
                for (block, amount) in block_totals([r]) {
                    block_settle!(block, amount).execute(tx).await?;
                }
                if let Some(row) = set_aside_of(r) {
                    set_aside_insert!(r, row).execute(tx).await?;
                }
            }
            let n = diesel::insert_into(billing_compensations::table)
                .values((
                    billing_compensations::request_id.eq(r.request_id.as_str()),
                    billing_compensations::api_key_id.eq(r.api_key_id),
                    billing_compensations::user_id.eq(r.user_id),
                    billing_compensations::amount_nanousd.eq(r.cost_nanousd),
                    billing_compensations::status.eq(CompensationStatus::Pending.as_str()),
                    billing_compensations::next_attempt_at.eq(Some(at)),
                    billing_compensations::last_error.eq(Some(error)),
                    billing_compensations::error_history.eq(&history),
                    billing_compensations::created_at.eq(at),
                    billing_compensations::updated_at.eq(at),
                ))
                .on_conflict((
                    billing_compensations::request_id,
                    billing_compensations::api_key_id,
                ))
                .do_nothing()
                .execute(tx)
                .await?;
            Ok(n == 1)
        })
        .await?
    }))
}

/// Keeps a record the database refused for its content, with the reason (docs/DESIGN.md#nothing-lost).
pub async fn quarantine(
    pool: &DbPool,
    r: &TurnRecord,
    payload: &str,
    reason: &str,
) -> Result<(), DbError> {
    let row = crate::db::models::NewQuarantine {
        request_id: &r.request_id,
        api_key_id: r.api_key_id,
        payload,
        reason,
        created_at: now(),
    };
    with_conn!(pool, |c| {
        diesel::insert_into(crate::db::schema::usage_quarantine::table)
            .values(&row)
            .execute(c)
            .await?
    });
    Ok(())
}

/// Quarantined records, oldest first: (request_id, api_key_id, reason).
pub async fn quarantined(pool: &DbPool) -> Result<Vec<(String, i64, String)>, DbError> {
    use crate::db::schema::usage_quarantine as q;
    Ok(with_conn!(pool, |c| {
        q::table
            .order(q::id)
            .select((q::request_id, q::api_key_id, q::reason))
            .load(c)
            .await?
    }))
}

/// Compensations by status (all when `None`), oldest first.
/// Compensations, oldest first, each with its key's display prefix (what operators know a key by).
pub async fn compensations(
    pool: &DbPool,
    status: Option<CompensationStatus>,
    limit: Option<i64>,
) -> Result<Vec<(Compensation, String)>, DbError> {
    Ok(with_conn!(pool, |c| {
        let mut q = billing_compensations::table
            .inner_join(api_keys::table)
            .select((Compensation::as_select(), api_keys::key_prefix))
            .order(billing_compensations::id)
            .into_boxed();
        if let Some(s) = status {
            q = q.filter(billing_compensations::status.eq(s.as_str()));
        }
        // The database stops at the limit (the admin API's page), rather than loading all.
        if let Some(n) = limit {
            q = q.limit(n);
        }
        q.load(c).await?
    }))
}

/// Pending compensations due now (at most `limit`).
pub async fn due_compensations(pool: &DbPool, limit: i64) -> Result<Vec<Compensation>, DbError> {
    let at = now();
    Ok(with_conn!(pool, |c| {
        billing_compensations::table
            .filter(billing_compensations::status.eq(CompensationStatus::Pending.as_str()))
            .filter(billing_compensations::next_attempt_at.le(at))
            .order(billing_compensations::next_attempt_at)
            .limit(limit)
            .select(Compensation::as_select())
            .load(c)
            .await?
    }))
}

/// Claims a due row for one attempt: counts the attempt and schedules the next one in the same
/// UPDATE (a worker that dies mid-attempt leaves a row that simply comes due again). `false`
/// when another worker claimed it first.
pub async fn claim_compensation(
    pool: &DbPool,
    row: &Compensation,
    retry_at: chrono::NaiveDateTime,
) -> Result<bool, DbError> {
    let n = with_conn!(pool, |c| {
        diesel::update(
            billing_compensations::table
                .filter(billing_compensations::id.eq(row.id))
                .filter(billing_compensations::status.eq(CompensationStatus::Pending.as_str()))
                .filter(billing_compensations::attempts.eq(row.attempts)),
        )
        .set((
            billing_compensations::attempts.eq(row.attempts + 1),
            billing_compensations::next_attempt_at.eq(Some(retry_at)),
            billing_compensations::updated_at.eq(now()),
        ))
        .execute(c)
        .await?
    });
    Ok(n == 1)
}

/// Applies a compensation's debit and marks it settled, in one transaction. A debit that the
/// ledger already holds is not applied twice.
pub async fn settle_compensation(pool: &DbPool, row: &Compensation) -> Result<(), DbError> {
    let at = now();
    with_conn!(pool, |c| {
        c.transaction::<_, DbError, _>(async |tx| {
            // The write first: on SQLite a transaction that reads before it writes cannot take
            // the write lock once another connection committed meanwhile (SQLITE_BUSY at once,
            // no busy wait), which under concurrent writers spent every attempt.
            diesel::update(
                billing_compensations::table.filter(billing_compensations::id.eq(row.id)),
            )
            .set((
                billing_compensations::status.eq(CompensationStatus::Settled.as_str()),
                billing_compensations::settled_at.eq(Some(at)),
                billing_compensations::next_attempt_at.eq(None::<chrono::NaiveDateTime>),
                billing_compensations::updated_at.eq(at),
            ))
            .execute(tx)
            .await?;
            // A debit without its turn's usage row would break the money invariant: the
            // compensation fails instead (and goes dead after its attempts, for an operator);
            // the error rolls the settlement back.
            let rows: i64 = crate::db::schema::usage_logs::table
                .filter(crate::db::schema::usage_logs::request_id.eq(&row.request_id))
                .filter(crate::db::schema::usage_logs::api_key_id.eq(row.api_key_id))
                .count()
                .get_result(tx)
                .await?;
            if rows == 0 {
                return Err(DbError::Integrity(format!(
                    "the usage row of turn {} (key {}) is missing: not debited",
                    row.request_id, row.api_key_id
                )));
            }
            let ledger = NewLedger {
                request_id: &row.request_id,
                api_key_id: row.api_key_id,
                user_id: row.user_id,
                amount_nanousd: row.amount_nanousd,
                created_at: at,
            };
            let debited = diesel::insert_into(billing_ledger::table)
                .values(&ledger)
                .on_conflict((billing_ledger::request_id, billing_ledger::api_key_id))
                .do_nothing()
                .execute(tx)
                .await?;
            if debited == 1 {
                spend_update!(row.api_key_id, row.amount_nanousd)
                    .execute(tx)
                    .await?;
                balance_update!(row.user_id, row.amount_nanousd)
                    .execute(tx)
                    .await?;
            }
            Ok(())
        })
        .await?
    });
    Ok(())
}

/// Records a failed attempt (error history appended); `dead` makes it final.
pub async fn fail_compensation(
    pool: &DbPool,
    row: &Compensation,
    attempt: i32,
    error: &str,
    dead: bool,
) -> Result<(), DbError> {
    let at = now();
    let mut history: Vec<serde_json::Value> =
        serde_json::from_str(&row.error_history).unwrap_or_default();
    history.push(serde_json::json!({"at": at.to_string(), "attempt": attempt, "error": error}));
    let history = serde_json::Value::Array(history).to_string();
    with_conn!(pool, |c| {
        diesel::update(billing_compensations::table.filter(billing_compensations::id.eq(row.id)))
            .set((
                billing_compensations::last_error.eq(Some(error)),
                billing_compensations::error_history.eq(&history),
                billing_compensations::updated_at.eq(at),
            ))
            .execute(c)
            .await?;
        if dead {
            diesel::update(
                billing_compensations::table.filter(billing_compensations::id.eq(row.id)),
            )
            .set((
                billing_compensations::status.eq(CompensationStatus::Dead.as_str()),
                billing_compensations::dead_at.eq(Some(at)),
                billing_compensations::next_attempt_at.eq(None::<chrono::NaiveDateTime>),
            ))
            .execute(c)
            .await?;
        }
    });
    Ok(())
}

/// An operator re-queues a dead (or pending) row: due now, attempts reset. `false` when there is
/// no such row or it is settled.
pub async fn requeue_compensation(pool: &DbPool, id: i64) -> Result<bool, DbError> {
    let at = now();
    let n = with_conn!(pool, |c| {
        diesel::update(
            billing_compensations::table
                .filter(billing_compensations::id.eq(id))
                .filter(billing_compensations::status.ne(CompensationStatus::Settled.as_str())),
        )
        .set((
            billing_compensations::status.eq(CompensationStatus::Pending.as_str()),
            billing_compensations::attempts.eq(0),
            billing_compensations::next_attempt_at.eq(Some(at)),
            billing_compensations::dead_at.eq(None::<chrono::NaiveDateTime>),
            billing_compensations::updated_at.eq(at),
        ))
        .execute(c)
        .await?
    });
    Ok(n == 1)
}
