//! Which HTTP headers pass between a client and the upstream (docs/DESIGN.md#headers). Pure.
//!
//! Default: a header passes, both ways, so a client sees through the relay what it would see
//! direct (`openai-model`, `x-codex-turn-state`, rate-limit headers, `x-request-id` …, and on
//! the way up `x-openai-subagent`, `version` …). Never passed: hop-by-hop and framing headers
//! (each connection has its own), credentials (the client's key is not the upstream's, the
//! upstream's cookies are not the client's) and the account's identity (which organization a
//! credential bills is the operator's choice, and no client learns it).

/// Hop-by-hop, framing and negotiation headers: set by each side's own connection.
const CONNECTION: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "content-encoding",
    "accept-encoding",
    "date",
];

/// Credentials and the account's identity: never from the client to the upstream, nor back.
const CREDENTIALS: [&str; 6] = [
    "authorization",
    "x-api-key",
    "cookie",
    "set-cookie",
    "openai-organization",
    "openai-project",
];

/// The relay's own choices about the body it sends (the request is JSON, asking SSE or JSON).
const BODY: [&str; 2] = ["content-type", "accept"];

fn never(name: &str) -> bool {
    CONNECTION.contains(&name)
        || CREDENTIALS.contains(&name)
        || name.starts_with("sec-websocket-")
        || name.starts_with("x-forwarded-")
}

/// Whether a client's request header (lower case) goes on the relay's request upstream.
pub fn request_passes(name: &str) -> bool {
    !never(name) && !BODY.contains(&name)
}

/// Whether an upstream response header (lower case) reaches the client. `content-type` is the
/// relay's (it sends what it relays in the form the client asked for).
pub fn response_passes(name: &str) -> bool {
    !never(name) && name != "content-type"
}

/// The headers of `headers` that `passes` lets through, as owned pairs (values that are not
/// visible ASCII are dropped: a relay never forwards bytes it cannot read as a header).
pub fn filtered<'a>(
    headers: impl Iterator<Item = (&'a str, &'a [u8])>,
    passes: fn(&str) -> bool,
) -> Vec<(String, String)> {
    headers
        .filter(|(k, _)| passes(k))
        .filter_map(|(k, v)| Some((k.to_string(), std::str::from_utf8(v).ok()?.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Codex 0.171, openai-python and openai-node send, header by header.
    #[test]
    fn request_headers_of_real_clients() {
        for passes in [
            "originator",
            "session_id",
            "session-id",
            "version",
            "x-openai-subagent",
            "x-responsesapi-include-timing-metrics",
            "x-codex-turn-metadata",
            "x-codex-turn-state",
            "x-codex-beta-features",
            "openai-beta",
            "user-agent",
            "x-stainless-lang",
            "x-stainless-retry-count",
            "x-client-request-id",
            "idempotency-key",
        ] {
            assert!(request_passes(passes), "{passes}");
        }
        for kept in [
            "authorization",
            "x-api-key",
            "openai-organization",
            "openai-project",
            "cookie",
            "host",
            "content-length",
            "accept-encoding",
            "connection",
            "sec-websocket-key",
            "content-type",
            "x-forwarded-for",
        ] {
            assert!(!request_passes(kept), "{kept}");
        }
    }

    /// What the upstream answers, header by header.
    #[test]
    fn response_headers_of_the_upstream() {
        for passes in [
            "openai-model",
            "openai-processing-ms",
            "x-request-id",
            "x-codex-turn-state",
            "x-codex-primary-used-percent",
            "x-codex-secondary-reset-at",
            "x-ratelimit-remaining-tokens",
            "x-reasoning-included",
            "x-models-etag",
            "retry-after",
            "openai-version",
        ] {
            assert!(response_passes(passes), "{passes}");
        }
        for kept in [
            "set-cookie",
            "openai-organization",
            "openai-project",
            "content-length",
            "content-encoding",
            "transfer-encoding",
            "content-type",
            "date",
            "connection",
        ] {
            assert!(!response_passes(kept), "{kept}");
        }
        let raw = [
            ("openai-model", &b"gpt-5.2"[..]),
            ("set-cookie", b"a=b"),
            ("x-bad", b"\xff"),
        ];
        assert_eq!(
            filtered(raw.into_iter(), response_passes),
            [("openai-model".to_string(), "gpt-5.2".to_string())]
        );
    }
}
