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
