//! Usage on the admin API (docs/DESIGN.md#retention): the export streamed as it is read, and
//! the daily rollups with their cache hit rate.

use actix_web::{HttpResponse, web};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, Operator};
use crate::db::queries::usage::ExportFilter;
use crate::export::{self, Format};
use crate::http::error::HttpError;
use crate::protocol::errors::ErrorCode;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/usage/export", web::get().to(export_usage))
        .route("/admin/usage/daily", web::get().to(daily));
}

fn invalid(message: String) -> HttpError {
    HttpError::new(ErrorCode::InvalidAdminRequest, message)
}

fn time(field: &str, text: Option<&str>) -> Result<Option<chrono::NaiveDateTime>, HttpError> {
    text.map(|t| export::parse_time(field, t).map_err(invalid))
        .transpose()
}

#[derive(Deserialize)]
struct ExportQuery {
    from: Option<String>,
    to: Option<String>,
    key: Option<String>,
    model: Option<String>,
    format: Option<String>,
}

/// The rows as CSV or JSON lines, a page at a time. A database error mid-way ends the body
/// early (the status was sent): the last line is then incomplete or missing, which a reader
/// checks against the row count of `GET /admin/usage/daily`.
async fn export_usage(
    _: Operator,
    query: web::Query<ExportQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let q = query.into_inner();
    let name = q.format.as_deref().unwrap_or("csv");
    let format = Format::parse(name)
        .ok_or_else(|| invalid(format!("format: {name:?}: expected csv or jsonl")))?;
    let filter = ExportFilter {
        from: time("from", q.from.as_deref())?,
        to: time("to", q.to.as_deref())?,
        key_prefix: q.key,
        model: q.model,
    };
    let body = export::stream(state.deps.db.clone(), filter, format).map(|chunk| {
        chunk.map_err(|e| {
            tracing::warn!(error = %e, "usage export ended early");
            actix_web::error::ErrorServiceUnavailable(e.to_string())
        })
    });
    Ok(HttpResponse::Ok()
        .content_type(format.content_type())
        .streaming(body))
}

#[derive(Deserialize)]
struct DailyQuery {
    from: Option<String>,
    to: Option<String>,
    key: Option<String>,
}

async fn daily(
    _: Operator,
    query: web::Query<DailyQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let day = |f: &str, t: &Option<String>| time(f, t.as_deref()).map(|t| t.map(|t| t.date()));
    let rows = crate::db::queries::usage::daily(
        &state.deps.db,
        day("from", &query.from)?,
        day("to", &query.to)?,
        query.key.as_deref(),
    )
    .await
    .map_err(|e| HttpError::new(ErrorCode::NotReady, e.to_string()))?;
    let days: Vec<serde_json::Value> = rows
        .iter()
        .map(|(d, prefix)| {
            let mut v = json!(d);
            v["key_prefix"] = json!(prefix);
            v["cache_hit_rate"] = json!(export::hit_rate(d));
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"days": days})))
}
