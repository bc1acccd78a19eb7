//! What an upstream event is, found by scanning bytes: its `type` is the first key of every
//! event the upstream sends, so a full parse is needed only for the few events that carry data
//! the relay uses (`response.created` and the terminals).

use std::sync::LazyLock;

use memchr::memmem::Finder;
use serde::Deserialize;

/// The keys searched for in every event. `str::find` builds a substring searcher on each call,
/// which at an event's size cost more than the rest of its scan (docs/DESIGN.md#event-scan):
/// these are built once.
static STREAM_ID_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"stream_id\""));
static DELTA_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"delta\""));
static USAGE_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"usage\""));

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `response.created`: carries the response id.
    Created,
    /// `response.in_progress`, `output_item.*`, `content_part.*` …: never a token.
    Lifecycle,
    /// `….delta` events: tokens (they carry no response id).
    Token,
    /// `response.output_text.done` / `response.function_call_arguments.done`: a token only when
    /// no delta came before it in the turn.
    TokenDone,
    /// `response.completed | incomplete | failed | cancelled`.
    Terminal(TerminalKind),
    /// A wrapped `error` event: ends the response.
    Error,
    /// `response.steer.accepted | failed | pending`: forwarded; they tell whether the upstream
    /// will start a successor on its own.
    Steer(SteerKind),
    /// Anything else (`codex.*` …): forwarded, no effect on timing.
    Other,
    /// Not a JSON object with a `type`: never forwarded (`upstream_protocol_error`).
    Invalid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteerKind {
    Accepted,
    Failed,
    Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminalKind {
    Completed,
    Incomplete,
    Failed,
    Cancelled,
}

impl TerminalKind {
    /// The `usage_logs.status` of a turn that ended with this terminal.
    pub fn status(self) -> &'static str {
        match self {
            TerminalKind::Completed => "completed",
            TerminalKind::Incomplete => "incomplete",
            TerminalKind::Failed => "failed",
            TerminalKind::Cancelled => "cancelled",
        }
    }
}

/// Classifies an event `type`.
pub fn kind_of(event_type: &str) -> EventKind {
    match event_type {
        "response.created" => EventKind::Created,
        "response.completed" | "response.done" => EventKind::Terminal(TerminalKind::Completed),
        "response.incomplete" => EventKind::Terminal(TerminalKind::Incomplete),
        "response.failed" => EventKind::Terminal(TerminalKind::Failed),
        "response.cancelled" => EventKind::Terminal(TerminalKind::Cancelled),
        "error" => EventKind::Error,
        "response.steer.accepted" => EventKind::Steer(SteerKind::Accepted),
        "response.steer.failed" => EventKind::Steer(SteerKind::Failed),
        "response.steer.pending" => EventKind::Steer(SteerKind::Pending),
        "response.output_text.done" | "response.function_call_arguments.done" => {
            EventKind::TokenDone
        }
        t if t.ends_with(".delta") => EventKind::Token,
        "response.in_progress" | "response.queued" => EventKind::Lifecycle,
        t if t.starts_with("response.output_item.")
            || t.starts_with("response.content_part.")
            || t.ends_with(".done")
            || t.ends_with(".added") =>
        {
            EventKind::Lifecycle
        }
        _ => EventKind::Other,
    }
}

/// The kind of an upstream text frame. A frame that is not shaped like a JSON object (`{…}`,
/// a structural check that costs no parse) or has no string `type` is `Invalid`.
pub fn classify(text: &str) -> EventKind {
    let t = text.trim_ascii();
    if !(t.starts_with('{') && t.ends_with('}')) {
        return EventKind::Invalid;
    }
    event_type(text).map_or(EventKind::Invalid, |k| kind_of(&k))
}

/// The event's `type`: a byte scan when `type` is the first key (always, from the upstream),
/// else a parse of that one field. `None` for text that is not a JSON object with a string type.
pub fn event_type(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(t) = scan_leading_type(text) {
        return Some(std::borrow::Cow::Borrowed(t));
    }
    #[derive(Deserialize)]
    struct TypeOnly {
        #[serde(rename = "type")]
        kind: String,
    }
    serde_json::from_str::<TypeOnly>(text)
        .ok()
        .map(|t| std::borrow::Cow::Owned(t.kind))
}

/// `{ "type" : "xyz"` → `xyz`, when the value has no escapes.
fn scan_leading_type(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let i = after(b, skip_ws(b, 0), b"{")?;
    let i = after(b, skip_ws(b, i), b"\"type\"")?;
    let i = after(b, skip_ws(b, i), b":")?;
    let start = after(b, skip_ws(b, i), b"\"")?;
    let len = memchr::memchr2(b'"', b'\\', &b[start..])?;
    (b[start + len] == b'"').then(|| text.get(start..start + len))?
}

/// The index after JSON whitespace from `i`.
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The index after `token` when it starts at `i`.
fn after(b: &[u8], i: usize, token: &[u8]) -> Option<usize> {
    b.get(i..)?.starts_with(token).then_some(i + token.len())
}

/// Whether an event mentions `usage` anywhere (only then is a lifecycle event parsed for it).
pub fn mentions_usage(text: &str) -> bool {
    USAGE_KEY.find(text.as_bytes()).is_some()
}

/// Characters of a token event's `delta` string (0 without one): the output the relay counts
/// when the upstream reports no usage. The first `"delta"` followed by a colon is the key; the
/// same word as a value is not.
pub fn delta_len(text: &str) -> usize {
    let b = text.as_bytes();
    let mut from = 0;
    while let Some(found) = DELTA_KEY.find(&b[from..]) {
        from += found + b"\"delta\"".len();
        let Some(value) = after(b, skip_ws(b, from), b":") else {
            continue;
        };
        return after(b, skip_ws(b, value), b"\"").map_or(0, |body| string_len(&text[body..]));
    }
    0
}

/// Characters of a JSON string's body up to its closing quote (0 if it never closes).
fn string_len(body: &str) -> usize {
    let bytes = body.as_bytes();
    let mut i = 0;
    while let Some(j) = memchr::memchr2(b'"', b'\\', &bytes[i..]) {
        i += j;
        if bytes[i] == b'"' {
            return body.get(..i).map_or(0, |s| s.chars().count());
        }
        i += 2;
        if i >= bytes.len() {
            break;
        }
    }
    0
}

/// The event's lane: its top-level `stream_id` (docs/DESIGN.md#overlap), `None` for the default
/// lane. A byte scan, no parse: text without the key (every event of the default lane) costs
/// one substring search; otherwise one pass that skips strings and nested values, so a
/// `stream_id` inside the response object or a delta's text is never taken for the event's.
pub fn stream_id_of(text: &str) -> Option<&str> {
    const KEY: &[u8] = b"\"stream_id\"";
    STREAM_ID_KEY.find(text.as_bytes())?;
    let b = text.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                let end = i.checked_add(1)?;
                if depth == 1 && b.get(start..end) == Some(KEY) {
                    let rest = text.get(end..)?.trim_start().strip_prefix(':')?;
                    let value = rest.trim_start().strip_prefix('"')?;
                    let id = &value[..value.find('"')?];
                    return (!id.contains('\\')).then_some(id);
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// An event of an HTTP leg (an SSE event's `data`) as the WebSocket mode sends it
/// (docs/DESIGN.md#upstream-transports): the lane's `stream_id` added as its last field (`type`
/// stays first, where the scan finds it); an SSE `error` event (`code`, `message` at the top)
/// wrapped like the WebSocket mode's (`error: {…}`). Everything else byte for byte.
pub fn ws_event_of_sse(data: &str, lane: Option<&str>) -> String {
    if classify(data) == EventKind::Error {
        let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
        if v.get("error").is_none() {
            let mut error = serde_json::Map::new();
            for key in ["type", "code", "message", "param"] {
                let value = match key {
                    // The SSE event's own `type` is `error`; the error's kind is not said.
                    "type" => serde_json::Value::Null,
                    _ => v.get(key).cloned().unwrap_or_default(),
                };
                error.insert(key.into(), value);
            }
            let wrapped = serde_json::json!({"type": "error", "error": error});
            return with_lane(&wrapped.to_string(), lane);
        }
    }
    with_lane(data, lane)
}

/// An HTTP error answer (`status`, its body `{"error": {…}}`) as the WebSocket mode's `error`
/// event on `lane`; a body that is not such JSON becomes its message.
pub fn http_error_event(status: u16, body: &[u8], lane: Option<&str>) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let error = match v.get("error") {
        Some(e @ serde_json::Value::Object(_)) => e.clone(),
        _ => serde_json::json!({
            "type": if status >= 500 { "server_error" } else { "invalid_request_error" },
            "code": null,
            "message": String::from_utf8_lossy(body).chars().take(512).collect::<String>(),
            "param": null,
        }),
    };
    let event = serde_json::json!({"type": "error", "status": status, "error": error});
    with_lane(&event.to_string(), lane)
}

/// Whether an upstream event is the refusal of `stream_id` by a backend without lanes (a
/// wrapped 400 "Unsupported parameter: stream_id", its `param` `stream_id`).
pub fn refuses_stream_id(text: &str) -> bool {
    if classify(text) != EventKind::Error || STREAM_ID_KEY.find(text.as_bytes()).is_none() {
        return false;
    }
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let error = &v["error"];
    error["param"] == "stream_id"
        && error["message"]
            .as_str()
            .is_some_and(|m| m.contains("Unsupported parameter"))
}

/// A WebSocket-mode event as an SSE event of the HTTP surface (docs/DESIGN.md#upstream-transports):
/// its bytes as `data`, its `type` as `event`. A wrapped `error` event gets the Responses
/// stream's own fields (`code`, `message`, `param`) beside its `error` object, as the relay's
/// own SSE errors have.
pub fn sse_of_ws(text: &str) -> bytes::Bytes {
    let kind = event_type(text).unwrap_or_default();
    if kind == "error" {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
        if let Some(error) = v.get("error").cloned() {
            for key in ["code", "message", "param"] {
                v[key] = error.get(key).cloned().unwrap_or_default();
            }
            return super::sse::event(&kind, &v.to_string());
        }
    }
    super::sse::event(&kind, text)
}

/// A wrapped `error` event as the HTTP answer the upstream's HTTP side gives: its `status`
/// (500 when it has none) and `{"error": {…}}`.
pub fn http_error_of_ws(text: &str) -> (u16, bytes::Bytes) {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let status = v
        .get("status")
        .and_then(serde_json::Value::as_u64)
        .and_then(|s| u16::try_from(s).ok())
        .filter(|s| (400..600).contains(s))
        .unwrap_or(500);
    let error = v.get("error").cloned().unwrap_or_default();
    let body = serde_json::json!({ "error": error }).to_string();
    (status, bytes::Bytes::from(body))
}

/// A terminal event's `response` object: the JSON answer of a request that did not stream.
pub fn response_of_terminal(text: &str) -> Option<bytes::Bytes> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let response = v.get("response").filter(|r| r.is_object())?;
    Some(bytes::Bytes::from(response.to_string()))
}

/// `text` (a JSON object) with `"stream_id": lane` as its last field; unchanged without a lane.
fn with_lane(text: &str, lane: Option<&str>) -> String {
    let (Some(lane), Some(end)) = (lane, text.rfind('}')) else {
        return text.to_string();
    };
    let lane = serde_json::Value::String(lane.to_string());
    let body = text[..end].trim_end();
    let sep = if body.ends_with('{') { "" } else { "," };
    format!("{body}{sep}\"stream_id\":{lane}{}", &text[end..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lane_of_an_event_is_its_top_level_stream_id() {
        let lane = stream_id_of;
        assert_eq!(
            lane(r#"{"type":"response.output_text.delta","delta":"x"}"#),
            None
        );
        assert_eq!(
            lane(r#"{"type":"response.output_text.delta","delta":"x","stream_id":"alpha"}"#),
            Some("alpha")
        );
        assert_eq!(
            lane(r#"{"stream_id" : "b-1.x", "type":"error"}"#),
            Some("b-1.x")
        );
        // Not the event's: inside the response, inside a string, a key of a nested object.
        assert_eq!(
            lane(r#"{"type":"response.created","response":{"stream_id":"inner"}}"#),
            None
        );
        assert_eq!(
            lane(r#"{"type":"x.delta","delta":"\"stream_id\":\"fake\""}"#),
            None
        );
        assert_eq!(
            lane(r#"{"type":"x.delta","delta":"say \"stream_id\"","stream_id":"real"}"#),
            Some("real")
        );
        assert_eq!(
            lane(r#"{"type":"x","items":[{"stream_id":"in-array"}],"stream_id":"top"}"#),
            Some("top")
        );
        assert_eq!(lane(r#"{"type":"x","stream_id":"#), None);
        assert_eq!(lane(r#"{"type":"x","stream_id":7}"#), None);
        assert_eq!(
            lane(r#"{"type":"x","note":"unterminated \"stream_id\""#),
            None
        );
    }

    #[test]
    fn frames_that_are_not_events_are_invalid() {
        assert_eq!(
            classify(r#"{"type":"response.output_text.delta","delta":"x"}"#),
            EventKind::Token
        );
        assert_eq!(
            classify("{\"type\": \"response.output_text.delta\", oops"),
            EventKind::Invalid
        );
        assert_eq!(classify("hello"), EventKind::Invalid);
        assert_eq!(classify(r#"{"no_type":1}"#), EventKind::Invalid);
        assert_eq!(classify(" {\"type\":\"error\"}\n"), EventKind::Error);
    }

    #[test]
    fn classification() {
        assert_eq!(kind_of("response.created"), EventKind::Created);
        assert_eq!(kind_of("response.in_progress"), EventKind::Lifecycle);
        assert_eq!(kind_of("response.output_item.added"), EventKind::Lifecycle);
        assert_eq!(kind_of("response.output_item.done"), EventKind::Lifecycle);
        assert_eq!(kind_of("response.content_part.added"), EventKind::Lifecycle);
        assert_eq!(kind_of("response.content_part.done"), EventKind::Lifecycle);
        assert_eq!(kind_of("response.output_text.delta"), EventKind::Token);
        assert_eq!(
            kind_of("response.function_call_arguments.delta"),
            EventKind::Token
        );
        assert_eq!(
            kind_of("response.reasoning_summary_text.delta"),
            EventKind::Token
        );
        assert_eq!(kind_of("response.refusal.delta"), EventKind::Token);
        assert_eq!(kind_of("response.audio.delta"), EventKind::Token);
        assert_eq!(kind_of("response.output_text.done"), EventKind::TokenDone);
        assert_eq!(
            kind_of("response.function_call_arguments.done"),
            EventKind::TokenDone
        );
        assert_eq!(
            kind_of("response.reasoning_summary_text.done"),
            EventKind::Lifecycle
        );
        assert_eq!(
            kind_of("response.completed"),
            EventKind::Terminal(TerminalKind::Completed)
        );
        assert_eq!(
            kind_of("response.incomplete"),
            EventKind::Terminal(TerminalKind::Incomplete)
        );
        assert_eq!(
            kind_of("response.failed"),
            EventKind::Terminal(TerminalKind::Failed)
        );
        assert_eq!(
            kind_of("response.cancelled"),
            EventKind::Terminal(TerminalKind::Cancelled)
        );
        assert_eq!(kind_of("error"), EventKind::Error);
        assert_eq!(
            kind_of("response.steer.accepted"),
            EventKind::Steer(SteerKind::Accepted)
        );
        assert_eq!(
            kind_of("response.steer.failed"),
            EventKind::Steer(SteerKind::Failed)
        );
        assert_eq!(
            kind_of("response.steer.pending"),
            EventKind::Steer(SteerKind::Pending)
        );
        assert_eq!(kind_of("codex.rate_limits"), EventKind::Other);
    }

    #[test]
    fn type_by_scan_or_parse() {
        assert_eq!(
            event_type(r#"{"type":"response.output_text.delta","delta":"x"}"#).as_deref(),
            Some("response.output_text.delta")
        );
        assert_eq!(
            event_type(r#" { "type" : "error" , "status":400}"#).as_deref(),
            Some("error")
        );
        // Not first: parsed.
        assert_eq!(
            event_type(r#"{"sequence_number":1,"type":"response.created"}"#).as_deref(),
            Some("response.created")
        );
        // A nested "type" before the top-level one is not mistaken for it.
        assert_eq!(
            event_type(r#"{"item":{"type":"message"},"type":"response.output_item.added"}"#)
                .as_deref(),
            Some("response.output_item.added")
        );
        assert_eq!(event_type("not json"), None);
        assert_eq!(event_type(r#"{"type":5}"#), None);
        // An escape in the value, or a truncated frame: left to the parser.
        assert_eq!(event_type(r#"{"type":"a\u002eb"}"#).as_deref(), Some("a.b"));
        assert_eq!(event_type(r#"{"type":"abc"#), None);
        assert_eq!(event_type(r#"{ "type""#), None);
    }

    #[test]
    fn delta_scan() {
        assert_eq!(delta_len(r#"{"type":"x","delta":"a\"b"}"#), 4);
        assert_eq!(delta_len(r#"{"type":"x","delta":""}"#), 0);
        assert_eq!(delta_len(r#"{"type":"x"}"#), 0);
        // Any JSON whitespace around the colon (Python's json.dumps writes `": "`).
        assert_eq!(delta_len(r#"{"type": "x", "delta": "hello"}"#), 5);
        assert_eq!(delta_len("{\"type\":\"x\",\"delta\"\n :\t\"ab\"}"), 2);
        // A `"delta"` that is a value, not the key, is skipped.
        assert_eq!(delta_len(r#"{"name":"delta","delta" : "abc"}"#), 3);
        // Characters, not bytes; a string that never closes (even on a lone backslash) is 0.
        assert_eq!(delta_len(r#"{"type":"x","delta":"héé\\"}"#), 5);
        assert_eq!(delta_len(r#"{"type":"x","delta":"ab"#), 0);
        assert_eq!(delta_len(r#"{"type":"x","delta":"ab\"#), 0);
        assert_eq!(delta_len(r#"{"type":"x","delta":5}"#), 0);
    }

    #[test]
    fn an_http_legs_events_get_their_lane_back_and_keep_type_first() {
        let delta = r#"{"type":"response.output_text.delta","delta":"}"}"#;
        assert_eq!(ws_event_of_sse(delta, None), delta);
        let on_lane = ws_event_of_sse(delta, Some("b"));
        assert_eq!(
            on_lane,
            r#"{"type":"response.output_text.delta","delta":"}","stream_id":"b"}"#
        );
        assert_eq!(stream_id_of(&on_lane), Some("b"));
        assert_eq!(classify(&on_lane), EventKind::Token);
        assert_eq!(with_lane("{}", Some("b")), r#"{"stream_id":"b"}"#);
    }

    #[test]
    fn errors_of_an_http_leg_read_like_the_websocket_modes() {
        let sse = r#"{"type":"error","code":"server_error","message":"boom","param":null,"sequence_number":3}"#;
        let v: serde_json::Value = serde_json::from_str(&ws_event_of_sse(sse, Some("b"))).unwrap();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["code"], "server_error");
        assert_eq!(v["error"]["message"], "boom");
        assert_eq!(v["stream_id"], "b");
        let body = br#"{"error":{"type":"invalid_request_error","code":"context_length_exceeded","message":"too long","param":"input"}}"#;
        let v: serde_json::Value =
            serde_json::from_str(&http_error_event(400, body, None)).unwrap();
        assert_eq!(v["status"], 400);
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        let v: serde_json::Value =
            serde_json::from_str(&http_error_event(502, b"bad gateway", None)).unwrap();
        assert_eq!(v["error"]["type"], "server_error");
        assert_eq!(v["error"]["message"], "bad gateway");
    }

    #[test]
    fn websocket_events_as_the_http_surface_answers_them() {
        let delta = r#"{"type":"response.output_text.delta","delta":"hi"}"#;
        assert_eq!(
            &sse_of_ws(delta)[..],
            format!("event: response.output_text.delta\ndata: {delta}\n\n").as_bytes()
        );
        let err = r#"{"type":"error","status":429,"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"slow down","param":null}}"#;
        let sse = String::from_utf8(sse_of_ws(err).to_vec()).unwrap();
        assert!(sse.starts_with("event: error\ndata: "), "{sse}");
        let data: serde_json::Value =
            serde_json::from_str(sse.trim_end().trim_start_matches("event: error\ndata: "))
                .unwrap();
        assert_eq!(data["code"], "rate_limit_exceeded");
        assert_eq!(data["message"], "slow down");
        assert_eq!(data["status"], 429);
        let (status, body) = http_error_of_ws(err);
        assert_eq!(status, 429);
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(http_error_of_ws(r#"{"type":"error","error":{}}"#).0, 500);
        let done =
            r#"{"type":"response.completed","response":{"id":"resp_1","status":"completed"}}"#;
        assert_eq!(
            &response_of_terminal(done).unwrap()[..],
            br#"{"id":"resp_1","status":"completed"}"#
        );
        assert_eq!(response_of_terminal(delta), None);
    }

    #[test]
    fn event_types_the_relay_does_not_know_are_no_tokens() {
        for t in [
            "response.metadata",
            "response.compaction.compacting",
            "codex.rate_limits",
        ] {
            assert_eq!(kind_of(t), EventKind::Other, "{t}");
        }
        assert_eq!(kind_of("response.queued"), EventKind::Lifecycle);
    }

    #[test]
    fn a_refused_stream_id_is_recognised() {
        let refusal = r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":null,"message":"Unsupported parameter: stream_id","param":"stream_id"}}"#;
        assert!(refuses_stream_id(refusal));
        let other = r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"invalid_stream_id","message":"stream_id must be 1-256 characters","param":"stream_id"}}"#;
        assert!(!refuses_stream_id(other));
        assert!(!refuses_stream_id(
            r#"{"type":"response.output_text.delta","delta":"stream_id"}"#
        ));
    }
}
