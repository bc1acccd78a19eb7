//! The upstream handshake.

use std::time::Duration;

use actix_codec::Framed;
use actix_service::Service;
use actix_tls::connect::{ConnectError, ConnectInfo, Connection};
use awc::error::SendRequestError;
use awc::http::Uri;
use awc::ws::Codec;
use awc::{BoxedSocket, ConnectRequest, ConnectResponse};
use futures_util::future::LocalBoxFuture;
use tokio::net::TcpStream;

/// Handshake headers passed from the client to the upstream (docs/DESIGN.md#handshake). Never the client's
/// `Authorization` (the upstream gets the account's credential), and never
/// `OpenAI-Organization` / `OpenAI-Project`: which organization the operator's credential
/// bills is the operator's choice (`[[accounts]] organization`, `project`).
pub fn passes_through(name: &str) -> bool {
    matches!(
        name,
        "openai-beta"
            | "session-id"
            | "session_id"
            | "thread-id"
            | "x-client-request-id"
            | "originator"
            | "user-agent"
            | "accept-language"
            | "version"
            | "x-openai-subagent"
            | "x-responsesapi-include-timing-metrics"
    ) || name.starts_with("x-codex-")
}

/// The pool identity of a session's headers: a connection dialled with one set of headers is
/// lent only to sessions presenting the same set, so no upstream ever sees one client's
/// session headers (`session-id`, `thread-id`, `x-codex-*`, `x-client-request-id`) on another
/// client's turn. Order-independent.
pub fn identity_of(headers: &[(String, String)]) -> String {
    let mut parts: Vec<String> = headers
        .iter()
        .filter(|(k, _)| passes_through(k))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    parts.sort_unstable();
    parts.join("\n")
}

/// What a dial needs.
#[derive(Debug, Clone)]
pub struct DialSpec {
    pub url: String,
    pub api_key: String,
    /// The session's pass-through headers.
    pub headers: Vec<(String, String)>,
    /// The account's own headers (organization, project), set after the client's.
    pub account_headers: Vec<(&'static str, String)>,
    pub frame_max: usize,
    pub timeout: Duration,
    /// Silence after which a request waits for a ping's pong before it is written.
    pub probe_idle: Duration,
    pub probe_timeout: Duration,
}

thread_local! {
    // awc::Client is !Send: one per thread that dials.
    static CLIENT: std::cell::OnceCell<awc::Client> = const { std::cell::OnceCell::new() };
}

fn client() -> awc::Client {
    CLIENT.with(|c| {
        c.get_or_init(|| {
            awc::Client::builder()
                .wrap(KeepRefusal)
                // awc's WebSocket client does not work over h2.
                .max_http_version(awc::http::Version::HTTP_11)
                // The connector's default limit is 100 connections per scheme: upstream
                // sockets are bounded by `[[accounts]] max_conns` only.
                .connector(awc::Connector::new().connector(nodelay_tcp()).limit(0))
                .disable_timeout()
                .finish()
        })
        .clone()
    })
}

/// awc's TCP connector with TCP_NODELAY set on every socket it opens: awc has no setting for
/// it, and without it Nagle holds back a small request frame written right after another.
pub(super) fn nodelay_tcp() -> impl Service<
    ConnectInfo<Uri>,
    Response = Connection<Uri, TcpStream>,
    Error = ConnectError,
    Future = impl Future<Output = Result<Connection<Uri, TcpStream>, ConnectError>>,
> + Clone {
    let tcp = actix_tls::connect::Connector::default().service();
    actix_service::fn_service(move |req: ConnectInfo<Uri>| {
        let connecting = tcp.call(req);
        async move {
            let conn = connecting.await?;
            let _ = conn.io_ref().set_nodelay(true);
            Ok(conn)
        }
    })
}

pub type Socket = Framed<BoxedSocket, Codec>;

/// The request header that names one dial to [`KeepRefusal`]; removed before the request
/// leaves, so the upstream never sees it.
const DIAL_MARK: &str = "x-turnpike-dial";

thread_local! {
    static NEXT_DIAL: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// `Retry-After` of refused handshakes, by dial mark, until their dial reads it.
    static REFUSALS: std::cell::RefCell<std::collections::HashMap<u64, Option<String>>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// awc middleware keeping what awc's WebSocket client drops from a refused handshake: its
/// `Retry-After` (awc's error holds the status only), so a rate-limited account cools down as
/// long as its upstream asks (docs/DESIGN.md#accounts).
struct KeepRefusal;

impl<S> awc::middleware::Transform<S, ConnectRequest> for KeepRefusal
where
    S: Service<ConnectRequest, Response = ConnectResponse, Error = SendRequestError> + 'static,
{
    type Transform = KeepRefusalService<S>;

    fn new_transform(self, service: S) -> Self::Transform {
        KeepRefusalService(std::rc::Rc::new(service))
    }
}

struct KeepRefusalService<S>(std::rc::Rc<S>);

impl<S> Service<ConnectRequest> for KeepRefusalService<S>
where
    S: Service<ConnectRequest, Response = ConnectResponse, Error = SendRequestError> + 'static,
{
    type Response = ConnectResponse;
    type Error = SendRequestError;
    type Future = LocalBoxFuture<'static, Result<ConnectResponse, SendRequestError>>;

    fn poll_ready(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&self, req: ConnectRequest) -> Self::Future {
        let (req, mark) = match req {
            ConnectRequest::Tunnel(mut head, addr) => {
                let mark = head
                    .headers
                    .remove(DIAL_MARK)
                    .next()
                    .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                (ConnectRequest::Tunnel(head, addr), mark)
            }
            other => (other, None),
        };
        let service = self.0.clone();
        Box::pin(async move {
            let res = service.call(req).await?;
            if let (Some(mark), ConnectResponse::Tunnel(head, _)) = (mark, &res)
                && head.status != awc::http::StatusCode::SWITCHING_PROTOCOLS
            {
                let retry_after = head
                    .headers
                    .get(awc::http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                REFUSALS.with(|r| r.borrow_mut().insert(mark, retry_after));
            }
            Ok(res)
        })
    }
}

/// Why a dial failed: the operator's words, and the HTTP status if the upstream answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DialError {
    pub message: String,
    pub status: Option<u16>,
    /// The refusal's `Retry-After`, as the upstream wrote it.
    pub retry_after: Option<String>,
}

impl DialError {
    fn plain(message: String) -> Self {
        Self {
            message,
            status: None,
            retry_after: None,
        }
    }
}

/// Opens the upstream WebSocket.
pub async fn dial(spec: DialSpec) -> Result<Socket, DialError> {
    let mut req = client()
        .ws(spec.url.as_str())
        .max_frame_size(spec.frame_max)
        .bearer_auth(&spec.api_key);
    for (k, v) in &spec.headers {
        if passes_through(k) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    for (k, v) in &spec.account_headers {
        req = req.header(*k, v.as_str());
    }
    let mark = NEXT_DIAL.with(|n| {
        let mark = n.get().wrapping_add(1);
        n.set(mark);
        mark
    });
    req = req.header(DIAL_MARK, mark.to_string());
    let connected = tokio::time::timeout(spec.timeout, req.connect()).await;
    let retry_after = REFUSALS.with(|r| r.borrow_mut().remove(&mark)).flatten();
    // The URL goes to the operator's log only; clients get a generic message (docs/DESIGN.md#upstream-faults).
    match connected {
        Err(_) => Err(DialError::plain(format!(
            "handshake with {} timed out",
            spec.url
        ))),
        // The status says why (401: the credential is refused, 429: rate-limited, 5xx: the
        // upstream's trouble); awc's own words leave it out.
        Ok(Err(awc::error::WsClientError::InvalidResponseStatus(status))) => Err(DialError {
            message: format!(
                "handshake with {}: the upstream answered HTTP {status}",
                spec.url
            ),
            status: Some(status.as_u16()),
            retry_after,
        }),
        Ok(Err(e)) => Err(DialError::plain(format!(
            "handshake with {}: {e}",
            spec.url
        ))),
        Ok(Ok((_, socket))) => Ok(socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthrough_and_identity() {
        assert!(passes_through("openai-beta"));
        assert!(passes_through("x-codex-turn-metadata"));
        assert!(!passes_through("authorization"));
        assert!(!passes_through("x-api-key"));
        assert!(!passes_through("cookie"));
        assert!(!passes_through("openai-organization"));
        assert!(!passes_through("openai-project"));
        let h = |sid: &str| {
            vec![
                ("session-id".to_string(), sid.to_string()),
                (
                    "openai-beta".to_string(),
                    "responses_websockets=2026-02-06".to_string(),
                ),
                ("openai-organization".to_string(), "org-client".to_string()),
            ]
        };
        assert_eq!(
            identity_of(&h("abc")),
            "openai-beta=responses_websockets=2026-02-06\nsession-id=abc"
        );
        assert_ne!(identity_of(&h("abc")), identity_of(&h("xyz")));
        let mut reordered = h("abc");
        reordered.reverse();
        assert_eq!(identity_of(&reordered), identity_of(&h("abc")));
        assert_eq!(identity_of(&[]), "");
    }
}
