//! `GET /healthz` (the process answers) and `GET /readyz` (it can serve: not draining, database
//! reachable, migrations applied).

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
    pub draining: Arc<AtomicBool>,
    /// Reports the records waiting for the database, when the relay runs.
    pub accounting: Option<actix::Addr<crate::accounting::Accounting>>,
}

#[get("/healthz")]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

#[get("/readyz")]
pub async fn readyz(state: web::Data<Readiness>) -> Result<HttpResponse, HttpError> {
    let not_ready = |why: String| HttpError::new(ErrorCode::NotReady, why);
    if state.draining.load(Ordering::Relaxed) {
        return Err(not_ready("draining: shutting down".into()));
    }
    let backlog = match &state.accounting {
        Some(a) => a.send(crate::accounting::messages::Backlog).await.ok(),
        None => None,
    };
    queries::health::ping(&state.db).await.map_err(|e| {
        not_ready(format!(
            "database unreachable: {e} (accounting backlog: {} records waiting in the spool)",
            backlog.unwrap_or(0)
        ))
    })?;
    let pending = migrate::pending(&state.db)
        .await
        .map_err(|e| not_ready(format!("cannot read migrations: {e}")))?;
    if !pending.is_empty() {
        return Err(not_ready(format!(
            "migrations pending: {} (run `turnpike migrate`)",
            pending.join(", ")
        )));
    }
    Ok(HttpResponse::Ok().json(json!({
        "status": "ready",
        "database": state.db.backend(),
        "accounting_backlog": backlog,
    })))
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(healthz).service(readyz);
}
