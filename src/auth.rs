//! turnpike API keys: generation, hashing, and the lookup the server uses to authenticate a
//! presented key. Keys are stored only as SHA-256; the full key is shown once, at creation.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::db::models::{ApiKey, NewApiKey, User};
use crate::db::{DbError, DbPool, queries};

/// Every turnpike key starts with this, so a leaked key is recognisable in a scan.
pub const KEY_SCHEME: &str = "tpk_";
/// Random bytes behind a key (192 bits).
const KEY_RANDOM_BYTES: usize = 24;
/// Characters of the key kept in clear for display (`tpk_` and 8 hex digits).
const DISPLAY_PREFIX_LEN: usize = KEY_SCHEME.len() + 8;

/// Lower-case hex SHA-256 of a key, as stored in `api_keys.key_hash`.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The part of a key shown in listings and logs.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(DISPLAY_PREFIX_LEN).collect()
}

/// A fresh random key.
pub fn generate_key() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; KEY_RANDOM_BYTES];
    getrandom::fill(&mut bytes)?;
    Ok(format!("{KEY_SCHEME}{}", hex::encode(bytes)))
}

/// Who is behind an authenticated key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub key_id: i64,
    pub key_prefix: String,
    pub user_id: i64,
    pub user_name: String,
    pub max_sessions: Option<i32>,
    pub max_concurrent_turns: Option<i32>,
}

/// Why a key is refused. Mapped to client errors in the protocol error table.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no API key presented")]
    Missing,
    #[error("invalid API key")]
    Invalid,
    #[error("API key revoked")]
    Revoked,
    #[error("user disabled")]
    UserDisabled,
    #[error("API key quota exhausted")]
    QuotaExhausted,
    #[error("user balance exhausted")]
    BalanceExhausted,
    #[error("this key may not use model {0:?}")]
    ModelNotAllowed(String),
    #[error("this key may not use service tier {0:?}")]
    ServiceTierNotAllowed(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Whether a key and its owner may run a turn now. Checked at connect and before every turn.
/// `pending` is spend not yet in the database (still in the accounting spool): the key's and
/// the user's.
pub fn check_standing(key: &ApiKey, user: &User, pending: (i64, i64)) -> Result<(), AuthError> {
    let (pending_key, pending_user) = pending;
    if key.revoked_at.is_some() {
        return Err(AuthError::Revoked);
    }
    if !user.enabled {
        return Err(AuthError::UserDisabled);
    }
    if let Some(quota) = key.quota_nanousd
        && key.spent_nanousd.saturating_add(pending_key) >= quota
    {
        return Err(AuthError::QuotaExhausted);
    }
    if let Some(balance) = user.balance_nanousd
        && balance.saturating_sub(pending_user) <= 0
    {
        return Err(AuthError::BalanceExhausted);
    }
    Ok(())
}

/// The names of a stored allow-list (`None`: no list, everything allowed).
pub fn allow_list(stored: Option<&str>) -> Option<Vec<&str>> {
    stored.map(|s| {
        s.split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .collect()
    })
}

/// An allow-list as stored: names trimmed, empty ones dropped, comma-joined; `None` for none.
pub fn stored_list(names: Option<&[String]>) -> Option<String> {
    let names: Vec<&str> = names?
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    (!names.is_empty()).then(|| names.join(","))
}

/// Whether a key may ask for this turn (docs/DESIGN.md#key-limits): its model, and the service
/// tier it names (a request naming none, or `auto`, asks for no tier in particular).
pub fn check_request(key: &ApiKey, model: &str, tier: Option<&str>) -> Result<(), AuthError> {
    if let Some(models) = allow_list(key.allowed_models.as_deref())
        && !models.contains(&model)
    {
        return Err(AuthError::ModelNotAllowed(model.to_string()));
    }
    let asked = tier.map(crate::billing::pricing::tier_name);
    if let (Some(tiers), Some(asked)) = (allow_list(key.allowed_service_tiers.as_deref()), asked)
        && asked != crate::billing::pricing::AUTO_TIER
        && !tiers.contains(&asked.as_str())
    {
        return Err(AuthError::ServiceTierNotAllowed(asked));
    }
    Ok(())
}

/// Authenticates a presented key: lookup by hash, constant-time confirmation, standing check.
pub async fn authenticate(pool: &DbPool, presented: &str) -> Result<Principal, AuthError> {
    authenticate_cached(pool, None, presented).await
}

/// Standings of keys that authenticated recently, by key hash: while the database is
/// unreachable, a key seen within `ttl` still connects (with the standing last read), so an
/// outage does not lock out clients that reconnect (Codex reconnects after every error).
#[derive(Debug)]
pub struct AuthCache {
    ttl: std::time::Duration,
    entries:
        std::sync::Mutex<std::collections::HashMap<String, (ApiKey, User, std::time::Instant)>>,
}

impl AuthCache {
    pub fn new(ttl: std::time::Duration) -> Self {
        Self {
            ttl,
            entries: std::sync::Mutex::default(),
        }
    }

    fn put(&self, hash: &str, key: &ApiKey, user: &User) {
        let mut m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, (_, _, at)| at.elapsed() < self.ttl);
        m.insert(
            hash.to_string(),
            (key.clone(), user.clone(), std::time::Instant::now()),
        );
    }

    fn get(&self, hash: &str) -> Option<(ApiKey, User)> {
        let m = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        m.get(hash)
            .filter(|(_, _, at)| at.elapsed() < self.ttl)
            .map(|(k, u, _)| (k.clone(), u.clone()))
    }
}

/// `authenticate`, falling back to `cache` when the database cannot be read.
pub async fn authenticate_cached(
    pool: &DbPool,
    cache: Option<&AuthCache>,
    presented: &str,
) -> Result<Principal, AuthError> {
    if presented.is_empty() {
        return Err(AuthError::Missing);
    }
    let hash = hash_key(presented);
    let (db, h) = (pool.clone(), hash.clone());
    let lookup = async move { queries::keys::by_hash(&db, &h).await };
    let (key, user) = match crate::db::within(crate::db::READ_DEADLINE, lookup).await {
        Ok(found) => {
            let (key, user) = found.ok_or(AuthError::Invalid)?;
            if let Some(c) = cache {
                c.put(&hash, &key, &user);
            }
            (key, user)
        }
        Err(e) => match cache.and_then(|c| c.get(&hash)) {
            Some(seen) => seen,
            None => return Err(e.into()),
        },
    };
    // The index lookup already matched; confirm without a data-dependent early exit.
    if !bool::from(key.key_hash.as_bytes().ct_eq(hash.as_bytes())) {
        return Err(AuthError::Invalid);
    }
    check_standing(&key, &user, (0, 0))?;
    Ok(Principal {
        key_id: key.id,
        key_prefix: key.key_prefix,
        user_id: user.id,
        user_name: user.name,
        max_sessions: key.max_sessions,
        max_concurrent_turns: key.max_concurrent_turns,
    })
}

/// What `keys create` asks for.
#[derive(Debug, Default, Clone)]
pub struct KeyRequest {
    pub label: Option<String>,
    pub quota_nanousd: Option<i64>,
    pub max_sessions: Option<i32>,
    pub max_concurrent_turns: Option<i32>,
    /// Models the key may use (`None`: any).
    pub allowed_models: Option<Vec<String>>,
    /// Service tiers the key may ask for (`None`: any).
    pub allowed_service_tiers: Option<Vec<String>>,
}

/// Creates a key for `user_id`; returns the full key (shown once) and the stored row.
pub async fn create_key(
    pool: &DbPool,
    user_id: i64,
    req: &KeyRequest,
) -> Result<(String, ApiKey), AuthError> {
    let key = generate_key().map_err(|e| DbError::Io(std::io::Error::other(e.to_string())))?;
    let hash = hash_key(&key);
    let prefix = display_prefix(&key);
    let models = stored_list(req.allowed_models.as_deref());
    let tiers = stored_list(req.allowed_service_tiers.as_deref());
    let row = queries::keys::insert(
        pool,
        &NewApiKey {
            user_id,
            key_hash: &hash,
            key_prefix: &prefix,
            label: req.label.as_deref(),
            quota_nanousd: req.quota_nanousd,
            spent_nanousd: 0,
            max_sessions: req.max_sessions,
            max_concurrent_turns: req.max_concurrent_turns,
            created_at: crate::db::now(),
            allowed_models: models.as_deref(),
            allowed_service_tiers: tiers.as_deref(),
        },
    )
    .await?;
    Ok((key, row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ApiKey {
        ApiKey {
            key_hash: hash_key("k"),
            ..crate::db::models::sample_standing().0
        }
    }

    fn user() -> User {
        crate::db::models::sample_standing().1
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn generated_keys_are_distinct_and_prefixed() {
        let a = generate_key().unwrap();
        let b = generate_key().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_SCHEME));
        assert_eq!(a.len(), KEY_SCHEME.len() + 2 * KEY_RANDOM_BYTES);
        assert_eq!(display_prefix(&a).len(), 12);
        assert!(a.starts_with(&display_prefix(&a)));
    }

    #[test]
    fn standing_rules() {
        check_standing(&key(), &user(), (0, 0)).unwrap();
        let mut k = key();
        k.quota_nanousd = Some(100);
        k.spent_nanousd = 99;
        check_standing(&k, &user(), (0, 0)).unwrap();
        // Pending spend counts against the quota before it reaches the database.
        assert!(matches!(
            check_standing(&k, &user(), (1, 1)),
            Err(AuthError::QuotaExhausted)
        ));
        k.spent_nanousd = 100;
        assert!(matches!(
            check_standing(&k, &user(), (0, 0)),
            Err(AuthError::QuotaExhausted)
        ));
        let mut u = user();
        u.balance_nanousd = Some(0);
        assert!(matches!(
            check_standing(&key(), &u, (0, 0)),
            Err(AuthError::BalanceExhausted)
        ));
        u.balance_nanousd = Some(5);
        check_standing(&key(), &u, (4, 4)).unwrap();
        assert!(matches!(
            check_standing(&key(), &u, (5, 5)),
            Err(AuthError::BalanceExhausted)
        ));
        u.enabled = false;
        assert!(matches!(
            check_standing(&key(), &u, (0, 0)),
            Err(AuthError::UserDisabled)
        ));
        let mut k = key();
        k.revoked_at = Some(crate::db::now());
        assert!(matches!(
            check_standing(&k, &user(), (0, 0)),
            Err(AuthError::Revoked)
        ));
    }
}
