//! The HTTP surface (docs/DESIGN.md#http-surface): `POST /v1/responses` — the JSON response,
//! or with `stream: true` the upstream's server-sent events relayed as they arrive — and
//! `POST /v1/responses/compact`. Each request is a turn like a WebSocket turn: the same key
//! checks, admission (`session::gate`), accounts, usage extraction and record, durable before
//! the client hears the end.
//!
//! - this file: routes, the request's checks before its turn starts, the answer;
//! - `exchange`: the turn itself, run as a task of its own so that a client who leaves
//!   mid-request ends it `client_gone` with its record, never without one.

mod exchange;

use std::sync::Arc;
use std::time::Instant;

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::error::HttpError;
use super::ingress;
use crate::protocol::errors::ErrorCode;
use crate::protocol::frames::{self, ClientFrame, CreateFrame};
use crate::session::SessionDeps;

/// What a request asks of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `POST /responses`.
    Responses,
    /// `POST /responses/compact` (always JSON).
    Compact,
}

impl Kind {
    /// The upstream path under the account's `base_url`.
    fn upstream_path(self) -> &'static str {
        match self {
            Kind::Responses => "responses",
            Kind::Compact => "responses/compact",
        }
    }
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    for base in ingress::PATHS {
        cfg.route(base, web::post().to(create))
            .route(&format!("{base}/compact"), web::post().to(compact));
    }
}

async fn create(
    req: HttpRequest,
    payload: web::Payload,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, HttpError> {
    serve(req, payload, deps.into_inner(), Kind::Responses).await
}

async fn compact(
    req: HttpRequest,
    payload: web::Payload,
    deps: web::Data<SessionDeps>,
) -> Result<HttpResponse, HttpError> {
    serve(req, payload, deps.into_inner(), Kind::Compact).await
}

/// The answer the exchange gives the handler.
pub(crate) enum Reply {
    /// A refusal or failure in the relay's own words (JSON error).
    Error(HttpError),
    /// The upstream's answer, relayed (its JSON response, or its JSON error with its status).
    Upstream {
        status: StatusCode,
        body: Bytes,
        /// The upstream's response headers that reach the client (docs/DESIGN.md#headers).
        headers: Vec<(String, String)>,
    },
    /// The SSE stream: events as the exchange lets them through (see `exchange::Sink`), with
    /// the upstream's response headers that reach the client.
    Stream(
        mpsc::UnboundedReceiver<exchange::Chunk>,
        Vec<(String, String)>,
    ),
}

async fn serve(
    req: HttpRequest,
    payload: web::Payload,
    deps: Arc<SessionDeps>,
    kind: Kind,
) -> Result<HttpResponse, HttpError> {
    let accepted = Instant::now();
    let peer = req.peer_addr().map(|a| a.ip());
    let checked = ingress::authenticate(req.head(), &deps).await;
    let principal = ingress::summarize_refusal(checked, peer, &deps.settings.limits).await?;
    let body = read_body(&req, payload, &deps, principal.key_id).await?;
    let frame = request_of(&body)?;
    let (tx, rx) = oneshot::channel();
    let turn = exchange::Exchange::new(
        deps,
        principal,
        frame,
        exchange::Origin {
            kind,
            // docs/DESIGN.md#headers: what passes upstream; a pooled upstream socket's dial
            // and identity take only the session-describing ones among them.
            headers: crate::protocol::headers::filtered(
                req.headers()
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_bytes())),
                crate::protocol::headers::request_passes,
            ),
            path: req.path().to_string(),
            session: client_session(&req),
        },
        accepted,
    )?;
    actix_web::rt::spawn(turn.run(tx));
    // The exchange always answers; a dropped sender would be a bug in it.
    let reply = rx.await.map_err(|_| {
        HttpError::new(
            ErrorCode::UpstreamConnectionLost,
            "the request ended without an answer",
        )
    })?;
    Ok(respond(reply))
}

/// The client's own session id (`session-id` or Codex's `session_id` header): HTTP turns of
/// one client session share it as their `session_id`, as WebSocket turns share their session's.
fn client_session(req: &HttpRequest) -> Option<String> {
    ["session-id", "session_id"]
        .iter()
        .find_map(|h| req.headers().get(*h)?.to_str().ok())
        .map(|v| crate::record::clean_label(v.trim(), crate::record::MODEL_MAX_CHARS))
        .filter(|v| !v.is_empty())
}

fn respond(reply: Reply) -> HttpResponse {
    match reply {
        Reply::Error(e) => actix_web::ResponseError::error_response(&e),
        Reply::Upstream {
            status,
            body,
            headers,
        } => with_headers(HttpResponse::build(status), headers)
            .content_type("application/json")
            .body(body),
        Reply::Stream(rx, headers) => {
            let body = sse_body(rx);
            with_headers(HttpResponse::Ok(), headers)
                .content_type("text/event-stream")
                .insert_header(("cache-control", "no-cache"))
                .streaming(body)
        }
    }
}

/// A response with the upstream's headers that pass (appended: a header the upstream repeats
/// stays repeated).
fn with_headers(
    mut res: actix_web::HttpResponseBuilder,
    headers: Vec<(String, String)>,
) -> actix_web::HttpResponseBuilder {
    for (k, v) in headers {
        res.append_header((k, v));
    }
    res
}

/// The SSE body: each chunk's bytes, its share of the client's send budget given back as it
/// leaves for the socket.
fn sse_body(
    rx: mpsc::UnboundedReceiver<exchange::Chunk>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold(rx, |mut rx| async move {
        let chunk = rx.recv().await?;
        Some((Ok(chunk.bytes), rx))
    })
}

/// The request body, refused above `limits.http_body_max_bytes`, beyond the key's bytes of
/// bodies being received (`limits.http_body_bytes_per_key`, a declared length counted at
/// once), or when the upload goes silent (`limits.http_body_idle_timeout_ms`): slow or stalled
/// uploads pin a bounded amount of memory per key (docs/DESIGN.md#http-surface).
async fn read_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    deps: &SessionDeps,
    key: i64,
) -> Result<Bytes, HttpError> {
    let limits = &deps.settings.limits;
    let max = limits.http_body_max_bytes;
    let too_large = || {
        HttpError::new(
            ErrorCode::BodyTooLarge,
            format!("the request body exceeds {max} bytes"),
        )
    };
    let in_flight = || {
        HttpError::new(
            ErrorCode::BodyBytesInFlight,
            format!(
                "this key's request bodies being received would exceed {} bytes; retry when one is sent",
                limits.http_body_bytes_per_key
            ),
        )
        .retry_after(1)
    };
    let declared = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    if declared > max {
        return Err(too_large());
    }
    let mut hold = deps.bodies.take(key, declared).ok_or_else(in_flight)?;
    let idle = std::time::Duration::from_millis(limits.http_body_idle_timeout_ms.max(1));
    let mut body = BytesMut::new();
    loop {
        let chunk = match tokio::time::timeout(idle, payload.next()).await {
            Err(_) => {
                return Err(HttpError::new(
                    ErrorCode::BodyTimeout,
                    format!("the request body sent nothing for {} ms", idle.as_millis()),
                ));
            }
            Ok(None) => break,
            Ok(Some(chunk)) => chunk.map_err(|e| {
                HttpError::new(
                    ErrorCode::InvalidJson,
                    format!("the request body could not be read: {e}"),
                )
            })?,
        };
        if body.len() + chunk.len() > max {
            return Err(too_large());
        }
        if !hold.reserve(body.len() + chunk.len()) {
            return Err(in_flight());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// The request as a turn's create (the same checks as a WebSocket `response.create`).
fn request_of(body: &[u8]) -> Result<CreateFrame, HttpError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| HttpError::new(ErrorCode::InvalidJson, "the request body is not UTF-8"))?;
    match frames::parse(text) {
        Err(e) => Err(HttpError::new(e.code, e.message)),
        Ok(ClientFrame::Create(frame)) if frame.model.is_some() => Ok(*frame),
        Ok(ClientFrame::Create(_)) => Err(HttpError::new(
            ErrorCode::ModelRequired,
            "the request needs `model`",
        )),
        Ok(_) => Err(HttpError::new(
            ErrorCode::InvalidJson,
            "the request body must be a response request (an object without a `type` other than response.create)",
        )),
    }
}

/// Paths the relay does not serve: 404 in the JSON error shape.
pub async fn not_found(req: HttpRequest) -> Result<HttpResponse, HttpError> {
    Err(no_route(req.method(), req.path()))
}

/// The answer to a request no route takes (the app's default, and the WebSocket ingress's for
/// a handshake on a path that is not ours).
pub fn no_route(method: &actix_web::http::Method, path: &str) -> HttpError {
    HttpError::new(ErrorCode::NotFound, format!("no route {method} {path}"))
}
