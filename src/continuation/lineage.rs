//! The lineages of a session's responses (docs/DESIGN.md#continuation): every response the
//! session saw end, with the response it continued and the items it added. Lanes run side by
//! side and a lane may fork another lane's response, so a session's conversation is a tree, not
//! one chain: the replay of a response is its own lineage, root to it — never another branch.
//! Bounded by `session.replay_max_bytes`: the oldest responses go first, and a lineage that
//! reaches one that is gone (or began before this session saw it) cannot be replayed: it fails
//! closed rather than replay part of a conversation.

use std::collections::{HashMap, VecDeque};

use serde_json::Value;

use super::history::{History, normalise_input};

/// What a response continued.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Parent {
    /// Nothing: a new conversation.
    Root,
    /// A response of this session.
    Known(String),
    /// A response this session never saw end (another session's, a stored one): what came
    /// before is unknown here.
    Unknown,
}

#[derive(Debug, Clone)]
struct Node {
    parent: Parent,
    /// Its input, then its output.
    items: Vec<Value>,
    bytes: usize,
    /// The upstream connection that holds it.
    conn: u64,
}

/// The connection of a response no connection holds (it ran over HTTP, or a failed
/// continuation evicted it from its socket's cache): a continuation of it is never "on the same
/// connection".
pub const NO_CONNECTION: u64 = u64::MAX;

#[derive(Debug, Default)]
pub struct Lineages {
    nodes: HashMap<String, Node>,
    /// Response ids, oldest first (eviction order).
    order: VecDeque<String>,
    bytes: usize,
    max_bytes: usize,
    /// The last response of each lane.
    last: HashMap<Option<String>, String>,
}

impl Lineages {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            ..Self::default()
        }
    }

    /// A response `id` on `lane` ended (completed or incomplete) on connection `conn`; it
    /// continued `parent` (the id the request named or the relay injected).
    pub fn record(
        &mut self,
        lane: &Option<String>,
        id: &str,
        parent: Option<&str>,
        conn: u64,
        input: Option<&Value>,
        output: &[Value],
    ) {
        let parent = match parent {
            None => Parent::Root,
            Some(p) if self.nodes.contains_key(p) => Parent::Known(p.to_string()),
            Some(_) => Parent::Unknown,
        };
        let mut items = normalise_input(input);
        items.extend(output.iter().cloned());
        let bytes = items.iter().map(|i| i.to_string().len()).sum();
        if let Some(old) = self.nodes.insert(
            id.to_string(),
            Node {
                parent,
                items,
                bytes,
                conn,
            },
        ) {
            self.bytes = self.bytes.saturating_sub(old.bytes);
            self.order.retain(|o| o != id);
        }
        self.bytes += bytes;
        self.order.push_back(id.to_string());
        self.last.insert(lane.clone(), id.to_string());
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(gone) = self.nodes.remove(&oldest) {
                self.bytes = self.bytes.saturating_sub(gone.bytes);
            }
        }
    }

    /// The last response of `lane`, and the connection that holds it.
    pub fn last_of(&self, lane: &Option<String>) -> Option<(&str, u64)> {
        let id = self.last.get(lane)?;
        Some((id.as_str(), self.nodes.get(id)?.conn))
    }

    /// Response `id` is no longer held by its connection: a continuation of it failed there
    /// (4xx/5xx), which evicts it from the socket's cache (docs/DESIGN.md#continuation).
    pub fn detach(&mut self, id: &str) {
        if let Some(node) = self.nodes.get_mut(id) {
            node.conn = NO_CONNECTION;
        }
    }

    /// The connection that holds response `id`, if this session saw it end (and still keeps
    /// it).
    pub fn conn_of(&self, id: &str) -> Option<u64> {
        self.nodes.get(id).map(|n| n.conn)
    }

    /// The conversation up to and including response `id`, root first, as a replay history
    /// (de-duplicated, bounded). Incomplete when the lineage began before this session saw it
    /// or reaches a response no longer kept.
    pub fn history_of(&self, id: &str) -> History {
        let mut chain = Vec::new();
        let mut at = Some(id);
        while let Some(current) = at {
            let Some(node) = self.nodes.get(current) else {
                return History::incomplete(self.max_bytes);
            };
            chain.push(node);
            at = match &node.parent {
                Parent::Root => None,
                Parent::Known(p) => Some(p.as_str()),
                Parent::Unknown => return History::incomplete(self.max_bytes),
            };
            if chain.len() > self.nodes.len() {
                // A cycle (an upstream repeating ids): not a conversation to replay.
                return History::incomplete(self.max_bytes);
            }
        }
        let mut history = History::new(self.max_bytes);
        for node in chain.into_iter().rev() {
            history.extend(node.items.iter().cloned());
        }
        history
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::continuation::history::ReplayError;

    fn said(h: &History) -> Vec<String> {
        h.items()
            .iter()
            .map(|i| {
                i.pointer("/content/0/text")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            })
            .collect()
    }

    fn answer(text: &str) -> Vec<Value> {
        vec![
            json!({"id": format!("msg_{text}"), "type": "message", "role": "assistant",
            "content": [{"type": "output_text", "text": text}]}),
        ]
    }

    #[test]
    fn a_fork_replays_its_own_branch_only() {
        let mut l = Lineages::new(1 << 20);
        let a: Option<String> = Some("a".into());
        let b: Option<String> = Some("b".into());
        l.record(&a, "r1", None, 7, Some(&json!("hello")), &answer("one"));
        l.record(
            &a,
            "r2",
            Some("r1"),
            7,
            Some(&json!("more")),
            &answer("two"),
        );
        l.record(
            &b,
            "r3",
            Some("r1"),
            7,
            Some(&json!("fork")),
            &answer("three"),
        );
        assert_eq!(said(&l.history_of("r3")), ["hello", "one", "fork", "three"]);
        assert_eq!(said(&l.history_of("r2")), ["hello", "one", "more", "two"]);
        assert_eq!(l.last_of(&a), Some(("r2", 7)));
        assert_eq!(l.last_of(&b), Some(("r3", 7)));
        assert_eq!(l.last_of(&None), None);
        assert_eq!(l.conn_of("r1"), Some(7));
    }

    #[test]
    fn a_lineage_this_session_did_not_see_begin_is_not_replayed() {
        let mut l = Lineages::new(1 << 20);
        l.record(
            &None,
            "r2",
            Some("elsewhere"),
            1,
            Some(&json!("hi")),
            &answer("x"),
        );
        assert_eq!(
            l.history_of("r2").replay(None),
            Err(ReplayError::Incomplete)
        );
        assert_eq!(
            l.history_of("never").replay(None),
            Err(ReplayError::Incomplete)
        );
    }

    #[test]
    fn the_oldest_responses_go_first_and_their_descendants_fail_closed() {
        let mut l = Lineages::new(600);
        l.record(&None, "r1", None, 1, Some(&json!("a".repeat(150))), &[]);
        l.record(
            &None,
            "r2",
            Some("r1"),
            1,
            Some(&json!("b".repeat(150))),
            &[],
        );
        assert!(l.history_of("r2").replay(None).is_ok());
        l.record(
            &None,
            "r3",
            Some("r2"),
            1,
            Some(&json!("c".repeat(150))),
            &[],
        );
        assert_eq!(l.conn_of("r1"), None, "evicted");
        assert_eq!(
            l.history_of("r3").replay(None),
            Err(ReplayError::Incomplete)
        );
        // A new conversation is replayable again.
        l.record(&None, "r4", None, 1, Some(&json!("d")), &[]);
        assert!(l.history_of("r4").replay(None).is_ok());
    }

    #[test]
    fn a_detached_response_is_on_no_connection_and_keeps_its_history() {
        let mut l = Lineages::new(1 << 20);
        let input = serde_json::json!("hi");
        l.record(&None, "r1", None, 7, Some(&input), &[]);
        l.detach("r1");
        assert_eq!(l.conn_of("r1"), Some(NO_CONNECTION));
        assert_eq!(l.last_of(&None), Some(("r1", NO_CONNECTION)));
        assert_eq!(l.history_of("r1").items()[0]["content"][0]["text"], "hi");
        l.detach("unknown");
    }
}
