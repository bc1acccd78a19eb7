//! One turn's bookkeeping, pure: timing (docs/DESIGN.md#timing), the response id, usage merge, and the
//! outcome that becomes a usage row. The session actor feeds it events and instants.

use std::time::{Duration, Instant};

use crate::protocol::errors::ErrorCode;
use crate::protocol::events::{
    EventKind, SteerKind, TerminalKind, classify, delta_len, mentions_usage,
};
use crate::protocol::usage::{Usage, estimate_tokens};
use crate::record::{Timing, TurnStatus, UsageSource};

/// The instants of one turn.
#[derive(Debug, Clone)]
pub struct TurnClock {
    accepted: Instant,
    written: Option<Instant>,
    first_event: Option<Instant>,
    first_token: Option<Instant>,
    saw_delta: bool,
}

fn floor_ms(d: Duration) -> i64 {
    crate::num::millis_i64(d)
}

fn ceil_ms(d: Duration) -> i64 {
    crate::num::millis_ceil_i64(d)
}

impl TurnClock {
    pub fn new(accepted: Instant) -> Self {
        Self {
            accepted,
            written: None,
            first_event: None,
            first_token: None,
            saw_delta: false,
        }
    }

    /// The request frame was written upstream (the first time only: a retry keeps the wait).
    pub fn written(&mut self, now: Instant) {
        self.written.get_or_insert(now);
    }

    /// An upstream event of this turn arrived. Deltas are credited here although they carry no
    /// response id: the session has one turn in flight, and this is it.
    pub fn event(&mut self, kind: EventKind, now: Instant) {
        self.first_event.get_or_insert(now);
        match kind {
            EventKind::Token => {
                self.saw_delta = true;
                self.first_token.get_or_insert(now);
            }
            // A `.done` carries the whole text: a token only when no delta preceded it.
            EventKind::TokenDone if !self.saw_delta => {
                self.first_token.get_or_insert(now);
            }
            _ => {}
        }
    }

    /// The request was written upstream (the upstream bills its input from then on).
    pub fn reached_upstream(&self) -> bool {
        self.written.is_some()
    }

    /// Timing of a turn that ends now (terminal event or any other end).
    pub fn finish(&self, now: Instant) -> Timing {
        let since = |t: Instant| t.saturating_duration_since(self.accepted);
        let first_event_ms = self.first_event.map(|t| floor_ms(since(t)));
        let first_token_ms = self.first_token.map(|t| floor_ms(since(t)));
        let mut duration_ms = ceil_ms(since(now));
        if let Some(ft) = first_token_ms {
            duration_ms = duration_ms.max(ft + 1);
        }
        if let Some(fe) = first_event_ms {
            duration_ms = duration_ms.max(fe);
        }
        Timing {
            upstream_wait_ms: self.written.map(|t| floor_ms(since(t))),
            first_event_ms,
            first_token_ms,
            duration_ms,
        }
    }
}

/// How a turn ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// A terminal response event.
    Terminal(TerminalKind),
    /// An upstream `error` event (its code).
    UpstreamError(Option<String>),
    Preempted,
    Cancelled,
    ClientGone,
    UpstreamLost(ErrorCode),
    /// Refused before anything was sent upstream (admission, lease, capacity).
    Rejected(ErrorCode),
    /// The relay ended it (shutdown, slow client).
    Aborted(ErrorCode),
}

/// What the usage row of a turn says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub status: TurnStatus,
    pub usage_source: UsageSource,
    pub usage: Usage,
    /// What the relay measured itself: billed instead of an implausible report.
    pub estimate: Usage,
    pub timing: Timing,
    pub error_code: Option<String>,
    pub response_id: Option<String>,
    /// The `service_tier` the upstream reported for the response (the terminal's, else the
    /// latest seen): the tier billed (docs/DESIGN.md#pricing).
    pub service_tier: Option<String>,
}

/// What one upstream frame meant to the turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub kind: EventKind,
    /// A terminal (or usage-bearing event) of another response than the turn's: relayed as
    /// the upstream sent it, never billed, never the turn's end (docs/DESIGN.md#stray-terminals).
    pub stray: bool,
}

/// The state of the turn in flight.
#[derive(Debug, Clone)]
pub struct TurnTracker {
    pub clock: TurnClock,
    pub response_id: Option<String>,
    service_tier: Option<String>,
    usage: Usage,
    usage_reported: bool,
    /// A terminal event arrived (its usage, if any, is the upstream's bill).
    saw_terminal: bool,
    /// The terminal response's output items (`response.output`), kept from the one parse of
    /// the terminal for the session's replay history.
    pub output: Vec<serde_json::Value>,
    pub usage_malformed: bool,
    streamed_chars: usize,
    /// Bytes of the request's prompt (input, instructions, tools): the input estimate when the
    /// upstream never reports usage.
    prompt_bytes: usize,
    pub events: u32,
}

impl TurnTracker {
    pub fn new(accepted: Instant) -> Self {
        Self {
            clock: TurnClock::new(accepted),
            response_id: None,
            service_tier: None,
            usage: Usage::default(),
            usage_reported: false,
            saw_terminal: false,
            output: Vec::new(),
            usage_malformed: false,
            streamed_chars: 0,
            prompt_bytes: 0,
            events: 0,
        }
    }

    /// The longest silence the turn's upstream is allowed before its next event: `first` until
    /// it heard one, then `idle`.
    pub fn silence_allowed(&self, first: Duration, idle: Duration) -> Duration {
        if self.events == 0 { first } else { idle }
    }

    /// The size of the request's prompt, for the input estimate.
    pub fn prompting(mut self, prompt_bytes: usize) -> Self {
        self.prompt_bytes = prompt_bytes;
        self
    }

    /// Feeds one upstream text frame. Only `response.created`, terminals and usage-bearing
    /// lifecycle events are parsed; deltas are scanned.
    pub fn observe(&mut self, text: &str, now: Instant) -> Observed {
        let kind = classify(text);
        let parsed = match kind {
            EventKind::Created | EventKind::Terminal(_) => true,
            EventKind::Lifecycle => mentions_usage(text),
            _ => false,
        };
        if parsed && !self.parse_response(text, kind) {
            return Observed { kind, stray: true };
        }
        self.events += 1;
        self.clock.event(kind, now);
        self.saw_terminal |= matches!(kind, EventKind::Terminal(_));
        if kind == EventKind::Token {
            self.streamed_chars += delta_len(text);
        }
        Observed { kind, stray: false }
    }

    /// A whole (non-streamed) response body that arrived at `now` — a response object, or a
    /// compaction — read as a stream's terminal event carrying it (docs/DESIGN.md#http-surface);
    /// no token event came (its tokens all arrived with its end: `first_token_ms` stays NULL).
    /// `None` when the body is not a JSON object.
    pub fn observe_whole(&mut self, body: &[u8], now: Instant) -> Option<TerminalKind> {
        let Ok(serde_json::Value::Object(response)) = serde_json::from_slice(body) else {
            return None;
        };
        let kind = match response.get("status").and_then(|s| s.as_str()) {
            Some("incomplete") => "response.incomplete",
            Some("failed") => "response.failed",
            Some("cancelled") => "response.cancelled",
            _ => "response.completed",
        };
        let event = serde_json::json!({"type": kind, "response": response}).to_string();
        match self.observe(&event, now).kind {
            EventKind::Terminal(k) => Some(k),
            _ => None,
        }
    }

    /// Reads a `response.*` event's response: its id, tier, usage and (of a terminal) output.
    /// `false`, with nothing read, when it names another response than the one the turn's
    /// `response.created` named (docs/DESIGN.md#stray-terminals).
    fn parse_response(&mut self, text: &str, kind: EventKind) -> bool {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(text) else {
            return true;
        };
        if let (Some(mine), Some(theirs)) = (
            self.response_id.as_deref(),
            v.pointer("/response/id").and_then(|i| i.as_str()),
        ) && mine != theirs
        {
            return false;
        }
        if matches!(kind, EventKind::Terminal(_))
            && let Some(serde_json::Value::Array(items)) = v.pointer_mut("/response/output")
        {
            self.output = std::mem::take(items);
        }
        if self.response_id.is_none()
            && let Some(id) = v.pointer("/response/id").and_then(|i| i.as_str())
        {
            self.response_id = Some(id.to_string());
        }
        if let Some(tier) = v.pointer("/response/service_tier").and_then(|t| t.as_str()) {
            self.service_tier = Some(tier.to_string());
        }
        match Usage::from_event(&v) {
            Ok(Some(u)) => {
                self.usage.merge(&u);
                self.usage_reported = true;
            }
            Ok(None) => {}
            Err(_) => self.usage_malformed = true,
        }
        true
    }

    /// The relay's own measure of the turn: input from the prompt's size (once the request
    /// reached the upstream), output from the streamed text.
    fn estimate(&self, reached: bool) -> Usage {
        let input_tokens = if reached {
            estimate_tokens(self.prompt_bytes)
        } else {
            0
        };
        let output_tokens = estimate_tokens(self.streamed_chars);
        Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
            ..Usage::default()
        }
    }

    /// The outcome of the turn ending now.
    ///
    /// Usage (docs/DESIGN.md#preemption): the upstream's, when a terminal event reported it. Otherwise never
    /// zero for a request that reached the upstream: input estimated from the prompt (about 4
    /// bytes a token) when nothing reported it, output from the streamed text when that is
    /// more than reported — `estimated`, or `partial` when part of it was reported.
    pub fn finish(&self, ending: Ending, now: Instant) -> Outcome {
        let timing = self.clock.finish(now);
        let (status, error_code) = match &ending {
            Ending::Terminal(k) => (TurnStatus::from(*k), None),
            Ending::UpstreamError(code) => (TurnStatus::Failed, code.clone()),
            Ending::Preempted => (
                TurnStatus::Preempted,
                Some(ErrorCode::ResponsePreempted.code().into()),
            ),
            Ending::Cancelled => (TurnStatus::Cancelled, None),
            Ending::ClientGone => (TurnStatus::ClientGone, None),
            Ending::UpstreamLost(code) => (TurnStatus::UpstreamLost, Some(code.code().into())),
            Ending::Rejected(code) => (TurnStatus::Rejected, Some(code.code().into())),
            Ending::Aborted(code) => (TurnStatus::Cancelled, Some(code.code().into())),
        };
        let reached = self.clock.reached_upstream();
        let estimate = self.estimate(reached);
        let mut usage = self.usage;
        let usage_source = if self.events == 0 && !reached {
            UsageSource::None
        } else if self.usage_reported && self.saw_terminal {
            UsageSource::Reported
        } else {
            usage.output_tokens = usage.output_tokens.max(estimate.output_tokens);
            if usage.input_tokens == 0 {
                usage.input_tokens = estimate.input_tokens;
            }
            if self.usage_reported {
                UsageSource::Partial
            } else {
                UsageSource::Estimated
            }
        };
        if usage.total_tokens == 0 {
            usage.total_tokens = usage.input_tokens + usage.output_tokens;
        }
        Outcome {
            status,
            usage_source,
            usage,
            estimate,
            timing,
            error_code,
            response_id: self.response_id.clone(),
            service_tier: self.service_tier.clone(),
        }
    }
}

/// What a streaming turn does with one upstream event, whatever carries it — the session's
/// socket, an HTTP leg, an HTTP client's SSE stream or its upstream socket
/// (docs/DESIGN.md#turn-steps). Each transport only carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Relay it to the client.
    Forward,
    /// Relay it; it says whether the upstream will start a successor (steering).
    Steer(SteerKind),
    /// The turn's last event: its record first, then the event. `reusable`: the connection
    /// may serve another response (a terminal, or an error of the request alone).
    End {
        ending: Ending,
        reusable: bool,
        /// What may still save the turn, tried first by a transport that can; the end stands
        /// when it cannot.
        recover: Option<Recovery>,
    },
    /// Not a JSON event: never relayed; the turn ends `upstream_protocol_error`.
    Invalid,
}

/// How an `error` event before anything was relayed may be recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// `previous_response_not_found`, not yet replayed: replay the chain once.
    Replay,
    /// The account's trouble, not the request's (its code): another account may take the turn.
    FailOver(String),
}

/// What a turn has done so far, as its next event's step depends on it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Relayed {
    /// Something of the response reached the client.
    pub forwarded: bool,
    /// Its conversation was replayed already.
    pub replayed: bool,
}

/// Feeds one upstream event to the turn's tracker and decides its step.
pub fn step(tracker: &mut TurnTracker, text: &str, now: Instant, relayed: Relayed) -> Step {
    let observed = tracker.observe(text, now);
    if observed.stray {
        // Another response's event: the client sees what the upstream sent, the turn goes on.
        ::metrics::counter!(crate::telemetry::metric::UPSTREAM_ERRORS, "code" => "stray_terminal")
            .increment(1);
        return Step::Forward;
    }
    match observed.kind {
        EventKind::Invalid => Step::Invalid,
        EventKind::Terminal(kind) => Step::End {
            ending: Ending::Terminal(kind),
            reusable: true,
            recover: None,
        },
        EventKind::Error => {
            let e = read_error(text);
            let recover = if relayed.forwarded {
                None
            } else if e.code.as_deref() == Some("previous_response_not_found") && !relayed.replayed
            {
                Some(Recovery::Replay)
            } else if e.account {
                Some(Recovery::FailOver(e.code.clone().unwrap_or_default()))
            } else {
                None
            };
            Step::End {
                ending: Ending::UpstreamError(e.code),
                reusable: e.request_level,
                recover,
            }
        }
        EventKind::Steer(kind) => Step::Steer(kind),
        _ => Step::Forward,
    }
}

/// An upstream `error` event, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamError {
    /// `error.code` (the WebSocket mode's wrapped error), or an SSE error's own `code`.
    pub code: Option<String>,
    /// It concerns only the request: the socket stays usable.
    pub request_level: bool,
    /// It says the account, not the request, is in trouble (its code, or its status 401, 403,
    /// 429 or 5xx): before anything was relayed the turn may go to another account
    /// (docs/DESIGN.md#accounts).
    pub account: bool,
}

pub fn read_error(text: &str) -> UpstreamError {
    let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
    let code = v
        .pointer("/error/code")
        .or_else(|| v.get("code"))
        .and_then(serde_json::Value::as_str)
        .map(str::to_string);
    let kind = v
        .pointer("/error/type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let request_level = matches!(code.as_deref(), Some("previous_response_not_found"))
        || (kind == "invalid_request_error"
            && code.as_deref() != Some("websocket_connection_limit_reached"));
    let status = v.get("status").and_then(serde_json::Value::as_u64);
    let account = matches!(
        code.as_deref(),
        Some(
            "rate_limit_exceeded"
                | "usage_limit_reached"
                | "insufficient_quota"
                | "invalid_api_key"
                | "server_error"
                | "server_is_overloaded"
                | "service_unavailable"
        )
    ) || matches!(status, Some(401 | 403 | 429 | 500..=599));
    UpstreamError {
        code,
        request_level,
        account,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    /// The stream of seed 000: deltas carry no response id; only created and completed do.
    #[test]
    fn seed_stream_first_token_is_the_first_delta() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.clock.written(at(t0, 2));
        t.observe(
            r#"{"type":"response.created","response":{"id":"resp_X"}}"#,
            at(t0, 100),
        );
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"He"}"#,
            at(t0, 150),
        );
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"llo"}"#,
            at(t0, 200),
        );
        let obs = t.observe(
            r#"{"type":"response.completed","response":{"id":"resp_X","usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}}"#,
            at(t0, 300),
        );
        assert_eq!(obs.kind, EventKind::Terminal(TerminalKind::Completed));
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), at(t0, 300));
        assert_eq!(o.timing.upstream_wait_ms, Some(2));
        assert_eq!(o.timing.first_event_ms, Some(100));
        assert_eq!(o.timing.first_token_ms, Some(150));
        assert_eq!(o.timing.duration_ms, 300);
        assert!(o.timing.first_token_ms.unwrap() < o.timing.duration_ms);
        assert_eq!(o.response_id.as_deref(), Some("resp_X"));
        assert_eq!(
            (o.status.as_str(), o.usage_source.as_str()),
            ("completed", "reported")
        );
        assert_eq!((o.usage.input_tokens, o.usage.output_tokens), (5, 2));
    }

    /// A stream without usage is estimated from its deltas, compact or spaced JSON alike.
    #[test]
    fn spaced_and_compact_deltas_estimate_the_same_output() {
        let estimate = |events: &[&str]| {
            let t0 = Instant::now();
            let mut t = TurnTracker::new(t0).prompting(40);
            t.clock.written(t0);
            for e in events {
                t.observe(e, t0);
            }
            t.finish(Ending::ClientGone, t0)
        };
        let compact = estimate(&[
            r#"{"type":"response.created","response":{"id":"r"}}"#,
            r#"{"type":"response.output_text.delta","delta":"Hello there, "}"#,
            r#"{"type":"response.output_text.delta","delta":"world"}"#,
        ]);
        let spaced = estimate(&[
            r#"{"type": "response.created", "response": {"id": "r"}}"#,
            r#"{"type": "response.output_text.delta", "delta": "Hello there, "}"#,
            r#"{"type": "response.output_text.delta", "delta": "world"}"#,
        ]);
        assert_eq!(compact.usage_source.as_str(), "estimated");
        assert_eq!(spaced.usage.output_tokens, 5);
        assert_eq!(spaced.usage, compact.usage);
    }

    #[test]
    fn same_millisecond_still_strictly_ordered() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        let same = t0 + Duration::from_micros(1500);
        t.observe(r#"{"type":"response.created","response":{"id":"r"}}"#, same);
        t.observe(r#"{"type":"response.output_text.delta","delta":"x"}"#, same);
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r"}}"#,
            same,
        );
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), same);
        let (fe, ft, d) = (
            o.timing.first_event_ms.unwrap(),
            o.timing.first_token_ms.unwrap(),
            o.timing.duration_ms,
        );
        assert!(fe <= ft && ft < d, "{fe} {ft} {d}");
    }

    #[test]
    fn terminals_and_lifecycle_are_never_tokens() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.created","response":{"id":"r"}}"#,
            at(t0, 10),
        );
        t.observe(
            r#"{"type":"response.in_progress","response":{"id":"r"}}"#,
            at(t0, 11),
        );
        t.observe(
            r#"{"type":"response.output_item.added","item":{}}"#,
            at(t0, 12),
        );
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r"}}"#,
            at(t0, 50),
        );
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), at(t0, 50));
        assert_eq!(o.timing.first_token_ms, None);
        assert_eq!(o.timing.first_event_ms, Some(10));
    }

    #[test]
    fn done_without_delta_is_a_token() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.function_call_arguments.done","arguments":"{}"}"#,
            at(t0, 40),
        );
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r"}}"#,
            at(t0, 60),
        );
        assert_eq!(
            t.finish(Ending::Terminal(TerminalKind::Completed), at(t0, 60))
                .timing
                .first_token_ms,
            Some(40)
        );
        // After deltas, the .done is not the first token.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"a"}"#,
            at(t0, 20),
        );
        t.observe(
            r#"{"type":"response.output_text.done","text":"a"}"#,
            at(t0, 30),
        );
        assert_eq!(
            t.finish(Ending::ClientGone, at(t0, 31))
                .timing
                .first_token_ms,
            Some(20)
        );
    }

    #[test]
    fn usage_sources() {
        let t0 = Instant::now();
        // No usage at all: estimated from the streamed text.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"12345678"}"#,
            t0,
        );
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r","usage":null}}"#,
            t0,
        );
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), t0);
        assert_eq!(
            (o.usage_source.as_str(), o.usage.output_tokens),
            ("estimated", 2)
        );
        // Malformed usage: flagged, never applied.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":"x"}}}"#,
            t0,
        );
        assert!(t.usage_malformed);
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), t0);
        assert_eq!(
            (o.usage_source.as_str(), o.usage.input_tokens),
            ("estimated", 0)
        );
        // Split usage merges; a later zero does not erase the input count.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.in_progress","response":{"id":"r","usage":{"input_tokens":9}}}"#,
            t0,
        );
        t.observe(r#"{"type":"response.completed","response":{"id":"r","usage":{"input_tokens":0,"output_tokens":4}}}"#, t0);
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), t0);
        assert_eq!(
            (
                o.usage.input_tokens,
                o.usage.output_tokens,
                o.usage.total_tokens
            ),
            (9, 4, 13)
        );
        // Cut short: partial.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"abcd"}"#,
            t0,
        );
        let o = t.finish(Ending::UpstreamLost(ErrorCode::UpstreamConnectionLost), t0);
        assert_eq!(
            (
                o.status.as_str(),
                o.usage_source.as_str(),
                o.usage.output_tokens
            ),
            ("upstream_lost", "estimated", 1)
        );
        // Part of the usage reported before the cut: partial, output floored by the text.
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.in_progress","response":{"id":"r","usage":{"input_tokens":9}}}"#,
            t0,
        );
        t.observe(
            r#"{"type":"response.output_text.delta","delta":"abcdefgh"}"#,
            t0,
        );
        let o = t.finish(Ending::ClientGone, t0);
        assert_eq!(
            (
                o.usage_source.as_str(),
                o.usage.input_tokens,
                o.usage.output_tokens
            ),
            ("partial", 9, 2)
        );
        // Nothing seen.
        let o = TurnTracker::new(t0).finish(Ending::Rejected(ErrorCode::AccountBusy), t0);
        assert_eq!(
            (o.status.as_str(), o.usage_source.as_str()),
            ("rejected", "none")
        );
    }

    /// A request that reached the upstream is never billed as zero input, however it ended.
    #[test]
    fn cut_short_turns_bill_estimated_input() {
        let t0 = Instant::now();
        for ending in [
            Ending::Preempted,
            Ending::Cancelled,
            Ending::ClientGone,
            Ending::UpstreamLost(ErrorCode::UpstreamRestarting),
            Ending::Aborted(ErrorCode::ShuttingDown),
        ] {
            let mut t = TurnTracker::new(t0).prompting(4_000);
            t.clock.written(t0);
            t.observe(
                r#"{"type":"response.created","response":{"id":"resp_1"}}"#,
                t0,
            );
            t.observe(
                r#"{"type":"response.output_text.delta","delta":"12345678"}"#,
                t0,
            );
            let o = t.finish(ending.clone(), t0);
            assert_eq!(
                (
                    o.usage_source.as_str(),
                    o.usage.input_tokens,
                    o.usage.output_tokens
                ),
                ("estimated", 1_000, 2),
                "{ending:?}"
            );
        }
        // Written upstream, nothing came back: input still billed.
        let mut t = TurnTracker::new(t0).prompting(40);
        t.clock.written(t0);
        let o = t.finish(Ending::UpstreamLost(ErrorCode::UpstreamConnectionLost), t0);
        assert_eq!(
            (o.usage_source.as_str(), o.usage.input_tokens),
            ("estimated", 10)
        );
        // A cancelled terminal that carries usage is the upstream's bill.
        let mut t = TurnTracker::new(t0).prompting(4_000);
        t.clock.written(t0);
        t.observe(r#"{"type":"response.cancelled","response":{"id":"r","usage":{"input_tokens":7,"output_tokens":3}}}"#, t0);
        let o = t.finish(Ending::Preempted, t0);
        assert_eq!(
            (
                o.status.as_str(),
                o.usage_source.as_str(),
                o.usage.input_tokens,
                o.usage.output_tokens
            ),
            ("preempted", "reported", 7, 3)
        );
    }

    #[test]
    fn terminal_output_items_are_kept() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.observe(
            r#"{"type":"response.created","response":{"id":"r","output":[]}}"#,
            t0,
        );
        t.observe(
            r#"{"type":"response.completed","response":{"id":"r","output":[{"type":"message","id":"m1"}]}}"#,
            t0,
        );
        assert_eq!(
            t.output,
            vec![serde_json::json!({"type": "message", "id": "m1"})]
        );
        let mut t = TurnTracker::new(t0);
        t.observe(r#"{"type":"error","error":{"code":"x"}}"#, t0);
        assert!(t.output.is_empty());
    }

    /// A JSON (non-streamed) answer is billed from its usage; a compaction (no status) too.
    #[test]
    fn whole_bodies() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.clock.written(at(t0, 1));
        let k = t.observe_whole(
            br#"{"id":"resp_J","status":"incomplete","output":[{"type":"message"}],"usage":{"input_tokens":11,"output_tokens":3}}"#,
            at(t0, 40),
        );
        assert_eq!(k, Some(TerminalKind::Incomplete));
        let o = t.finish(Ending::Terminal(TerminalKind::Incomplete), at(t0, 40));
        assert_eq!(o.response_id.as_deref(), Some("resp_J"));
        assert_eq!((o.usage.input_tokens, o.usage.output_tokens), (11, 3));
        assert_eq!(o.usage_source.as_str(), "reported");
        // No token event came: the tokens all arrived with the end.
        assert_eq!(o.timing.first_token_ms, None);
        let mut t = TurnTracker::new(t0);
        let k = t.observe_whole(
            br#"{"id":"cmp_1","object":"response.compaction","output":[],"usage":{"input_tokens":5,"output_tokens":2}}"#,
            t0,
        );
        assert_eq!(k, Some(TerminalKind::Completed));
        assert_eq!(
            t.finish(Ending::Terminal(TerminalKind::Completed), t0)
                .usage
                .input_tokens,
            5
        );
        assert_eq!(TurnTracker::new(t0).observe_whole(b"<html>", t0), None);
        assert_eq!(TurnTracker::new(t0).observe_whole(b"[1]", t0), None);
    }

    fn stepped(text: &str, relayed: Relayed) -> Step {
        step(
            &mut TurnTracker::new(Instant::now()),
            text,
            Instant::now(),
            relayed,
        )
    }

    const FRESH: Relayed = Relayed {
        forwarded: false,
        replayed: false,
    };

    #[test]
    fn every_event_kind_has_its_step() {
        let fwd = Relayed {
            forwarded: true,
            ..FRESH
        };
        assert_eq!(
            stepped(
                r#"{"type":"response.created","response":{"id":"r"}}"#,
                FRESH
            ),
            Step::Forward
        );
        assert_eq!(
            stepped(r#"{"type":"response.output_text.delta","delta":"x"}"#, fwd),
            Step::Forward
        );
        assert_eq!(
            stepped(r#"{"type":"codex.rate_limits"}"#, fwd),
            Step::Forward
        );
        assert_eq!(
            stepped(r#"{"type":"response.steer.accepted"}"#, fwd),
            Step::Steer(SteerKind::Accepted)
        );
        assert_eq!(stepped("not json", fwd), Step::Invalid);
        for (terminal, kind) in [
            ("response.completed", TerminalKind::Completed),
            ("response.incomplete", TerminalKind::Incomplete),
            ("response.failed", TerminalKind::Failed),
            ("response.cancelled", TerminalKind::Cancelled),
        ] {
            let text = format!(r#"{{"type":"{terminal}","response":{{"id":"r"}}}}"#);
            assert_eq!(
                stepped(&text, fwd),
                Step::End {
                    ending: Ending::Terminal(kind),
                    reusable: true,
                    recover: None
                }
            );
        }
    }

    #[test]
    fn an_error_ends_the_turn_and_says_what_may_save_it() {
        let not_found = r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"previous_response_not_found","message":"gone"}}"#;
        let end = |reusable, recover| Step::End {
            ending: Ending::UpstreamError(Some("previous_response_not_found".into())),
            reusable,
            recover,
        };
        assert_eq!(stepped(not_found, FRESH), end(true, Some(Recovery::Replay)));
        let replayed = Relayed {
            replayed: true,
            ..FRESH
        };
        assert_eq!(stepped(not_found, replayed), end(true, None));
        let forwarded = Relayed {
            forwarded: true,
            ..FRESH
        };
        assert_eq!(stepped(not_found, forwarded), end(true, None));

        let limited = r#"{"type":"error","status":429,"error":{"type":"rate_limit_error","code":"rate_limit_exceeded","message":"slow"}}"#;
        assert_eq!(
            stepped(limited, FRESH),
            Step::End {
                ending: Ending::UpstreamError(Some("rate_limit_exceeded".into())),
                reusable: false,
                recover: Some(Recovery::FailOver("rate_limit_exceeded".into())),
            }
        );
        // A status alone says it too; an SSE error's own `code` is read.
        let e = read_error(
            r#"{"type":"error","status":503,"error":{"type":"server_error","code":"odd"}}"#,
        );
        assert!(e.account && !e.request_level);
        let e = read_error(r#"{"type":"error","code":"server_is_overloaded","message":"busy"}"#);
        assert_eq!(e.code.as_deref(), Some("server_is_overloaded"));
        assert!(e.account);
        let bad = read_error(
            r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"context_length_exceeded"}}"#,
        );
        assert!(bad.request_level && !bad.account);
        let limit = read_error(
            r#"{"type":"error","status":400,"error":{"type":"invalid_request_error","code":"websocket_connection_limit_reached"}}"#,
        );
        assert!(!limit.request_level, "the socket goes");
    }

    /// A terminal naming another response than the turn's `response.created` (an upstream
    /// repeating an old one, or nonsense) is relayed but is not the turn's end and bills
    /// nothing; the turn's own terminal ends it.
    #[test]
    fn a_stray_terminal_is_not_the_turns() {
        let t0 = Instant::now();
        let mut t = TurnTracker::new(t0);
        t.clock.written(t0);
        let relayed = Relayed::default();
        let created = r#"{"type":"response.created","response":{"id":"resp_A"}}"#;
        assert_eq!(step(&mut t, created, at(t0, 1), relayed), Step::Forward);
        let stray = r#"{"type":"response.completed","response":{"id":"resp_OLD","usage":{"input_tokens":999,"output_tokens":999}}}"#;
        assert_eq!(step(&mut t, stray, at(t0, 2), relayed), Step::Forward);
        let own = r#"{"type":"response.completed","response":{"id":"resp_A","usage":{"input_tokens":3,"output_tokens":2}}}"#;
        assert!(matches!(
            step(&mut t, own, at(t0, 3), relayed),
            Step::End {
                ending: Ending::Terminal(TerminalKind::Completed),
                ..
            }
        ));
        let o = t.finish(Ending::Terminal(TerminalKind::Completed), at(t0, 4));
        assert_eq!((o.usage.input_tokens, o.usage.output_tokens), (3, 2));
        assert_eq!(o.response_id.as_deref(), Some("resp_A"));
        // Before any `response.created`, a terminal is the turn's (nothing to match it to).
        let mut t = TurnTracker::new(t0);
        assert!(matches!(
            step(&mut t, stray, at(t0, 1), relayed),
            Step::End { .. }
        ));
    }
}
