//! The WebSocket ingress: every check that can refuse a client happens here, before the
//! upgrade, with an HTTP JSON error (docs/DESIGN.md#handshake); then a `SessionActor` takes the
//! socket itself (docs/DESIGN.md#client-socket).
//!
//! actix-http hands every request that asks for `Upgrade: websocket` to [`upgrade_service`],
//! with its connection; a GET on a WebSocket path without one reaches the app's route here
//! (`routes`) and is answered 426 once its key is checked.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actix_codec::Framed;
use actix_http::body::{BodySize, MessageBody};
use actix_http::h1::{Codec, Message};
use actix_http::{ConnectionType, Request, RequestHead, Response};
use actix_service::{ServiceFactory, fn_service};
use actix_web::http::header::HeaderMap;
use actix_web::rt::net::TcpStream;
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use bytes::BytesMut;
use futures_util::SinkExt;
use tracing::Instrument;

use super::error::HttpError;
use super::{refusals, request_log};
use crate::auth;
use crate::config::LimitSettings;
use crate::protocol::errors::ErrorCode;
use crate::session::SessionDeps;
use crate::session::admission::KeySlot;
use crate::session::fleet::{SlotKind, Taken};
use actix::{Actor, AsyncContext};

use crate::pool::placement::Claim;
use crate::session::actor::{SessionActor, auth_error_code};
use crate::session::socket;
use crate::telemetry::metric;
use crate::upstream::dial::{identity_of, passes_through};

/// The paths a client reaches the Responses API on (WebSocket GET, HTTP POST alike).
pub const PATHS: [&str; 3] = [
    "/v1/responses",
    "/responses",
    "/backend-api/codex/responses",
];

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
    for path in PATHS {
        cfg.route(path, web::get().to(not_upgraded));
    }
}

fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    header("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| header("x-api-key"))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A GET on a WebSocket path that does not ask for the upgrade: the key first, then 426.
async fn not_upgraded(
    req: HttpRequest,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, HttpError> {
    let checked = authenticate(req.head(), &deps).await.and_then(|_| {
        Err(HttpError::new(
            ErrorCode::UpgradeRequired,
            "this endpoint speaks WebSocket only (GET with Upgrade: websocket)",
        ))
    });
    let peer = req.peer_addr().map(|a| a.ip());
    summarize_refusal(checked, peer, &deps.settings.limits).await
}

/// A refused request is counted in the refusal summary (docs/DESIGN.md#refusals), and a
/// prefix that keeps failing waits before it hears the refusal.
pub(super) async fn summarize_refusal<T>(
    outcome: Result<T, HttpError>,
    peer: Option<std::net::IpAddr>,
    limits: &LimitSettings,
) -> Result<T, HttpError> {
    match outcome {
        Err(mut e) if e.code.status() < 500 => {
            let from_prefix = refusals::record(e.code.code(), peer);
            let threshold = limits.refused_handshakes_before_delay;
            if threshold > 0 && from_prefix > threshold {
                let delay = Duration::from_millis(limits.refused_handshake_delay_ms);
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
    req: &RequestHead,
    deps: &SessionDeps,
) -> Result<crate::auth::Principal, HttpError> {
    if deps.draining.load(Ordering::Relaxed) {
        return Err(HttpError::new(
            ErrorCode::NotReady,
            "the relay is shutting down",
        ));
    }
    if query_carries_key(req.uri.query().unwrap_or_default()) {
        return Err(HttpError::new(
            ErrorCode::ApiKeyInQuery,
            "API keys in the URL are refused; send Authorization: Bearer <key>",
        ));
    }
    let Some(key) = presented_key(&req.headers) else {
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
pub(super) fn pass_through_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| passes_through(k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// What actix-http hands the upgrade service: the request and its connection, with whatever
/// was read past the request's head.
type Upgrade = (Request, Framed<TcpStream, Codec>);

/// The upgrade service: checks the handshake, answers it, and runs the session on the socket.
/// Its future lives as long as the session writes to the client, so the server's connection
/// count and its graceful stop see the socket (docs/DESIGN.md#client-socket).
pub fn upgrade_service(
    deps: Arc<SessionDeps>,
) -> impl ServiceFactory<Upgrade, Config = (), Response = (), Error = Infallible, InitError = ()> {
    fn_service(move |(req, framed): Upgrade| upgrade(req, framed, deps.clone()))
}

/// A session admitted by the handshake's checks.
struct Admitted {
    principal: crate::auth::Principal,
    slot: KeySlot,
    headers: Vec<(String, String)>,
    /// The 101.
    response: Response<()>,
}

/// The 101's header that tells Codex the largest WebSocket message the relay takes.
pub const MAX_MESSAGE_HEADER: &str = "x-codex-websocket-max-message-bytes";

async fn upgrade(
    req: Request,
    framed: Framed<TcpStream, Codec>,
    deps: Arc<SessionDeps>,
) -> Result<(), Infallible> {
    // The handshake's future and everything it holds (the request, the HTTP codec and its
    // buffers, the checks' state) live on the heap only until the session starts: the future
    // kept for the socket's life is the writer's alone (idle memory, BENCHMARKS.md).
    match Box::pin(open(req, framed, deps)).await {
        Some(Running::Here(writer)) => writer.await,
        // The writer runs on the other worker; this future ends with it, so this worker's
        // connection count and graceful stop still see the socket.
        Some(Running::There(ended)) => {
            let _ = ended.await;
        }
        None => {}
    }
    Ok(())
}

/// A session started on the socket: its writer, here or on another worker thread.
enum Running {
    Here(socket::ClientWriter),
    There(tokio::sync::oneshot::Receiver<()>),
}

/// What a session is started with.
struct Starting {
    deps: Arc<SessionDeps>,
    principal: crate::auth::Principal,
    slot: KeySlot,
    headers: Vec<(String, String)>,
    claim: Option<Claim>,
}

/// Starts the session on the socket, on the calling thread; returns its writer.
fn start(io: TcpStream, leftover: BytesMut, s: Starting) -> socket::ClientWriter {
    let (tx, input, writer) = socket::over(io, leftover);
    SessionActor::create(move |ctx| {
        ctx.add_stream(input);
        SessionActor::new(s.deps, s.principal, s.slot, s.headers, tx, s.claim)
    });
    writer
}

/// The handshake: refused (`None`), or a session started on the socket.
async fn open(
    req: Request,
    mut framed: Framed<TcpStream, Codec>,
    deps: Arc<SessionDeps>,
) -> Option<Running> {
    let head = req.head();
    let peer = head.peer_addr.map(|a| a.ip());
    let path = head.uri.path();
    let known = PATHS.contains(&path);
    let span = request_log::span(
        head.method.as_str(),
        if known { path } else { "" },
        path,
        &peer.map(|ip| ip.to_string()).unwrap_or_default(),
    );
    let outcome = if known {
        let checked = handshake(head, &deps).instrument(span.clone()).await;
        summarize_refusal(checked, peer, &deps.settings.limits).await
    } else {
        // Not one of ours: the answer the app gives an unknown route.
        Err(super::responses::no_route(&head.method, path))
    };
    let admitted = match outcome {
        Ok(admitted) => admitted,
        Err(e) => {
            request_log::ended(&span, e.status_code(), Some(&e));
            // The client may be gone already: nothing to do about it.
            let _ = refuse(&mut framed, &e).await;
            return None;
        }
    };
    request_log::ended(
        &span,
        actix_web::http::StatusCode::SWITCHING_PROTOCOLS,
        None,
    );
    let Admitted {
        principal,
        slot,
        headers,
        response,
    } = admitted;
    if framed
        .send(Message::Item((response, BodySize::None)))
        .await
        .is_err()
    {
        // Gone before the 101: no session (the key's slot goes with `slot`).
        return None;
    }
    let placed = deps.placement.place(&identity_of(&headers));
    let starting = Starting {
        deps,
        principal,
        slot,
        headers,
        claim: placed.claim,
    };
    let parts = framed.into_parts();
    let Some(there) = placed.to else {
        return Some(Running::Here(start(parts.io, parts.read_buf, starting)));
    };
    // docs/DESIGN.md#placement: the socket moves to the worker holding the idle connection.
    let io = parts.io.into_std().ok()?;
    let leftover = parts.read_buf;
    let (ended, running) = tokio::sync::oneshot::channel();
    let moved = there.spawn_fn(move || {
        // A socket the other worker cannot register is closed (dropped) like a failed write.
        let Ok(io) = TcpStream::from_std(io) else {
            return;
        };
        let writer = start(io, leftover, starting);
        actix_web::rt::spawn(async move {
            writer.await;
            let _ = ended.send(());
        });
    });
    if moved {
        ::metrics::counter!(metric::SESSIONS_MOVED).increment(1);
    }
    moved.then_some(Running::There(running))
}

/// Answers a refused handshake with its JSON error and closes the connection.
async fn refuse(framed: &mut Framed<TcpStream, Codec>, e: &HttpError) -> std::io::Result<()> {
    let (response, body) = e.error_response().into_parts();
    let body = body.try_into_bytes().unwrap_or_default();
    let mut response: Response<()> = response.into();
    response
        .head_mut()
        .set_connection_type(ConnectionType::Close);
    let size = BodySize::Sized(u64::try_from(body.len()).unwrap_or(u64::MAX));
    framed.feed(Message::Item((response, size))).await?;
    framed.feed(Message::Chunk(Some(body))).await?;
    framed.send(Message::Chunk(None)).await?;
    framed.close().await
}

async fn handshake(head: &RequestHead, deps: &Arc<SessionDeps>) -> Result<Admitted, HttpError> {
    let principal = authenticate(head, deps).await?;
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
    let headers = pass_through_headers(&head.headers);
    // The largest message this relay reads: Codex sends a bigger request over HTTP instead of
    // a frame it would get 1009 for (docs/DESIGN.md#upstream-transports).
    let response = actix_http::ws::handshake(head)
        .map_err(|e| HttpError::new(ErrorCode::UpgradeRequired, e.to_string()))?
        .insert_header((
            MAX_MESSAGE_HEADER,
            deps.settings.limits.client_frame_max_bytes.to_string(),
        ))
        .finish()
        .drop_body();
    Ok(Admitted {
        principal,
        slot,
        headers,
        response,
    })
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
