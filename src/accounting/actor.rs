//! The accounting actor (supervised, on a thread of its own because it fsyncs).
//!
//! `RecordTurn` → append to the spool → group-committed fsync (one fsync covers every record
//! that arrived meanwhile) → acknowledge. Acknowledged records wait in memory (their segments
//! sealed on disk) until a batch transaction commits them; only then are their segments removed.
//! A failed batch is retried record by record; a record whose debit fails gets its usage row and
//! a pending compensation. While the database is down, records wait in the spool and flushes
//! retry with backoff. An fsync error restarts the actor: every in-memory state is dropped and
//! rebuilt from the spool on disk (no retried fsync that "succeeds" over lost pages); the
//! acknowledgements still owed are refused, so their senders send again. Restarts happen in
//! place — a second stop/restart cycle through actix's `Supervisor` was seen to leave the actor
//! dead (mailbox closed) here — and the Supervisor remains for a stop (spool cannot be opened).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::messages::{Backlog, Flush, RecordTurn, Restart, SpoolFailure, TurnRecord};
use super::pending::PendingSpend;
use super::spool::{DirFs, Spool};
use crate::db::{DbPool, queries};

pub struct AccountingConfig {
    pub spool_dir: PathBuf,
    pub batch_max_rows: usize,
    pub flush_interval: Duration,
    /// Records kept in memory while the database lags; older ones stay only on disk ("spilled")
    /// and are read back segment by segment when the database returns.
    pub max_in_memory: usize,
}

/// Answers a `RecordTurn` once its record is durable.
type Ack = oneshot::Sender<Result<(), SpoolFailure>>;

/// A record acknowledged (durable) and not yet committed, with its segment.
struct Pending {
    seg: u64,
    record: TurnRecord,
}

pub struct Accounting {
    db: DbPool,
    spend: Arc<PendingSpend>,
    cfg: AccountingConfig,
    spool: Option<Spool<DirFs>>,
    /// Appended, waiting for the next fsync.
    unsynced: Vec<(u64, TurnRecord, Ack)>,
    sync_scheduled: bool,
    /// Durable, waiting for the database.
    pending: Vec<Pending>,
    /// Sealed segments whose records are only on disk (memory cap reached), oldest first, with
    /// their record counts.
    spilled: std::collections::VecDeque<(u64, usize)>,
    flushing: bool,
    backoff: Duration,
    next_flush_at: Instant,
    restarts: u32,
    /// Bumped by every restart: a flush begun before it reports to nobody.
    epoch: u64,
}

impl Accounting {
    pub fn new(db: DbPool, cfg: AccountingConfig, spend: Arc<PendingSpend>) -> Self {
        Self {
            db,
            spend,
            cfg,
            spool: None,
            unsynced: Vec::new(),
            sync_scheduled: false,
            pending: Vec::new(),
            spilled: std::collections::VecDeque::new(),
            flushing: false,
            backoff: Duration::from_millis(100),
            next_flush_at: Instant::now(),
            restarts: 0,
            epoch: 0,
        }
    }

    /// Opens the spool and queues whatever an earlier run left for the database.
    fn open_spool(&mut self) -> std::io::Result<()> {
        let (spool, recovered) = Spool::open(DirFs::new(&self.cfg.spool_dir)?)?;
        if recovered.torn_tails + recovered.corrupt_segments > 0 {
            warn!(
                torn = recovered.torn_tails,
                corrupt = recovered.corrupt_segments,
                "spool recovered with damage (corrupt data quarantined)"
            );
        }
        self.pending.clear();
        self.spilled.clear();
        self.spend.clear();
        let mut unreadable = 0;
        for (seg, bytes) in recovered.records {
            match serde_json::from_slice::<TurnRecord>(&bytes) {
                Ok(record) => {
                    self.spend.add(&record);
                    if self.spilled.is_empty() && self.pending.len() < self.cfg.max_in_memory {
                        self.pending.push(Pending { seg, record });
                    } else {
                        // A segment is either in memory or on disk only, never split: records
                        // of this segment already in memory move to the spilled count.
                        while self.pending.last().is_some_and(|p| p.seg == seg) {
                            self.pending.pop();
                            self.spill_one(seg);
                        }
                        self.spill_one(seg);
                    }
                }
                Err(_) => unreadable += 1,
            }
        }
        if unreadable > 0 {
            error!(
                unreadable,
                "spool records that are not turn records were skipped"
            );
        }
        let on_disk: usize = self.spilled.iter().map(|(_, n)| n).sum();
        if !self.pending.is_empty() || on_disk > 0 {
            info!(
                records = self.pending.len() + on_disk,
                spilled = on_disk,
                "replaying the spool"
            );
        }
        self.spool = Some(spool);
        Ok(())
    }

    /// Records durable and not yet committed.
    fn backlog(&self) -> usize {
        self.pending.len() + self.spilled.iter().map(|(_, n)| n).sum::<usize>()
    }

    fn spill_one(&mut self, seg: u64) {
        match self.spilled.back_mut() {
            Some((s, n)) if *s == seg => *n += 1,
            _ => self.spilled.push_back((seg, 1)),
        }
    }

    /// Memory cap reached: seal the active segment and keep the pending records on disk only.
    fn spill(&mut self, ctx: &mut Context<Self>) {
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        if let Err(e) = spool.rotate() {
            error!(error = %e, "spool rotation failed; restarting the accounting actor");
            return self.restart(ctx);
        }
        let spilled = self.pending.len();
        for p in std::mem::take(&mut self.pending) {
            self.spill_one(p.seg);
        }
        warn!(
            spilled,
            "accounting backlog over accounting.max_in_memory: records kept on disk only"
        );
    }

    fn sync(&mut self, ctx: &mut Context<Self>) {
        self.sync_scheduled = false;
        if self.unsynced.is_empty() {
            return;
        }
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        if let Err(e) = spool.sync() {
            error!(error = %e, "spool fsync failed; restarting the accounting actor");
            return self.restart(ctx);
        }
        for (seg, record, ack) in self.unsynced.drain(..) {
            let _ = ack.send(Ok(()));
            self.spend.add(&record);
            self.pending.push(Pending { seg, record });
        }
        if self.pending.len() > self.cfg.max_in_memory && !self.flushing {
            self.spill(ctx);
        }
        if self.pending.len() >= self.cfg.batch_max_rows {
            self.flush(ctx);
        }
    }

    /// Seals the active segment and commits everything pending, in batches.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing
            || (self.pending.is_empty() && self.spilled.is_empty())
            || Instant::now() < self.next_flush_at
        {
            return;
        }
        let Some(spool) = self.spool.as_mut() else {
            return;
        };
        // Spilled segments first (the oldest records), one segment per pass, read from disk.
        let from_disk = self.spilled.front().copied();
        let batch: Vec<TurnRecord> = match from_disk {
            Some((seg, _)) => match spool.read_records(seg) {
                Ok(raw) => raw
                    .iter()
                    .filter_map(|b| serde_json::from_slice(b).ok())
                    .collect(),
                Err(e) => {
                    error!(error = %e, seg, "cannot read a spilled spool segment; restarting the accounting actor");
                    return self.restart(ctx);
                }
            },
            None => {
                if let Err(e) = spool.rotate() {
                    error!(error = %e, "spool rotation failed; restarting the accounting actor");
                    return self.restart(ctx);
                }
                self.pending.iter().map(|p| p.record.clone()).collect()
            }
        };
        self.flushing = true;
        let taken = batch.len();
        let committed_from_disk = from_disk.map(|_| batch.clone());
        let db = self.db.clone();
        let max = self.cfg.batch_max_rows.max(1);
        let fut = async move {
            for chunk in batch.chunks(max) {
                match queries::billing::record_batch(&db, chunk).await {
                    Ok(out) if out.mismatched > 0 => {
                        error!(
                            mismatched = out.mismatched,
                            "replayed records differ from the rows already stored (kept the stored rows)"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, rows = chunk.len(), "batch failed; writing its records one by one");
                        for r in chunk {
                            if let Err(e) =
                                queries::billing::record_batch(&db, std::slice::from_ref(r)).await
                            {
                                // The debit (or the whole write) failed: usage row + compensation.
                                queries::billing::record_with_compensation(&db, r, &e.to_string())
                                    .await?;
                            }
                        }
                    }
                }
            }
            Ok::<(), crate::db::DbError>(())
        };
        let epoch = self.epoch;
        ctx.spawn(fut.into_actor(self).map(move |res, act, _| {
            if act.epoch != epoch {
                // The actor restarted meanwhile; its pending list was reloaded from disk.
                return;
            }
            act.flushing = false;
            match res {
                Ok(()) if committed_from_disk.is_some() => {
                    if let Some((seg, _)) = act.spilled.pop_front() {
                        for r in committed_from_disk.iter().flatten() {
                            act.spend.remove(r);
                        }
                        if let Some(spool) = act.spool.as_mut()
                            && let Err(e) = spool.remove(&[seg])
                        {
                            warn!(error = %e, "could not remove a committed spool segment (it replays harmlessly)");
                        }
                    }
                    act.backoff = Duration::from_millis(100);
                }
                Ok(()) => {
                    let done: Vec<Pending> = act.pending.drain(..taken.min(act.pending.len())).collect();
                    for p in &done {
                        act.spend.remove(&p.record);
                    }
                    let mut segs: Vec<u64> = done.iter().map(|p| p.seg).collect();
                    segs.dedup();
                    // Segments still holding pending or spilled records stay.
                    segs.retain(|s| {
                        !act.pending.iter().any(|p| p.seg == *s) && !act.spilled.iter().any(|(x, _)| x == s)
                    });
                    if let Some(spool) = act.spool.as_mut()
                        && let Err(e) = spool.remove(&segs)
                    {
                        warn!(error = %e, "could not remove committed spool segments (they replay harmlessly)");
                    }
                    act.backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    warn!(error = %e, backlog = act.backlog(), retry_in = ?act.backoff, "database unavailable; records stay in the spool");
                    act.next_flush_at = Instant::now() + act.backoff;
                    act.backoff = (act.backoff * 2).min(Duration::from_secs(10));
                }
            }
        }));
    }
}

impl Accounting {
    /// Restart: forget every in-memory state and rebuild it from the spool on disk (the truth).
    /// Records appended but not yet acknowledged are refused (their senders send again; a copy
    /// that did reach the disk is harmless: rows are idempotent). A flush in flight reports to
    /// nobody. If the spool cannot be reopened the actor stops and its Supervisor restarts it.
    fn restart(&mut self, ctx: &mut Context<Self>) {
        self.restarts += 1;
        self.epoch += 1;
        warn!(
            restarts = self.restarts,
            "accounting actor restarting; replaying the spool"
        );
        for (_, _, ack) in self.unsynced.drain(..) {
            let _ = ack.send(Err(SpoolFailure));
        }
        self.sync_scheduled = false;
        self.flushing = false;
        self.spool = None;
        self.next_flush_at = Instant::now();
        if let Err(e) = self.open_spool() {
            error!(error = %e, "cannot reopen the spool; stopping for the supervisor");
            return ctx.stop();
        }
        ctx.notify(Flush);
    }
}

impl Actor for Accounting {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(65_536);
        if let Err(e) = self.open_spool() {
            error!(error = %e, dir = %self.cfg.spool_dir.display(), "cannot open the spool; retrying");
            ctx.run_later(Duration::from_secs(1), |_, ctx| ctx.stop());
            return;
        }
        let every = self.cfg.flush_interval;
        ctx.run_interval(every, |act, ctx| act.flush(ctx));
        ctx.notify(Flush);
    }
}

impl Supervised for Accounting {
    fn restarting(&mut self, _: &mut Context<Self>) {
        self.restarts += 1;
        self.epoch += 1;
        warn!(
            restarts = self.restarts,
            "accounting actor restarting; replaying the spool"
        );
        // The disk is the truth: what was pending is read back from the spool.
        self.spool = None;
        self.unsynced.clear();
        self.sync_scheduled = false;
        self.flushing = false;
    }
}

impl Handler<RecordTurn> for Accounting {
    type Result = ResponseFuture<Result<(), SpoolFailure>>;

    fn handle(&mut self, msg: RecordTurn, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let appended = match (self.spool.as_mut(), serde_json::to_vec(&msg.0)) {
            (Some(spool), Ok(bytes)) => spool.append(&bytes).map_err(|e| e.to_string()),
            (None, _) => Err("spool not open".into()),
            (_, Err(e)) => Err(e.to_string()),
        };
        match appended {
            Ok(seg) => {
                self.unsynced.push((seg, msg.0, tx));
                if !self.sync_scheduled {
                    // Behind every message already queued: they join this fsync.
                    self.sync_scheduled = true;
                    ctx.notify(SyncNow);
                }
            }
            Err(e) => {
                error!(error = %e, "spool append failed; restarting the accounting actor");
                let _ = tx.send(Err(SpoolFailure));
                self.restart(ctx);
            }
        }
        Box::pin(async move { rx.await.unwrap_or(Err(SpoolFailure)) })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct SyncNow;

impl Handler<SyncNow> for Accounting {
    type Result = ();
    fn handle(&mut self, _: SyncNow, ctx: &mut Context<Self>) {
        self.sync(ctx);
    }
}

impl Handler<Flush> for Accounting {
    type Result = usize;

    /// Starts a flush now (ignoring backoff); returns the records still waiting.
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> usize {
        self.sync(ctx);
        self.next_flush_at = Instant::now();
        self.flush(ctx);
        self.backlog()
    }
}

impl Handler<Backlog> for Accounting {
    type Result = usize;
    fn handle(&mut self, _: Backlog, _: &mut Context<Self>) -> usize {
        self.backlog() + self.unsynced.len()
    }
}

impl Handler<Restart> for Accounting {
    type Result = ();
    fn handle(&mut self, _: Restart, ctx: &mut Context<Self>) {
        self.restart(ctx);
    }
}
