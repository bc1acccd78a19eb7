//! Continuation (docs/DESIGN.md#continuation): `previous_response_id` across lost connections. All pure; the
//! session actor asks and applies.
//!
//! - `history`: a conversation, normalised, de-duplicated, bounded.
//! - `lineage`: the session's responses as a tree (lanes fork each other): the history of each.
//! - `decide`: keep, inject, drop + replay, or fail closed — for a turn about to be written,
//!   and after an upstream `previous_response_not_found`.

pub mod decide;
pub mod history;
pub mod lineage;

use serde_json::Value;

pub use decide::{Chain, Decision, Turn, after_not_found, before_send};
pub use history::History;
pub use lineage::Lineages;

/// The frame to send for `decision`: `None` keeps the client's bytes; otherwise the frame with
/// `previous_response_id` set (inject) or removed and `input` replaced (replay). Every other
/// field survives, in order.
pub fn rewrite(raw: &str, decision: &Decision) -> Option<String> {
    let mut v: serde_json::Map<String, Value> = serde_json::from_str(raw).ok()?;
    match decision {
        Decision::Keep | Decision::FailClosed { .. } => return None,
        Decision::Inject(id) => {
            v.insert("previous_response_id".into(), Value::String(id.clone()));
        }
        Decision::Replay { input, .. } => {
            v.shift_remove("previous_response_id");
            v.insert("input".into(), Value::Array(input.clone()));
        }
    }
    Some(Value::Object(v).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rewrites_keep_every_other_field() {
        let raw = r#"{"type":"response.create","model":"m","previous_response_id":"resp_1","input":"x","zz":1}"#;
        assert_eq!(rewrite(raw, &Decision::Keep), None);
        let replay = Decision::Replay {
            input: vec![json!({"type": "message"})],
            reason: "r",
        };
        assert_eq!(
            rewrite(raw, &replay).unwrap(),
            r#"{"type":"response.create","model":"m","input":[{"type":"message"}],"zz":1}"#
        );
        let raw = r#"{"type":"response.create","input":[]}"#;
        assert_eq!(
            rewrite(raw, &Decision::Inject("resp_9".into())).unwrap(),
            r#"{"type":"response.create","input":[],"previous_response_id":"resp_9"}"#
        );
    }
}
