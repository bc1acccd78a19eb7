//! The usage record of one turn: what a session hands to accounting, what the spool stores
//! (versioned JSON) and what becomes a `usage_logs` row. Below `session`, `accounting` and
//! `db`, which all use it; it imports none of them.

use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

use crate::protocol::usage::Usage;

/// Timing of a turn in whole milliseconds from `accepted`.
///
/// Rounding: the `first_*` marks are rounded down and `duration_ms` up, and a turn that
/// streamed a token before it ended has `duration_ms > first_token_ms` even when both fell in
/// the same millisecond — so `first_event_ms <= first_token_ms < duration_ms` always holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Timing {
    pub upstream_wait_ms: Option<i64>,
    pub first_event_ms: Option<i64>,
    pub first_token_ms: Option<i64>,
    pub duration_ms: i64,
}

/// How a turn ended (`usage_logs.status`; the spool and the database hold these strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    Completed,
    Incomplete,
    Failed,
    Cancelled,
    Preempted,
    ClientGone,
    UpstreamLost,
    Rejected,
}

impl TurnStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            TurnStatus::Completed => "completed",
            TurnStatus::Incomplete => "incomplete",
            TurnStatus::Failed => "failed",
            TurnStatus::Cancelled => "cancelled",
            TurnStatus::Preempted => "preempted",
            TurnStatus::ClientGone => "client_gone",
            TurnStatus::UpstreamLost => "upstream_lost",
            TurnStatus::Rejected => "rejected",
        }
    }
}

impl From<crate::protocol::events::TerminalKind> for TurnStatus {
    fn from(k: crate::protocol::events::TerminalKind) -> Self {
        use crate::protocol::events::TerminalKind as K;
        match k {
            K::Completed => TurnStatus::Completed,
            K::Incomplete => TurnStatus::Incomplete,
            K::Failed => TurnStatus::Failed,
            K::Cancelled => TurnStatus::Cancelled,
        }
    }
}

/// Where a turn's billed usage comes from (`usage_logs.usage_source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream's terminal event.
    Reported,
    /// Part reported before the turn was cut, floored by the relay's estimate.
    Partial,
    /// The relay's estimate (nothing reported, or a report not believed).
    Estimated,
    /// Nothing reached the upstream.
    None,
}

impl UsageSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Partial => "partial",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

/// What started a turn (`usage_logs.origin`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The client's `response.create`.
    #[default]
    Create,
    /// A successor the upstream started on its own after `response.steer`.
    Steer,
    /// `POST /v1/responses/compact`, or a request whose input holds a `compaction_trigger`
    /// (records spooled before were `compact`).
    #[serde(alias = "compact")]
    Compaction,
}

impl Origin {
    pub const fn as_str(self) -> &'static str {
        match self {
            Origin::Create => "create",
            Origin::Steer => "steer",
            Origin::Compaction => "compaction",
        }
    }
}

/// Which transport carried a turn: the client's (`usage_logs.transport`;
/// docs/DESIGN.md#http-surface), or the upstream's (`usage_logs.upstream_transport`;
/// docs/DESIGN.md#upstream-transports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// The WebSocket mode.
    #[default]
    Ws,
    /// `POST /v1/responses` (JSON or SSE) or `/v1/responses/compact`.
    Http,
}

impl Transport {
    pub const fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Http => "http",
        }
    }
}

/// Where a failed debit's retry stands (`billing_compensations.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompensationStatus {
    /// Due for a retry (at `next_attempt_at`).
    Pending,
    /// The debit is in the ledger.
    Settled,
    /// Retries exhausted; an operator may re-queue it.
    Dead,
}

impl CompensationStatus {
    pub const ALL: [CompensationStatus; 3] = [Self::Pending, Self::Settled, Self::Dead];

    pub const fn as_str(self) -> &'static str {
        match self {
            CompensationStatus::Pending => "pending",
            CompensationStatus::Settled => "settled",
            CompensationStatus::Dead => "dead",
        }
    }

    /// The status named `s`, if it is one.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(
    TurnStatus,
    UsageSource,
    Origin,
    Transport,
    CompensationStatus
);

/// Everything the usage row of one turn needs (also the spool's record format, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// The relay's turn id (`turn_…`), generated when the `response.create` was accepted: the
    /// idempotency key with `api_key_id`. (Records of format version 1 hold the upstream
    /// response id here.)
    pub request_id: crate::ids::TurnId,
    /// The upstream's response id, when it named one.
    #[serde(default)]
    pub response_id: Option<String>,
    pub api_key_id: i64,
    pub user_id: i64,
    pub session_id: crate::ids::SessionId,
    pub turn_index: i32,
    pub account: String,
    pub model: String,
    pub status: TurnStatus,
    pub usage_source: UsageSource,
    pub warmup: bool,
    pub usage: Usage,
    pub cost_nanousd: i64,
    pub timing: Timing,
    pub error_code: Option<String>,
    pub accepted_at: NaiveDateTime,
    /// `create` (the client's `response.create` or `POST /v1/responses`), `steer` (a successor
    /// the upstream started after `response.steer`) or `compaction` (`/v1/responses/compact`,
    /// or a `compaction_trigger` input item).
    #[serde(default)]
    pub origin: Origin,
    /// `ws` or `http` (records spooled before the HTTP surface are `ws`).
    #[serde(default)]
    pub transport: Transport,
    /// How the request reached the upstream (records spooled before HTTP legs are `ws`;
    /// docs/DESIGN.md#upstream-transports).
    #[serde(default)]
    pub upstream_transport: Transport,
    /// The service tier billed (docs/DESIGN.md#pricing; records spooled before tiers are
    /// `standard`).
    #[serde(default = "standard_tier")]
    pub service_tier: String,
    /// The usage the upstream reported and the relay did not believe (billed from its
    /// estimate instead): written to `usage_quarantine` with the usage row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_aside: Option<SetAside>,
    /// The reservation block the turn drew from, and what its record takes off the block's
    /// row (docs/DESIGN.md#reservation-blocks; none for a turn with a row of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockDraw>,
}

/// A turn's draw on a reservation block, as its record settles it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDraw {
    /// The block's `turn_reservations.request_id`.
    pub block: String,
    pub amount_nanousd: i64,
}

/// The service tier of a request that names none, and of the upstream's `default`
/// (docs/DESIGN.md#pricing).
pub const STANDARD_TIER: &str = "standard";

fn standard_tier() -> String {
    STANDARD_TIER.to_string()
}

/// A reported usage set aside (docs/DESIGN.md#usage-bounds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetAside {
    pub reported: Usage,
    pub reason: String,
}

/// Longest `model` stored (longer names are refused when the request is read; records
/// spooled before are cut).
pub use crate::protocol::frames::MODEL_MAX_CHARS;
/// Longest `error_code` stored (codes come from the upstream or the relay's table).
pub const ERROR_CODE_MAX_CHARS: usize = 64;

/// `s` without control characters (NUL included: PostgreSQL cannot store it), at most `max`
/// characters.
pub fn clean_label(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

impl TurnRecord {
    /// The record with its client- and upstream-controlled text bounded and cleaned, so the
    /// database never refuses it for those bytes.
    pub fn cleaned(mut self) -> Self {
        let bad = |s: &str, max| s.chars().count() > max || s.chars().any(char::is_control);
        if bad(&self.model, MODEL_MAX_CHARS) {
            self.model = clean_label(&self.model, MODEL_MAX_CHARS);
        }
        if let Some(c) = self.error_code.as_deref()
            && bad(c, ERROR_CODE_MAX_CHARS)
        {
            self.error_code = Some(clean_label(c, ERROR_CODE_MAX_CHARS));
        }
        if let Some(c) = self.response_id.as_deref()
            && bad(c, MODEL_MAX_CHARS)
        {
            self.response_id = Some(clean_label(c, MODEL_MAX_CHARS));
        }
        if bad(&self.service_tier, MODEL_MAX_CHARS) {
            self.service_tier = clean_label(&self.service_tier, MODEL_MAX_CHARS);
        }
        self
    }
}

/// The spool's record format version, written into every record. Version 1 (no `v` field)
/// is the format before turn ids; it is still read.
pub const RECORD_VERSION: u32 = 2;

#[derive(Serialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(flatten)]
    record: &'a TurnRecord,
}

#[derive(Deserialize)]
struct VersionOnly {
    #[serde(default = "version_one")]
    v: u32,
}

fn version_one() -> u32 {
    1
}

/// Why a spool payload is not a record this build can bill.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("record format version {0} is unknown to this build")]
    UnknownVersion(u32),
    #[error("not a turn record: {0}")]
    Invalid(String),
}

/// A record's spool payload (JSON with its format version).
pub fn encode_record(r: &TurnRecord) -> Vec<u8> {
    // A struct of strings and numbers always serializes.
    serde_json::to_vec(&Envelope {
        v: RECORD_VERSION,
        record: r,
    })
    .unwrap_or_default()
}

pub fn decode_record(bytes: &[u8]) -> Result<TurnRecord, RecordError> {
    let v = serde_json::from_slice::<VersionOnly>(bytes)
        .map_err(|e| RecordError::Invalid(e.to_string()))?
        .v;
    if !(1..=RECORD_VERSION).contains(&v) {
        return Err(RecordError::UnknownVersion(v));
    }
    serde_json::from_slice(bytes).map_err(|e| RecordError::Invalid(e.to_string()))
}

/// A record for unit tests: key 1, user 7, 40 nano-USD.
#[cfg(test)]
pub fn sample() -> TurnRecord {
    tests::record()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn record() -> TurnRecord {
        serde_json::from_value(serde_json::json!({
            "request_id": "turn_1", "api_key_id": 1, "user_id": 7, "session_id": "s", "turn_index": 1,
            "account": "a", "model": "m", "status": "completed", "usage_source": "reported",
            "warmup": false, "usage": {"input_tokens": 1, "cached_input_tokens": 0, "cache_write_tokens": 0,
            "output_tokens": 1, "reasoning_tokens": 0, "total_tokens": 2}, "cost_nanousd": 40,
            "timing": {"upstream_wait_ms": null, "first_event_ms": null, "first_token_ms": null, "duration_ms": 1},
            "error_code": null, "accepted_at": "2026-11-22T00:00:00"
        }))
        .unwrap()
    }

    #[test]
    fn versions_round_trip_old_ones_read_unknown_ones_refused() {
        let mut r = record();
        r.response_id = Some("resp_1".into());
        let bytes = encode_record(&r);
        assert!(String::from_utf8_lossy(&bytes).starts_with("{\"v\":2,"));
        assert_eq!(decode_record(&bytes), Ok(r.clone()));
        // Version 1: no `v`, no `response_id`.
        let mut v1 = serde_json::to_value(record()).unwrap();
        v1.as_object_mut().unwrap().remove("response_id");
        v1["origin"] = "compact".into();
        let old = decode_record(v1.to_string().as_bytes()).unwrap();
        assert_eq!(old.response_id, None);
        assert_eq!(old.service_tier, "standard");
        assert_eq!(old.origin, Origin::Compaction);
        v1["v"] = 99.into();
        assert_eq!(
            decode_record(v1.to_string().as_bytes()),
            Err(RecordError::UnknownVersion(99))
        );
        assert!(matches!(
            decode_record(b"[1]"),
            Err(RecordError::Invalid(_))
        ));
    }

    #[test]
    fn labels_are_bounded_and_cleaned() {
        let mut r = record();
        r.model = format!("gpt\u{0}-{}", "x".repeat(300));
        r.error_code = Some("bad\ncode".into());
        let c = r.cleaned();
        assert_eq!(c.model.chars().count(), MODEL_MAX_CHARS);
        assert!(c.model.starts_with("gpt-x"));
        assert_eq!(c.error_code.as_deref(), Some("badcode"));
        assert_eq!(record().cleaned(), record());
    }
}
