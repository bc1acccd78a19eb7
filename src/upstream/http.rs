//! Upstream HTTP requests (`POST {base_url}/responses`, `/responses/compact`;
//! docs/DESIGN.md#http-surface): one keep-alive client per account and worker thread (awc's
//! client is bound to its thread), its connections capped at the account's turn slots, the
//! account's credential and headers on every request.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::dial::passes_through;

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
        if passes_through(k) {
            req = req.insert_header((k.as_str(), v.as_str()));
        }
    }
    for (k, v) in &endpoint.account_headers {
        req = req.insert_header((*k, v.as_str()));
    }
    match tokio::time::timeout(first_byte, req.send_body(body)).await {
        Err(_) => Err(PostError::Timeout(url)),
        Ok(Err(awc::error::SendRequestError::Connect(e))) => {
            Err(PostError::Unreachable(format!("connecting to {url}: {e}")))
        }
        Ok(Err(e)) => Err(PostError::Failed {
            url,
            why: e.to_string(),
        }),
        Ok(Ok(res)) => Ok(res),
    }
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
