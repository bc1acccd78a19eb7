//! Messages of the accounting actor.

use actix::prelude::*;
use chrono::NaiveDateTime;
use serde::{Deserialize, Serialize};

use crate::protocol::usage::Usage;
use crate::session::turn::Timing;

/// Everything the usage row of one turn needs (also the spool's record format, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnRecord {
    /// Upstream response id, else the relay's turn id.
    pub request_id: String,
    pub api_key_id: i64,
    pub user_id: i64,
    pub session_id: String,
    pub turn_index: i32,
    pub account: String,
    pub model: String,
    pub status: String,
    pub usage_source: String,
    pub warmup: bool,
    pub usage: Usage,
    pub cost_nanousd: i64,
    pub timing: Timing,
    pub error_code: Option<String>,
    pub accepted_at: NaiveDateTime,
}

/// Record a finished turn; `Ok` means it is durable (fsynced to the spool) and will not be lost.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SpoolFailure>")]
pub struct RecordTurn(pub TurnRecord);

/// The record could not be made durable (the accounting actor is restarting); send it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the record is not durable yet; retry")]
pub struct SpoolFailure;

/// Restart the accounting actor through its supervisor (tests now, the admin API later).
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub struct Restart;

/// Records acknowledged but not yet committed to the database.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Backlog;

/// Write everything buffered now (shutdown).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Flush;
