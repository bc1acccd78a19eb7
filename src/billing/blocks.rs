//! Reservation blocks (docs/DESIGN.md#reservation-blocks): a relay reserves a limited key's
//! turns in blocks of several turns' expected cost, one `turn_reservations` row each, and its
//! turns draw from the block in memory — the round trip a turn paid for its reservation is paid
//! once a block. A key's blocks grow (to `max_turns` turns) while they run out before their
//! time, and shrink back while they close half unused. The block's row holds what is unused plus every draw whose record has not
//! landed; each record takes its draw off the row in the transaction that debits the turn, and
//! what is unused when the block closes (`billing.reservation_block_ms` after it opened) goes
//! back at once — as a row of its own with the negative amount, keyed by the block, so giving
//! back twice (a retry after an unclear failure) is a no-op. Pure: the database work is the
//! caller's, told by the return values.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;

use crate::ids::BlockId;
use crate::record::BlockDraw;

/// Whose a block is, and when its row stops counting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub key: i64,
    pub user: i64,
    pub expires_at: NaiveDateTime,
}

/// A part of a block given back: a row `row_id` of `-amount` for the block's holder, expiring
/// with the block's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiveBack {
    pub row_id: String,
    pub holder: Holder,
    pub amount: i64,
}

/// What a turn asking to draw `amount` is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// Drawn from the key's open block: nothing to do in the database.
    Drawn,
    /// Take a block of up to `size` named `id` in the database (or, when it does not fit, a
    /// row of its own), in the transaction that first gives back what the key's previous block
    /// left unused; then `acquired` with the size taken, or `not_acquired`.
    Acquire {
        id: BlockId,
        size: i64,
        give_back: Option<GiveBack>,
    },
    /// Take a row of its own, as without blocks (blocks are off, or another turn of the key is
    /// taking one now).
    Exact,
}

/// What releasing a turn's reservation leaves to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Released {
    /// The turn drew from no block: delete its own row.
    Own,
    /// Given back to its open block: nothing.
    Local,
    /// Its block closed: give the draw back.
    GiveBack(GiveBack),
}

#[derive(Debug)]
struct Open {
    id: BlockId,
    holder: Holder,
    size: i64,
    unused: i64,
    until: Instant,
}

impl Open {
    /// Its unused part, if any, as given back when it closes.
    fn close(self) -> Option<GiveBack> {
        (self.unused > 0).then(|| GiveBack {
            row_id: format!("{}.unused", self.id),
            holder: self.holder,
            amount: self.unused,
        })
    }
}

#[derive(Debug)]
struct Key {
    open: Option<Open>,
    acquiring: bool,
    /// Turns the key's next block holds.
    turns: u32,
    /// A turn took a row of its own while a block was being taken: the next block grows.
    crowded: bool,
    /// When its last block closed (a key without a block is forgotten after a block's time).
    closed_at: Instant,
}

#[derive(Debug)]
struct Draw {
    key: i64,
    block: BlockId,
    holder: Holder,
    amount: i64,
    at: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<i64, Key>,
    /// Request id → its draw, until the turn ends or is released.
    draws: HashMap<String, Draw>,
    /// Unused parts of closed blocks not yet given back (retried until the database takes them).
    returns: Vec<GiveBack>,
    /// Blocks whose taking had no clear answer (a timeout, a dropped connection): their rows,
    /// if they were written after all, are deleted once any commit in flight has landed.
    unclear: Vec<(BlockId, Instant)>,
}

/// A relay's open blocks and the draws on them, shared by every session and request.
#[derive(Debug)]
pub struct Blocks {
    /// Turns a key's first block holds (≤ 1: no blocks, a row per turn).
    turns: u32,
    /// Turns a block grows to at most.
    max_turns: u32,
    open_for: Duration,
    /// A draw forgotten (its turn never ended nor was released) after this long.
    forget_after: Duration,
    inner: Mutex<Inner>,
}

impl Blocks {
    pub fn new(turns: u32, max_turns: u32, open_for: Duration, forget_after: Duration) -> Self {
        Self {
            turns,
            max_turns: max_turns.max(turns),
            open_for,
            forget_after,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turn `request_id` of key `key` reserves `amount`.
    pub fn ask(&self, key: i64, request_id: &str, amount: i64, now: Instant) -> Ask {
        if self.turns <= 1 {
            return Ask::Exact;
        }
        let mut g = self.lock();
        let inner = &mut *g;
        let k = inner.keys.entry(key).or_insert_with(|| Key {
            open: None,
            acquiring: false,
            turns: self.turns,
            crowded: false,
            closed_at: now,
        });
        if let Some(open) = k.open.as_mut()
            && now < open.until
            && open.unused >= amount
        {
            open.unused -= amount;
            let draw = Draw {
                key,
                block: open.id.clone(),
                holder: open.holder.clone(),
                amount,
                at: now,
            };
            inner.draws.insert(request_id.to_string(), draw);
            return Ask::Drawn;
        }
        if k.acquiring {
            k.crowded = true;
            return Ask::Exact;
        }
        // Used up before its time, or too small for the turns arriving at once: the next
        // block is twice as large.
        let crowded = std::mem::take(&mut k.crowded);
        if crowded || k.open.as_ref().is_some_and(|o| now < o.until) {
            k.turns = k.turns.saturating_mul(2).min(self.max_turns);
        }
        // The open block cannot serve this turn: it closes, its unused part goes back with
        // the next block's reservation.
        k.acquiring = true;
        Ask::Acquire {
            id: BlockId::random(),
            size: amount.saturating_mul(i64::from(k.turns)),
            give_back: k.open.take().and_then(Open::close),
        }
    }

    /// The block asked for is taken, of `size` (at most what was asked): it opens with the
    /// asking turn's draw.
    pub fn acquired(
        &self,
        id: BlockId,
        holder: Holder,
        size: i64,
        request_id: &str,
        amount: i64,
        now: Instant,
    ) {
        let mut g = self.lock();
        let inner = &mut *g;
        let key = holder.key;
        let Some(k) = inner.keys.get_mut(&key) else {
            // Forgotten meanwhile (not while acquiring): the block gives back at once.
            inner.returns.push(GiveBack {
                row_id: format!("{id}.unused"),
                holder,
                amount: size.saturating_sub(amount),
            });
            return;
        };
        k.acquiring = false;
        if let Some(back) = k.open.take().and_then(Open::close) {
            inner.returns.push(back);
        }
        k.open = Some(Open {
            id: id.clone(),
            holder: holder.clone(),
            size,
            unused: size.saturating_sub(amount),
            until: now + self.open_for,
        });
        let draw = Draw {
            key,
            block: id,
            holder,
            amount,
            at: now,
        };
        inner.draws.insert(request_id.to_string(), draw);
    }

    /// The block asked for was not taken (a row of the turn's own was, or nothing).
    pub fn not_acquired(&self, key: i64) {
        if let Some(k) = self.lock().keys.get_mut(&key) {
            k.acquiring = false;
        }
    }

    /// Turn `request_id` ended costing `cost`: what its record takes off its block's row, if it
    /// drew from one, and the part of the cost beyond it. While the block is open the draw
    /// becomes the cost — the difference goes back to the block, or is taken from it as far as
    /// it has some — so every relay's admission counts the cost at once; what the block cannot
    /// cover is the excess, for the caller to hold in a row of the turn's own. A closed block's
    /// row keeps the draw as it was.
    pub fn end(&self, request_id: &str, cost: i64) -> Option<(BlockDraw, i64)> {
        let mut g = self.lock();
        let inner = &mut *g;
        let d = inner.draws.remove(request_id)?;
        let cost = cost.max(0);
        let mut amount = d.amount;
        if let Some(open) = inner
            .keys
            .get_mut(&d.key)
            .and_then(|k| k.open.as_mut())
            .filter(|o| o.id == d.block)
        {
            if cost <= d.amount {
                open.unused = open.unused.saturating_add(d.amount - cost);
                amount = cost;
            } else {
                let more = (cost - d.amount).min(open.unused.max(0));
                open.unused -= more;
                amount = d.amount + more;
            }
        }
        let draw = BlockDraw {
            block: d.block.to_string(),
            amount_nanousd: amount,
        };
        Some((draw, cost.saturating_sub(amount).max(0)))
    }

    /// Turn `request_id` will not run: its draw goes back.
    pub fn release(&self, request_id: &str) -> Released {
        let mut g = self.lock();
        let inner = &mut *g;
        let Some(d) = inner.draws.remove(request_id) else {
            return Released::Own;
        };
        match inner
            .keys
            .get_mut(&d.key)
            .and_then(|k| k.open.as_mut())
            .filter(|o| o.id == d.block)
        {
            Some(open) => {
                open.unused = open.unused.saturating_add(d.amount);
                Released::Local
            }
            None => Released::GiveBack(GiveBack {
                row_id: format!("{}.{request_id}", d.block),
                holder: d.holder,
                amount: d.amount,
            }),
        }
    }

    /// Closes the blocks whose time is up and forgets draws older than `forget_after`; returns
    /// what goes back to the database (the unused parts, with those not given back before).
    pub fn close_due(&self, now: Instant) -> Vec<GiveBack> {
        let mut g = self.lock();
        let inner = &mut *g;
        for k in inner.keys.values_mut() {
            if k.open.as_ref().is_none_or(|o| now < o.until) {
                continue;
            }
            let Some(open) = k.open.take() else { continue };
            // Half unused at its end: the key's next block is half as large.
            if open.unused.saturating_mul(2) > open.size {
                k.turns = (k.turns / 2).max(self.turns);
            }
            k.closed_at = now;
            if let Some(back) = open.close() {
                inner.returns.push(back);
            }
        }
        let open_for = self.open_for;
        inner.keys.retain(|_, k| {
            k.open.is_some() || k.acquiring || now.saturating_duration_since(k.closed_at) < open_for
        });
        let forget = self.forget_after;
        inner
            .draws
            .retain(|_, d| now.saturating_duration_since(d.at) < forget);
        std::mem::take(&mut inner.returns)
    }

    /// A give-back the database may not have taken: tried again at the next `close_due`
    /// (giving back twice is a no-op).
    pub fn retry(&self, back: GiveBack) {
        self.lock().returns.push(back);
    }

    /// Block `id` may have been written though its taking failed (`since`: when it was
    /// asked): its row is to be deleted — no turn draws from it.
    pub fn unclear(&self, id: BlockId, since: Instant) {
        self.lock().unclear.push((id, since));
    }

    /// The unclear blocks whose rows are now to be deleted: those asked for a block's time
    /// ago (a commit in flight then has long landed). One whose deletion fails goes back
    /// through `unclear`.
    pub fn unclear_due(&self, now: Instant) -> Vec<BlockId> {
        let mut g = self.lock();
        let (due, wait) = std::mem::take(&mut g.unclear)
            .into_iter()
            .partition(|(_, since)| now.saturating_duration_since(*since) >= self.open_for);
        g.unclear = wait;
        due.into_iter().map(|(id, _)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn blocks() -> Blocks {
        Blocks::new(4, 4, SEC, Duration::from_secs(3600))
    }

    fn holder(key: i64) -> Holder {
        Holder {
            key,
            user: 7,
            expires_at: NaiveDateTime::default(),
        }
    }

    fn back(id: &BlockId, what: &str, amount: i64) -> GiveBack {
        GiveBack {
            row_id: format!("{id}.{what}"),
            holder: holder(1),
            amount,
        }
    }

    /// Asks for a block and gets it; returns its id and what the previous one gave back.
    fn acquire(
        b: &Blocks,
        key: i64,
        req: &str,
        amount: i64,
        now: Instant,
    ) -> (BlockId, Option<GiveBack>) {
        match b.ask(key, req, amount, now) {
            Ask::Acquire {
                id,
                size,
                give_back,
            } => {
                assert_eq!(size, amount * 4);
                b.acquired(id.clone(), holder(key), size, req, amount, now);
                (id, give_back)
            }
            other => panic!("expected to acquire, got {other:?}"),
        }
    }

    #[test]
    fn turns_draw_from_a_block_until_it_is_used_up() {
        let (b, t0) = (blocks(), Instant::now());
        let (id, none) = acquire(&b, 1, "t1", 100, t0);
        assert_eq!(none, None);
        // Another key has its own block.
        assert!(matches!(b.ask(2, "u1", 100, t0), Ask::Acquire { .. }));
        for t in ["t2", "t3", "t4"] {
            assert_eq!(b.ask(1, t, 100, t0), Ask::Drawn);
        }
        // Used up: the next turn asks for a new block; the old one has nothing to give back.
        assert!(matches!(
            b.ask(1, "t5", 100, t0),
            Ask::Acquire {
                give_back: None,
                ..
            }
        ));
        // Its records each take their draw off the old block's row.
        assert_eq!(
            b.end("t2", 100),
            Some((
                BlockDraw {
                    block: id.to_string(),
                    amount_nanousd: 100
                },
                0
            ))
        );
        assert_eq!(b.end("t2", 100), None, "a draw ends once");
        assert!(b.close_due(t0).is_empty());
    }

    #[test]
    fn while_another_turn_takes_a_block_turns_take_rows_of_their_own() {
        let (b, t0) = (blocks(), Instant::now());
        assert!(matches!(b.ask(1, "t1", 100, t0), Ask::Acquire { .. }));
        assert_eq!(b.ask(1, "t2", 100, t0), Ask::Exact);
        b.not_acquired(1);
        assert!(matches!(b.ask(1, "t3", 100, t0), Ask::Acquire { .. }));
        assert_eq!(Blocks::new(1, 8, SEC, SEC).ask(1, "t", 100, t0), Ask::Exact);
    }

    #[test]
    fn an_ended_turn_holds_its_cost_and_the_rest_goes_back() {
        let (b, t0) = (blocks(), Instant::now());
        acquire(&b, 1, "t1", 100, t0);
        let end = |t: &str, cost: i64| b.end(t, cost).map(|(d, excess)| (d.amount_nanousd, excess));
        // Cheaper than drawn: the difference goes back to the block.
        assert_eq!(end("t1", 30), Some((30, 0)));
        for t in ["t2", "t3", "t4"] {
            assert_eq!(b.ask(1, t, 100, t0), Ask::Drawn);
        }
        assert_eq!(b.ask(1, "t5", 70, t0), Ask::Drawn, "the 70 given back");
        // Dearer than drawn: the block covers what it has left (nothing here), the rest is
        // the excess.
        assert_eq!(end("t2", 250), Some((100, 150)));
        assert_eq!(end("t3", 10), Some((10, 0)));
        assert_eq!(end("t4", 250), Some((190, 60)));
        // Closed: nothing unused to give back; a draw ends as it was drawn.
        assert_eq!(b.close_due(t0 + SEC), Vec::new());
        assert_eq!(end("t5", 1), Some((70, 0)));
        assert_eq!(end("t6", 1), None, "never drawn");
    }

    #[test]
    fn a_closed_blocks_unused_part_goes_back_once_and_is_retried() {
        let (b, t0) = (blocks(), Instant::now());
        let (id, _) = acquire(&b, 1, "t1", 100, t0);
        assert_eq!(b.ask(1, "t2", 100, t0), Ask::Drawn);
        assert!(b.close_due(t0 + SEC / 2).is_empty(), "still open");
        assert_eq!(b.close_due(t0 + SEC), vec![back(&id, "unused", 200)]);
        assert!(b.close_due(t0 + SEC).is_empty());
        b.retry(back(&id, "unused", 200));
        assert_eq!(b.close_due(t0 + SEC), vec![back(&id, "unused", 200)]);
        // A turn released after its block closed gives its draw back; one before, to the block.
        assert_eq!(b.release("t2"), Released::GiveBack(back(&id, "t2", 100)));
        assert_eq!(b.release("t2"), Released::Own);
        let (id2, _) = acquire(&b, 1, "t3", 100, t0 + SEC);
        assert_eq!(b.release("t3"), Released::Local);
        assert_eq!(b.close_due(t0 + 2 * SEC), vec![back(&id2, "unused", 400)]);
    }

    #[test]
    fn an_expired_block_serves_no_turn_and_gives_back_with_the_next() {
        let (b, t0) = (blocks(), Instant::now());
        let (id, _) = acquire(&b, 1, "t1", 100, t0);
        let (_, given) = acquire(&b, 1, "t2", 100, t0 + SEC);
        assert_eq!(given, Some(back(&id, "unused", 300)));
        assert!(b.close_due(t0 + SEC).is_empty(), "given back once");
    }

    #[test]
    fn blocks_grow_while_used_up_early_and_shrink_while_half_unused() {
        let b = Blocks::new(4, 16, SEC, Duration::from_secs(3600));
        let t0 = Instant::now();
        let size = |ask: Ask| match ask {
            Ask::Acquire { size, .. } => size,
            other => panic!("expected to acquire, got {other:?}"),
        };
        let take = |req: &str, size: i64| {
            b.acquired(BlockId::random(), holder(1), size, req, 100, t0);
        };
        assert_eq!(size(b.ask(1, "t1", 100, t0)), 400);
        take("t1", 400);
        for t in ["t2", "t3", "t4"] {
            assert_eq!(b.ask(1, t, 100, t0), Ask::Drawn);
        }
        // Used up within its second: twice as large; a turn arriving meanwhile reserves alone.
        assert_eq!(size(b.ask(1, "t5", 100, t0)), 800);
        assert_eq!(b.ask(1, "t6", 100, t0), Ask::Exact);
        // The database granted less (half of what the key had left): the block is that size.
        take("t5", 500);
        for t in ["t7", "t8", "t9", "t10"] {
            assert_eq!(b.ask(1, t, 100, t0), Ask::Drawn);
        }
        // Used up early and crowded: doubled once; never beyond 16 turns.
        assert_eq!(size(b.ask(1, "t11", 100, t0)), 1_600);
        take("t11", 1_600);
        for n in 12..27 {
            assert_eq!(b.ask(1, &format!("t{n}"), 100, t0), Ask::Drawn);
        }
        assert_eq!(size(b.ask(1, "t27", 100, t0)), 1_600);
        take("t27", 1_600);
        // Closed more than half unused: the next block is half as large, and so on to four.
        assert_eq!(b.close_due(t0 + SEC).len(), 1);
        assert_eq!(size(b.ask(1, "t28", 100, t0 + SEC)), 800);
        take("t28", 800);
        assert_eq!(b.close_due(t0 + 3 * SEC).len(), 1);
        assert_eq!(size(b.ask(1, "t29", 100, t0 + 3 * SEC)), 400);
        b.not_acquired(1);
        // A key without a block for a block's time starts over.
        let _ = b.close_due(t0 + 5 * SEC);
        assert_eq!(size(b.ask(1, "t30", 100, t0 + 5 * SEC)), 400);
    }

    #[test]
    fn a_block_taken_without_a_clear_answer_is_deleted_a_block_time_later() {
        let (b, t0) = (blocks(), Instant::now());
        let id = BlockId::random();
        b.unclear(id.clone(), t0);
        assert!(
            b.unclear_due(t0 + SEC / 2).is_empty(),
            "a commit may still be in flight"
        );
        assert_eq!(b.unclear_due(t0 + SEC), vec![id]);
        assert!(b.unclear_due(t0 + 2 * SEC).is_empty(), "once");
    }

    #[test]
    fn draws_never_ended_are_forgotten() {
        let b = Blocks::new(4, 4, SEC, 10 * SEC);
        let t0 = Instant::now();
        acquire(&b, 1, "t1", 100, t0);
        let _ = b.close_due(t0 + 10 * SEC);
        assert_eq!(b.end("t1", 1), None);
    }
}
