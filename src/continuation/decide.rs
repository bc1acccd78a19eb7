//! What to do with a turn's `previous_response_id` (docs/DESIGN.md#continuation), as a pure function of the
//! session's chain state and the frame: keep it, inject the session's last response id, drop
//! it and replay the conversation on a fresh connection, or fail closed.

use serde_json::Value;

use super::history::{History, ReplayError};

/// The session's chain, as the decision needs it.
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a> {
    /// The id of the session's last response, when it had one.
    pub last_response_id: Option<&'a str>,
    /// The turn is about to run on the connection that produced `last_response_id` (which
    /// holds it in memory: `store:false` responses live only there).
    pub same_connection: bool,
    pub history: &'a History,
}

/// The parts of a `response.create` the decision reads.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    pub previous_response_id: Option<&'a str>,
    pub store: bool,
    pub input: Option<&'a Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Send the frame as it is.
    Keep,
    /// Add `previous_response_id` (a tool output continuing the session's last response).
    Inject(String),
    /// The chain is lost: remove `previous_response_id` and send this input instead (the
    /// whole conversation, once).
    Replay {
        input: Vec<Value>,
        reason: &'static str,
    },
    /// Nothing can be sent safely: `continuation_unavailable` (409), nothing goes upstream.
    FailClosed { reason: String },
}

/// Whether a tool output in `input` answers a call that `input` does not carry itself.
fn tool_outputs_without_their_call(input: Option<&Value>) -> bool {
    let Some(items) = input.and_then(Value::as_array) else {
        return false;
    };
    let call_id = |i: &Value| i.get("call_id").and_then(Value::as_str).map(str::to_string);
    let calls: Vec<String> = items
        .iter()
        .filter(|i| !crate::protocol::frames::is_tool_output(i))
        .filter_map(call_id)
        .collect();
    items
        .iter()
        .filter(|i| crate::protocol::frames::is_tool_output(i))
        .filter_map(call_id)
        .any(|c| !calls.contains(&c))
}

fn has_tool_output(input: Option<&Value>) -> bool {
    input
        .and_then(Value::as_array)
        .is_some_and(|items| items.iter().any(crate::protocol::frames::is_tool_output))
}

/// The decision before a turn is written upstream.
pub fn before_send(chain: Chain<'_>, turn: Turn<'_>) -> Decision {
    match (turn.previous_response_id, chain.last_response_id) {
        // Continuing this session's own last response.
        (Some(prev), Some(last)) if prev == last => {
            if chain.same_connection || turn.store {
                // The connection still holds it (or the upstream stored it).
                Decision::Keep
            } else {
                chain_lost(
                    chain,
                    turn,
                    "the connection that held the previous response is gone",
                )
            }
        }
        // Another chain (a stored response, another session's): the upstream decides.
        (Some(_), _) => Decision::Keep,
        // A tool output that answers the last response's call, sent without the id, on the
        // connection that holds that response: the id is what the upstream needs.
        (None, Some(last))
            if chain.same_connection && tool_outputs_without_their_call(turn.input) =>
        {
            Decision::Inject(last.to_string())
        }
        (None, _) => Decision::Keep,
    }
}

/// The upstream answered `previous_response_not_found` before anything was forwarded. Only a
/// turn continuing the session's own last response is recovered (the history is that chain);
/// `Keep` means: forward the error.
pub fn after_not_found(chain: Chain<'_>, turn: Turn<'_>) -> Decision {
    match (turn.previous_response_id, chain.last_response_id) {
        (Some(prev), Some(last)) if prev == last => chain_lost(
            chain,
            turn,
            "the upstream no longer has the previous response",
        ),
        _ => Decision::Keep,
    }
}

fn chain_lost(chain: Chain<'_>, turn: Turn<'_>, why: &'static str) -> Decision {
    // A tool output needs the response that made its call: replaying would leave it without
    // one (the upstream answers "No tool call found for function call output").
    if has_tool_output(turn.input) || chain.history.has_tool_output() {
        return Decision::FailClosed {
            reason: format!(
                "{why}, and the conversation holds tool outputs that cannot be replayed without it; start a new chain"
            ),
        };
    }
    match chain.history.replay(turn.input) {
        Ok(input) => Decision::Replay { input, reason: why },
        Err(ReplayError::TooLarge(max)) => Decision::FailClosed {
            reason: format!(
                "{why}, and the conversation is over {max} bytes (session.replay_max_bytes); start a new chain"
            ),
        },
        Err(ReplayError::Incomplete) => Decision::FailClosed {
            reason: format!(
                "{why}, and the conversation began before this session saw it (or its start is no longer kept), so it cannot be replayed; start a new chain"
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn turn<'a>(prev: Option<&'a str>, input: &'a Value) -> Turn<'a> {
        Turn {
            previous_response_id: prev,
            store: false,
            input: Some(input),
        }
    }

    #[test]
    fn keep_on_the_same_connection_or_for_other_chains() {
        let h = History::new(1 << 20);
        let input = json!("next");
        let chain = Chain {
            last_response_id: Some("resp_1"),
            same_connection: true,
            history: &h,
        };
        assert_eq!(
            before_send(chain, turn(Some("resp_1"), &input)),
            Decision::Keep
        );
        assert_eq!(
            before_send(chain, turn(Some("resp_other"), &input)),
            Decision::Keep
        );
        assert_eq!(before_send(chain, turn(None, &input)), Decision::Keep);
        // store:true: the upstream keeps the response, any connection continues it.
        let moved = Chain {
            same_connection: false,
            ..chain
        };
        let stored = Turn {
            store: true,
            ..turn(Some("resp_1"), &input)
        };
        assert_eq!(before_send(moved, stored), Decision::Keep);
    }

    #[test]
    fn lost_chain_replays_plain_conversations_once() {
        let mut h = History::new(1 << 20);
        h.record_turn(
            Some(&json!("hi")),
            &[json!({"type": "message", "id": "msg_1", "role": "assistant", "content": []})],
        );
        let input = json!("and then?");
        let chain = Chain {
            last_response_id: Some("resp_1"),
            same_connection: false,
            history: &h,
        };
        match before_send(chain, turn(Some("resp_1"), &input)) {
            Decision::Replay { input, .. } => {
                assert_eq!(input.len(), 3);
                assert_eq!(input[2]["content"][0]["text"], "and then?");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            after_not_found(chain, turn(Some("resp_1"), &input)),
            Decision::Replay { .. }
        ));
        // Not this session's chain: the error is the client's to see.
        assert_eq!(
            after_not_found(chain, turn(Some("resp_elsewhere"), &input)),
            Decision::Keep
        );
    }

    /// The seed `003_…` case: the tool output is only in an earlier turn; this turn is plain
    /// input with `previous_response_id`; the connection is gone → fail closed.
    #[test]
    fn tool_output_in_the_frame_or_in_the_history_fails_closed() {
        let mut h = History::new(1 << 20);
        h.record_turn(
            Some(&json!([{"type": "function_call_output", "call_id": "c1", "output": "ok"}])),
            &[json!({"type": "message", "id": "msg_2", "role": "assistant", "content": []})],
        );
        let chain = Chain {
            last_response_id: Some("resp_2"),
            same_connection: false,
            history: &h,
        };
        let plain = json!("thanks");
        assert!(matches!(
            before_send(chain, turn(Some("resp_2"), &plain)),
            Decision::FailClosed { .. }
        ));
        let clean = History::new(1 << 20);
        let chain = Chain {
            history: &clean,
            ..chain
        };
        let with_output = json!([{"type": "function_call_output", "call_id": "c9", "output": "x"}]);
        assert!(matches!(
            before_send(chain, turn(Some("resp_2"), &with_output)),
            Decision::FailClosed { .. }
        ));
    }

    #[test]
    fn inference_only_for_outputs_whose_call_is_not_in_the_frame() {
        let h = History::new(1 << 20);
        let chain = Chain {
            last_response_id: Some("resp_7"),
            same_connection: true,
            history: &h,
        };
        let bare = json!([{"type": "function_call_output", "call_id": "c1", "output": "ok"}]);
        assert_eq!(
            before_send(chain, turn(None, &bare)),
            Decision::Inject("resp_7".into())
        );
        // Self-contained: the call travels with its output.
        let whole = json!([
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "ok"}
        ]);
        assert_eq!(before_send(chain, turn(None, &whole)), Decision::Keep);
        // Not on the connection that holds the response: nothing to continue.
        let moved = Chain {
            same_connection: false,
            ..chain
        };
        assert_eq!(before_send(moved, turn(None, &bare)), Decision::Keep);
    }
}
