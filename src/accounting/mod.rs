//! Usage accounting: every finished turn becomes one `usage_logs` row, and nothing a client saw
//! finish is lost (docs/DESIGN.md#nothing-lost).
//!
//! - `messages`: `TurnRecord` (with its spool format and version) and the actor's messages.
//! - `actor`: the accounting actor: durable spool, batched billing, fail-closed acknowledgement.
//! - `spool`: append-only checksummed segments, group-committed fsync, recovery, the lock.
//! - `health`: whether a record can be made durable now (sessions and `/readyz` read it).
//! - `pending`: spend not yet in the database, counted by admission.
//! - `merge`: the spool and memory merged when the spool is (re)opened (pure).
//! - `faults`: filesystems that fail or forget on demand (fault tests).

pub mod actor;
pub mod faults;
pub mod health;
pub mod merge;
pub mod messages;
pub mod pending;
pub mod spool;

pub use actor::Accounting;
