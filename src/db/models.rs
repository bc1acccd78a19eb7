//! Rows as Rust types. `check_for_backend` makes a type that breaks on either backend fail to
//! compile.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{api_keys, users};

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct User {
    pub id: i64,
    pub name: String,
    pub enabled: bool,
    /// `None`: no balance limit.
    pub balance_nanousd: Option<i64>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = users)]
pub struct NewUser<'a> {
    pub name: &'a str,
    pub enabled: bool,
    pub balance_nanousd: Option<i64>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = api_keys, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct ApiKey {
    pub id: i64,
    pub user_id: i64,
    pub key_hash: String,
    pub key_prefix: String,
    pub label: Option<String>,
    /// `None`: no spending cap.
    pub quota_nanousd: Option<i64>,
    pub spent_nanousd: i64,
    pub max_sessions: Option<i32>,
    pub max_concurrent_turns: Option<i32>,
    pub created_at: NaiveDateTime,
    pub revoked_at: Option<NaiveDateTime>,
    /// Models this key may ask for, comma-separated; `None`: any (docs/DESIGN.md#key-limits).
    pub allowed_models: Option<String>,
    /// Service tiers this key may ask for, comma-separated; `None`: any.
    pub allowed_service_tiers: Option<String>,
}

/// An unlimited, active key (id 1) of an enabled user (id 2) without a balance, for unit tests.
#[cfg(test)]
pub fn sample_standing() -> (ApiKey, User) {
    let now = crate::db::now();
    let key = ApiKey {
        id: 1,
        user_id: 2,
        key_hash: String::new(),
        key_prefix: "tpk_x".into(),
        label: None,
        quota_nanousd: None,
        spent_nanousd: 0,
        max_sessions: None,
        max_concurrent_turns: None,
        created_at: now,
        revoked_at: None,
        allowed_models: None,
        allowed_service_tiers: None,
    };
    let user = User {
        id: 2,
        name: "u".into(),
        enabled: true,
        balance_nanousd: None,
        created_at: now,
        updated_at: now,
    };
    (key, user)
}

#[derive(Debug, Insertable)]
#[diesel(table_name = api_keys)]
pub struct NewApiKey<'a> {
    pub user_id: i64,
    pub key_hash: &'a str,
    pub key_prefix: &'a str,
    pub label: Option<&'a str>,
    pub quota_nanousd: Option<i64>,
    pub spent_nanousd: i64,
    pub max_sessions: Option<i32>,
    pub max_concurrent_turns: Option<i32>,
    pub created_at: NaiveDateTime,
    pub allowed_models: Option<&'a str>,
    pub allowed_service_tiers: Option<&'a str>,
}

/// One row of the `billing_compensation_backlog` view.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct BacklogRow {
    pub status: String,
    pub rows_count: i64,
    pub amount_nanousd: i64,
    pub oldest_created_at: Option<NaiveDateTime>,
    pub oldest_age_s: i64,
    pub max_attempts: Option<i32>,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = super::schema::billing_compensations)]
pub struct NewCompensation<'a> {
    pub request_id: &'a str,
    pub api_key_id: i64,
    pub user_id: i64,
    pub amount_nanousd: i64,
    pub status: &'a str,
    pub next_attempt_at: Option<NaiveDateTime>,
    pub last_error: Option<&'a str>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = super::schema::usage_logs)]
pub struct NewUsage<'a> {
    pub request_id: &'a str,
    pub api_key_id: i64,
    pub user_id: i64,
    pub session_id: &'a str,
    pub turn_index: i32,
    pub account: &'a str,
    pub model: &'a str,
    pub status: &'a str,
    pub usage_source: &'a str,
    pub warmup: bool,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub total_tokens: i64,
    pub cost_nanousd: i64,
    pub upstream_wait_ms: Option<i64>,
    pub first_event_ms: Option<i64>,
    pub first_token_ms: Option<i64>,
    pub duration_ms: i64,
    pub error_code: Option<&'a str>,
    pub accepted_at: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub response_id: Option<&'a str>,
    pub origin: &'a str,
    pub transport: &'a str,
    pub upstream_transport: &'a str,
    pub service_tier: &'a str,
    pub cache_write_30m_tokens: i64,
    pub cache_write_12h_tokens: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = super::schema::usage_logs, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct UsageRow {
    pub id: i64,
    pub request_id: String,
    pub api_key_id: i64,
    pub user_id: i64,
    pub session_id: String,
    pub turn_index: i32,
    pub account: String,
    pub model: String,
    pub status: String,
    pub usage_source: String,
    pub warmup: bool,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub total_tokens: i64,
    pub cost_nanousd: i64,
    pub upstream_wait_ms: Option<i64>,
    pub first_event_ms: Option<i64>,
    pub first_token_ms: Option<i64>,
    pub duration_ms: i64,
    pub error_code: Option<String>,
    pub accepted_at: NaiveDateTime,
    pub created_at: NaiveDateTime,
    pub response_id: Option<String>,
    /// `create`, `steer` or `compaction`.
    pub origin: String,
    /// `ws` or `http`: the client's side.
    pub transport: String,
    /// `ws` or `http`: how the request reached the upstream (docs/DESIGN.md#upstream-transports).
    pub upstream_transport: String,
    /// The tier billed (docs/DESIGN.md#pricing).
    pub service_tier: String,
    pub cache_write_30m_tokens: i64,
    pub cache_write_12h_tokens: i64,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = super::schema::usage_quarantine)]
pub struct NewQuarantine<'a> {
    pub request_id: &'a str,
    pub api_key_id: i64,
    pub payload: &'a str,
    pub reason: &'a str,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = super::schema::billing_ledger)]
pub struct NewLedger<'a> {
    pub request_id: &'a str,
    pub api_key_id: i64,
    pub user_id: i64,
    pub amount_nanousd: i64,
    pub created_at: NaiveDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = super::schema::billing_compensations, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Compensation {
    pub id: i64,
    pub request_id: String,
    pub api_key_id: i64,
    pub user_id: i64,
    pub amount_nanousd: i64,
    pub status: String,
    pub attempts: i32,
    #[serde(serialize_with = "crate::utc::serialize_opt")]
    pub next_attempt_at: Option<NaiveDateTime>,
    pub last_error: Option<String>,
    pub error_history: String,
    #[serde(serialize_with = "crate::utc::serialize")]
    pub created_at: NaiveDateTime,
    #[serde(serialize_with = "crate::utc::serialize")]
    pub updated_at: NaiveDateTime,
    #[serde(serialize_with = "crate::utc::serialize_opt")]
    pub settled_at: Option<NaiveDateTime>,
    #[serde(serialize_with = "crate::utc::serialize_opt")]
    pub dead_at: Option<NaiveDateTime>,
}

/// One operator action (docs/DESIGN.md#audit).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = super::schema::admin_audit, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct AuditRow {
    pub id: i64,
    #[serde(serialize_with = "crate::utc::serialize")]
    pub at: NaiveDateTime,
    pub actor: String,
    pub peer: String,
    pub action: String,
    pub target: String,
    pub detail: String,
}

#[derive(Debug, Insertable)]
#[diesel(table_name = super::schema::admin_audit)]
pub struct NewAudit<'a> {
    pub at: NaiveDateTime,
    pub actor: &'a str,
    pub peer: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: &'a str,
}

/// One day of one key and model (docs/DESIGN.md#retention).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = super::schema::usage_daily, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct DailyRow {
    pub day: chrono::NaiveDate,
    pub api_key_id: i64,
    pub model: String,
    pub turns: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_tokens: i64,
    pub output_tokens: i64,
    pub reasoning_tokens: i64,
    pub cost_nanousd: i64,
}
