//! The operators' HTTP API (docs/DESIGN.md#admin): its own listener (`admin.bind`, loopback by default),
//! started only when `admin.token` is set; every route needs `Authorization: Bearer <token>`,
//! compared in constant time.
//!
//! - `GET /admin/actors`, `POST /admin/actors/{name}/restart` (`accounting`, `compensator`,
//!   `pool:<account>`)
//! - `GET /admin/sessions`, `DELETE /admin/sessions/{id}`
//! - `GET /admin/pools`
//! - `GET /admin/compensations?status=&limit=`, `POST /admin/compensations/{id}/retry`
//! - `GET /admin/ready`, `GET /admin/turns?key=&limit=`, `GET /admin/requests`
//! - `GET /metrics` (Prometheus text; without the token unless `admin.metrics_require_token`)
//! - `GET /admin/console`: the operators' console (`console`: one page, assets embedded; the
//!   page asks for the token and calls the routes above)

use std::net::TcpListener;
use std::sync::Arc;

use actix::Addr;
use actix_web::{HttpRequest, HttpResponse, HttpServer, web};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tracing::info;

mod console;
mod people;
mod usage;

use crate::actors::{ActorStatus, GetStatus, RestartActor};
use crate::billing::compensator::Compensator;
use crate::db::queries;
use crate::http::error::HttpError;
use crate::pool::messages::PoolStats;
use crate::protocol::errors::ErrorCode;
use crate::session::SessionDeps;
use crate::session::registry::{EndOne, ListSessions};

/// What the admin routes reach.
pub struct AdminState {
    pub token: String,
    pub deps: Arc<SessionDeps>,
    pub compensator: Addr<Compensator>,
    /// The Prometheus recorder's handle (`None`: metrics not installed in this process).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// `GET /metrics` needs the admin token too (`admin.metrics_require_token`).
    pub metrics_require_token: bool,
    /// What `/readyz` looks at (`/admin/ready` says the same).
    pub readiness: crate::http::health::Readiness,
}

/// Serves the admin API on `listener` (one worker; it is for operators, not traffic).
pub fn start(listener: TcpListener, state: AdminState) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    let data = web::Data::new(state);
    let server = HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            .configure(routes)
    })
    .workers(1)
    .disable_signals()
    .listen(listener)?
    .run();
    actix_web::rt::spawn(server);
    info!(addr = %addr, "admin API on http://{addr}/admin");
    Ok(())
}

/// Every route, as (method, path) — the OpenAPI description (`openapi.json`, served at
/// `/admin/openapi.json`) lists exactly these; a test keeps them in step.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/metrics"),
    ("GET", "/admin/openapi.json"),
    ("GET", "/admin/actors"),
    ("POST", "/admin/actors/{name}/restart"),
    ("GET", "/admin/sessions"),
    ("DELETE", "/admin/sessions/{id}"),
    ("GET", "/admin/requests"),
    ("GET", "/admin/pools"),
    ("POST", "/admin/accounts/{name}/disable"),
    ("POST", "/admin/accounts/{name}/enable"),
    ("GET", "/admin/compensations"),
    ("POST", "/admin/compensations/{id}/retry"),
    ("GET", "/admin/ready"),
    ("GET", "/admin/turns"),
    ("GET", "/admin/keys"),
    ("POST", "/admin/keys"),
    ("PATCH", "/admin/keys/{id}"),
    ("POST", "/admin/keys/{id}/revoke"),
    ("GET", "/admin/users"),
    ("POST", "/admin/users"),
    ("POST", "/admin/users/{name}/balance"),
    ("POST", "/admin/users/{name}/disable"),
    ("POST", "/admin/users/{name}/enable"),
    ("GET", "/admin/audit"),
    ("GET", "/admin/usage/export"),
    ("GET", "/admin/usage/daily"),
    ("GET", "/admin/console"),
    ("GET", "/admin/console/{asset}"),
];

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/metrics", web::get().to(metrics))
        .route("/admin/openapi.json", web::get().to(openapi))
        .route("/admin/actors", web::get().to(actors))
        .route("/admin/actors/{name}/restart", web::post().to(restart))
        .route("/admin/sessions", web::get().to(sessions))
        .route("/admin/sessions/{id}", web::delete().to(end_session))
        .route("/admin/requests", web::get().to(requests))
        .route("/admin/pools", web::get().to(pools))
        .route(
            "/admin/accounts/{name}/disable",
            web::post().to(disable_account),
        )
        .route(
            "/admin/accounts/{name}/enable",
            web::post().to(enable_account),
        )
        .route("/admin/compensations", web::get().to(compensations))
        .route(
            "/admin/compensations/{id}/retry",
            web::post().to(retry_compensation),
        )
        .route("/admin/ready", web::get().to(ready))
        .route("/admin/turns", web::get().to(turns))
        .route("/admin/keys", web::get().to(keys))
        .configure(people::routes)
        .configure(usage::routes)
        .configure(console::routes);
}

/// Whether the relay can serve, as `/readyz` says it (200 here either way: the console shows
/// the reason).
async fn ready(_: Operator, state: web::Data<AdminState>) -> HttpResponse {
    match crate::http::health::check(&state.readiness).await {
        Ok(report) => HttpResponse::Ok().json(json!({"ready": true, "report": report})),
        Err(why) => HttpResponse::Ok().json(json!({"ready": false, "why": why})),
    }
}

#[derive(Deserialize)]
struct TurnsQuery {
    /// A key's display prefix (`tpk_…`, as `/admin/sessions` shows it).
    key: Option<String>,
    limit: Option<i64>,
}

/// The latest usage rows, newest first (of one key with `key=`).
async fn turns(
    _: Operator,
    query: web::Query<TurnsQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let limit = query.limit.unwrap_or(50).clamp(1, 1_000);
    let rows = queries::usage::recent(&state.deps.db, query.key.as_deref(), limit)
        .await
        .map_err(|e| HttpError::new(ErrorCode::NotReady, e.to_string()))?;
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(r, key_prefix)| {
            json!({
                "key_prefix": key_prefix, "request_id": r.request_id, "response_id": r.response_id,
                "session_id": r.session_id, "account": r.account, "model": r.model,
                "status": r.status, "usage_source": r.usage_source, "transport": r.transport, "upstream_transport": r.upstream_transport,
                "origin": r.origin, "input_tokens": r.input_tokens,
                "cached_input_tokens": r.cached_input_tokens, "cache_write_tokens": r.cache_write_tokens,
                "cache_write_30m_tokens": r.cache_write_30m_tokens, "cache_write_12h_tokens": r.cache_write_12h_tokens,
                "output_tokens": r.output_tokens, "service_tier": r.service_tier,
                "cost_nanousd": r.cost_nanousd, "first_token_ms": r.first_token_ms,
                "duration_ms": r.duration_ms, "error_code": r.error_code,
                "accepted_at": crate::utc::text(&r.accepted_at),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"turns": rows})))
}

/// Every key with its owner, limits and allow-lists, oldest first (the full key is never
/// stored, so never shown).
async fn keys(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    let rows = queries::keys::list(&state.deps.db, None)
        .await
        .map_err(|e| HttpError::new(ErrorCode::NotReady, e.to_string()))?;
    fn list(stored: &Option<String>) -> Option<Vec<&str>> {
        crate::auth::allow_list(stored.as_deref())
    }
    let keys: Vec<serde_json::Value> = rows
        .iter()
        .map(|(k, user)| {
            json!({
                "id": k.id, "user": user, "key_prefix": k.key_prefix, "label": k.label,
                "quota_nanousd": k.quota_nanousd, "spent_nanousd": k.spent_nanousd,
                "max_sessions": k.max_sessions, "max_concurrent_turns": k.max_concurrent_turns,
                "allowed_models": list(&k.allowed_models),
                "allowed_service_tiers": list(&k.allowed_service_tiers),
                "revoked": k.revoked_at.is_some(), "created_at": crate::utc::text(&k.created_at),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"keys": keys})))
}

async fn disable_account(
    op: Operator,
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    set_account(op, name.into_inner(), state, true).await
}

async fn enable_account(
    op: Operator,
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    set_account(op, name.into_inner(), state, false).await
}

/// Takes an account out of service or puts it back (docs/DESIGN.md#accounts): a disabled
/// account is never dialled; its turns go to the other accounts.
async fn set_account(
    op: Operator,
    name: String,
    state: web::Data<AdminState>,
    disabled: bool,
) -> Result<HttpResponse, HttpError> {
    let Some(account) = state.deps.accounts.iter().find(|a| a.name == name) else {
        return Err(HttpError::new(
            ErrorCode::NotFound,
            format!("no account named {name:?} (see GET /admin/pools)"),
        ));
    };
    account.health.set_disabled(disabled);
    tracing::info!(account = %name, disabled, from = %op.peer, "account set by an operator");
    let action = if disabled {
        "accounts.disable"
    } else {
        "accounts.enable"
    };
    crate::manage::audit(&state.deps.db, &op.into(), action, &name, json!({})).await;
    let view = account.health.view(std::time::Instant::now());
    Ok(HttpResponse::Ok().json(json!({"account": name, "health": view.state, "reason": view.reason, "failures": view.failures})))
}

/// The bearer token, compared in constant time.
fn authorize(req: &HttpRequest, state: &AdminState) -> Result<(), HttpError> {
    let presented = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok = presented.len() == state.token.len()
        && bool::from(presented.as_bytes().ct_eq(state.token.as_bytes()));
    if ok {
        Ok(())
    } else {
        refused(req);
        Err(HttpError::new(
            ErrorCode::AdminUnauthorized,
            "send the admin token as Authorization: Bearer <admin.token>",
        ))
    }
}

/// Refused admin requests since the window opened, and when it did (`None`: no refusal yet).
static REFUSALS: std::sync::Mutex<(u64, Option<std::time::Instant>)> =
    std::sync::Mutex::new((0, None));

/// How long refusals are summed before one more line says how many there were.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// A request refused for its token: counted (`turnpike_admin_refused_total`), and logged once
/// when refusals start and at most once a minute while they go on, with their count — a
/// token being guessed at thousands a second shows without flooding the log.
fn refused(req: &HttpRequest) {
    ::metrics::counter!(crate::telemetry::metric::ADMIN_REFUSED).increment(1);
    let peer = req
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let now = std::time::Instant::now();
    let mut w = REFUSALS.lock().unwrap_or_else(|p| p.into_inner());
    match w.1 {
        Some(start) if now.duration_since(start) < REFUSAL_WINDOW => w.0 += 1,
        Some(_) => {
            tracing::warn!(refused = w.0 + 1, latest_from = %peer,
                "admin API: requests with a wrong or missing token go on");
            *w = (0, Some(now));
        }
        None => {
            tracing::warn!(from = %peer,
                "admin API: a request with a wrong or missing token was refused; more are counted in turnpike_admin_refused_total and summed once a minute");
            *w = (0, Some(now));
        }
    }
}

/// An authorized caller of the admin API (the extractor checks the bearer token), who they say
/// they are (`X-Turnpike-Operator`, else `admin`) and where they called from — every action is
/// logged and audited with it.
pub struct Operator {
    pub actor: String,
    pub peer: String,
}

impl From<Operator> for crate::manage::Operator {
    fn from(op: Operator) -> Self {
        Self {
            actor: op.actor,
            peer: op.peer,
        }
    }
}

/// The name an admin caller gives (`X-Turnpike-Operator`): printable, at most 64 characters;
/// anything else is `admin` (the token is shared, so the name is what the caller says).
fn operator_name(req: &HttpRequest) -> String {
    req.headers()
        .get("x-turnpike-operator")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.len() <= 64 && !n.chars().any(char::is_control))
        .map_or_else(|| "admin".to_string(), str::to_string)
}

impl actix_web::FromRequest for Operator {
    type Error = HttpError;
    type Future = std::future::Ready<Result<Self, HttpError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        let checked = match req.app_data::<web::Data<AdminState>>() {
            Some(state) => authorize(req, state).map(|()| Operator {
                actor: operator_name(req),
                peer: req.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            }),
            None => Err(unavailable("admin state")),
        };
        std::future::ready(checked)
    }
}

fn unavailable(what: &str) -> HttpError {
    HttpError::new(ErrorCode::NotReady, format!("{what} did not answer"))
}

async fn all_statuses(state: &AdminState) -> Result<Vec<ActorStatus>, HttpError> {
    let mut out = vec![
        state
            .deps
            .accounting
            .send(GetStatus)
            .await
            .map_err(|_| unavailable("accounting"))?,
        state
            .compensator
            .send(GetStatus)
            .await
            .map_err(|_| unavailable("compensator"))?,
    ];
    for a in &state.deps.accounts {
        out.push(
            a.pool
                .send(GetStatus)
                .await
                .map_err(|_| unavailable("pool"))?,
        );
    }
    Ok(out)
}

async fn actors(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    Ok(HttpResponse::Ok().json(json!({"actors": all_statuses(&state).await?})))
}

async fn restart(
    op: Operator,
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let name = name.into_inner();
    let status = match name.as_str() {
        "accounting" => state.deps.accounting.send(RestartActor).await,
        "compensator" => state.compensator.send(RestartActor).await,
        other => {
            let pool = other
                .strip_prefix("pool:")
                .and_then(|account| state.deps.pool_of(account));
            match pool {
                Some(pool) => pool.send(RestartActor).await,
                None => {
                    return Err(HttpError::new(
                        ErrorCode::NotFound,
                        format!("no actor named {name:?} (see GET /admin/actors)"),
                    ));
                }
            }
        }
    }
    .map_err(|_| unavailable(&name))?;
    info!(actor = %name, from = %op.peer, "restarted by an operator");
    crate::manage::audit(
        &state.deps.db,
        &op.into(),
        "actors.restart",
        &name,
        json!({}),
    )
    .await;
    Ok(HttpResponse::Ok().json(status))
}

async fn sessions(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    let list = state
        .deps
        .registry
        .send(ListSessions)
        .await
        .map_err(|_| unavailable("session registry"))?;
    Ok(HttpResponse::Ok().json(json!({"sessions": list})))
}

/// HTTP requests in flight (docs/DESIGN.md#http-surface), oldest first.
async fn requests(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    Ok(HttpResponse::Ok().json(json!({"requests": state.deps.requests.list()})))
}

async fn end_session(
    op: Operator,
    id: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let id = id.into_inner();
    let found = state
        .deps
        .registry
        .send(EndOne {
            id: id.clone(),
            code: ErrorCode::SessionEnded,
        })
        .await
        .map_err(|_| unavailable("session registry"))?;
    if !found {
        return Err(HttpError::new(
            ErrorCode::NotFound,
            format!("no session {id:?}"),
        ));
    }
    info!(session = %id, from = %op.peer, "session ended by an operator");
    crate::manage::audit(&state.deps.db, &op.into(), "sessions.end", &id, json!({})).await;
    Ok(HttpResponse::Ok().json(json!({"ended": id})))
}

async fn pools(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    let mut out = Vec::new();
    for a in &state.deps.accounts {
        out.push(
            a.pool
                .send(PoolStats)
                .await
                .map_err(|_| unavailable("pool"))?,
        );
    }
    Ok(HttpResponse::Ok().json(json!({"pools": out})))
}

#[derive(Deserialize)]
struct CompensationQuery {
    status: Option<String>,
    limit: Option<usize>,
}

async fn compensations(
    _: Operator,
    query: web::Query<CompensationQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let limit = query.limit.unwrap_or(100).min(10_000);
    let status = match query.status.as_deref() {
        None => None,
        Some(s) => match crate::record::CompensationStatus::parse(s) {
            Some(status) => Some(status),
            // No compensation has a status that does not exist.
            None => return Ok(HttpResponse::Ok().json(json!({"compensations": []}))),
        },
    };
    let rows = queries::billing::compensations(
        &state.deps.db,
        status,
        Some(i64::try_from(limit).unwrap_or(10_000)),
    )
    .await
    .map_err(|e| HttpError::new(ErrorCode::NotReady, e.to_string()))?;
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|(c, key_prefix)| {
            let mut v = json!(c);
            v["key_prefix"] = json!(key_prefix);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"compensations": rows})))
}

async fn retry_compensation(
    op: Operator,
    id: web::Path<i64>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let id = id.into_inner();
    let requeued = queries::billing::requeue_compensation(&state.deps.db, id)
        .await
        .map_err(|e| HttpError::new(ErrorCode::NotReady, e.to_string()))?;
    if !requeued {
        return Err(HttpError::new(
            ErrorCode::NotFound,
            format!("no unsettled compensation {id}"),
        ));
    }
    info!(compensation = id, from = %op.peer, "compensation re-queued by an operator");
    let target = id.to_string();
    crate::manage::audit(
        &state.deps.db,
        &op.into(),
        "compensations.retry",
        &target,
        json!({}),
    )
    .await;
    Ok(HttpResponse::Ok().json(json!({"requeued": id})))
}

/// `GET /metrics`: what the actors recorded, plus gauges read now (pools, spool backlog,
/// accounting availability, compensation backlog).
async fn metrics(
    req: HttpRequest,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    use crate::telemetry::metric;
    if state.metrics_require_token {
        authorize(&req, &state)?;
    }
    let Some(handle) = &state.metrics else {
        return Err(HttpError::new(
            ErrorCode::NotFound,
            "metrics are not installed in this process",
        ));
    };
    for a in &state.deps.accounts {
        if let Ok(p) = a.pool.send(PoolStats).await {
            for (s, n) in [
                ("idle", p.idle),
                ("leased", p.leased),
                ("parked", p.parked),
                ("dialing", p.dialing),
            ] {
                ::metrics::gauge!(metric::UPSTREAM_CONNECTIONS, "account" => a.name.clone(), "state" => s)
                    .set(crate::num::f64_of(crate::num::count(n)));
            }
            ::metrics::gauge!(metric::LEASE_WAITERS, "account" => a.name.clone())
                .set(crate::num::f64_of(crate::num::count(p.waiters)));
            crate::telemetry::account_state(&a.name, &p.health);
            crate::telemetry::account_http(&a.name, p.http_only, p.lanes_refused);
        }
    }
    if let Ok(n) = state
        .deps
        .accounting
        .send(crate::accounting::messages::Backlog)
        .await
    {
        ::metrics::gauge!(metric::SPOOL_BACKLOG).set(crate::num::f64_of(crate::num::count(n)));
    }
    if let Ok(age) = state
        .deps
        .accounting
        .send(crate::accounting::messages::BacklogAge)
        .await
    {
        ::metrics::gauge!(metric::SPOOL_BACKLOG_AGE).set(crate::num::f64_of(age));
    }
    let unavailable = state.deps.accounting_health.report().unavailable;
    ::metrics::gauge!(metric::ACCOUNTING_UNAVAILABLE).set(f64::from(u8::from(unavailable)));
    let db = state.deps.db.clone();
    let backlog = crate::db::within(crate::db::READ_DEADLINE, async move {
        queries::billing::compensation_backlog(&db).await
    })
    .await;
    if let Ok(rows) = backlog {
        for r in rows {
            ::metrics::gauge!(metric::COMPENSATIONS, "status" => r.status.clone())
                .set(crate::num::f64_of_i64(r.rows_count));
            ::metrics::gauge!(metric::COMPENSATION_AMOUNT, "status" => r.status)
                .set(crate::num::f64_of_i64(r.amount_nanousd));
        }
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(handle.render()))
}

async fn openapi(_: Operator) -> Result<HttpResponse, HttpError> {
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_exactly_the_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.push((method.to_uppercase(), path.clone()));
            }
        }
        let mut served: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
