//! THE error table: every error turnpike originates, with its stable `code`, HTTP `status`,
//! OpenAI-style `type`, and the WebSocket close code that follows it (if any). docs/errors.md's
//! error table lists the same rows; a test keeps the two in step.

use serde_json::json;

/// WebSocket close codes (RFC 6455 §7.4) the relay sends, or reads from the upstream.
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    /// Text that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const RESTART: u16 = 1012;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    MissingApiKey,
    InvalidApiKey,
    ApiKeyInQuery,
    ApiKeyRevoked,
    UserDisabled,
    QuotaExhausted,
    BalanceExhausted,
    ModelNotAllowed,
    ServiceTierNotAllowed,
    UpgradeRequired,
    TooManySessions,
    NotReady,
    InvalidJson,
    BinaryFrame,
    FrameTooLarge,
    BodyTooLarge,
    BodyBytesInFlight,
    BodyTimeout,
    InvalidModel,
    InvalidPreviousResponseId,
    ModelRequired,
    NoActiveResponse,
    ResponseAlreadyInFlight,
    ResponsePreempted,
    LaneQueueFull,
    InvalidStreamId,
    StreamLimitReached,
    ContinuationUnavailable,
    PreviousResponseForbidden,
    ConcurrencyLimitExceeded,
    AccountBusy,
    NoUpstreamAccounts,
    UpstreamUnavailable,
    UpstreamRestarting,
    UpstreamConnectionLost,
    UpstreamProtocolError,
    ClientTooSlow,
    ShuttingDown,
    AccountingUnavailable,
    SessionEnded,
    AdminUnauthorized,
    NotFound,
    InvalidAdminRequest,
    AlreadyExists,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorSpec {
    pub code: &'static str,
    pub status: u16,
    pub error_type: &'static str,
    /// Close code sent after the error event on a WebSocket; `None`: the session stays open.
    pub close: Option<u16>,
    pub when: &'static str,
}

impl ErrorCode {
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::MissingApiKey,
        ErrorCode::InvalidApiKey,
        ErrorCode::ApiKeyInQuery,
        ErrorCode::ApiKeyRevoked,
        ErrorCode::UserDisabled,
        ErrorCode::QuotaExhausted,
        ErrorCode::BalanceExhausted,
        ErrorCode::ModelNotAllowed,
        ErrorCode::ServiceTierNotAllowed,
        ErrorCode::UpgradeRequired,
        ErrorCode::TooManySessions,
        ErrorCode::NotReady,
        ErrorCode::InvalidJson,
        ErrorCode::BinaryFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::BodyTooLarge,
        ErrorCode::BodyBytesInFlight,
        ErrorCode::BodyTimeout,
        ErrorCode::InvalidModel,
        ErrorCode::InvalidPreviousResponseId,
        ErrorCode::ModelRequired,
        ErrorCode::NoActiveResponse,
        ErrorCode::ResponseAlreadyInFlight,
        ErrorCode::ResponsePreempted,
        ErrorCode::LaneQueueFull,
        ErrorCode::InvalidStreamId,
        ErrorCode::StreamLimitReached,
        ErrorCode::ContinuationUnavailable,
        ErrorCode::PreviousResponseForbidden,
        ErrorCode::ConcurrencyLimitExceeded,
        ErrorCode::AccountBusy,
        ErrorCode::NoUpstreamAccounts,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::UpstreamRestarting,
        ErrorCode::UpstreamConnectionLost,
        ErrorCode::UpstreamProtocolError,
        ErrorCode::ClientTooSlow,
        ErrorCode::ShuttingDown,
        ErrorCode::AccountingUnavailable,
        ErrorCode::SessionEnded,
        ErrorCode::AdminUnauthorized,
        ErrorCode::NotFound,
        ErrorCode::InvalidAdminRequest,
        ErrorCode::AlreadyExists,
    ];

    pub const fn spec(self) -> ErrorSpec {
        match self {
            ErrorCode::MissingApiKey => ErrorSpec {
                code: "missing_api_key",
                status: 401,
                error_type: "authentication_error",
                close: None,
                when: "no `Authorization: Bearer` or `x-api-key` header",
            },
            ErrorCode::InvalidApiKey => ErrorSpec {
                code: "invalid_api_key",
                status: 401,
                error_type: "authentication_error",
                close: None,
                when: "the key is unknown",
            },
            ErrorCode::ApiKeyInQuery => ErrorSpec {
                code: "api_key_in_query",
                status: 401,
                error_type: "authentication_error",
                close: None,
                when: "a key was passed in the query string (refused: URLs end up in logs)",
            },
            ErrorCode::ApiKeyRevoked => ErrorSpec {
                code: "api_key_revoked",
                status: 401,
                error_type: "authentication_error",
                close: None,
                when: "the key was revoked (at connect, or at the next turn)",
            },
            ErrorCode::UserDisabled => ErrorSpec {
                code: "user_disabled",
                status: 403,
                error_type: "permission_error",
                close: None,
                when: "the key's user is disabled (at connect, or at the next turn)",
            },
            ErrorCode::QuotaExhausted => ErrorSpec {
                code: "quota_exhausted",
                status: 403,
                error_type: "insufficient_quota",
                close: None,
                when: "the key's spending has reached its quota (at connect, or at the next turn)",
            },
            ErrorCode::BalanceExhausted => ErrorSpec {
                code: "balance_exhausted",
                status: 403,
                error_type: "insufficient_quota",
                close: None,
                when: "the user's balance is spent (at connect, or at the next turn)",
            },
            ErrorCode::ModelNotAllowed => ErrorSpec {
                code: "model_not_allowed",
                status: 403,
                error_type: "permission_error",
                close: None,
                when: "the key's `allowed_models` does not name the turn's model (before the upstream is asked)",
            },
            ErrorCode::ServiceTierNotAllowed => ErrorSpec {
                code: "service_tier_not_allowed",
                status: 403,
                error_type: "permission_error",
                close: None,
                when: "the key's `allowed_service_tiers` does not name the `service_tier` asked for",
            },
            ErrorCode::UpgradeRequired => ErrorSpec {
                code: "upgrade_required",
                status: 426,
                error_type: "invalid_request_error",
                close: None,
                when: "a plain HTTP request on a WebSocket route",
            },
            ErrorCode::TooManySessions => ErrorSpec {
                code: "too_many_sessions",
                status: 429,
                error_type: "rate_limit_error",
                close: None,
                when: "the key has `max_sessions` sockets open (with `Retry-After`)",
            },
            ErrorCode::NotReady => ErrorSpec {
                code: "not_ready",
                status: 503,
                error_type: "service_unavailable",
                close: None,
                when: "draining, database unreachable, or migrations pending",
            },
            ErrorCode::InvalidJson => ErrorSpec {
                code: "invalid_json",
                status: 400,
                error_type: "invalid_request_error",
                close: Some(close::POLICY),
                when: "a client frame that is not a JSON object (close 1007 instead when it is not valid UTF-8)",
            },
            ErrorCode::BinaryFrame => ErrorSpec {
                code: "binary_frame",
                status: 400,
                error_type: "invalid_request_error",
                close: Some(close::POLICY),
                when: "a binary client frame",
            },
            ErrorCode::FrameTooLarge => ErrorSpec {
                code: "frame_too_large",
                status: 400,
                error_type: "invalid_request_error",
                close: Some(close::TOO_BIG),
                when: "a client frame over `limits.client_frame_max_bytes`",
            },
            ErrorCode::BodyTooLarge => ErrorSpec {
                code: "request_body_too_large",
                status: 413,
                error_type: "invalid_request_error",
                close: None,
                when: "an HTTP request body over `limits.http_body_max_bytes`",
            },
            ErrorCode::BodyBytesInFlight => ErrorSpec {
                code: "request_bytes_in_flight",
                status: 429,
                error_type: "rate_limit_error",
                close: None,
                when: "the key's request bodies being received would exceed `limits.http_body_bytes_per_key` (with `Retry-After`)",
            },
            ErrorCode::BodyTimeout => ErrorSpec {
                code: "request_body_timeout",
                status: 408,
                error_type: "invalid_request_error",
                close: None,
                when: "an HTTP request body that sent nothing for `limits.http_body_idle_timeout_ms`",
            },
            ErrorCode::InvalidModel => ErrorSpec {
                code: "invalid_model",
                status: 400,
                error_type: "invalid_request_error",
                close: Some(close::POLICY),
                when: "`model` is not a non-empty string of at most 128 characters without control characters",
            },
            ErrorCode::InvalidPreviousResponseId => ErrorSpec {
                code: "invalid_previous_response_id",
                status: 400,
                error_type: "invalid_request_error",
                close: Some(close::POLICY),
                when: "`previous_response_id` is a message/item id or not a string",
            },
            ErrorCode::ModelRequired => ErrorSpec {
                code: "model_required",
                status: 400,
                error_type: "invalid_request_error",
                close: None,
                when: "the first turn has no `model`",
            },
            ErrorCode::NoActiveResponse => ErrorSpec {
                code: "no_active_response",
                status: 400,
                error_type: "invalid_request_error",
                close: None,
                when: "a non-create frame (e.g. `response.steer`) while no upstream connection is held",
            },
            ErrorCode::ResponseAlreadyInFlight => ErrorSpec {
                code: "response_already_in_flight",
                status: 409,
                error_type: "invalid_request_error",
                close: None,
                when: "`response.create` during a turn with `session.on_overlap = \"reject\"`",
            },
            ErrorCode::ResponsePreempted => ErrorSpec {
                code: "response_preempted",
                status: 409,
                error_type: "invalid_request_error",
                close: None,
                when: "the turn in flight was ended by a new `response.create` (`on_overlap = \"preempt\"`), or a waiting `response.create` was superseded by a newer one before it started",
            },
            ErrorCode::LaneQueueFull => ErrorSpec {
                code: "lane_queue_full",
                status: 429,
                error_type: "rate_limit_error",
                close: None,
                when: "`response.create` while `session.lane_queue_max` creates already wait on its lane, or the session's waiting creates would exceed `session.lane_queue_max_bytes` (`on_overlap = \"queue\"`)",
            },
            ErrorCode::StreamLimitReached => ErrorSpec {
                code: "websocket_stream_limit_reached",
                status: 400,
                error_type: "invalid_request_error",
                close: None,
                when: "`response.create` naming a 33rd `stream_id` on one session (the upstream's limit of 32 named lanes per connection); the other lanes go on",
            },
            ErrorCode::InvalidStreamId => ErrorSpec {
                code: "invalid_stream_id",
                status: 400,
                error_type: "invalid_request_error",
                close: None,
                when: "`stream_id` that is not 1-256 characters of letters, digits, `_`, `.` or `-`",
            },
            ErrorCode::ContinuationUnavailable => ErrorSpec {
                code: "continuation_unavailable",
                status: 409,
                error_type: "invalid_request_error",
                close: None,
                when: "the `previous_response_id` chain is lost (its connection is gone) and the conversation holds tool outputs, or is over `session.replay_max_bytes`: nothing is sent upstream; start a new chain",
            },
            ErrorCode::PreviousResponseForbidden => ErrorSpec {
                code: "previous_response_forbidden",
                status: 403,
                error_type: "permission_error",
                close: None,
                when: "`previous_response_id` names a stored response another key created",
            },
            ErrorCode::ConcurrencyLimitExceeded => ErrorSpec {
                code: "concurrency_limit_exceeded",
                status: 429,
                error_type: "rate_limit_error",
                close: None,
                when: "the key has `max_concurrent_turns` turns in flight",
            },
            ErrorCode::AccountBusy => ErrorSpec {
                code: "account_busy",
                status: 429,
                error_type: "rate_limit_error",
                close: None,
                when: "every upstream account is at its turn limit",
            },
            ErrorCode::NoUpstreamAccounts => ErrorSpec {
                code: "no_upstream_accounts",
                status: 503,
                error_type: "server_error",
                close: None,
                when: "the relay has no `[[accounts]]` configured (readiness is 503 too)",
            },
            ErrorCode::UpstreamUnavailable => ErrorSpec {
                code: "upstream_unavailable",
                status: 503,
                error_type: "server_error",
                close: None,
                when: "no upstream connection could be leased within `pool.lease_timeout_ms` (close 1013 after `session.max_lease_failures` in a row)",
            },
            ErrorCode::UpstreamRestarting => ErrorSpec {
                code: "upstream_restarting",
                status: 503,
                error_type: "server_error",
                close: None,
                when: "the upstream closed with 1012/1013 after part of the turn was forwarded",
            },
            ErrorCode::UpstreamConnectionLost => ErrorSpec {
                code: "upstream_connection_lost",
                status: 503,
                error_type: "server_error",
                close: None,
                when: "the upstream socket closed, broke or went silent (`upstream.read_timeout_ms`) mid-turn",
            },
            ErrorCode::UpstreamProtocolError => ErrorSpec {
                code: "upstream_protocol_error",
                status: 502,
                error_type: "server_error",
                close: None,
                when: "the upstream sent a binary or non-JSON frame",
            },
            ErrorCode::ClientTooSlow => ErrorSpec {
                code: "client_too_slow",
                status: 503,
                error_type: "server_error",
                close: Some(close::POLICY),
                when: "the client left more than `limits.client_send_buffer_bytes` unread",
            },
            ErrorCode::ShuttingDown => ErrorSpec {
                code: "shutting_down",
                status: 503,
                error_type: "server_error",
                close: Some(close::GOING_AWAY),
                when: "the relay is shutting down (the turn in flight is ended)",
            },
            ErrorCode::AccountingUnavailable => ErrorSpec {
                code: "accounting_unavailable",
                status: 503,
                error_type: "server_error",
                close: None,
                when: "the turn's usage record could not be made durable within `accounting.ack_timeout_ms` (sent instead of its terminal event), or new turns while neither the spool nor the database can record usage",
            },
            ErrorCode::SessionEnded => ErrorSpec {
                code: "session_ended",
                status: 503,
                error_type: "server_error",
                close: Some(close::GOING_AWAY),
                when: "an operator ended the session (`DELETE /admin/sessions/{id}`); a turn in flight ends first",
            },
            ErrorCode::AdminUnauthorized => ErrorSpec {
                code: "admin_unauthorized",
                status: 401,
                error_type: "authentication_error",
                close: None,
                when: "an admin route without `Authorization: Bearer <admin.token>`",
            },
            ErrorCode::NotFound => ErrorSpec {
                code: "not_found",
                status: 404,
                error_type: "invalid_request_error",
                close: None,
                when: "a path the relay does not serve, or an admin route naming an actor, session, compensation, user or key that does not exist",
            },
            ErrorCode::InvalidAdminRequest => ErrorSpec {
                code: "invalid_admin_request",
                status: 400,
                error_type: "invalid_request_error",
                close: None,
                when: "an admin change whose body is not the documented JSON or holds a value out of range (the message names the field)",
            },
            ErrorCode::AlreadyExists => ErrorSpec {
                code: "already_exists",
                status: 409,
                error_type: "invalid_request_error",
                close: None,
                when: "an admin route creating a user whose name is taken",
            },
        }
    }

    pub const fn code(self) -> &'static str {
        self.spec().code
    }

    pub const fn status(self) -> u16 {
        self.spec().status
    }

    /// The HTTP JSON error body: `{"error":{"type","code","message","param"}}`.
    pub fn http_body(self, message: &str) -> serde_json::Value {
        let s = self.spec();
        json!({"error": {"type": s.error_type, "code": s.code, "message": message, "param": null}})
    }

    /// The SSE `error` event's data after an HTTP stream started: the Responses stream's error
    /// fields (`code`, `message`, `param`) and the wrapped `error` object with `status`, so
    /// readers of either shape find the code.
    pub fn sse_data(self, message: &str) -> serde_json::Value {
        let mut v = self.ws_event(message);
        let s = self.spec();
        v["code"] = json!(s.code);
        v["message"] = json!(message);
        v["param"] = serde_json::Value::Null;
        v
    }

    /// The wrapped WebSocket error event (with `status`, which Codex requires).
    pub fn ws_event(self, message: &str) -> serde_json::Value {
        let s = self.spec();
        json!({
            "type": "error",
            "status": s.status,
            "error": {"type": s.error_type, "code": s.code, "message": message, "param": null}
        })
    }

    /// The wrapped error event of a request on lane `stream_id` (tagged as the upstream tags
    /// its own; the default lane's carry none).
    pub fn ws_event_on(self, message: &str, stream_id: Option<&str>) -> serde_json::Value {
        let mut v = self.ws_event(message);
        if let Some(id) = stream_id {
            v["stream_id"] = json!(id);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            let code = c.code();
            assert!(seen.insert(code), "duplicate {code}");
            assert!(code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        }
    }

    #[test]
    fn readme_lists_every_code() {
        let readme = include_str!("../../docs/errors.md");
        for c in ErrorCode::ALL {
            let s = c.spec();
            let row = format!("| `{}` | {} |", s.code, s.status);
            assert!(readme.contains(&row), "docs/errors.md lacks {row}");
        }
    }

    #[test]
    fn wrapped_event_shape() {
        let v = ErrorCode::UpstreamConnectionLost.ws_event("boom");
        assert_eq!(v["type"], "error");
        assert_eq!(v["status"], 503);
        assert_eq!(v["error"]["code"], "upstream_connection_lost");
        assert!(v["error"]["param"].is_null());
    }
}
