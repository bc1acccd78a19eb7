//! Messages handled by the session actor (besides upstream events and client frames).

use actix::prelude::*;

use crate::protocol::errors::ErrorCode;

/// End the session: the turn in flight gets `code`'s error event, then the socket closes with
/// `code`'s close code (1001 for shutdown).
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct EndSession(pub ErrorCode);

/// Shutdown, first step: a session between turns closes now (1001); a session in a turn lets
/// the turn finish (terminal delivered and billed), then closes.
#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "()")]
pub struct EndWhenIdle;

/// What a session is, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionInfo {
    pub id: String,
    pub key_prefix: String,
    pub user: String,
    /// The account of the connection it holds, if any.
    pub account: Option<String>,
    pub turns: i32,
    /// `idle`, or the phase of the turn in flight (`admitting`, `leasing`, `streaming`,
    /// `finishing`).
    pub state: &'static str,
    pub age_s: u64,
    /// Named lanes (`stream_id`) the session has used.
    pub lanes: usize,
    /// `response.create`s waiting behind the turn in flight.
    pub queued: usize,
}

#[derive(Debug, Clone, Copy, Message)]
#[rtype(result = "SessionInfo")]
pub struct Describe;
