//! The Compensator (supervised): retries `pending` compensations until `settled`, or `dead`
//! after `compensation.max_attempts`. Each attempt is counted when the row is claimed, in the
//! same UPDATE that schedules the next one (exponential backoff with jitter, capped).

use std::time::Duration;

use actix::prelude::*;
use tracing::{info, warn};

use crate::actors::{ActorStatus, GetStatus, RestartActor};
use crate::db::{DbPool, queries};

#[derive(Debug, Clone)]
pub struct CompensatorConfig {
    pub poll_interval: Duration,
    pub base_backoff: Duration,
    pub max_backoff: Duration,
    pub max_attempts: i32,
}

/// The wait before attempt `attempt + 1` (1-based `attempt`): `base × 2^(attempt-1)`, capped,
/// then scaled by `jitter` in [0.8, 1.2) so that rows failing together do not retry together.
pub fn retry_delay(attempt: i32, base: Duration, cap: Duration, jitter: f64) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
    let raw = base.saturating_mul(1u32 << exp.min(30)).min(cap);
    raw.mul_f64(jitter.clamp(0.8, 1.2))
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    if getrandom::fill(&mut b).is_err() {
        return 1.0;
    }
    0.8 + 0.4 * f64::from(u16::from_le_bytes(b)) / 65_536.0
}

pub struct Compensator {
    db: DbPool,
    cfg: CompensatorConfig,
    busy: bool,
    /// Bumped by a restart: a pass begun before it reports to nobody.
    epoch: u64,
    restarts: u32,
    started_at: chrono::NaiveDateTime,
    last_error: Option<String>,
}

impl Compensator {
    pub fn new(db: DbPool, cfg: CompensatorConfig) -> Self {
        Self {
            db,
            cfg,
            busy: false,
            epoch: 0,
            restarts: 0,
            started_at: crate::db::now(),
            last_error: None,
        }
    }

    fn status(&self) -> ActorStatus {
        ActorStatus {
            name: "compensator".into(),
            kind: "compensator",
            state: "running".into(),
            started_at: self.started_at,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        }
    }
}

impl Handler<GetStatus> for Compensator {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}

impl Handler<RestartActor> for Compensator {
    type Result = MessageResult<RestartActor>;

    /// In place: a pass in flight reports to nobody, a new pass starts now. Rows are claimed
    /// in the database (attempt counted in the claiming UPDATE), so nothing is lost or doubled.
    fn handle(&mut self, _: RestartActor, ctx: &mut Context<Self>) -> Self::Result {
        self.epoch += 1;
        self.restarts += 1;
        self.busy = false;
        self.started_at = crate::db::now();
        info!(restarts = self.restarts, "compensator restarted");
        ctx.notify(RunDue);
        MessageResult(self.status())
    }
}

impl Actor for Compensator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.cfg.poll_interval, |_, ctx| ctx.notify(RunDue));
    }
}

impl Supervised for Compensator {
    fn restarting(&mut self, _: &mut Context<Self>) {
        warn!("compensator restarting");
        self.busy = false;
    }
}

/// Work the due rows now.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunDue;

impl Handler<RunDue> for Compensator {
    type Result = ();

    fn handle(&mut self, _: RunDue, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let epoch = self.epoch;
        let (db, cfg) = (self.db.clone(), self.cfg.clone());
        let work = async move {
            let due = queries::billing::due_compensations(&db, 100).await?;
            let mut settled = 0;
            for row in due {
                let attempt = row.attempts + 1;
                let next = crate::db::now()
                    + chrono::Duration::from_std(retry_delay(
                        attempt,
                        cfg.base_backoff,
                        cfg.max_backoff,
                        jitter(),
                    ))
                    .unwrap_or_else(|_| chrono::Duration::seconds(60));
                if !queries::billing::claim_compensation(&db, &row, next).await? {
                    continue;
                }
                match queries::billing::settle_compensation(&db, &row).await {
                    Ok(()) => settled += 1,
                    Err(e) => {
                        let dead = attempt >= cfg.max_attempts;
                        warn!(id = row.id, attempt, dead, error = %e, "compensation attempt failed");
                        queries::billing::fail_compensation(
                            &db,
                            &row,
                            attempt,
                            &e.to_string(),
                            dead,
                        )
                        .await?;
                    }
                }
            }
            Ok::<usize, crate::db::DbError>(settled)
        };
        ctx.spawn(work.into_actor(self).map(move |res, act, _| {
            if act.epoch != epoch {
                return;
            }
            act.busy = false;
            match res {
                Ok(0) => {}
                Ok(n) => info!(settled = n, "compensations settled"),
                Err(e) => {
                    warn!(error = %e, "compensator pass failed; retrying at the next poll");
                    act.last_error = Some(e.to_string());
                }
            }
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let (b, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        assert_eq!(retry_delay(1, b, cap, 1.0), Duration::from_secs(1));
        assert_eq!(retry_delay(2, b, cap, 1.0), Duration::from_secs(2));
        assert_eq!(retry_delay(5, b, cap, 1.0), Duration::from_secs(16));
        assert_eq!(retry_delay(30, b, cap, 1.0), cap);
        assert_eq!(retry_delay(1000, b, cap, 1.0), cap);
        assert_eq!(retry_delay(3, b, cap, 0.8), Duration::from_millis(3200));
        assert_eq!(
            retry_delay(3, b, cap, 5.0),
            Duration::from_millis(4800),
            "jitter is clamped"
        );
        for _ in 0..100 {
            let j = jitter();
            assert!((0.8..1.2).contains(&j));
        }
    }
}
