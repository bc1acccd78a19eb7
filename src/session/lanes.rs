//! Lanes of one client session (docs/DESIGN.md#overlap): which `response.create` starts now,
//! which waits, which is refused — decided here, without sockets; the session actor carries the
//! decisions out. A lane (`stream_id`, `None` for the default lane) runs one turn at a time and
//! its creates in order; lanes run side by side, at most [`MAX_IN_FLIGHT`] turns at once (more
//! wait, none is refused for it), at most [`MAX_NAMED_LANES`] named lanes per session.

use std::collections::{HashSet, VecDeque};
use std::time::Instant;

use crate::config::OnOverlap;
use crate::protocol::errors::ErrorCode;
use crate::protocol::frames::CreateFrame;

/// A lane: its `stream_id`, `None` for the implicit default lane.
pub type LaneId = Option<String>;

pub use crate::protocol::frames::{MAX_IN_FLIGHT, MAX_NAMED_LANES};

/// A create waiting for its lane, with when it was read.
#[derive(Debug, Clone)]
pub struct Waiting {
    pub frame: CreateFrame,
    pub accepted: Instant,
}

/// What becomes of a `response.create` that just arrived.
#[derive(Debug, PartialEq, Eq)]
pub enum Arrival {
    /// Its lane is free: it starts now.
    Start,
    /// It waits its turn.
    Queued,
    /// Refused with this error event (`lane_queue_full`, `response_already_in_flight`,
    /// `websocket_stream_limit_reached`); nothing else changes.
    Refused(ErrorCode),
    /// `on_overlap = "preempt"`: admit it, then end its lane's turn in flight.
    Preempt,
}

/// What the lane's turn in flight is doing, as far as a new create cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneState {
    /// No turn, and no successor expected.
    Free,
    /// A turn runs (or a successor the upstream will start on its own is expected).
    Busy,
    /// The turn ended; its record is on its way (the lane frees in a moment).
    Ending,
}

#[derive(Debug, Default)]
pub struct Lanes {
    named: HashSet<String>,
    /// Creates waiting, in arrival order across lanes (FIFO within each lane).
    waiting: VecDeque<Waiting>,
    /// `preempt` mode: creates being admitted before they end their lane's turn (one per
    /// lane: the latest wins while the check runs).
    checking: Vec<CreateFrame>,
    /// The most bytes of creates that may wait across the session's lanes (`None`: no bound).
    bytes_max: Option<usize>,
}

/// A create that would preempt its lane's turn, held while it is admitted.
#[derive(Debug, PartialEq)]
pub enum Check {
    /// Its admission starts.
    Start,
    /// A check of its lane runs already: it now decides for this create; the older one is
    /// superseded (answered, never started).
    Supersedes(Box<CreateFrame>),
}

impl Lanes {
    /// Lanes whose waiting creates hold at most `bytes` (docs/DESIGN.md#overlap).
    pub fn bounded(bytes: usize) -> Self {
        Self {
            bytes_max: Some(bytes),
            ..Self::default()
        }
    }

    /// Bytes of the creates waiting or being checked.
    fn held_bytes(&self) -> usize {
        let waiting = self.waiting.iter().map(|w| w.frame.raw.len());
        waiting
            .chain(self.checking.iter().map(|f| f.raw.len()))
            .sum()
    }

    /// Decides a create's fate: [`Lanes::admit`], with a create that would wait refused
    /// `lane_queue_full` when the session's waiting creates would hold more than their bound
    /// of bytes (a count alone lets one session pin gigabytes: 33 lanes × 64 frames of 16 MiB).
    pub fn arrive(
        &mut self,
        frame: &CreateFrame,
        state: LaneState,
        in_flight: usize,
        mode: OnOverlap,
        queue_max: usize,
    ) -> Arrival {
        let arrival = self.admit(frame, state, in_flight, mode, queue_max);
        match self.bytes_max {
            Some(max)
                if arrival == Arrival::Queued
                    && self.held_bytes().saturating_add(frame.raw.len()) > max =>
            {
                Arrival::Refused(ErrorCode::LaneQueueFull)
            }
            _ => arrival,
        }
    }

    /// Decides a create's fate by counts. `state`: its lane's; `in_flight`: turns of the session now;
    /// `queue_max`: creates that may wait per lane.
    fn admit(
        &mut self,
        frame: &CreateFrame,
        state: LaneState,
        in_flight: usize,
        mode: OnOverlap,
        queue_max: usize,
    ) -> Arrival {
        if let Some(lane) = &frame.stream_id
            && !self.named.contains(lane)
        {
            if self.named.len() >= MAX_NAMED_LANES {
                return Arrival::Refused(ErrorCode::StreamLimitReached);
            }
            self.named.insert(lane.clone());
        }
        let lane = &frame.stream_id;
        let behind = self.waiting_on(lane);
        if state == LaneState::Free && behind == 0 {
            // Its lane is free: it starts, unless the session is at its limit of turns in
            // flight, where it waits like the upstream would have it wait.
            return if in_flight < MAX_IN_FLIGHT {
                Arrival::Start
            } else {
                Arrival::Queued
            };
        }
        match mode {
            OnOverlap::Queue if behind >= queue_max => Arrival::Refused(ErrorCode::LaneQueueFull),
            OnOverlap::Queue => Arrival::Queued,
            // Waiting for its lane's current turn to finish ending: it is handled then.
            OnOverlap::Reject if state == LaneState::Ending && behind == 0 => Arrival::Queued,
            OnOverlap::Reject if state == LaneState::Free => Arrival::Queued,
            OnOverlap::Reject => Arrival::Refused(ErrorCode::ResponseAlreadyInFlight),
            OnOverlap::Preempt if state == LaneState::Busy => Arrival::Preempt,
            // Nothing runs to preempt: it supersedes those waiting and waits itself.
            OnOverlap::Preempt => Arrival::Queued,
        }
    }

    /// Queues a create (after [`Arrival::Queued`], or after its preemption was admitted).
    pub fn push(&mut self, frame: CreateFrame, accepted: Instant) {
        self.waiting.push_back(Waiting { frame, accepted });
    }

    /// Creates waiting on `lane`.
    pub fn waiting_on(&self, lane: &LaneId) -> usize {
        self.waiting
            .iter()
            .filter(|w| &w.frame.stream_id == lane)
            .count()
    }

    /// Takes the creates that may start now, in order: the first waiting on each lane whose
    /// state is `Free`, while fewer than [`MAX_IN_FLIGHT`] turns are in flight.
    pub fn startable(
        &mut self,
        state: impl Fn(&LaneId) -> LaneState,
        mut in_flight: usize,
    ) -> Vec<Waiting> {
        let mut seen: Vec<&LaneId> = Vec::new();
        let mut take = Vec::new();
        for (i, w) in self.waiting.iter().enumerate() {
            if in_flight >= MAX_IN_FLIGHT {
                break;
            }
            let lane = &w.frame.stream_id;
            if seen.contains(&lane) {
                continue;
            }
            seen.push(lane);
            if state(lane) == LaneState::Free {
                take.push(i);
                in_flight += 1;
            }
        }
        // Removed back to front so the indices stay right; handed out front to back.
        let mut out: Vec<Waiting> = take
            .into_iter()
            .rev()
            .filter_map(|i| self.waiting.remove(i))
            .collect();
        out.reverse();
        out
    }

    /// Takes every create waiting on `lane` (superseded by a newer one in `preempt` mode).
    pub fn take_lane(&mut self, lane: &LaneId) -> Vec<Waiting> {
        let (theirs, others): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| &w.frame.stream_id == lane);
        let others = VecDeque::from(others);
        self.waiting = others;
        theirs
    }

    /// Holds a create whose preemption is being admitted.
    pub fn check(&mut self, frame: CreateFrame) -> Check {
        match self
            .checking
            .iter_mut()
            .find(|f| f.stream_id == frame.stream_id)
        {
            Some(pending) => Check::Supersedes(Box::new(std::mem::replace(pending, frame))),
            None => {
                self.checking.push(frame);
                Check::Start
            }
        }
    }

    /// The create of `lane` whose admission just ended.
    pub fn checked(&mut self, lane: &LaneId) -> Option<CreateFrame> {
        let at = self.checking.iter().position(|f| &f.stream_id == lane)?;
        Some(self.checking.remove(at))
    }

    /// Takes every create waiting or being checked (the session ends: each is answered).
    pub fn take_all(&mut self) -> Vec<CreateFrame> {
        std::mem::take(&mut self.checking)
            .into_iter()
            .chain(
                std::mem::take(&mut self.waiting)
                    .into_iter()
                    .map(|w| w.frame),
            )
            .collect()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn named(&self) -> usize {
        self.named.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(lane: Option<&str>, n: usize) -> CreateFrame {
        CreateFrame {
            raw: format!("{n}"),
            model: None,
            previous_response_id: None,
            store: false,
            warmup: false,
            has_tool_output: false,
            prompt_bytes: 0,
            input: None,
            max_output_tokens: None,
            stream_id: lane.map(str::to_string),
            stream: false,
            background: false,
            prompt_cache_key: None,
            service_tier: None,
            compaction: false,
        }
    }

    const Q: OnOverlap = OnOverlap::Queue;

    #[test]
    fn free_lanes_start_and_busy_lanes_queue_in_order() {
        let mut l = Lanes::default();
        let t0 = Instant::now();
        assert_eq!(
            l.arrive(&create(Some("a"), 1), LaneState::Free, 0, Q, 4),
            Arrival::Start
        );
        assert_eq!(
            l.arrive(&create(Some("b"), 2), LaneState::Free, 1, Q, 4),
            Arrival::Start
        );
        for n in 3..5 {
            let f = create(Some("a"), n);
            assert_eq!(l.arrive(&f, LaneState::Busy, 2, Q, 4), Arrival::Queued);
            l.push(f, t0);
        }
        let f = create(None, 5);
        assert_eq!(l.arrive(&f, LaneState::Busy, 2, Q, 4), Arrival::Queued);
        l.push(f, t0);
        // Lane a frees: only its first waiting create starts; the default lane is still busy.
        let go = l.startable(
            |lane| {
                if lane.is_none() {
                    LaneState::Busy
                } else {
                    LaneState::Free
                }
            },
            1,
        );
        let raws: Vec<&str> = go.iter().map(|w| w.frame.raw.as_str()).collect();
        assert_eq!(raws, ["3"]);
        let go = l.startable(|_| LaneState::Free, 0);
        let raws: Vec<&str> = go.iter().map(|w| w.frame.raw.as_str()).collect();
        assert_eq!(raws, ["4", "5"], "one per lane, in arrival order");
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn a_full_lane_refuses_and_others_still_queue() {
        let mut l = Lanes::default();
        let t0 = Instant::now();
        for n in 0..2 {
            let f = create(Some("a"), n);
            assert_eq!(l.arrive(&f, LaneState::Busy, 1, Q, 2), Arrival::Queued);
            l.push(f, t0);
        }
        assert_eq!(
            l.arrive(&create(Some("a"), 9), LaneState::Busy, 1, Q, 2),
            Arrival::Refused(ErrorCode::LaneQueueFull)
        );
        assert_eq!(
            l.arrive(&create(Some("b"), 9), LaneState::Busy, 1, Q, 2),
            Arrival::Queued
        );
    }

    #[test]
    fn the_seventeenth_turn_waits_and_starts_when_one_ends() {
        let mut l = Lanes::default();
        let f = create(Some("l16"), 16);
        assert_eq!(
            l.arrive(&f, LaneState::Free, MAX_IN_FLIGHT, Q, 4),
            Arrival::Queued,
            "waits, not refused"
        );
        l.push(f, Instant::now());
        assert!(l.startable(|_| LaneState::Free, MAX_IN_FLIGHT).is_empty());
        assert_eq!(l.startable(|_| LaneState::Free, MAX_IN_FLIGHT - 1).len(), 1);
    }

    #[test]
    fn the_thirty_third_named_lane_is_refused() {
        let mut l = Lanes::default();
        for n in 0..MAX_NAMED_LANES {
            let lane = format!("l{n}");
            assert_eq!(
                l.arrive(&create(Some(&lane), n), LaneState::Free, 0, Q, 4),
                Arrival::Start
            );
        }
        assert_eq!(
            l.arrive(&create(Some("one-more"), 0), LaneState::Free, 0, Q, 4),
            Arrival::Refused(ErrorCode::StreamLimitReached)
        );
        // Known lanes and the default lane go on.
        assert_eq!(
            l.arrive(&create(Some("l3"), 0), LaneState::Free, 0, Q, 4),
            Arrival::Start
        );
        assert_eq!(
            l.arrive(&create(None, 0), LaneState::Free, 0, Q, 4),
            Arrival::Start
        );
        assert_eq!(l.named(), MAX_NAMED_LANES);
    }

    #[test]
    fn reject_and_preempt_act_per_lane() {
        let mut l = Lanes::default();
        let r = OnOverlap::Reject;
        let p = OnOverlap::Preempt;
        assert_eq!(
            l.arrive(&create(Some("a"), 1), LaneState::Busy, 1, r, 4),
            Arrival::Refused(ErrorCode::ResponseAlreadyInFlight)
        );
        assert_eq!(
            l.arrive(&create(Some("a"), 1), LaneState::Ending, 1, r, 4),
            Arrival::Queued,
            "its lane frees in a moment"
        );
        assert_eq!(
            l.arrive(&create(Some("b"), 1), LaneState::Free, 1, r, 4),
            Arrival::Start,
            "another lane is not an overlap"
        );
        assert_eq!(
            l.arrive(&create(Some("a"), 1), LaneState::Busy, 1, p, 4),
            Arrival::Preempt
        );
        l.push(create(Some("a"), 2), Instant::now());
        l.push(create(Some("c"), 3), Instant::now());
        let superseded = l.take_lane(&Some("a".into()));
        assert_eq!(superseded.len(), 1);
        assert_eq!(l.waiting(), 1);
        // While a preemption is admitted, a newer create of its lane supersedes it.
        assert_eq!(l.check(create(Some("a"), 7)), Check::Start);
        assert_eq!(l.check(create(Some("b"), 8)), Check::Start);
        assert_eq!(
            l.check(create(Some("a"), 9)),
            Check::Supersedes(Box::new(create(Some("a"), 7)))
        );
        assert_eq!(l.checked(&Some("a".into())), Some(create(Some("a"), 9)));
        assert_eq!(l.checked(&Some("a".into())), None);
        assert_eq!(l.take_all().len(), 2, "b's check and c's wait");
    }

    /// Waiting creates are bounded in bytes across the session's lanes, not only in count.
    #[test]
    fn waiting_bytes_are_bounded() {
        let mut l = Lanes::bounded(10);
        let big = |lane: &str, n: usize| {
            let mut f = create(Some(lane), n);
            f.raw = "x".repeat(4);
            f
        };
        for (lane, n) in [("a", 1), ("b", 2)] {
            let f = big(lane, n);
            assert_eq!(l.arrive(&f, LaneState::Busy, 2, Q, 64), Arrival::Queued);
            l.push(f, Instant::now());
        }
        // 8 bytes wait: 4 more would be 12 > 10, on any lane.
        assert_eq!(
            l.arrive(&big("c", 3), LaneState::Busy, 2, Q, 64),
            Arrival::Refused(ErrorCode::LaneQueueFull)
        );
        // A create that starts now holds nothing waiting.
        assert_eq!(
            l.arrive(&big("d", 4), LaneState::Free, 2, Q, 64),
            Arrival::Start
        );
        l.take_lane(&Some("a".into()));
        assert_eq!(
            l.arrive(&big("c", 5), LaneState::Busy, 2, Q, 64),
            Arrival::Queued
        );
    }
}
