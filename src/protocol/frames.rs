//! Client → relay frames: what a text frame is, checked once when it arrives. The frame's bytes
//! are kept and forwarded unchanged unless a rewrite is needed (`with_model`).

use serde_json::Value;

use super::errors::ErrorCode;

#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    /// `response.create` (or no `type`): starts a turn.
    /// Boxed: a create is far larger than the other frames.
    Create(Box<CreateFrame>),
    /// `response.cancel` / `response.interrupt`.
    Cancel,
    /// Any other type (`response.steer`, unknown): forwarded while a lease is held.
    Other(String),
}

/// The fields of a `response.create` the relay looks at; the rest stays in the raw text.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateFrame {
    pub raw: String,
    pub model: Option<String>,
    pub previous_response_id: Option<String>,
    /// The API default is `true`.
    pub store: bool,
    /// `generate: false`.
    pub warmup: bool,
    /// The input holds a tool output (`function_call_output`, `custom_tool_call_output`, …).
    pub has_tool_output: bool,
    /// Bytes of the prompt the upstream bills as input (`input`, `instructions`, `tools`), for
    /// the input estimate of a turn the upstream never reports usage for.
    pub prompt_bytes: usize,
    /// The `input` (string or items), kept for the session's replay history.
    pub input: Option<Value>,
    /// `max_output_tokens`, when a count: what the turn reserves for output.
    pub max_output_tokens: Option<u64>,
    /// The lane (`stream_id`); `None`: the implicit default lane.
    pub stream_id: Option<String>,
    /// `stream: true`: over HTTP, the answer is an SSE stream (the WebSocket mode ignores it).
    pub stream: bool,
    /// `background: true`: the response outlives its request (HTTP only).
    pub background: bool,
    /// `prompt_cache_key`: turns sharing it go to one account (docs/DESIGN.md#routing).
    pub prompt_cache_key: Option<String>,
    /// `service_tier` as asked (`auto`, `default`, `flex`, `priority`, …).
    pub service_tier: Option<String>,
    /// The input asks the upstream to compact (a `compaction_trigger` item): the turn's
    /// `origin` is `compaction` (docs/DESIGN.md#pricing).
    pub compaction: bool,
}

/// Longest model name (it is priced, stored and sent as given).
pub const MODEL_MAX_CHARS: usize = 128;

/// Responses in flight on one upstream connection (the upstream's limit; more wait).
pub const MAX_IN_FLIGHT: usize = 16;

/// Named lanes (`stream_id`) per upstream connection (the upstream's limit).
pub const MAX_NAMED_LANES: usize = 32;

/// A `stream_id` as the upstream accepts it: 1–256 characters of `[A-Za-z0-9_.-]`.
pub fn valid_stream_id(id: &str) -> bool {
    (1..=256).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Bytes of a JSON value as the upstream reads it: a string's own length, else its JSON text.
fn json_bytes(v: Option<&Value>) -> usize {
    match v {
        None | Some(Value::Null) => 0,
        Some(Value::String(s)) => s.len(),
        Some(v) => v.to_string().len(),
    }
}

/// A frame the relay refuses; the session sends the error and closes (docs/DESIGN.md#client-frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> FrameError {
    FrameError {
        code,
        message: message.into(),
    }
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        refuse(
            ErrorCode::InvalidJson,
            format!("frame is not valid JSON: {e}"),
        )
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| refuse(ErrorCode::InvalidJson, "frame is not a JSON object"))?;
    let kind = match obj.get("type") {
        None | Some(Value::Null) => "",
        Some(Value::String(s)) => s.as_str(),
        Some(_) => return Err(refuse(ErrorCode::InvalidJson, "`type` must be a string")),
    };
    match kind {
        "" | "response.create" => {}
        "response.cancel" | "response.interrupt" => return Ok(ClientFrame::Cancel),
        other => return Ok(ClientFrame::Other(other.to_string())),
    }
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        // The name priced is the name stored and the name sent: one with control characters
        // (a NUL PostgreSQL cannot store) or too long to store is no model name.
        Some(Value::String(m))
            if !m.trim().is_empty()
                && !m.chars().any(char::is_control)
                && m.chars().count() <= MODEL_MAX_CHARS =>
        {
            Some(m.clone())
        }
        Some(_) => {
            return Err(refuse(
                ErrorCode::InvalidModel,
                format!(
                    "`model` must be a non-empty string of at most {MODEL_MAX_CHARS} characters, without control characters"
                ),
            ));
        }
    };
    let previous_response_id = match obj.get("previous_response_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => {
            if id.starts_with("msg_") || id.starts_with("item_") {
                return Err(refuse(
                    ErrorCode::InvalidPreviousResponseId,
                    format!(
                        "previous_response_id {id:?} is a message/item id, not a response id (resp_…)"
                    ),
                ));
            }
            Some(id.clone())
        }
        Some(_) => {
            return Err(refuse(
                ErrorCode::InvalidPreviousResponseId,
                "`previous_response_id` must be a string",
            ));
        }
    };
    let stream_id = match obj.get("stream_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if valid_stream_id(id) => Some(id.clone()),
        Some(_) => {
            return Err(refuse(
                ErrorCode::InvalidStreamId,
                "`stream_id` must be 1-256 characters of letters, digits, '_', '.' or '-'",
            ));
        }
    };
    let items = obj.get("input").and_then(Value::as_array);
    let has_tool_output = items.is_some_and(|items| items.iter().any(is_tool_output));
    let compaction = items.is_some_and(|items| {
        items
            .iter()
            .any(|i| i.get("type").and_then(Value::as_str) == Some("compaction_trigger"))
    });
    Ok(ClientFrame::Create(Box::new(CreateFrame {
        raw: text.to_string(),
        model,
        previous_response_id,
        store: obj.get("store").and_then(Value::as_bool).unwrap_or(true),
        warmup: obj.get("generate").and_then(Value::as_bool) == Some(false),
        has_tool_output,
        prompt_bytes: ["input", "instructions", "tools"]
            .iter()
            .map(|k| json_bytes(obj.get(*k)))
            .sum(),
        input: obj.get("input").cloned(),
        max_output_tokens: obj.get("max_output_tokens").and_then(Value::as_u64),
        stream_id,
        stream: obj.get("stream").and_then(Value::as_bool) == Some(true),
        background: obj.get("background").and_then(Value::as_bool) == Some(true),
        prompt_cache_key: obj
            .get("prompt_cache_key")
            .and_then(Value::as_str)
            .map(str::to_string),
        service_tier: obj
            .get("service_tier")
            .and_then(Value::as_str)
            .map(str::to_string),
        compaction,
    })))
}

/// `function_call_output`, `custom_tool_call_output`, `mcp_tool_call_output`, …
pub fn is_tool_output(item: &Value) -> bool {
    item.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with("_output"))
}

/// The frame with `"model"` added as its first field; everything else byte for byte.
pub fn with_model(raw: &str, model: &str) -> String {
    let model = Value::String(model.to_string()).to_string();
    match raw.find('{') {
        Some(at) => {
            let rest = raw[at + 1..].trim_start();
            let sep = if rest.starts_with('}') { "" } else { "," };
            format!("{}{{\"model\":{model}{sep}{}", &raw[..at], &raw[at + 1..])
        }
        None => raw.to_string(),
    }
}

/// A `POST /responses` body as the WebSocket mode's `response.create` frame
/// (docs/DESIGN.md#upstream-transports): `type` first, without `stream` (the WebSocket mode
/// always streams); every other field as the client sent it, in its order. `None` when `body`
/// is not a JSON object.
pub fn ws_frame(body: &[u8]) -> Option<String> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    let mut frame = serde_json::Map::with_capacity(fields.len() + 1);
    frame.insert("type".into(), Value::String("response.create".into()));
    frame.extend(
        fields
            .into_iter()
            .filter(|(k, _)| k != "stream" && k != "type"),
    );
    Some(Value::Object(frame).to_string())
}

/// A `response.create` frame as the body of `POST /responses` (docs/DESIGN.md#upstream-transports):
/// without the WebSocket mode's `type` and `stream_id`, with `stream: true`; every other field
/// as the client sent it, in its order. `None` when `raw` is not a JSON object.
pub fn http_body(raw: &str) -> Option<String> {
    let Ok(Value::Object(mut fields)) = serde_json::from_str::<Value>(raw) else {
        return None;
    };
    fields.shift_remove("type");
    fields.shift_remove("stream_id");
    fields.insert("stream".into(), Value::Bool(true));
    Some(Value::Object(fields).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_body_is_the_create_without_the_websocket_fields() {
        let raw = r#"{"type":"response.create","stream_id":"b","model":"m","input":"hi","prompt_cache_options":{"ttl":"12h"},"stream":false}"#;
        assert_eq!(
            http_body(raw).unwrap(),
            r#"{"model":"m","input":"hi","prompt_cache_options":{"ttl":"12h"},"stream":true}"#
        );
        assert_eq!(http_body("[1]"), None);
        // And back: an HTTP body as a frame.
        let body = br#"{"model":"m","stream":true,"input":"hi","client_metadata":{"a":"b"}}"#;
        assert_eq!(
            ws_frame(body).unwrap(),
            r#"{"type":"response.create","model":"m","input":"hi","client_metadata":{"a":"b"}}"#
        );
        assert_eq!(ws_frame(b"[]"), None);
        assert_eq!(http_body("{}").unwrap(), r#"{"stream":true}"#);
    }

    fn create(text: &str) -> CreateFrame {
        match parse(text).unwrap() {
            ClientFrame::Create(c) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn create_fields() {
        let c = create(
            r#"{"type":"response.create","model":"gpt-x","store":false,"previous_response_id":"resp_1","input":[{"type":"function_call_output","call_id":"c","output":"o"}],"generate":false}"#,
        );
        assert_eq!(c.model.as_deref(), Some("gpt-x"));
        assert_eq!(c.previous_response_id.as_deref(), Some("resp_1"));
        assert!(!c.store && c.warmup && c.has_tool_output);
        let c = create(r#"{"input":"hi"}"#);
        assert!(c.store && !c.warmup && !c.has_tool_output && c.model.is_none());
        assert_eq!(c.prompt_bytes, 2);
        let c = create(r#"{"input":[{"type":"message"}],"instructions":"be brief","tools":[]}"#);
        assert_eq!(c.prompt_bytes, r#"[{"type":"message"}]"#.len() + 8 + 2);
        assert!(!c.compaction && c.service_tier.is_none());
        let c = create(
            r#"{"input":[{"type":"message"},{"type":"compaction_trigger"}],"service_tier":"priority"}"#,
        );
        assert!(c.compaction);
        assert_eq!(c.service_tier.as_deref(), Some("priority"));
        // A model name is priced, stored and sent as given: none that could not be.
        for bad in [
            "\"gpt-p3\\u0000\"".to_string(),
            "\"gpt\\nx\"".to_string(),
            format!("\"{}\"", "m".repeat(129)),
        ] {
            let e = parse(&format!(r#"{{"model":{bad}}}"#)).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidModel, "{bad}");
        }
        assert!(parse(&format!(r#"{{"model":"{}"}}"#, "m".repeat(128))).is_ok());
    }

    #[test]
    fn other_types() {
        assert_eq!(
            parse(r#"{"type":"response.cancel"}"#).unwrap(),
            ClientFrame::Cancel
        );
        assert_eq!(
            parse(r#"{"type":"response.interrupt","response_id":"r"}"#).unwrap(),
            ClientFrame::Cancel
        );
        assert_eq!(
            parse(r#"{"type":"response.steer","input":[]}"#).unwrap(),
            ClientFrame::Other("response.steer".into())
        );
    }

    #[test]
    fn refusals() {
        assert_eq!(parse("{nope").unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::InvalidJson);
        assert_eq!(
            parse(r#"{"model":5}"#).unwrap_err().code,
            ErrorCode::InvalidModel
        );
        assert_eq!(
            parse(r#"{"model":""}"#).unwrap_err().code,
            ErrorCode::InvalidModel
        );
        assert_eq!(
            parse(r#"{"model":"m","previous_response_id":"msg_1"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidPreviousResponseId
        );
        assert_eq!(
            parse(r#"{"model":"m","previous_response_id":"item_1"}"#)
                .unwrap_err()
                .code,
            ErrorCode::InvalidPreviousResponseId
        );
    }

    #[test]
    fn model_injection_keeps_the_rest() {
        let raw = r#"{"type":"response.create","input":"hi","unknown":{"a":[1,2]}}"#;
        let out = with_model(raw, "gpt-\"q\"");
        assert_eq!(
            out,
            r#"{"model":"gpt-\"q\"","type":"response.create","input":"hi","unknown":{"a":[1,2]}}"#
        );
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["model"], "gpt-\"q\"");
        assert_eq!(with_model("{}", "m"), r#"{"model":"m"}"#);
    }
}
