//! The replay history of a session (docs/DESIGN.md#continuation): the input items it sent and the output items
//! of each response, normalised and de-duplicated, so that a chain whose connection is gone
//! can be continued on a fresh one by sending the whole conversation once.

use serde_json::{Value, json};

use crate::protocol::frames::is_tool_output;

/// Why a replay cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the session's history is over {0} bytes; it is not replayed (never truncated)")]
    TooLarge(usize),
    #[error("the conversation began before this session saw it, or its start is no longer kept")]
    Incomplete,
}

/// Items of the conversation so far, in order.
#[derive(Debug, Clone, Default)]
pub struct History {
    items: Vec<Value>,
    bytes: usize,
    max_bytes: usize,
    /// Set once the history went over `max_bytes`: it can no longer be replayed.
    overflowed: bool,
    /// The conversation's start is not known here: it cannot be replayed.
    incomplete: bool,
}

/// A `response.create` input as items: a string is one user message.
pub fn normalise_input(input: Option<&Value>) -> Vec<Value> {
    match input {
        Some(Value::String(s)) => vec![json!({
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": s}],
        })],
        Some(Value::Array(items)) => items.clone(),
        _ => Vec::new(),
    }
}

/// The identity of an item for de-duplication: its `id`, else its `call_id` with its type
/// (a call and its output share a `call_id`).
fn identity(item: &Value) -> Option<String> {
    if let Some(id) = item.get("id").and_then(Value::as_str) {
        return Some(format!("id:{id}"));
    }
    let call = item.get("call_id").and_then(Value::as_str)?;
    let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
    Some(format!("call:{kind}:{call}"))
}

impl History {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }

    /// A conversation whose start is not known: never replayed.
    pub fn incomplete(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            incomplete: true,
            ..Self::default()
        }
    }

    /// Appends items not seen before (by id, then call id).
    pub fn extend(&mut self, items: impl IntoIterator<Item = Value>) {
        for item in items {
            if let Some(id) = identity(&item)
                && self
                    .items
                    .iter()
                    .any(|seen| identity(seen).as_deref() == Some(&id))
            {
                continue;
            }
            self.bytes += item.to_string().len();
            self.items.push(item);
        }
        if self.bytes > self.max_bytes {
            self.overflowed = true;
            // Nothing kept can be replayed any more; free it.
            self.items.clear();
        }
    }

    /// A finished turn: what it sent, then what the response produced.
    pub fn record_turn(&mut self, input: Option<&Value>, output: &[Value]) {
        self.extend(normalise_input(input));
        self.extend(output.iter().cloned());
    }

    /// The items so far.
    pub fn items(&self) -> &[Value] {
        &self.items
    }

    pub fn has_tool_output(&self) -> bool {
        self.items.iter().any(is_tool_output)
    }

    /// The replay input for a turn whose own input is `input`: the history, then this turn's
    /// items not already in it.
    pub fn replay(&self, input: Option<&Value>) -> Result<Vec<Value>, ReplayError> {
        if self.incomplete {
            return Err(ReplayError::Incomplete);
        }
        if self.overflowed {
            return Err(ReplayError::TooLarge(self.max_bytes));
        }
        let mut all = self.clone();
        all.extend(normalise_input(input));
        if all.overflowed {
            return Err(ReplayError::TooLarge(self.max_bytes));
        }
        Ok(all.items)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_input_is_one_message_and_items_are_deduplicated() {
        let mut h = History::new(1 << 20);
        h.record_turn(
            Some(&json!("hi")),
            &[json!({"type": "message", "id": "msg_1", "role": "assistant", "content": []})],
        );
        h.record_turn(
            Some(&json!([
                {"type": "message", "id": "msg_1", "role": "assistant", "content": []},
                {"type": "function_call_output", "call_id": "c1", "output": "ok"}
            ])),
            &[json!({"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"})],
        );
        let kinds: Vec<&str> = h
            .items()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "message",
                "message",
                "function_call_output",
                "function_call"
            ]
        );
        assert_eq!(h.items()[0]["content"][0]["text"], "hi");
        assert!(h.has_tool_output());
        // The same output sent again is not repeated.
        h.extend([json!({"type": "function_call_output", "call_id": "c1", "output": "ok"})]);
        assert_eq!(h.items().len(), 4);
        let replay = h.replay(Some(&json!("next"))).unwrap();
        assert_eq!(replay.len(), 5);
        assert_eq!(replay[4]["content"][0]["text"], "next");
    }

    #[test]
    fn over_the_bound_replay_is_refused_not_truncated() {
        let mut h = History::new(200);
        h.record_turn(Some(&json!("x".repeat(100))), &[]);
        assert!(h.replay(None).is_ok());
        assert_eq!(
            h.replay(Some(&json!("y".repeat(150)))),
            Err(ReplayError::TooLarge(200))
        );
        h.record_turn(Some(&json!("z".repeat(150))), &[]);
        assert_eq!(h.replay(None), Err(ReplayError::TooLarge(200)));
        assert!(h.items().is_empty());
    }
}
