//! Upstream HTTP requests (`POST {base_url}/responses`, `/responses/compact`;
//! docs/DESIGN.md#http-surface): one keep-alive client per account and worker thread (awc's
//! client is bound to its thread), its connections capped at the account's turn slots, the
//! account's credential and headers on every request.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

use crate::protocol::events::{http_error_event, ws_event_of_sse};
use crate::protocol::sse::SseReader;

use crate::protocol::headers::request_passes;

/// An account as the HTTP surface reaches it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub account: String,
    /// `https://api.openai.com/v1` (no trailing slash).
    pub base_url: String,
    pub api_key: String,
    /// Organization, project: set after the client's headers.
    pub account_headers: Vec<(&'static str, String)>,
    /// Connections per worker thread (the account's turn slots).
    pub max_conns: usize,
}

thread_local! {
    static CLIENTS: RefCell<HashMap<String, awc::Client>> = RefCell::new(HashMap::new());
}

/// The thread's keep-alive client of `endpoint`'s account.
fn client(endpoint: &Endpoint) -> awc::Client {
    CLIENTS.with(|c| {
        c.borrow_mut()
            .entry(endpoint.account.clone())
            .or_insert_with(|| {
                awc::Client::builder()
                    .connector(
                        awc::Connector::new()
                            .connector(super::dial::nodelay_tcp())
                            .limit(endpoint.max_conns.max(1))
                            .conn_keep_alive(Duration::from_secs(90)),
                    )
                    // Timeouts are the caller's: first byte, then idle between chunks.
                    .disable_timeout()
                    .finish()
            })
            .clone()
    })
}

/// Why a request got no answer to relay.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// No connection: the request never reached the upstream.
    #[error("{0}")]
    Unreachable(String),
    #[error("no answer from {0} within the first-event timeout")]
    Timeout(String),
    #[error("request to {url} failed: {why}")]
    Failed { url: String, why: String },
}

/// Sends `body` to `{base_url}/{path}` with the client's pass-through headers; resolves when
/// the response's head has arrived (within `first_byte`).
pub async fn post(
    endpoint: &Endpoint,
    path: &str,
    client_headers: &[(String, String)],
    body: Bytes,
    sse: bool,
    first_byte: Duration,
) -> Result<awc::ClientResponse, PostError> {
    let url = format!("{}/{path}", endpoint.base_url);
    let mut req = client(endpoint)
        .post(url.as_str())
        .bearer_auth(&endpoint.api_key)
        .insert_header(("content-type", "application/json"))
        .insert_header((
            "accept",
            if sse {
                "text/event-stream"
            } else {
                "application/json"
            },
        ));
    for (k, v) in client_headers {
        if request_passes(k) {
            req = req.insert_header((k.as_str(), v.as_str()));
        }
    }
    for (k, v) in &endpoint.account_headers {
        req = req.insert_header((*k, v.as_str()));
    }
    let answer = match tokio::time::timeout(first_byte, req.send_body(body)).await {
        Err(_) => Err(PostError::Timeout(url)),
        // The connection closed after the request went out, before an answer's head: it may
        // have reached the upstream (awc says so with this variant of its connect errors).
        Ok(Err(awc::error::SendRequestError::Connect(awc::error::ConnectError::Disconnected))) => {
            Err(PostError::Failed {
                url,
                why: "the connection closed before the answer's head".into(),
            })
        }
        Ok(Err(awc::error::SendRequestError::Connect(e))) => {
            Err(PostError::Unreachable(format!("connecting to {url}: {e}")))
        }
        Ok(Err(e)) => Err(PostError::Failed {
            url,
            why: e.to_string(),
        }),
        Ok(Ok(res)) => Ok(res),
    };
    let unreached = match &answer {
        Err(PostError::Unreachable(_) | PostError::Timeout(_)) => true,
        Ok(res) => account_trouble(res.status()),
        Err(_) => false,
    };
    if unreached {
        crate::telemetry::dial_failed(&endpoint.account);
    }
    answer
}

/// The next chunk of a response body, or why there is none: `Ok(None)` at its end.
pub async fn next_chunk(
    res: &mut awc::ClientResponse,
    idle: Duration,
) -> Result<Option<Bytes>, String> {
    use futures_util::StreamExt;
    match tokio::time::timeout(idle, res.next()).await {
        Err(_) => Err(format!("no byte for {} ms", idle.as_millis())),
        Ok(None) => Ok(None),
        Ok(Some(Ok(b))) => Ok(Some(b)),
        Ok(Some(Err(e))) => Err(e.to_string()),
    }
}

/// An answer's `Content-Type`, lower-case (empty when absent).
pub fn content_type(res: &awc::ClientResponse) -> String {
    res.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Statuses that say the account (not the request) is refused: the turn may go elsewhere.
pub fn account_trouble(status: awc::http::StatusCode) -> bool {
    matches!(status.as_u16(), 401 | 403 | 429) || status.is_server_error()
}

/// A whole body, at most `max` bytes, with at most `idle` between chunks.
pub async fn read_all(
    res: &mut awc::ClientResponse,
    max: usize,
    idle: Duration,
) -> Result<Bytes, String> {
    let mut body = BytesMut::new();
    while let Some(chunk) = next_chunk(res, idle).await? {
        if body.len() + chunk.len() > max {
            return Err(format!("the body exceeds {max} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A WebSocket session's turn sent as `POST /responses` with `stream: true`
/// (docs/DESIGN.md#upstream-transports).
pub struct LegRequest {
    pub endpoint: Arc<Endpoint>,
    /// The client's handshake headers (those that pass through).
    pub headers: Vec<(String, String)>,
    /// The request body (`frames::http_body`).
    pub body: Bytes,
    /// The turn's lane, restored on every event.
    pub lane: Option<String>,
    pub first_event: Duration,
    pub idle: Duration,
    /// Largest event.
    pub event_max: usize,
}

/// What an HTTP leg tells the session, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegItem {
    /// The request reached the upstream (sent at this instant): it may bill it from here on.
    Written(Instant),
    /// One event as a WebSocket-mode text frame (the SSE event's `data`, its lane restored; an
    /// HTTP error answer as the WebSocket mode's `error` event).
    Event(ByteString),
    /// The account refused the request before serving anything (401, 403, 429, 5xx): the
    /// WebSocket mode's `error` event of its answer, for the client if no other account takes it.
    Refused(ByteString),
    /// No connection to the upstream: nothing was sent.
    Unreachable(String),
    /// Lost after the request was written: no byte for too long, a cut stream, an event over
    /// the bound, an answer that is not SSE.
    Lost(String),
}

enum Leg {
    Start(Box<LegRequest>),
    Reading(Box<Reading>),
    /// Items left to hand out, then the end.
    Flush(VecDeque<LegItem>),
}

struct Reading {
    res: awc::ClientResponse,
    reader: SseReader,
    queue: VecDeque<LegItem>,
    lane: Option<String>,
    first_event: Duration,
    idle: Duration,
    event_max: usize,
    events: u64,
}

/// The items of one HTTP leg as a stream: dropping it drops the upstream request (which is how
/// the upstream is told to stop: HTTP has no `response.cancel`).
pub fn leg(req: LegRequest) -> impl futures_util::Stream<Item = LegItem> + 'static {
    futures_util::stream::unfold(Leg::Start(Box::new(req)), |leg| async move {
        let leg = match leg {
            Leg::Start(req) => start(*req).await,
            other => other,
        };
        match leg {
            Leg::Start(_) => None,
            Leg::Flush(mut queue) => queue.pop_front().map(|i| (i, Leg::Flush(queue))),
            Leg::Reading(mut r) => match r.next().await {
                Ok(item) => Some((item, Leg::Reading(r))),
                Err(last) => Some((last, Leg::Flush(VecDeque::new()))),
            },
        }
    })
}

/// Sends the request: the leg reads its events, or what the upstream answered instead.
async fn start(req: LegRequest) -> Leg {
    let sent_at = Instant::now();
    let answer = post(
        &req.endpoint,
        "responses",
        &req.headers,
        req.body,
        true,
        req.first_event,
    )
    .await;
    let flush = |items: Vec<LegItem>| Leg::Flush(items.into());
    let mut res = match answer {
        Err(PostError::Unreachable(why)) => return flush(vec![LegItem::Unreachable(why)]),
        // Written, not answered: the upstream may bill it.
        Err(e) => {
            return flush(vec![
                LegItem::Written(sent_at),
                LegItem::Lost(e.to_string()),
            ]);
        }
        Ok(res) => res,
    };
    let status = res.status();
    if !status.is_success() {
        let body = read_all(&mut res, 64 * 1024, req.idle)
            .await
            .unwrap_or_default();
        let event = ByteString::from(http_error_event(
            status.as_u16(),
            &body,
            req.lane.as_deref(),
        ));
        return if account_trouble(status) {
            flush(vec![LegItem::Refused(event)])
        } else {
            flush(vec![LegItem::Written(sent_at), LegItem::Event(event)])
        };
    }
    let content_type = content_type(&res);
    if !content_type.starts_with("text/event-stream") {
        let why = format!("the upstream answered {content_type:?}, not the SSE stream asked for");
        return flush(vec![LegItem::Written(sent_at), LegItem::Lost(why)]);
    }
    Leg::Reading(Box::new(Reading {
        res,
        reader: SseReader::default(),
        queue: VecDeque::from([LegItem::Written(sent_at)]),
        lane: req.lane,
        first_event: req.first_event,
        idle: req.idle,
        event_max: req.event_max,
        events: 0,
    }))
}

impl Reading {
    /// The next item; `Err` is the last one (the stream is over).
    async fn next(&mut self) -> Result<LegItem, LegItem> {
        loop {
            if let Some(item) = self.queue.pop_front() {
                return Ok(item);
            }
            let wait = if self.events == 0 {
                self.first_event
            } else {
                self.idle
            };
            let chunk = match next_chunk(&mut self.res, wait).await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Err(LegItem::Lost(
                        "the upstream's stream ended before the response finished".into(),
                    ));
                }
                Err(why) => return Err(LegItem::Lost(why)),
            };
            self.reader.push(&chunk);
            let events = self
                .reader
                .scan(self.event_max)
                .map_err(|e| LegItem::Lost(e.to_string()))?;
            let mut end = 0;
            for e in &events {
                end = e.span.end;
                let data = self.reader.data(e).trim();
                if data.is_empty() || data == "[DONE]" {
                    continue;
                }
                self.events += 1;
                let text = ws_event_of_sse(data, self.lane.as_deref());
                self.queue.push_back(LegItem::Event(ByteString::from(text)));
            }
            self.reader.take(end);
        }
    }
}
