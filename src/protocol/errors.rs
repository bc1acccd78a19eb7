//! THE error table: every error turnpike originates, with its stable `code`, HTTP `status`,
//! OpenAI-style `type`, and the WebSocket close code that follows it (if any). The README's
//! error table lists the same rows; a test keeps the two in step.

use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Readiness failed: draining, database unreachable or migrations pending.
    NotReady,
    /// An unexpected internal failure.
    InternalError,
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
    pub const ALL: &'static [ErrorCode] = &[ErrorCode::NotReady, ErrorCode::InternalError];

    pub const fn spec(self) -> ErrorSpec {
        match self {
            ErrorCode::NotReady => ErrorSpec {
                code: "not_ready",
                status: 503,
                error_type: "service_unavailable",
                close: None,
                when: "draining, database unreachable, or migrations pending",
            },
            ErrorCode::InternalError => ErrorSpec {
                code: "internal_error",
                status: 500,
                error_type: "server_error",
                close: Some(1011),
                when: "an unexpected internal failure",
            },
        }
    }

    pub const fn code(self) -> &'static str {
        self.spec().code
    }

    pub const fn status(self) -> u16 {
        self.spec().status
    }

    /// The HTTP JSON error body: `{"error":{"type","code","message"}}`.
    pub fn http_body(self, message: &str) -> serde_json::Value {
        let s = self.spec();
        json!({"error": {"type": s.error_type, "code": s.code, "message": message}})
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
        let readme = include_str!("../../README.md");
        for c in ErrorCode::ALL {
            let s = c.spec();
            let row = format!("| `{}` | {} |", s.code, s.status);
            assert!(readme.contains(&row), "README error table lacks {row}");
        }
    }

    #[test]
    fn wrapped_event_shape() {
        let v = ErrorCode::InternalError.ws_event("boom");
        assert_eq!(v["type"], "error");
        assert_eq!(v["status"], 500);
        assert_eq!(v["error"]["code"], "internal_error");
        assert!(v["error"]["param"].is_null());
    }
}
