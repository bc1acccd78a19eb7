//! The accounting actor (supervised, on a thread of its own because it fsyncs).
//!
//! `RecordTurn` → append to the spool → group-committed fsync (one fsync covers every record
//! that arrived meanwhile) → acknowledge. Acknowledged records wait in memory (their segments
//! sealed on disk) until a batch transaction commits them; only then are their segments removed.
//! A failed batch is retried record by record; a record whose debit fails gets its usage row and
//! a pending compensation; a record the database refuses for its content is quarantined, so it
//! never blocks the records behind it. While the database is down, records wait in the spool
//! and flushes retry with backoff.
//!
//! Fail closed (docs/DESIGN.md#nothing-lost): when the spool cannot acknowledge (append, fsync or rotation
//! error, directory removed or replaced), records are committed to the database directly and
//! acknowledged only then; the spool is reopened with backoff, and every record not yet in the
//! database that it no longer holds is written to it again. A record acknowledged by neither
//! waits here (callers stop waiting after `accounting.ack_timeout_ms` and tell their client)
//! and is written as soon as either works. Nothing in memory is dropped by a failure or a
//! restart (`RestartActor`); an fsync that failed is never retried over the same pages — its
//! records go to the database or, after a reopen, to a fresh segment.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::oneshot;
use tracing::{debug, error, info, warn};

use super::health::AccountingHealth;
use super::merge::{self, Key, Merge, key};
use super::messages::{Backlog, BacklogAge, Flush, RecordTurn, SpoolFailure};
use super::pending::PendingSpend;
use super::spool::{Spool, SpoolFs};
use crate::actors::{ActorStatus, GetStatus, RestartActor};
use crate::db::{DbError, DbPool, queries, within as timed};
use crate::record::{TurnRecord, decode_record, encode_record};
use crate::telemetry::metric;

pub struct AccountingConfig {
    pub batch_max_rows: usize,
    pub flush_interval: Duration,
    /// Records kept in memory while the database lags; older ones stay only on disk ("spilled")
    /// and are read back segment by segment when the database returns.
    pub max_in_memory: usize,
    /// Longest one database statement may take before it counts as an outage.
    pub db_timeout: Duration,
}

/// Answers a `RecordTurn` once its record is durable.
type Ack = oneshot::Sender<Result<(), SpoolFailure>>;

/// A record not yet committed to the database.
struct Pending {
    /// The spool segment holding it; `None` while it is in memory only (the spool failed
    /// before it was acknowledged).
    seg: Option<u64>,
    record: TurnRecord,
    /// The sender still waiting for its acknowledgement.
    ack: Option<Ack>,
}

impl Pending {
    fn acknowledge(&mut self) {
        if let Some(ack) = self.ack.take() {
            let _ = ack.send(Ok(()));
        }
    }
}

const SPOOL_BACKOFF_MIN: Duration = Duration::from_millis(100);
const SPOOL_BACKOFF_MAX: Duration = Duration::from_secs(5);
const DB_BACKOFF_MIN: Duration = Duration::from_millis(100);
const DB_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Batches taken from memory per flush pass, so that a long backlog acknowledges as it goes.
const CHUNKS_PER_PASS: usize = 8;

pub struct Accounting {
    db: DbPool,
    spend: Arc<PendingSpend>,
    health: Arc<AccountingHealth>,
    cfg: AccountingConfig,
    spool: Spool<Box<dyn SpoolFs>>,
    /// The spool acknowledges records; when false, records go to the database directly.
    spool_ok: bool,
    spool_opened: bool,
    spool_backoff: Duration,
    next_reopen_at: Instant,
    /// Appended, waiting for the next fsync.
    unsynced: Vec<Pending>,
    sync_scheduled: bool,
    /// Waiting for the database, oldest first.
    pending: Vec<Pending>,
    /// Sealed segments whose records are only on disk (memory cap reached), oldest first, with
    /// their record counts.
    spilled: VecDeque<(u64, usize)>,
    /// When the oldest record kept on disk only was accepted.
    spilled_oldest: Option<chrono::NaiveDateTime>,
    flushing: bool,
    db_failing: bool,
    backoff: Duration,
    next_flush_at: Instant,
    restarts: u32,
    started_at: chrono::NaiveDateTime,
    /// Bumped by every reopen: a flush begun before it reports to nobody.
    epoch: u64,
}

impl Accounting {
    pub fn new(
        db: DbPool,
        cfg: AccountingConfig,
        spend: Arc<PendingSpend>,
        health: Arc<AccountingHealth>,
        fs: Box<dyn SpoolFs>,
    ) -> Self {
        Self {
            db,
            spend,
            health,
            cfg,
            spool: Spool::new(fs),
            spool_ok: false,
            spool_opened: false,
            spool_backoff: SPOOL_BACKOFF_MIN,
            next_reopen_at: Instant::now(),
            unsynced: Vec::new(),
            sync_scheduled: false,
            pending: Vec::new(),
            spilled: VecDeque::new(),
            spilled_oldest: None,
            flushing: false,
            db_failing: false,
            backoff: DB_BACKOFF_MIN,
            next_flush_at: Instant::now(),
            restarts: 0,
            started_at: crate::db::now(),
            epoch: 0,
        }
    }

    /// Records durable or waiting, not yet committed.
    fn backlog(&self) -> usize {
        self.unsynced.len()
            + self.pending.len()
            + self.spilled.iter().map(|(_, n)| n).sum::<usize>()
    }

    // ---- the spool: open, fail, reopen -------------------------------------------------------

    /// (Re)reads the spool directory and merges it with what is in memory: records found on
    /// disk and not in memory are loaded (up to `max_in_memory`, the rest stay on disk), records
    /// in memory that the disk does not hold — never acknowledged by it, or lost with a removed
    /// directory — are appended again and fsynced. Then every waiting sender is acknowledged.
    fn reopen(&mut self, ctx: &mut Context<Self>) {
        self.epoch += 1;
        self.flushing = false;
        self.sync_scheduled = false;
        // Appended but never acknowledged by an fsync: not trusted to be on disk.
        for mut p in std::mem::take(&mut self.unsynced) {
            p.seg = None;
            self.pending.push(p);
        }
        match self.try_reopen() {
            Ok(rewritten) => {
                for p in &mut self.pending {
                    p.acknowledge();
                }
                if !self.spool_ok && self.spool_opened {
                    info!(spool = %self.spool.describe(), rewritten, "spool usable again");
                }
                self.spool_ok = true;
                self.spool_opened = true;
                self.spool_backoff = SPOOL_BACKOFF_MIN;
                self.health.spool_up();
            }
            Err(e) => self.spool_failed(e.to_string(), ctx),
        }
        self.next_flush_at = Instant::now();
        if !self.pending.is_empty() || !self.spilled.is_empty() {
            ctx.notify(Flush);
        }
    }

    /// Returns how many records in memory had to be written to the spool again.
    fn try_reopen(&mut self) -> std::io::Result<usize> {
        if self.spool_opened {
            self.spool.fs_mut().reset()?;
        }
        let in_memory: HashSet<Key> = self.pending.iter().map(|p| key(&p.record)).collect();
        let mut merge = Merge::new(in_memory, self.cfg.max_in_memory);
        let rec = self
            .spool
            .recover(&mut |seg, records| merge.segment(seg, records))?;
        let Merge {
            loaded,
            spilled,
            unreadable,
            fresh: fresh_all,
            dead: dead_segs,
            ..
        } = merge;
        let loaded: Vec<Pending> = loaded
            .into_iter()
            .map(|(seg, record)| Pending {
                seg: Some(seg),
                record,
                ack: None,
            })
            .collect();
        let found_segs: HashSet<u64> = rec.segments.iter().map(|(s, _)| *s).collect();
        if rec.torn_tails + rec.corrupt_segments > 0 {
            warn!(
                torn = rec.torn_tails,
                corrupt = rec.corrupt_segments,
                "spool recovered with damage (corrupt data quarantined)"
            );
        }
        if !unreadable.is_empty() {
            error!(
                records = unreadable.len(),
                "spool records this build cannot bill were quarantined (.unknown / .invalid files beside the segments)"
            );
            for (seg, suffix, bytes) in &unreadable {
                self.spool.quarantine(*seg, suffix, bytes)?;
            }
            self.spool.remove(&dead_segs)?;
        }
        let lost = merge::lost(&self.spilled, &found_segs);
        if lost > 0 {
            error!(
                records = lost,
                "records kept on disk only were not found when the spool was reopened (the directory was removed)"
            );
        }
        self.spend.clear();
        for p in &self.pending {
            self.spend.add(&p.record);
        }
        for r in &fresh_all {
            self.spend.add(r);
        }
        self.pending.extend(loaded);
        self.spilled_oldest = (!spilled.is_empty())
            .then(|| fresh_all.iter().map(|r| r.accepted_at).min())
            .flatten();
        self.spilled = spilled;
        // Records in memory whose segment is gone, or that no segment ever acknowledged.
        let mut rewritten = 0;
        for p in &mut self.pending {
            if merge::needs_rewrite(p.seg, &found_segs) {
                p.seg = Some(self.spool.append(&encode_record(&p.record))?);
                rewritten += 1;
            }
        }
        self.spool.sync()?;
        let on_disk_total: usize = self.spilled.iter().map(|(_, n)| n).sum();
        if !fresh_all.is_empty() {
            info!(
                records = fresh_all.len(),
                spilled = on_disk_total,
                "replaying the spool"
            );
        }
        Ok(rewritten)
    }

    /// The spool cannot acknowledge: log once, send records to the database directly, try to
    /// reopen later (with backoff).
    fn spool_failed(&mut self, cause: String, ctx: &mut Context<Self>) {
        if self.spool_ok || !self.spool_opened {
            error!(spool = %self.spool.describe(), error = %cause,
                "spool unusable: records go to the database directly until it can be reopened");
            self.health.spool_down(cause);
            self.spool_backoff = SPOOL_BACKOFF_MIN;
        } else {
            debug!(error = %cause, "spool still unusable");
        }
        self.spool_ok = false;
        self.spool_opened = true;
        self.next_reopen_at = Instant::now() + self.spool_backoff;
        self.spool_backoff = (self.spool_backoff * 2).min(SPOOL_BACKOFF_MAX);
        self.sync_scheduled = false;
        for mut p in std::mem::take(&mut self.unsynced) {
            p.seg = None;
            self.pending.push(p);
        }
        ctx.notify(Flush);
    }

    fn sync(&mut self, ctx: &mut Context<Self>) {
        self.sync_scheduled = false;
        if self.unsynced.is_empty() {
            return;
        }
        if let Err(e) = self.spool.sync() {
            return self.spool_failed(e.to_string(), ctx);
        }
        for mut p in std::mem::take(&mut self.unsynced) {
            p.acknowledge();
            self.pending.push(p);
        }
        if self.pending.len() > self.cfg.max_in_memory && !self.flushing {
            self.spill(ctx);
        }
        if self.pending.len() >= self.cfg.batch_max_rows {
            self.flush(ctx);
        }
    }

    /// Memory cap reached: seal the active segment and keep the records that are safely on
    /// disk there only.
    fn spill(&mut self, ctx: &mut Context<Self>) {
        if let Err(e) = self.spool.rotate() {
            return self.spool_failed(e.to_string(), ctx);
        }
        let before = self.pending.len();
        let mut kept = Vec::new();
        for p in std::mem::take(&mut self.pending) {
            let Some(seg) = p.seg.filter(|_| p.ack.is_none()) else {
                kept.push(p);
                continue;
            };
            let at = p.record.accepted_at;
            self.spilled_oldest = Some(self.spilled_oldest.map_or(at, |t| t.min(at)));
            match self.spilled.back_mut() {
                Some((s, n)) if *s == seg => *n += 1,
                _ => self.spilled.push_back((seg, 1)),
            }
        }
        self.pending = kept;
        warn!(
            spilled = before - self.pending.len(),
            "accounting backlog over accounting.max_in_memory: records kept on disk only"
        );
    }

    // ---- the database ----------------------------------------------------------------------

    /// Commits the oldest records: a spilled segment read back from disk, else what is in
    /// memory (sealing the active segment first).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing
            || (self.pending.is_empty() && self.spilled.is_empty())
            || Instant::now() < self.next_flush_at
        {
            return;
        }
        let from_disk = self.spilled.front().copied().filter(|_| self.spool_ok);
        let batch: Vec<TurnRecord> = match from_disk {
            Some((seg, _)) => match self.spool.read_records(seg) {
                Ok(raw) => {
                    let in_memory: HashSet<Key> =
                        self.pending.iter().map(|p| key(&p.record)).collect();
                    raw.iter()
                        .filter_map(|b| decode_record(b).ok())
                        .filter(|r| !in_memory.contains(&key(r)))
                        .collect()
                }
                Err(e) => return self.spool_failed(e.to_string(), ctx),
            },
            None if self.pending.is_empty() => return,
            None => {
                if self.spool_ok
                    && let Err(e) = self.spool.rotate()
                {
                    // The records stay pending; they commit below all the same.
                    self.spool_failed(e.to_string(), ctx);
                }
                let max = self.cfg.batch_max_rows.max(1) * CHUNKS_PER_PASS;
                self.pending
                    .iter()
                    .take(max)
                    .map(|p| p.record.clone())
                    .collect()
            }
        };
        let full_pass =
            from_disk.is_none() && batch.len() >= self.cfg.batch_max_rows.max(1) * CHUNKS_PER_PASS;
        self.flushing = true;
        let db = self.db.clone();
        let chunk = self.cfg.batch_max_rows.max(1);
        let timeout = self.cfg.db_timeout;
        let epoch = self.epoch;
        let fut = async move {
            let t0 = Instant::now();
            let res = commit(&db, &batch, chunk, timeout).await;
            ::metrics::histogram!(metric::FLUSH_SECONDS).record(t0.elapsed().as_secs_f64());
            ::metrics::histogram!(metric::BATCH_ROWS)
                .record(crate::num::f64_of(crate::num::count(batch.len())));
            (batch, res)
        };
        ctx.spawn(fut.into_actor(self).map(move |(batch, res), act, ctx| {
            if act.epoch != epoch {
                // Reopened meanwhile: whatever this committed commits again harmlessly.
                return;
            }
            act.flushing = false;
            match res {
                Ok(()) => {
                    act.database_ok(batch.len());
                    match from_disk {
                        Some(_) => act.committed_from_disk(&batch),
                        None => act.committed_from_memory(&batch),
                    }
                    // A backlog (on disk, or more than one pass) drains at once; otherwise the
                    // next flush waits for `flush_interval` (or `batch_max_rows`).
                    if !act.spilled.is_empty() || full_pass {
                        ctx.notify(Flush);
                    }
                }
                Err(e) => act.database_failed(e),
            }
        }));
    }

    fn database_ok(&mut self, rows: usize) {
        if self.db_failing {
            info!(
                rows,
                backlog = self.backlog(),
                "database answering again; writing the backlog"
            );
            self.db_failing = false;
        }
        self.health.db_ok();
        self.backoff = DB_BACKOFF_MIN;
        self.next_flush_at = Instant::now();
    }

    fn database_failed(&mut self, e: DbError) {
        ::metrics::counter!(metric::DB_ERRORS).increment(1);
        if !self.db_failing {
            warn!(error = %e, backlog = self.backlog(),
                "database unavailable: records wait in the spool; retrying with backoff");
            self.db_failing = true;
        } else {
            debug!(error = %e, retry_in = ?self.backoff, "database still unavailable");
        }
        self.health.db_failed(e.to_string());
        self.next_flush_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(DB_BACKOFF_MAX);
    }

    fn committed_from_disk(&mut self, batch: &[TurnRecord]) {
        let Some((seg, _)) = self.spilled.pop_front() else {
            return;
        };
        if self.spilled.is_empty() {
            self.spilled_oldest = None;
        }
        for r in batch {
            self.spend.remove(r);
        }
        if !self.pending.iter().any(|p| p.seg == Some(seg))
            && let Err(e) = self.spool.remove(&[seg])
        {
            warn!(error = %e, "could not remove a committed spool segment (it replays harmlessly)");
        }
    }

    fn committed_from_memory(&mut self, batch: &[TurnRecord]) {
        let done: HashSet<Key> = batch.iter().map(key).collect();
        let mut segs = Vec::new();
        let mut kept = Vec::with_capacity(self.pending.len());
        for mut p in std::mem::take(&mut self.pending) {
            if done.contains(&key(&p.record)) {
                p.acknowledge();
                self.spend.remove(&p.record);
                segs.extend(p.seg);
            } else {
                kept.push(p);
            }
        }
        self.pending = kept;
        segs.sort_unstable();
        segs.dedup();
        // Segments still holding pending or spilled records stay; so does the active one.
        segs.retain(|s| {
            !self.pending.iter().any(|p| p.seg == Some(*s))
                && !self.spilled.iter().any(|(x, _)| x == s)
        });
        if self.spool_ok
            && let Err(e) = self.spool.remove(&segs)
        {
            warn!(error = %e, "could not remove committed spool segments (they replay harmlessly)");
        }
    }

    /// Restart in place: reopen the spool, start flushing over. Nothing in memory is dropped.
    fn restart(&mut self, ctx: &mut Context<Self>) {
        self.restarts += 1;
        info!(
            restarts = self.restarts,
            "accounting actor restarting; reopening the spool"
        );
        self.reopen(ctx);
    }
}

/// Writes `records` in batches of `chunk`. A batch that fails for another reason than an
/// outage is written record by record; a record whose debit fails gets its usage row and a
/// compensation; a record the database refuses even then, for its content, is quarantined.
/// An outage (or a statement slower than `timeout`) ends the pass with the error.
async fn commit(
    db: &DbPool,
    records: &[TurnRecord],
    chunk: usize,
    timeout: Duration,
) -> Result<(), DbError> {
    for batch in records.chunks(chunk) {
        match write_batch(db, batch.to_vec(), timeout).await {
            Ok(out) if out.mismatched > 0 => error!(
                mismatched = out.mismatched,
                "replayed records differ from the rows already stored (kept the stored rows)"
            ),
            Ok(_) => {}
            Err(e) if e.is_outage() => return Err(e),
            Err(e) => {
                warn!(error = %e, rows = batch.len(), "batch failed; writing its records one by one");
                for r in batch {
                    commit_one(db, r, timeout).await?;
                }
            }
        }
    }
    Ok(())
}

/// One batch transaction, with a deadline.
async fn write_batch(
    db: &DbPool,
    batch: Vec<TurnRecord>,
    timeout: Duration,
) -> Result<queries::billing::BatchOutcome, DbError> {
    let db = db.clone();
    timed(timeout, async move {
        queries::billing::record_batch(&db, &batch).await
    })
    .await
}

async fn commit_one(db: &DbPool, r: &TurnRecord, timeout: Duration) -> Result<(), DbError> {
    let e = match write_batch(db, vec![r.clone()], timeout).await {
        Ok(_) => return Ok(()),
        Err(e) if e.is_outage() => return Err(e),
        Err(e) => e,
    };
    // The debit (or the whole write) failed: usage row + compensation.
    let why = e.to_string();
    let (pool, record, reason) = (db.clone(), r.clone(), why.clone());
    let with_compensation =
        async move { queries::billing::record_with_compensation(&pool, &record, &reason).await };
    let e2 = match timed(timeout, with_compensation).await {
        Ok(_) => return Ok(()),
        Err(e2) if !e2.is_content() => return Err(e2),
        Err(e2) => e2,
    };
    let reason = format!("{why}; usage row with compensation: {e2}");
    error!(request_id = %r.request_id, reason = %reason, "record refused by the database; quarantined");
    let payload = String::from_utf8_lossy(&encode_record(r)).replace('\0', "");
    let (pool, record) = (db.clone(), r.clone());
    timed(timeout, async move {
        queries::billing::quarantine(&pool, &record, &payload, &reason).await
    })
    .await
}

impl Actor for Accounting {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(65_536);
        self.reopen(ctx);
        let every = self.cfg.flush_interval;
        ctx.run_interval(every, |act, ctx| {
            if !act.spool_ok && Instant::now() >= act.next_reopen_at {
                act.reopen(ctx);
            }
            act.flush(ctx);
        });
    }
}

impl Supervised for Accounting {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // In-memory state is kept; `started` reopens the spool and merges.
        self.restarts += 1;
        warn!(
            restarts = self.restarts,
            "accounting actor restarted by its supervisor"
        );
    }
}

impl Handler<RecordTurn> for Accounting {
    type Result = ResponseFuture<Result<(), SpoolFailure>>;

    fn handle(&mut self, msg: RecordTurn, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        let record = msg.0.cleaned();
        self.spend.add(&record);
        let mut p = Pending {
            seg: None,
            record,
            ack: Some(tx),
        };
        if self.spool_ok {
            match self.spool.append(&encode_record(&p.record)) {
                Ok(seg) => {
                    p.seg = Some(seg);
                    self.unsynced.push(p);
                    if !self.sync_scheduled {
                        // Behind every message already queued: they join this fsync.
                        self.sync_scheduled = true;
                        ctx.notify(SyncNow);
                    }
                }
                Err(e) => {
                    self.unsynced.push(p);
                    self.spool_failed(e.to_string(), ctx);
                }
            }
        } else {
            // Straight to the database (acknowledged when committed).
            self.pending.push(p);
            self.flush(ctx);
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

impl Handler<BacklogAge> for Accounting {
    type Result = u64;
    fn handle(&mut self, _: BacklogAge, _: &mut Context<Self>) -> u64 {
        let oldest = self
            .unsynced
            .iter()
            .chain(&self.pending)
            .map(|p| p.record.accepted_at)
            .chain(self.spilled_oldest)
            .min();
        oldest.map_or(0, |t| {
            u64::try_from((crate::db::now() - t).num_seconds()).unwrap_or(0)
        })
    }
}

impl Handler<Backlog> for Accounting {
    type Result = usize;
    fn handle(&mut self, _: Backlog, _: &mut Context<Self>) -> usize {
        self.backlog()
    }
}

impl Accounting {
    fn status(&self) -> ActorStatus {
        let report = self.health.report();
        let state = match (&report.spool_error, &report.db_error) {
            (None, None) => "running".to_string(),
            (Some(_), None) => {
                "degraded: spool unusable, records go to the database directly".into()
            }
            (None, Some(_)) => "degraded: database unavailable, records wait in the spool".into(),
            (Some(_), Some(_)) => "unavailable: neither spool nor database can record usage".into(),
        };
        ActorStatus {
            name: "accounting".into(),
            kind: "accounting",
            state,
            started_at: self.started_at,
            restarts: self.restarts,
            last_error: report.spool_error.or(report.db_error),
        }
    }
}

impl Handler<GetStatus> for Accounting {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.status())
    }
}

impl Handler<RestartActor> for Accounting {
    type Result = MessageResult<RestartActor>;

    /// In place: the spool is reopened and merged with what is in memory, flushing starts
    /// over; nothing acknowledged or pending is dropped (see the module doc for why not
    /// through actix's `Supervisor`).
    fn handle(&mut self, _: RestartActor, ctx: &mut Context<Self>) -> Self::Result {
        self.restart(ctx);
        self.started_at = crate::db::now();
        MessageResult(self.status())
    }
}
