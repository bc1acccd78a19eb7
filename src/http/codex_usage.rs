//! Codex's quota endpoint (docs/DESIGN.md#codex-usage): `GET /api/codex/usage` and
//! `GET /backend-api/wham/usage`, answered from the presented key's standing in the shape
//! Codex's `/status` reads (`RateLimitStatusPayload`): the key's quota as the primary window,
//! the user's balance as the secondary window and as credits.

use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::error::HttpError;
use super::ingress;
use crate::billing::money;
use crate::db::models::{ApiKey, User};
use crate::protocol::errors::ErrorCode;
use crate::session::SessionDeps;

/// The paths Codex asks, by its base URL's style (`/api/codex/…`, or `/wham/…` under a
/// ChatGPT-style `/backend-api`).
pub const PATHS: [&str; 2] = ["/api/codex/usage", "/backend-api/wham/usage"];

/// The plan Codex is told: a key of an organisation's gateway (Codex names plans; it shows this).
const PLAN_TYPE: &str = "enterprise";

pub fn routes(cfg: &mut web::ServiceConfig) {
    for path in PATHS {
        cfg.route(path, web::get().to(usage));
    }
}

async fn usage(req: HttpRequest, deps: web::Data<SessionDeps>) -> Result<HttpResponse, HttpError> {
    let peer = req.peer_addr().map(|a| a.ip());
    let checked = ingress::authenticate(req.head(), &deps).await;
    let principal = ingress::summarize_refusal(checked, peer, &deps.settings.limits).await?;
    let unavailable = |_| {
        HttpError::new(
            ErrorCode::NotReady,
            "the key's standing cannot be read right now; retry",
        )
    };
    let (db, key_id) = (deps.db.clone(), principal.key_id);
    let read = async move { crate::db::queries::keys::by_id(&db, key_id).await };
    let (key, user) = crate::db::within(crate::db::READ_DEADLINE, read)
        .await
        .map_err(unavailable)?
        .ok_or_else(|| HttpError::new(ErrorCode::ApiKeyRevoked, "API key revoked"))?;
    // The user's spend is what its keys spent (a balance is what remains of what was given).
    let user_spent = match user.balance_nanousd {
        None => 0,
        Some(_) => {
            let (db, name) = (deps.db.clone(), user.name.clone());
            let keys = async move { crate::db::queries::keys::list(&db, Some(&name)).await };
            let keys = crate::db::within(crate::db::READ_DEADLINE, keys)
                .await
                .map_err(unavailable)?;
            keys.iter()
                .map(|(k, _)| k.spent_nanousd)
                .fold(0i64, i64::saturating_add)
        }
    };
    let pending = deps.pending_spend.of(key.id, user.id);
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("cache-control", "no-store"))
        .json(payload(&key, &user, user_spent, pending)))
}

/// Percent of `limit` that `used` is, rounded up (a sliver used is 1 %), at most 100.
fn used_percent(used: i64, limit: i64) -> i64 {
    if limit <= 0 {
        return 100;
    }
    let used = i128::from(used.max(0));
    let percent = (used * 100 + i128::from(limit) - 1) / i128::from(limit);
    i64::try_from(percent.min(100)).unwrap_or(100)
}

/// A window of a limit that never resets (turnpike's quotas and balances have no period):
/// no window length and no reset time, which Codex reads as zeros.
fn window(percent: i64) -> Value {
    json!({
        "used_percent": percent,
        "limit_window_seconds": 0,
        "reset_after_seconds": 0,
        "reset_at": 0,
    })
}

/// The answer for a key and its user: `user_spent` is what the user's keys spent, `pending`
/// the key's and the user's spend not yet in the database (`PendingSpend`).
pub fn payload(key: &ApiKey, user: &User, user_spent: i64, pending: (i64, i64)) -> Value {
    let key_spent = key.spent_nanousd.saturating_add(pending.0);
    let balance = user
        .balance_nanousd
        .map(|b| b.saturating_sub(pending.1).max(0));
    let key_window = key.quota_nanousd.map(|q| used_percent(key_spent, q));
    let user_window = balance.map(|b| {
        let spent = user_spent.saturating_add(pending.1);
        used_percent(spent, spent.saturating_add(b))
    });
    let reached = key_window.is_some_and(|p| p >= 100) || balance == Some(0);
    let rate_limit = (key_window.is_some() || user_window.is_some()).then(|| {
        json!({
            "allowed": !reached && user.enabled,
            "limit_reached": reached,
            "primary_window": key_window.map(window),
            "secondary_window": user_window.map(window),
        })
    });
    json!({
        "plan_type": PLAN_TYPE,
        "rate_limit": rate_limit,
        "credits": {
            "has_credits": balance.is_none_or(|b| b > 0),
            "unlimited": balance.is_none(),
            "balance": balance.map(money::format_usd),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing(quota: Option<i64>, spent: i64, balance: Option<i64>) -> (ApiKey, User) {
        let (mut key, mut user) = crate::db::models::sample_standing();
        (key.quota_nanousd, key.spent_nanousd) = (quota, spent);
        user.balance_nanousd = balance;
        (key, user)
    }

    #[test]
    fn quota_and_balance_as_codex_reads_them() {
        // $10 quota with $2.50 spent and $0.01 in the spool; the user has $6 left of $8 + $6.
        let (k, u) = standing(Some(10_000_000_000), 2_500_000_000, Some(6_000_000_000));
        let p = payload(&k, &u, 8_000_000_000, (10_000_000, 0));
        assert_eq!(p["plan_type"], "enterprise");
        let rl = &p["rate_limit"];
        assert_eq!(rl["allowed"], true);
        assert_eq!(rl["limit_reached"], false);
        assert_eq!(rl["primary_window"]["used_percent"], 26);
        assert_eq!(rl["secondary_window"]["used_percent"], 58);
        for w in ["primary_window", "secondary_window"] {
            for f in ["limit_window_seconds", "reset_after_seconds", "reset_at"] {
                assert!(rl[w][f].is_i64(), "{w}.{f} is an integer Codex requires");
            }
        }
        assert_eq!(p["credits"]["balance"], "6");
        assert_eq!(p["credits"]["unlimited"], false);
        assert_eq!(p["credits"]["has_credits"], true);
    }

    #[test]
    fn unlimited_and_exhausted() {
        let (k, u) = standing(None, 5, None);
        let p = payload(&k, &u, 0, (0, 0));
        assert!(p["rate_limit"].is_null());
        assert_eq!(p["credits"]["unlimited"], true);
        assert!(p["credits"]["balance"].is_null());
        let (k, u) = standing(Some(100), 100, None);
        let p = payload(&k, &u, 0, (0, 0));
        assert_eq!(p["rate_limit"]["primary_window"]["used_percent"], 100);
        assert_eq!(p["rate_limit"]["limit_reached"], true);
        assert!(p["rate_limit"]["secondary_window"].is_null());
        assert_eq!(used_percent(1, 1_000_000), 1);
        assert_eq!(used_percent(5, 0), 100);
        assert_eq!(used_percent(i64::MAX, 1), 100);
    }
}
