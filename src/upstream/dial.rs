//! The upstream handshake.

use std::time::Duration;

use actix_codec::Framed;
use awc::BoxedSocket;
use awc::ws::Codec;

/// Handshake headers passed from the client to the upstream (SPEC §3.1). Never the client's
/// `Authorization`: the upstream gets the account's credential.
pub fn passes_through(name: &str) -> bool {
    matches!(
        name,
        "openai-beta"
            | "session-id"
            | "thread-id"
            | "x-client-request-id"
            | "originator"
            | "user-agent"
            | "accept-language"
            | "openai-organization"
            | "openai-project"
    ) || name.starts_with("x-codex-")
}

/// Headers that make two upstream connections interchangeable only when equal: a pooled
/// connection is reused only by a session with the same values. Per-session metadata headers
/// (`session-id`, `x-codex-*` …) are sent when a connection is dialled but do not split the pool.
pub fn identity_of(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "openai-beta" | "openai-organization" | "openai-project"
            )
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What a dial needs.
#[derive(Debug, Clone)]
pub struct DialSpec {
    pub url: String,
    pub api_key: String,
    pub headers: Vec<(String, String)>,
    pub frame_max: usize,
    pub timeout: Duration,
}

thread_local! {
    // awc::Client is !Send: one per thread that dials.
    static CLIENT: std::cell::OnceCell<awc::Client> = const { std::cell::OnceCell::new() };
}

fn client() -> awc::Client {
    CLIENT.with(|c| {
        c.get_or_init(|| {
            awc::Client::builder()
                // awc's WebSocket client does not work over h2.
                .max_http_version(awc::http::Version::HTTP_11)
                .disable_timeout()
                .finish()
        })
        .clone()
    })
}

pub type Socket = Framed<BoxedSocket, Codec>;

/// Opens the upstream WebSocket.
pub async fn dial(spec: DialSpec) -> Result<Socket, String> {
    let mut req = client()
        .ws(spec.url.as_str())
        .max_frame_size(spec.frame_max)
        .bearer_auth(&spec.api_key);
    for (k, v) in &spec.headers {
        if passes_through(k) {
            req = req.header(k.as_str(), v.as_str());
        }
    }
    match tokio::time::timeout(spec.timeout, req.connect()).await {
        Err(_) => Err(format!("handshake with {} timed out", spec.url)),
        Ok(Err(e)) => Err(format!("handshake with {}: {e}", spec.url)),
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
        let h = vec![
            (
                "openai-beta".to_string(),
                "responses_websockets=2026-02-06".to_string(),
            ),
            ("session-id".to_string(), "abc".to_string()),
        ];
        assert_eq!(
            identity_of(&h),
            "openai-beta=responses_websockets=2026-02-06"
        );
        assert_eq!(identity_of(&[]), "");
    }
}
