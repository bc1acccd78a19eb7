//! Usage accounting: every finished turn becomes one `usage_logs` row.
//!
//! - `messages`: `TurnRecord`, the message a session sends at the end of each turn.
//! - `actor`: the accounting actor. It acknowledges a record once it is written (or, while the
//!   database fails, once it is queued in memory for retry — the durable spool and batched
//!   billing are the next step, see the README's status).

pub mod actor;
pub mod messages;
pub mod pending;
pub mod spool;

pub use actor::Accounting;
