//! The decisions of a turn's life on the session's shared connection (docs/DESIGN.md#overlap),
//! as pure functions of what the session knows: the actor gathers the facts, asks, and carries
//! out the answer. Unit-tested without sockets.

use std::time::{Duration, Instant};

use crate::protocol::errors::ErrorCode;
use crate::upstream::messages::LostReason;

/// What becomes of a turn whose connection was lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterLoss {
    /// Nothing of it reached the client: once, transparently, on a fresh connection (a chained
    /// turn too: the continuation decision then replays it or fails closed).
    Retry,
    /// It ends with this error.
    End(ErrorCode, &'static str),
}

/// The turn's facts when its connection went.
#[derive(Debug, Clone, Copy)]
pub struct Loss<'a> {
    pub forwarded: u32,
    pub retried: bool,
    pub client_gone: bool,
    pub reason: &'a LostReason,
}

pub fn after_loss(l: Loss<'_>) -> AfterLoss {
    let protocol = matches!(l.reason, LostReason::Protocol(_));
    if l.forwarded == 0 && !l.retried && !l.client_gone && !protocol {
        return AfterLoss::Retry;
    }
    match l.reason {
        LostReason::Closed(Some(crate::protocol::errors::close::RESTART))
        | LostReason::Closed(Some(crate::protocol::errors::close::TRY_AGAIN_LATER)) => {
            AfterLoss::End(
                ErrorCode::UpstreamRestarting,
                "the upstream is restarting; retry this turn",
            )
        }
        LostReason::Protocol(what) => AfterLoss::End(ErrorCode::UpstreamProtocolError, what),
        _ => AfterLoss::End(
            ErrorCode::UpstreamConnectionLost,
            "the upstream connection was lost mid-turn; retry this turn",
        ),
    }
}

/// A streaming turn's silence, as the session's timer sees it.
#[derive(Debug, Clone, Copy)]
pub struct Silence {
    /// Events of the turn so far.
    pub events: u32,
    /// Since the turn last heard from the upstream.
    pub silent: Duration,
    /// Since the connection last sent anything, for any lane.
    pub connection_silent: Option<Duration>,
    /// Other lanes' responses are on the connection.
    pub others: bool,
    pub first_event_timeout: Duration,
    pub read_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stall {
    /// Within its limits.
    No,
    /// The connection answers other lanes: this response alone stalls; it ends and the
    /// connection is spent.
    Alone,
    /// The connection is silent: it goes, with every turn on it.
    Connection(&'static str),
}

pub fn stall(s: Silence) -> Stall {
    let (limit, why) = if s.events == 0 {
        // The request went out and nothing came back: the upstream may have gone silent (a
        // graceful restart keeps its old sockets open and mute).
        (s.first_event_timeout, "no first event")
    } else {
        (s.read_timeout, "read timeout")
    };
    if s.silent < limit {
        return Stall::No;
    }
    if s.others && s.connection_silent.is_some_and(|c| c < limit) {
        Stall::Alone
    } else {
        Stall::Connection(why)
    }
}

/// The held connection, as a turn that wants to be sent sees it.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    pub account: &'a str,
    pub opened_at: Instant,
    pub retired: bool,
    /// A turn left it in an unknown state: no new turn goes on it.
    pub spent: bool,
    /// Other lanes' responses are on it.
    pub in_use: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Send the turn on it.
    Send,
    /// It does not fit (another account, too old, spent, retired) but other lanes use it: the
    /// turn waits until they end.
    Wait,
    /// It does not fit and nobody else uses it: give it back (reusable unless spent) and
    /// acquire one for the turn.
    Exchange { reusable: bool },
}

pub fn fit(held: Held<'_>, account: &str, max_age: Duration, now: Instant) -> Fit {
    let fresh = now.duration_since(held.opened_at) < max_age;
    if held.account == account && !held.spent && fresh && !held.retired {
        Fit::Send
    } else if held.in_use {
        Fit::Wait
    } else {
        Fit::Exchange {
            reusable: !held.spent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_is_retried_once_before_anything_reached_the_client() {
        let eof = LostReason::Eof;
        let l = |forwarded, retried, client_gone, reason| Loss {
            forwarded,
            retried,
            client_gone,
            reason,
        };
        assert_eq!(after_loss(l(0, false, false, &eof)), AfterLoss::Retry);
        let lost = AfterLoss::End(
            ErrorCode::UpstreamConnectionLost,
            "the upstream connection was lost mid-turn; retry this turn",
        );
        assert_eq!(after_loss(l(1, false, false, &eof)), lost, "forwarded");
        assert_eq!(after_loss(l(0, true, false, &eof)), lost, "retried once");
        assert_eq!(after_loss(l(0, false, true, &eof)), lost, "nobody to serve");
        let protocol = LostReason::Protocol("bad");
        assert_eq!(
            after_loss(l(0, false, false, &protocol)),
            AfterLoss::End(ErrorCode::UpstreamProtocolError, "bad"),
            "a protocol error is not retried"
        );
        let restart = LostReason::Closed(Some(crate::protocol::errors::close::RESTART));
        assert!(matches!(
            after_loss(l(2, false, false, &restart)),
            AfterLoss::End(ErrorCode::UpstreamRestarting, _)
        ));
    }

    #[test]
    fn a_silent_lane_stalls_alone_while_its_connection_answers_others() {
        let ms = Duration::from_millis;
        let s = |events, silent, connection_silent: Option<u64>, others| Silence {
            events,
            silent: ms(silent),
            connection_silent: connection_silent.map(ms),
            others,
            first_event_timeout: ms(100),
            read_timeout: ms(500),
        };
        assert_eq!(stall(s(3, 400, Some(400), false)), Stall::No);
        assert_eq!(
            stall(s(0, 150, None, false)),
            Stall::Connection("no first event")
        );
        assert_eq!(
            stall(s(3, 600, Some(600), true)),
            Stall::Connection("read timeout")
        );
        assert_eq!(stall(s(3, 600, Some(20), true)), Stall::Alone);
        assert_eq!(
            stall(s(3, 600, Some(20), false)),
            Stall::Connection("read timeout"),
            "no other lane: the connection is what is silent for this turn"
        );
    }

    #[test]
    fn a_connection_that_does_not_fit_waits_for_the_other_lanes() {
        let t0 = Instant::now();
        let age = Duration::from_secs(60);
        let held = |account, spent, in_use| Held {
            account,
            opened_at: t0,
            retired: false,
            spent,
            in_use,
        };
        assert_eq!(fit(held("a", false, true), "a", age, t0), Fit::Send);
        assert_eq!(fit(held("b", false, true), "a", age, t0), Fit::Wait);
        assert_eq!(
            fit(held("b", false, false), "a", age, t0),
            Fit::Exchange { reusable: true }
        );
        assert_eq!(fit(held("a", true, true), "a", age, t0), Fit::Wait, "spent");
        assert_eq!(
            fit(held("a", true, false), "a", age, t0),
            Fit::Exchange { reusable: false }
        );
        assert_eq!(
            fit(held("a", false, false), "a", age, t0 + age),
            Fit::Exchange { reusable: true },
            "too old"
        );
    }
}
