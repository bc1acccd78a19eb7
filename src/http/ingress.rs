//! The WebSocket ingress: every check that can refuse a client happens here, before the
//! upgrade, with an HTTP JSON error (docs/DESIGN.md#handshake); then a `SessionActor` takes the socket.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};

use std::time::Duration;

use super::error::HttpError;
use super::refusals;
use crate::auth;
use crate::protocol::errors::ErrorCode;
use crate::session::SessionDeps;
use crate::session::admission::KeySlot;
use crate::session::fleet::{SlotKind, Taken};
use actix::{Actor, AsyncContext};

use crate::session::actor::{SessionActor, auth_error_code};
use crate::session::socket;
use crate::upstream::dial::passes_through;

/// Query parameters that would carry a key in the URL (refused: URLs end up in logs).
const KEY_PARAMS: &[&str] = &[
    "api_key",
    "api-key",
    "apikey",
    "key",
    "token",
    "access_token",
];

/// Whether a query string carries a key: a parameter named like one, or any value that looks
/// like a turnpike key (`tpk_…`) or an OpenAI key (`sk-…`), whatever its name. Values are
/// compared after percent-decoding of the few bytes that matter.
pub fn query_carries_key(query: &str) -> bool {
    query.split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value
            .replace("%5F", "_")
            .replace("%5f", "_")
            .replace("%2D", "-")
            .replace("%2d", "-");
        let value = value
            .trim_start_matches("Bearer%20")
            .trim_start_matches("Bearer+");
        KEY_PARAMS.contains(&name.to_ascii_lowercase().as_str())
            || value.starts_with(crate::auth::KEY_SCHEME)
            || value.starts_with("sk-")
    })
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    for path in [
        "/v1/responses",
        "/responses",
        "/backend-api/codex/responses",
    ] {
        cfg.route(path, web::get().to(upgrade));
    }
}

fn presented_key(req: &HttpRequest) -> Option<&str> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| header("x-api-key"))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

fn is_websocket(req: &HttpRequest) -> bool {
    req.headers()
        .get("upgrade")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// A refused handshake is counted, not logged by itself (docs/DESIGN.md#refusals); a prefix
/// that keeps failing waits before it hears the refusal.
async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, HttpError> {
    let deps: Arc<SessionDeps> = deps.into_inner();
    let limits = &deps.settings.limits;
    let (threshold, delay) = (
        limits.refused_handshakes_before_delay,
        Duration::from_millis(limits.refused_handshake_delay_ms),
    );
    let peer = req.peer_addr().map(|a| a.ip());
    let outcome = handshake(req.clone(), stream, deps).await;
    summarize_refusal(outcome, peer, threshold, delay).await
}

/// A refused request is counted in the refusal summary (docs/DESIGN.md#refusals), and a
/// prefix that keeps failing waits before it hears the refusal.
pub(super) async fn summarize_refusal<T>(
    outcome: Result<T, HttpError>,
    peer: Option<std::net::IpAddr>,
    threshold: u32,
    delay: Duration,
) -> Result<T, HttpError> {
    match outcome {
        Err(mut e) if e.code.status() < 500 => {
            let from_prefix = refusals::record(e.code.code(), peer);
            if threshold > 0 && from_prefix > threshold {
                tokio::time::sleep(delay).await;
            }
            e.summarized = true;
            Err(e)
        }
        other => other,
    }
}

/// The checks every client request passes first, WebSocket or HTTP: not draining, no key in
/// the URL, a key presented and valid.
pub(super) async fn authenticate(
    req: &HttpRequest,
    deps: &SessionDeps,
) -> Result<crate::auth::Principal, HttpError> {
    if deps.draining.load(Ordering::Relaxed) {
        return Err(HttpError::new(
            ErrorCode::NotReady,
            "the relay is shutting down",
        ));
    }
    if query_carries_key(req.query_string()) {
        return Err(HttpError::new(
            ErrorCode::ApiKeyInQuery,
            "API keys in the URL are refused; send Authorization: Bearer <key>",
        ));
    }
    let Some(key) = presented_key(req) else {
        return Err(HttpError::new(
            ErrorCode::MissingApiKey,
            "send your turnpike key as Authorization: Bearer <key>",
        ));
    };
    auth::authenticate_cached(&deps.db, Some(&deps.auth_cache), key)
        .await
        .map_err(|e| {
            let code = auth_error_code(&e);
            let message = match &e {
                auth::AuthError::Db(_) => {
                    "the key cannot be checked now (database unavailable)".to_string()
                }
                other => other.to_string(),
            };
            HttpError::new(code, message)
        })
}

/// Handshake headers passed through to the upstream (docs/DESIGN.md#handshake).
pub(super) fn pass_through_headers(req: &HttpRequest) -> Vec<(String, String)> {
    req.headers()
        .iter()
        .filter(|(k, _)| passes_through(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

async fn handshake(
    req: HttpRequest,
    stream: web::Payload,
    deps: Arc<SessionDeps>,
) -> Result<HttpResponse, HttpError> {
    let principal = authenticate(&req, &deps).await?;
    if !is_websocket(&req) {
        return Err(HttpError::new(
            ErrorCode::UpgradeRequired,
            "this endpoint speaks WebSocket only (GET with Upgrade: websocket)",
        ));
    }
    let max_sessions = principal
        .max_sessions
        .or(Some(deps.settings.limits.default_max_sessions_per_key));
    let too_many = || {
        HttpError::new(
            ErrorCode::TooManySessions,
            "this key has its maximum of sessions open",
        )
        .retry_after(1)
    };
    let Some(local) = deps.slots.session(principal.key_id, max_sessions) else {
        return Err(too_many());
    };
    // Relays sharing PostgreSQL count the key's sessions together (docs/DESIGN.md#fleet-slots).
    let fleet = match &deps.fleet {
        Some(fleet) => match fleet
            .take(principal.key_id, SlotKind::Session, max_sessions)
            .await
        {
            Taken::Full => return Err(too_many()),
            Taken::Granted(slot) => slot,
        },
        None => None,
    };
    let slot = KeySlot::new(local, fleet);
    let headers = pass_through_headers(&req);
    let mut response = actix_web_actors::ws::handshake(&req)
        .map_err(|e| HttpError::new(ErrorCode::UpgradeRequired, e.to_string()))?;
    let (tx, body) = socket::transport();
    SessionActor::create(move |ctx| {
        ctx.add_stream(stream);
        SessionActor::new(deps, principal, slot, headers, tx)
    });
    Ok(response.streaming(body))
}

#[cfg(test)]
mod tests {
    use super::query_carries_key;

    #[test]
    fn keys_in_the_query_whatever_the_name() {
        for q in [
            "api_key=abc",
            "API_KEY=abc",
            "k=tpk_0123",
            "foo=1&bar=tpk%5F0123",
            "x=sk-proj-1",
            "auth=Bearer%20tpk_9",
        ] {
            assert!(query_carries_key(q), "{q}");
        }
        for q in ["", "model=gpt-5", "session=abc&turn=2", "q=tpk"] {
            assert!(!query_carries_key(q), "{q}");
        }
    }
}
