//! Messages of the accounting actor.

use actix::prelude::*;

use crate::record::TurnRecord;

/// Record a finished turn; `Ok` means it is durable — fsynced to the spool, or committed to the
/// database while the spool is unusable — and will not be lost. The answer may take as long as
/// neither is possible: callers bound the wait (`accounting.ack_timeout_ms`). A record that was
/// not acknowledged in time stays with the actor, which writes it once it can.
#[derive(Debug, Message)]
#[rtype(result = "Result<(), SpoolFailure>")]
pub struct RecordTurn(pub TurnRecord);

/// The record could not be made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the record is not durable")]
pub struct SpoolFailure;

/// Records acknowledged but not yet committed to the database.
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Backlog;

/// Seconds since the oldest record not yet in the database was accepted (0 when none).
#[derive(Debug, Message)]
#[rtype(result = "u64")]
pub struct BacklogAge;

/// Write everything buffered now (shutdown).
#[derive(Debug, Message)]
#[rtype(result = "usize")]
pub struct Flush;
