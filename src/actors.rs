//! What a long-lived actor reports about itself (the admin API lists them): kind, state, when
//! it started, how often it was restarted, the last error it saw.

use chrono::NaiveDateTime;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActorStatus {
    pub name: String,
    pub kind: &'static str,
    /// `running`, or a degraded state the actor names (`degraded: …`).
    pub state: String,
    #[serde(serialize_with = "crate::utc::serialize")]
    pub started_at: NaiveDateTime,
    pub restarts: u32,
    pub last_error: Option<String>,
}

/// Ask an actor for its status.
#[derive(Debug, actix::Message)]
#[rtype(result = "ActorStatus")]
pub struct GetStatus;

/// Restart an actor in place (what a restart means is the actor's own: see each handler);
/// answers with the status after the restart.
#[derive(Debug, actix::Message)]
#[rtype(result = "ActorStatus")]
pub struct RestartActor;
