//! Users and keys as operators change them — one path for the CLI and the admin API
//! (docs/DESIGN.md#audit): the checks, the change, and its row in `admin_audit`. Changes reach
//! running relays within `limits.standing_cache_ms` (docs/DESIGN.md#admission-cache).

use serde_json::{Value, json};

use crate::auth::{self, AuthError, KeyRequest};
use crate::billing::money::{self, MoneyError};
use crate::db::models::{ApiKey, NewAudit, User};
use crate::db::queries::keys::KeyChange;
use crate::db::{DbError, DbPool, queries};

/// Who acts, and from where (an audit row's `actor` and `peer`).
#[derive(Debug, Clone)]
pub struct Operator {
    pub actor: String,
    pub peer: String,
}

impl Operator {
    /// The command line, as the operating system user running it.
    pub fn cli() -> Self {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        Self {
            actor: format!("cli:{user}"),
            peer: "local".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// A value out of range or malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// A USD amount given as text (`"12.50"`), for the field `field`.
pub fn usd(field: &str, text: &str) -> Result<i64, ManageError> {
    money::parse_usd(text).map_err(|e: MoneyError| ManageError::Invalid(format!("{field}: {e}")))
}

/// Appends the audit row of an action that was carried out. A failure to write it is logged
/// (with the whole row) and does not undo the action: the action happened.
pub async fn audit(db: &DbPool, op: &Operator, action: &str, target: &str, detail: Value) {
    let detail = detail.to_string();
    let row = NewAudit {
        at: crate::db::now(),
        actor: &op.actor,
        peer: &op.peer,
        action,
        target,
        detail: &detail,
    };
    if let Err(e) = queries::audit::insert(db, &row).await {
        tracing::error!(error = %e, actor = %op.actor, peer = %op.peer, action, target, detail = %detail,
            "an operator action was carried out but its audit row could not be written");
    }
}

fn no_user(name: &str) -> ManageError {
    ManageError::NotFound(format!("no user named {name:?}"))
}

fn no_key(id: i64) -> ManageError {
    ManageError::NotFound(format!("no active key with id {id}"))
}

pub async fn create_user(
    db: &DbPool,
    op: &Operator,
    name: &str,
    balance_nanousd: Option<i64>,
) -> Result<User, ManageError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ManageError::Invalid("name: must not be empty".into()));
    }
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ManageError::Invalid(
            "name: at most 128 bytes, no control characters".into(),
        ));
    }
    let user = queries::users::create(db, name, balance_nanousd)
        .await
        .map_err(|e| {
            if e.is_unique_violation() {
                ManageError::Exists(format!("user {name:?} exists already"))
            } else {
                e.into()
            }
        })?;
    audit(
        db,
        op,
        "users.create",
        name,
        json!({"id": user.id, "balance_nanousd": balance_nanousd}),
    )
    .await;
    Ok(user)
}

/// A change of a user's balance.
#[derive(Debug, Clone, Copy)]
pub enum Balance {
    /// Set it (`None`: no limit).
    Set(Option<i64>),
    /// Top it up by this much (a user without a limit has nothing to top up).
    Add(i64),
}

/// Changes a user's balance; returns the new one (`None`: no limit).
pub async fn balance(
    db: &DbPool,
    op: &Operator,
    name: &str,
    change: Balance,
) -> Result<Option<i64>, ManageError> {
    let now = match change {
        Balance::Set(to) => {
            if !queries::users::set_balance(db, name, to).await? {
                return Err(no_user(name));
            }
            to
        }
        Balance::Add(delta) => match queries::users::add_balance(db, name, delta).await? {
            Some(b) => Some(b),
            None if queries::users::by_name(db, name).await?.is_some() => {
                return Err(ManageError::Invalid(format!(
                    "add_usd: user {name:?} has no balance limit (set one first)"
                )));
            }
            None => return Err(no_user(name)),
        },
    };
    let detail = match change {
        Balance::Set(to) => json!({"set_nanousd": to, "balance_nanousd": now}),
        Balance::Add(d) => json!({"added_nanousd": d, "balance_nanousd": now}),
    };
    audit(db, op, "users.balance", name, detail).await;
    Ok(now)
}

pub async fn set_enabled(
    db: &DbPool,
    op: &Operator,
    name: &str,
    enabled: bool,
) -> Result<(), ManageError> {
    if !queries::users::set_enabled(db, name, enabled).await? {
        return Err(no_user(name));
    }
    let action = if enabled {
        "users.enable"
    } else {
        "users.disable"
    };
    audit(db, op, action, name, json!({})).await;
    Ok(())
}

/// Checks the limits of a key being created or changed.
fn check_limits(
    max_sessions: Option<i32>,
    max_turns: Option<i32>,
    lists: [Option<&[String]>; 2],
) -> Result<(), ManageError> {
    for (field, v) in [
        ("max_sessions", max_sessions),
        ("max_concurrent_turns", max_turns),
    ] {
        if v.is_some_and(|n| n < 1) {
            return Err(ManageError::Invalid(format!("{field}: at least 1")));
        }
    }
    for (field, list) in ["allowed_models", "allowed_service_tiers"]
        .into_iter()
        .zip(lists)
    {
        if list.is_some_and(|l| {
            l.is_empty() || l.iter().any(|m| m.trim().is_empty() || m.contains(','))
        }) {
            return Err(ManageError::Invalid(format!(
                "{field}: one name or more, each non-empty and without commas (null: any)"
            )));
        }
    }
    Ok(())
}

/// Creates a key for the user named `user`: the full key (shown once) and its row.
pub async fn create_key(
    db: &DbPool,
    op: &Operator,
    user: &str,
    req: &KeyRequest,
) -> Result<(String, ApiKey), ManageError> {
    check_limits(
        req.max_sessions,
        req.max_concurrent_turns,
        [
            req.allowed_models.as_deref(),
            req.allowed_service_tiers.as_deref(),
        ],
    )?;
    let owner = queries::users::by_name(db, user)
        .await?
        .ok_or_else(|| no_user(user))?;
    let (key, row) = auth::create_key(db, owner.id, req).await?;
    audit(
        db,
        op,
        "keys.create",
        &key_target(&row),
        json!({"user": owner.name, "label": req.label, "quota_nanousd": req.quota_nanousd,
            "max_sessions": req.max_sessions, "max_concurrent_turns": req.max_concurrent_turns,
            "allowed_models": req.allowed_models, "allowed_service_tiers": req.allowed_service_tiers}),
    )
    .await;
    Ok((key, row))
}

/// How a key is named in the audit: its id and display prefix.
fn key_target(k: &ApiKey) -> String {
    format!("key {} ({})", k.id, k.key_prefix)
}

/// A change of a key's limits, as an operator writes it: `None` leaves a field, `Some(None)`
/// clears it (no limit, any model).
#[derive(Debug, Default, Clone)]
pub struct KeyEdit {
    pub label: Option<Option<String>>,
    pub quota_nanousd: Option<Option<i64>>,
    pub max_sessions: Option<Option<i32>>,
    pub max_concurrent_turns: Option<Option<i32>>,
    pub allowed_models: Option<Option<Vec<String>>>,
    pub allowed_service_tiers: Option<Option<Vec<String>>>,
}

impl KeyEdit {
    /// The fields given, with their new values (`null`: cleared).
    fn detail(&self) -> Value {
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                m.insert(k.into(), v);
            }
        };
        put("label", self.label.as_ref().map(|v| json!(v)));
        put("quota_nanousd", self.quota_nanousd.map(|v| json!(v)));
        put("max_sessions", self.max_sessions.map(|v| json!(v)));
        put(
            "max_concurrent_turns",
            self.max_concurrent_turns.map(|v| json!(v)),
        );
        put(
            "allowed_models",
            self.allowed_models.as_ref().map(|v| json!(v)),
        );
        put(
            "allowed_service_tiers",
            self.allowed_service_tiers.as_ref().map(|v| json!(v)),
        );
        Value::Object(m)
    }
}

pub async fn update_key(
    db: &DbPool,
    op: &Operator,
    id: i64,
    edit: &KeyEdit,
) -> Result<ApiKey, ManageError> {
    check_limits(
        edit.max_sessions.flatten(),
        edit.max_concurrent_turns.flatten(),
        [
            edit.allowed_models.as_ref().and_then(|l| l.as_deref()),
            edit.allowed_service_tiers
                .as_ref()
                .and_then(|l| l.as_deref()),
        ],
    )?;
    let stored =
        |l: &Option<Option<Vec<String>>>| l.as_ref().map(|l| auth::stored_list(l.as_deref()));
    let change = KeyChange {
        label: edit.label.clone(),
        quota_nanousd: edit.quota_nanousd,
        max_sessions: edit.max_sessions,
        max_concurrent_turns: edit.max_concurrent_turns,
        allowed_models: stored(&edit.allowed_models),
        allowed_service_tiers: stored(&edit.allowed_service_tiers),
    };
    let empty = change.label.is_none()
        && change.quota_nanousd.is_none()
        && change.max_sessions.is_none()
        && change.max_concurrent_turns.is_none()
        && change.allowed_models.is_none()
        && change.allowed_service_tiers.is_none();
    if empty {
        return Err(ManageError::Invalid("nothing to change".into()));
    }
    if !queries::keys::update(db, id, &change).await? {
        return Err(no_key(id));
    }
    let (row, _) = queries::keys::by_id(db, id)
        .await?
        .ok_or_else(|| no_key(id))?;
    audit(db, op, "keys.update", &key_target(&row), edit.detail()).await;
    Ok(row)
}

pub async fn revoke_key(db: &DbPool, op: &Operator, id: i64) -> Result<(), ManageError> {
    if !queries::keys::revoke(db, id).await? {
        return Err(no_key(id));
    }
    let target = match queries::keys::by_id(db, id).await? {
        Some((row, _)) => key_target(&row),
        None => format!("key {id}"),
    };
    audit(db, op, "keys.revoke", &target, json!({})).await;
    Ok(())
}
