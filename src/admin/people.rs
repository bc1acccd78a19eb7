//! Users, keys and the audit trail on the admin API (docs/DESIGN.md#audit): every change goes
//! through `manage`, which checks it and writes its audit row — the same path as the CLI.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{AdminState, Operator};
use crate::auth::KeyRequest;
use crate::db::queries;
use crate::http::error::HttpError;
use crate::manage::{self, Balance, KeyEdit, ManageError};
use crate::protocol::errors::ErrorCode;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin/users", web::get().to(users))
        .route("/admin/users", web::post().to(create_user))
        .route("/admin/users/{name}/balance", web::post().to(balance))
        .route("/admin/users/{name}/disable", web::post().to(disable_user))
        .route("/admin/users/{name}/enable", web::post().to(enable_user))
        .route("/admin/keys", web::post().to(create_key))
        .route("/admin/keys/{id}", web::patch().to(update_key))
        .route("/admin/keys/{id}/revoke", web::post().to(revoke_key))
        .route("/admin/audit", web::get().to(audit));
}

/// The one place where a management error becomes the admin API's answer.
impl From<ManageError> for HttpError {
    fn from(e: ManageError) -> Self {
        match e {
            ManageError::Invalid(m) => HttpError::new(ErrorCode::InvalidAdminRequest, m),
            ManageError::NotFound(m) => HttpError::new(ErrorCode::NotFound, m),
            ManageError::Exists(m) => HttpError::new(ErrorCode::AlreadyExists, m),
            other => HttpError::new(ErrorCode::NotReady, other.to_string()),
        }
    }
}

/// A JSON body, or `invalid_admin_request` naming what is wrong (unknown fields included: a
/// misspelt limit must not pass silently).
fn body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    serde_json::from_slice(bytes).map_err(|e| {
        HttpError::new(
            ErrorCode::InvalidAdminRequest,
            format!("body: {e} (see GET /admin/openapi.json)"),
        )
    })
}

/// A field that may be absent (`None`: unchanged) or `null` (`Some(None)`: cleared).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn db_error(e: crate::db::DbError) -> HttpError {
    HttpError::new(ErrorCode::NotReady, e.to_string())
}

/// Every user with their balance and what their keys spent.
async fn users(_: Operator, state: web::Data<AdminState>) -> Result<HttpResponse, HttpError> {
    let db = &state.deps.db;
    let users = queries::users::list(db).await.map_err(db_error)?;
    let keys = queries::keys::list(db, None).await.map_err(db_error)?;
    let rows: Vec<serde_json::Value> = users
        .iter()
        .map(|u| {
            let theirs = || keys.iter().filter(|(_, owner)| owner == &u.name);
            let active = theirs().filter(|(k, _)| k.revoked_at.is_none()).count();
            let spent: i64 = theirs().map(|(k, _)| k.spent_nanousd).sum();
            json!({
                "id": u.id, "name": u.name, "enabled": u.enabled,
                "balance_nanousd": u.balance_nanousd, "keys": theirs().count(),
                "active_keys": active, "spent_nanousd": spent,
                "created_at": crate::utc::text(&u.created_at),
            })
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"users": rows})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    /// USD as text (`"25"`, `"0.50"`); absent or null: no balance limit.
    balance_usd: Option<String>,
}

async fn create_user(
    op: Operator,
    bytes: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let req: NewUser = body(&bytes)?;
    let balance = req
        .balance_usd
        .map(|b| manage::usd("balance_usd", &b))
        .transpose()?;
    let user = manage::create_user(&state.deps.db, &op.into(), &req.name, balance).await?;
    Ok(HttpResponse::Created().json(json!({
        "id": user.id, "name": user.name, "enabled": user.enabled,
        "balance_nanousd": user.balance_nanousd,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BalanceChange {
    /// Top up by this much.
    add_usd: Option<String>,
    /// Set to this (`null`: no limit).
    #[serde(default, deserialize_with = "present")]
    set_usd: Option<Option<String>>,
}

async fn balance(
    op: Operator,
    name: web::Path<String>,
    bytes: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let req: BalanceChange = body(&bytes)?;
    let change = match (req.add_usd, req.set_usd) {
        (Some(add), None) => Balance::Add(manage::usd("add_usd", &add)?),
        (None, Some(set)) => Balance::Set(set.map(|s| manage::usd("set_usd", &s)).transpose()?),
        _ => {
            return Err(HttpError::new(
                ErrorCode::InvalidAdminRequest,
                "body: exactly one of add_usd and set_usd",
            ));
        }
    };
    let name = name.into_inner();
    let now = manage::balance(&state.deps.db, &op.into(), &name, change).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "balance_nanousd": now})))
}

async fn disable_user(
    op: Operator,
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    set_user(op, name.into_inner(), state, false).await
}

async fn enable_user(
    op: Operator,
    name: web::Path<String>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    set_user(op, name.into_inner(), state, true).await
}

async fn set_user(
    op: Operator,
    name: String,
    state: web::Data<AdminState>,
    enabled: bool,
) -> Result<HttpResponse, HttpError> {
    manage::set_enabled(&state.deps.db, &op.into(), &name, enabled).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "enabled": enabled})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    user: String,
    label: Option<String>,
    quota_usd: Option<String>,
    max_sessions: Option<i32>,
    max_concurrent_turns: Option<i32>,
    allowed_models: Option<Vec<String>>,
    allowed_service_tiers: Option<Vec<String>>,
}

/// Creates a key; the answer holds the key itself, which is never shown again.
async fn create_key(
    op: Operator,
    bytes: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let req: NewKey = body(&bytes)?;
    let key_req = KeyRequest {
        label: req.label,
        quota_nanousd: req
            .quota_usd
            .map(|q| manage::usd("quota_usd", &q))
            .transpose()?,
        max_sessions: req.max_sessions,
        max_concurrent_turns: req.max_concurrent_turns,
        allowed_models: req.allowed_models,
        allowed_service_tiers: req.allowed_service_tiers,
    };
    let (key, row) = manage::create_key(&state.deps.db, &op.into(), &req.user, &key_req).await?;
    Ok(HttpResponse::Created()
        .insert_header(("cache-control", "no-store"))
        .json(json!({"key": key, "id": row.id, "key_prefix": row.key_prefix, "user": req.user})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyPatch {
    #[serde(default, deserialize_with = "present")]
    label: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    quota_usd: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    max_sessions: Option<Option<i32>>,
    #[serde(default, deserialize_with = "present")]
    max_concurrent_turns: Option<Option<i32>>,
    #[serde(default, deserialize_with = "present")]
    allowed_models: Option<Option<Vec<String>>>,
    #[serde(default, deserialize_with = "present")]
    allowed_service_tiers: Option<Option<Vec<String>>>,
}

async fn update_key(
    op: Operator,
    id: web::Path<i64>,
    bytes: web::Bytes,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let req: KeyPatch = body(&bytes)?;
    let quota = match req.quota_usd {
        None => None,
        Some(q) => Some(q.map(|q| manage::usd("quota_usd", &q)).transpose()?),
    };
    let edit = KeyEdit {
        label: req.label,
        quota_nanousd: quota,
        max_sessions: req.max_sessions,
        max_concurrent_turns: req.max_concurrent_turns,
        allowed_models: req.allowed_models,
        allowed_service_tiers: req.allowed_service_tiers,
    };
    let k = manage::update_key(&state.deps.db, &op.into(), id.into_inner(), &edit).await?;
    Ok(HttpResponse::Ok().json(json!({
        "id": k.id, "key_prefix": k.key_prefix, "label": k.label,
        "quota_nanousd": k.quota_nanousd, "spent_nanousd": k.spent_nanousd,
        "max_sessions": k.max_sessions, "max_concurrent_turns": k.max_concurrent_turns,
        "allowed_models": crate::auth::allow_list(k.allowed_models.as_deref()),
        "allowed_service_tiers": crate::auth::allow_list(k.allowed_service_tiers.as_deref()),
    })))
}

async fn revoke_key(
    op: Operator,
    id: web::Path<i64>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let id = id.into_inner();
    manage::revoke_key(&state.deps.db, &op.into(), id).await?;
    Ok(HttpResponse::Ok().json(json!({"revoked": id})))
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

/// The latest operator actions, newest first.
async fn audit(
    _: Operator,
    query: web::Query<AuditQuery>,
    state: web::Data<AdminState>,
) -> Result<HttpResponse, HttpError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1_000);
    let rows = queries::audit::recent(&state.deps.db, limit)
        .await
        .map_err(db_error)?;
    let rows: Vec<serde_json::Value> = rows
        .into_iter()
        .map(|r| {
            let detail: serde_json::Value =
                serde_json::from_str(&r.detail).unwrap_or(serde_json::Value::Null);
            let mut v = json!(r);
            v["detail"] = detail;
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({"audit": rows})))
}
