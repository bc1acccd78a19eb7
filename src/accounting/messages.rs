//! Messages of the accounting actor.

use actix::prelude::*;
use chrono::NaiveDateTime;

use crate::protocol::usage::Usage;
use crate::session::turn::Timing;

/// Everything the usage row of one turn needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnRecord {
    /// Upstream response id, else the relay's turn id.
    pub request_id: String,
    pub api_key_id: i64,
    pub user_id: i64,
    pub session_id: String,
    pub turn_index: i32,
    pub account: String,
    pub model: String,
    pub status: &'static str,
    pub usage_source: &'static str,
    pub warmup: bool,
    pub usage: Usage,
    pub cost_nanousd: i64,
    pub timing: Timing,
    pub error_code: Option<String>,
    pub accepted_at: NaiveDateTime,
}

/// Record a finished turn; the reply means it will not be lost.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct RecordTurn(pub TurnRecord);

/// Write everything buffered now (shutdown).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Flush;
