//! The accounting actor.

use std::collections::VecDeque;
use std::time::Duration;

use actix::prelude::*;
use tracing::{error, warn};

use super::messages::{Flush, RecordTurn, TurnRecord};
use crate::db::{DbPool, queries};

pub struct Accounting {
    db: DbPool,
    /// Records whose insert failed, retried in order.
    retry: VecDeque<TurnRecord>,
}

impl Accounting {
    pub fn new(db: DbPool) -> Self {
        Self {
            db,
            retry: VecDeque::new(),
        }
    }
}

impl Actor for Accounting {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            if !act.retry.is_empty() {
                ctx.notify(Flush);
            }
        });
    }
}

impl Handler<RecordTurn> for Accounting {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: RecordTurn, _: &mut Context<Self>) -> Self::Result {
        let db = self.db.clone();
        let record = msg.0;
        Box::pin(
            async move {
                let result = queries::usage::insert(&db, &record).await;
                (record, result)
            }
            .into_actor(self)
            .map(|(record, result), act, _| {
                if let Err(e) = result {
                    warn!(request_id = %record.request_id, error = %e, "usage insert failed; queued for retry");
                    act.retry.push_back(record);
                }
            }),
        )
    }
}

impl Handler<Flush> for Accounting {
    type Result = AtomicResponse<Self, usize>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let batch: Vec<TurnRecord> = self.retry.drain(..).collect();
        let db = self.db.clone();
        AtomicResponse::new(Box::pin(
            async move {
                let mut failed = Vec::new();
                for r in batch {
                    if let Err(e) = queries::usage::insert(&db, &r).await {
                        error!(request_id = %r.request_id, error = %e, "usage insert failed again");
                        failed.push(r);
                    }
                }
                failed
            }
            .into_actor(self)
            .map(|failed, act, _| {
                let left = failed.len();
                act.retry.extend(failed);
                left
            }),
        ))
    }
}
