//! `GET /healthz` (the process answers) and `GET /readyz` (it can serve: not draining, an
//! upstream account configured, accounting able to make a record durable, database reachable,
//! migrations applied). A 503 names its cause.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use actix_web::{HttpResponse, get, web};
use serde_json::json;

use super::error::HttpError;
use crate::db::{DbPool, migrate, queries};
use crate::protocol::errors::ErrorCode;

/// What the probes look at.
#[derive(Clone)]
pub struct Readiness {
    pub db: DbPool,
    /// `SQLite PATH` or `PostgreSQL host:port/db`, for the 503's words.
    pub db_label: String,
    pub draining: Arc<AtomicBool>,
    /// Reports the records waiting for the database and accounting's health, when the relay
    /// runs.
    pub accounting: Option<(
        actix::Addr<crate::accounting::Accounting>,
        Arc<crate::accounting::health::AccountingHealth>,
    )>,
    /// No `[[accounts]]` configured: nothing can be served.
    pub no_accounts: bool,
    /// Each account's health: ready while one can serve (docs/DESIGN.md#accounts).
    pub accounts: Vec<(String, Arc<crate::pool::health::Health>)>,
    /// `accounting.stuck_after_ms`.
    pub stuck_after: std::time::Duration,
}

impl Readiness {
    /// What the probes of a running relay look at.
    pub fn of(deps: &crate::session::SessionDeps) -> Self {
        let settings = &deps.settings;
        Self {
            db: deps.db.clone(),
            db_label: settings.database.label(),
            draining: deps.draining.clone(),
            accounting: Some((deps.accounting.clone(), deps.accounting_health.clone())),
            no_accounts: deps.accounts.is_empty(),
            accounts: deps
                .accounts
                .iter()
                .map(|a| (a.name.clone(), a.health.clone()))
                .collect(),
            stuck_after: std::time::Duration::from_millis(settings.accounting.stuck_after_ms),
        }
    }
}

#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[get("/readyz")]
pub async fn readyz(state: web::Data<Readiness>) -> Result<HttpResponse, HttpError> {
    match check(&state).await {
        Ok(report) => Ok(HttpResponse::Ok().json(report)),
        Err(why) => Err(HttpError::new(ErrorCode::NotReady, why)),
    }
}

/// Whether the relay can serve: its report, or why not (the words of the 503). `/readyz` and
/// the operators' console (`/admin/ready`) both read it.
pub async fn check(state: &Readiness) -> Result<serde_json::Value, String> {
    let not_ready = |why: String| why;
    if state.draining.load(Ordering::Relaxed) {
        return Err(not_ready("draining: shutting down".into()));
    }
    if state.no_accounts {
        return Err(not_ready(
            "no upstream accounts configured ([[accounts]] in the config)".into(),
        ));
    }
    // Accounts whose last dial failed (cooling or about to probe), with why.
    let out: Vec<String> = state
        .accounts
        .iter()
        .filter(|(_, h)| h.failing())
        .map(|(name, h)| {
            let why = h.last_error().unwrap_or_default();
            format!("{name}: failing ({why})")
        })
        .collect();
    if !state.accounts.is_empty() && out.len() == state.accounts.len() {
        return Err(not_ready(format!(
            "no upstream account can serve: {}",
            out.join("; ")
        )));
    }
    let (backlog, health) = match &state.accounting {
        Some((a, h)) => (
            a.send(crate::accounting::messages::Backlog).await.ok(),
            h.report(),
        ),
        None => (None, Default::default()),
    };
    if let (Some(ms), Some(err)) = (health.db_failing_for_ms, &health.db_error)
        && ms >= crate::num::millis(state.stuck_after)
    {
        return Err(not_ready(format!(
            "billing stuck: database writes failing for {} s ({} records waiting): {err}",
            ms / 1000,
            backlog.unwrap_or(0)
        )));
    }
    if health.unavailable {
        return Err(not_ready(format!(
            "accounting unavailable: spool: {}; database: {} ({} records waiting)",
            health.spool_error.as_deref().unwrap_or("-"),
            health.db_error.as_deref().unwrap_or("-"),
            backlog.unwrap_or(0)
        )));
    }
    let db = state.db.clone();
    let ping = async move { queries::health::ping(&db).await };
    crate::db::within(crate::db::READ_DEADLINE, ping)
        .await
        .map_err(|e| {
            not_ready(format!(
                "database unreachable: {}: {e} (accounting backlog: {} records waiting in the spool)",
                state.db_label,
                backlog.unwrap_or(0)
            ))
        })?;
    let db = state.db.clone();
    let pending = async move { migrate::pending(&db).await };
    let pending = crate::db::within(crate::db::READ_DEADLINE, pending)
        .await
        .map_err(|e| not_ready(format!("cannot read migrations of {}: {e}", state.db_label)))?;
    if !pending.is_empty() {
        return Err(not_ready(format!(
            "migrations pending on {}: {} (run `turnpike migrate`)",
            state.db_label,
            pending.join(", ")
        )));
    }
    Ok(json!({
        "status": "ready",
        "accounts_out": out,
        "database": state.db.backend(),
        "accounting_backlog": backlog,
        // The spool can fail while the database carries every record (ready, degraded).
        "spool_error": health.spool_error,
    }))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz).service(readyz);
}
