//! The turn machine (docs/DESIGN.md#turn-machine): one turn's life as a value — its phase, its
//! tracker (timing, response id, usage), what of it reached the client, its deadlines — and
//! `step(input, now) -> Effects`. The session actor (a WebSocket client's turns) and the
//! HTTP exchange (an HTTP client's) feed it what happened and carry out what it answers with
//! their sockets, pools and accounting; neither decides a phase. Unit-tested without sockets.

use std::time::{Duration, Instant};

use smallvec::{SmallVec, smallvec};

use super::lifecycle::{self, AfterLoss, Loss, Silence, Stall};
use super::turn::{self, Ending, Recovery, Relayed, Step, TurnTracker};
use crate::protocol::errors::ErrorCode;
use crate::protocol::events::SteerKind;
use crate::upstream::messages::LostReason;

/// Where a turn is in its life (the diagram in docs/DESIGN.md#turn-machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its standing, slots and reservation are being read and taken.
    Admitting,
    /// Admitted; waiting for a connection (or an HTTP leg) to send it on.
    Leasing,
    /// Its request went upstream; its events come back.
    Streaming,
    /// It ended: its record is on its way to accounting, its last frame waits for that.
    Finishing,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Self::Admitting => "admitting",
            Self::Leasing => "leasing",
            Self::Streaming => "streaming",
            Self::Finishing => "finishing",
        }
    }
}

/// How its request reached the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Leg {
    /// A WebSocket (the session's leased one, or the HTTP client's).
    #[default]
    Socket,
    /// `POST /responses` of its own; HTTP has no cancel message, and the leg times its own
    /// silence.
    Http,
}

/// The time limits a turn lives by (from the settings, copied in).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// After a client's cancel, how long the upstream has to end the response.
    pub cancel_grace: Duration,
    /// After the client left, how long the upstream is read for the terminal's usage (zero:
    /// the turn ends at once, its connection spent).
    pub drain: Duration,
    pub first_event: Duration,
    pub read: Duration,
}

/// Why no upstream took the turn before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// No connection of its account came in time (all busy, or a handshake hangs).
    Timeout,
    /// Its account cannot be dialled, or cools down after failures.
    Down,
    /// Its account's upstream answered the WebSocket handshake 426: HTTP may carry the turn.
    NoWebSocket,
    /// The account refused the request before serving anything (an HTTP leg's 401/403/429/5xx,
    /// the client hears `event`, the upstream's own words, if no other account takes it).
    Refused { event: String },
    /// An HTTP leg could not reach its account.
    LegDown,
    /// Nothing else is tried (the relay stops, its account is gone).
    Final,
}

/// What happened to the turn: the machine's only way in.
#[derive(Debug)]
pub enum Input<'a> {
    /// Admission granted (slots, reservation): it wants a connection.
    Admitted,
    /// Admission, or the continuation decision, refused it: nothing was sent.
    Refused(ErrorCode, String),
    /// No upstream took it (`message`: what the client hears; `close`: the socket closes after,
    /// too many lease timeouts in a row).
    Unreachable {
        why: Unreachable,
        message: String,
        close: bool,
    },
    /// Its request was written upstream over `leg`; `replayed`: as its conversation's replay.
    Sent { leg: Leg, replayed: bool },
    /// The upstream's answer began (an HTTP answer's head): from now on it is this answer or
    /// nothing — no retry, no rescue (the upstream is generating it).
    Answered,
    /// One upstream event of its response.
    Upstream(&'a str),
    /// Its whole answer at once (an HTTP request that did not stream): a response object.
    Whole(&'a [u8]),
    /// Its upstream (connection or HTTP leg) went before its end.
    Lost(&'a LostReason),
    /// Its transport changed before anything of it was heard (the upstream refused its lane,
    /// a failover): it wants a connection again.
    Resend,
    /// The client's `response.cancel`.
    Cancel,
    /// A newer create on its lane ends it (`message`: what the client hears).
    Preempt(String),
    /// The client went.
    ClientGone,
    /// The relay ended it (`code`: shutdown, a client that does not read).
    Abort(ErrorCode, String),
    /// The timer: the connection's silence as the executor sees it, and whether other lanes'
    /// responses are on it.
    Tick {
        connection_silent: Option<Duration>,
        others: bool,
    },
    /// The rescue asked for (`Effect::Rescue`) cannot be carried out: the end it stood in for
    /// stands.
    NotRescued,
}

/// What may save a turn before anything of it was relayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rescue {
    /// Replay its conversation once, on the same connection (`previous_response_not_found`).
    Replay,
    /// Another account: the current one is marked failing first (`code`: the upstream's word).
    FailOver(String),
    /// Another account: the current one is known to be failing (its pool said so).
    OtherAccount,
    /// An HTTP leg on the same account (its upstream has no WebSocket mode).
    Http,
}

/// The turn's last frame to the client, sent once its record is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Last {
    /// The upstream event just stepped (a terminal, or an `error`).
    Upstream,
    /// A refused or lost turn's error, in the transport's shape.
    Error(ErrorCode, String),
    /// The upstream's own refusal, as it came.
    Verbatim(String),
    /// `response.cancelled` (or `response.failed` on HTTP), naming the response.
    Cancelled,
    /// Nothing: nobody is listening.
    Nothing,
}

/// How a turn ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    pub ending: Ending,
    pub last: Last,
    /// Whether its connection may serve another response.
    pub reusable: bool,
    /// The client socket closes afterwards (`upstream_unavailable`, try again later).
    pub close: bool,
}

impl End {
    fn new(ending: Ending, last: Last, reusable: bool) -> Self {
        Self {
            ending,
            last,
            reusable,
            close: false,
        }
    }
}

/// What the executor does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Find it a connection (the session's held one, a new lease, an HTTP leg) and send it.
    Lease,
    /// Once more on a fresh connection: nothing of it reached the client.
    Retry,
    /// Relay the event just stepped.
    Forward,
    /// Relay it; the upstream says whether it starts a successor (steering).
    Steer(SteerKind),
    /// Try this before the end it stands in for; feed `NotRescued` when it cannot be done.
    Rescue(Rescue),
    /// Send the client's cancel upstream.
    ForwardCancel,
    /// Stop its HTTP leg (dropping the request stops the upstream).
    StopLeg,
    /// Read its response in the background for the terminal's usage (a preempted socket turn):
    /// the client hears `message` now.
    Drain(String),
    /// Give its slots back now: the upstream is read a while longer for its usage.
    FreeSlots,
    /// Its connection sent garbage or went silent: it goes, with every turn on it (each gets
    /// `Lost`).
    DropConnection(LostReason),
    /// Count an upstream error (the metric's `code`).
    CountError(String),
    /// The end: its record first, then its last frame.
    Finish(End),
}

/// The effects of one step, in order: at most a few, kept inline (no allocation per event).
pub type Effects = SmallVec<[Effect; 2]>;

/// One turn's state.
#[derive(Debug, Clone)]
pub struct TurnMachine {
    /// Timing, the response id, usage: fed by every upstream event.
    pub tracker: TurnTracker,
    phase: Phase,
    leg: Leg,
    limits: Limits,
    /// Events of it relayed to the client.
    forwarded: u32,
    /// Its upstream answer began (`Input::Answered`).
    answered: bool,
    /// Retried once on a fresh connection already.
    retried: bool,
    /// Its conversation was replayed (never twice).
    replayed: bool,
    last_upstream: Instant,
    cancel_deadline: Option<Instant>,
    drain_deadline: Option<Instant>,
    /// While a rescue is tried: the end it stands in for, and the phase to end from.
    pending: Option<(End, Phase)>,
}

impl TurnMachine {
    pub fn new(tracker: TurnTracker, limits: Limits, accepted: Instant) -> Self {
        Self {
            tracker,
            phase: Phase::Admitting,
            leg: Leg::Socket,
            limits,
            forwarded: 0,
            answered: false,
            retried: false,
            replayed: false,
            last_upstream: accepted,
            cancel_deadline: None,
            drain_deadline: None,
            pending: None,
        }
    }

    /// A successor the upstream started on its own (steering): streaming at once on the
    /// connection its predecessor used; nothing of it was sent by the relay, so it is never
    /// retried or replayed elsewhere.
    pub fn started_upstream(&mut self, now: Instant) {
        self.tracker.clock.written(now);
        self.phase = Phase::Streaming;
        self.retried = true;
        self.replayed = true;
        self.last_upstream = now;
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn leg(&self) -> Leg {
        self.leg
    }

    pub fn replayed(&self) -> bool {
        self.replayed
    }

    /// Something of it reached the client, or its answer began.
    pub fn committed(&self) -> bool {
        self.forwarded > 0 || self.answered
    }

    /// Streaming over a WebSocket: its events come on the connection.
    pub fn on_socket(&self) -> bool {
        self.phase == Phase::Streaming && self.leg == Leg::Socket
    }

    /// The executor carries out a `Finish` (or ends the turn for a reason of its own, such as
    /// a drain's end): the turn is over; answers whether it was streaming.
    pub fn finished(&mut self) -> bool {
        let streaming = self.phase == Phase::Streaming;
        self.phase = Phase::Finishing;
        self.pending = None;
        streaming
    }

    /// What `input` does to the turn, at `now`.
    pub fn step(&mut self, input: Input<'_>, now: Instant) -> Effects {
        if self.phase == Phase::Finishing {
            return Effects::new();
        }
        match input {
            Input::Admitted => self.admitted(),
            Input::Refused(code, message) => {
                smallvec![self.finish(End::new(
                    Ending::Rejected(code),
                    Last::Error(code, message),
                    true,
                ))]
            }
            Input::Unreachable {
                why,
                message,
                close,
            } => self.unreachable(why, message, close),
            Input::Sent { leg, replayed } => {
                self.phase = Phase::Streaming;
                self.leg = leg;
                self.replayed |= replayed;
                self.pending = None;
                self.last_upstream = now;
                Effects::new()
            }
            Input::Answered => {
                self.answered = true;
                Effects::new()
            }
            Input::Upstream(text) => self.upstream(text, now),
            Input::Whole(body) => match self.tracker.observe_whole(body, now) {
                Some(kind) => {
                    smallvec![self.finish(End::new(Ending::Terminal(kind), Last::Upstream, true))]
                }
                None => self.lost(&LostReason::Protocol(
                    "the upstream's answer is not a JSON object",
                )),
            },
            Input::Lost(reason) => self.lost(reason),
            Input::Resend => {
                self.phase = Phase::Leasing;
                smallvec![Effect::Lease]
            }
            Input::Cancel => self.cancel(now),
            Input::Preempt(message) => self.preempt(message),
            Input::ClientGone => self.client_gone(now),
            Input::Abort(code, message) => {
                let last = match code {
                    // Nobody reads: nothing more is queued.
                    ErrorCode::ClientTooSlow => Last::Nothing,
                    _ => Last::Error(code, message),
                };
                // A turn not yet sent leaves its connection as it was.
                let reusable = self.phase != Phase::Streaming;
                let mut out = self.stop_leg();
                out.push(self.finish(End::new(Ending::Aborted(code), last, reusable)));
                out
            }
            Input::Tick {
                connection_silent,
                others,
            } => self.tick(now, connection_silent, others),
            Input::NotRescued => match self.pending.take() {
                Some((end, phase)) => {
                    self.phase = phase;
                    smallvec![self.finish(end)]
                }
                None => Effects::new(),
            },
        }
    }

    fn admitted(&mut self) -> Effects {
        if self.phase != Phase::Admitting {
            return Effects::new();
        }
        self.phase = Phase::Leasing;
        smallvec![Effect::Lease]
    }

    fn finish(&mut self, end: End) -> Effect {
        self.pending = None;
        Effect::Finish(end)
    }

    /// Tries `rescue` first; `end` stands when it cannot be done.
    fn rescue(&mut self, rescue: Rescue, end: End) -> Effect {
        self.pending = Some((end, self.phase));
        if !matches!(rescue, Rescue::Replay) {
            // The turn looks for another way upstream.
            self.phase = Phase::Leasing;
        }
        Effect::Rescue(rescue)
    }

    fn unreachable(&mut self, why: Unreachable, message: String, close: bool) -> Effects {
        let code = ErrorCode::UpstreamUnavailable;
        let refused = |last| End {
            close,
            ..End::new(Ending::Rejected(code), last, true)
        };
        let mut out = self.stop_leg();
        out.push(match why {
            Unreachable::NoWebSocket => {
                self.rescue(Rescue::Http, refused(Last::Error(code, message)))
            }
            Unreachable::Timeout | Unreachable::Down => {
                self.rescue(Rescue::OtherAccount, refused(Last::Error(code, message)))
            }
            Unreachable::LegDown => self.rescue(
                Rescue::FailOver("unreachable".into()),
                refused(Last::Error(code, message)),
            ),
            Unreachable::Refused { event } => {
                let code = turn::read_error(&event)
                    .code
                    .unwrap_or_else(|| "http_refused".into());
                self.rescue(Rescue::FailOver(code), refused(Last::Verbatim(event)))
            }
            Unreachable::Final => self.finish(refused(Last::Error(code, message))),
        });
        out
    }

    fn upstream(&mut self, text: &str, now: Instant) -> Effects {
        if self.phase != Phase::Streaming {
            return Effects::new();
        }
        self.last_upstream = now;
        let relayed = Relayed {
            forwarded: self.committed(),
            replayed: self.replayed,
        };
        match turn::step(&mut self.tracker, text, now, relayed) {
            Step::Forward => {
                self.forwarded += 1;
                smallvec![Effect::Forward]
            }
            Step::Steer(kind) => {
                self.forwarded += 1;
                smallvec![Effect::Steer(kind)]
            }
            Step::Invalid => {
                let why =
                    LostReason::Protocol("the upstream sent a frame that is not a JSON event");
                match self.leg {
                    // The leg alone is in an unknown state.
                    Leg::Http => {
                        let mut out = self.stop_leg();
                        out.extend(self.lost(&why));
                        out
                    }
                    Leg::Socket => smallvec![Effect::DropConnection(why)],
                }
            }
            Step::End {
                ending,
                reusable,
                recover,
            } => {
                let mut out = Effects::new();
                if let Ending::UpstreamError(code) = &ending {
                    out.push(Effect::CountError(
                        code.clone().unwrap_or_else(|| "error".into()),
                    ));
                }
                let end = End::new(ending, Last::Upstream, reusable);
                let last = match recover {
                    Some(Recovery::Replay) => self.rescue(Rescue::Replay, end),
                    Some(Recovery::FailOver(code)) => {
                        out.extend(self.stop_leg());
                        self.rescue(Rescue::FailOver(code), end)
                    }
                    None => self.finish(end),
                };
                out.push(last);
                out
            }
        }
    }

    fn lost(&mut self, reason: &LostReason) -> Effects {
        if self.phase != Phase::Streaming {
            return Effects::new();
        }
        let loss = Loss {
            forwarded: self.forwarded + u32::from(self.answered),
            retried: self.retried,
            client_gone: self.drain_deadline.is_some(),
            reason,
        };
        match lifecycle::after_loss(loss) {
            AfterLoss::Retry => {
                self.retried = true;
                self.phase = Phase::Leasing;
                smallvec![Effect::Retry]
            }
            AfterLoss::End(code, message) => smallvec![
                Effect::CountError(code.code().into()),
                self.finish(End::new(
                    Ending::UpstreamLost(code),
                    Last::Error(code, message.into()),
                    false,
                )),
            ],
        }
    }

    fn stop_leg(&self) -> Effects {
        if self.phase == Phase::Streaming && self.leg == Leg::Http {
            smallvec![Effect::StopLeg]
        } else {
            Effects::new()
        }
    }

    fn cancel(&mut self, now: Instant) -> Effects {
        match (self.phase, self.leg) {
            (Phase::Streaming, Leg::Http) => smallvec![
                Effect::StopLeg,
                self.finish(End::new(Ending::Cancelled, Last::Cancelled, true)),
            ],
            (Phase::Streaming, Leg::Socket) => {
                // The upstream ends it with `response.cancelled` (billed as it reports), or
                // the grace ends it here.
                self.cancel_deadline
                    .get_or_insert(now + self.limits.cancel_grace);
                smallvec![Effect::ForwardCancel]
            }
            _ => smallvec![self.finish(End::new(Ending::Cancelled, Last::Cancelled, true))],
        }
    }

    fn preempt(&mut self, message: String) -> Effects {
        let last = Last::Error(ErrorCode::ResponsePreempted, message.clone());
        match (self.phase, self.leg) {
            (Phase::Streaming, Leg::Socket) => {
                self.phase = Phase::Finishing;
                smallvec![Effect::Drain(message)]
            }
            (Phase::Streaming, Leg::Http) => smallvec![
                Effect::StopLeg,
                self.finish(End::new(Ending::Preempted, last, true)),
            ],
            _ => smallvec![self.finish(End::new(Ending::Preempted, last, true))],
        }
    }

    fn client_gone(&mut self, now: Instant) -> Effects {
        if self.phase == Phase::Streaming && self.leg == Leg::Http {
            // Dropping the request stops the upstream; billed from what was seen.
            return smallvec![
                Effect::StopLeg,
                self.finish(End::new(Ending::ClientGone, Last::Nothing, true)),
            ];
        }
        if self.phase == Phase::Streaming && self.limits.drain.is_zero() {
            return smallvec![self.finish(End::new(Ending::ClientGone, Last::Nothing, false))];
        }
        if self.phase == Phase::Streaming {
            // Its usage comes with the terminal: read a while longer, its slots free now.
            self.drain_deadline = Some(now + self.limits.drain);
            return smallvec![Effect::FreeSlots];
        }
        smallvec![self.finish(End::new(Ending::ClientGone, Last::Nothing, true))]
    }

    fn tick(&mut self, now: Instant, connection_silent: Option<Duration>, others: bool) -> Effects {
        if self.phase != Phase::Streaming {
            return Effects::new();
        }
        if self.drain_deadline.is_some_and(|d| now >= d) {
            let mut out = self.stop_leg();
            out.push(self.finish(End::new(Ending::ClientGone, Last::Nothing, false)));
            return out;
        }
        if self.cancel_deadline.is_some_and(|d| now >= d) {
            return smallvec![self.finish(End::new(Ending::Cancelled, Last::Cancelled, false))];
        }
        if self.leg == Leg::Http {
            // Its leg times its own silence (`Lost`).
            return Effects::new();
        }
        let silence = Silence {
            events: self.tracker.events,
            silent: now.duration_since(self.last_upstream),
            connection_silent,
            others,
            first_event_timeout: self.limits.first_event,
            read_timeout: self.limits.read,
        };
        match lifecycle::stall(silence) {
            Stall::No => Effects::new(),
            Stall::Alone => {
                let code = ErrorCode::UpstreamConnectionLost;
                smallvec![
                    Effect::CountError(code.code().into()),
                    self.finish(End::new(
                        Ending::UpstreamLost(code),
                        Last::Error(
                            code,
                            "the upstream stopped answering this response; retry this turn".into(),
                        ),
                        false,
                    )),
                ]
            }
            Stall::Connection(why) => {
                smallvec![Effect::DropConnection(LostReason::Error(why.into()))]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::events::TerminalKind;

    const MS: Duration = Duration::from_millis(1);

    fn limits() -> Limits {
        Limits {
            cancel_grace: 100 * MS,
            drain: 1000 * MS,
            first_event: 5000 * MS,
            read: 2000 * MS,
        }
    }

    /// One step, its effects as a `Vec` (comparable with `vec![…]`).
    fn run(m: &mut TurnMachine, input: Input<'_>, now: Instant) -> Vec<Effect> {
        m.step(input, now).into_vec()
    }

    fn machine(t0: Instant) -> TurnMachine {
        TurnMachine::new(TurnTracker::new(t0), limits(), t0)
    }

    /// A turn admitted and sent over `leg` at `t0`.
    fn sent(t0: Instant, leg: Leg) -> TurnMachine {
        let mut m = machine(t0);
        assert_eq!(run(&mut m, Input::Admitted, t0), vec![Effect::Lease]);
        assert_eq!(m.phase(), Phase::Leasing);
        assert!(
            run(
                &mut m,
                Input::Sent {
                    leg,
                    replayed: false
                },
                t0
            )
            .is_empty()
        );
        assert_eq!(m.phase(), Phase::Streaming);
        m
    }

    const CREATED: &str = r#"{"type":"response.created","response":{"id":"resp_1"}}"#;
    const DELTA: &str = r#"{"type":"response.output_text.delta","delta":"hi"}"#;
    const COMPLETED: &str = r#"{"type":"response.completed","response":{"id":"resp_1","usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}}"#;

    fn error(code: &str, kind: &str, status: u16) -> String {
        format!(
            r#"{{"type":"error","status":{status},"error":{{"type":"{kind}","code":"{code}","message":"m"}}}}"#
        )
    }

    fn finish_of(effects: &[Effect]) -> Option<&End> {
        effects.iter().find_map(|e| match e {
            Effect::Finish(end) => Some(end),
            _ => None,
        })
    }

    #[test]
    fn a_turn_streams_to_its_terminal() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        assert_eq!(
            run(&mut m, Input::Upstream(CREATED), t0 + MS),
            vec![Effect::Forward]
        );
        assert_eq!(
            run(&mut m, Input::Upstream(DELTA), t0 + 2 * MS),
            vec![Effect::Forward]
        );
        let out = run(&mut m, Input::Upstream(COMPLETED), t0 + 3 * MS);
        assert_eq!(
            out,
            vec![Effect::Finish(End::new(
                Ending::Terminal(TerminalKind::Completed),
                Last::Upstream,
                true
            ))]
        );
        assert_eq!(m.tracker.response_id.as_deref(), Some("resp_1"));
        assert!(m.finished());
        assert_eq!(m.phase(), Phase::Finishing);
        // Nothing moves a finished turn.
        assert!(run(&mut m, Input::Upstream(DELTA), t0 + 4 * MS).is_empty());
        assert!(run(&mut m, Input::Cancel, t0 + 4 * MS).is_empty());
    }

    #[test]
    fn a_refused_turn_ends_before_anything_is_sent() {
        let t0 = Instant::now();
        let mut m = machine(t0);
        let out = run(
            &mut m,
            Input::Refused(ErrorCode::QuotaExhausted, "over".into()),
            t0,
        );
        let end = finish_of(&out).unwrap();
        assert_eq!(end.ending, Ending::Rejected(ErrorCode::QuotaExhausted));
        assert_eq!(
            end.last,
            Last::Error(ErrorCode::QuotaExhausted, "over".into())
        );
        assert!(end.reusable);
    }

    #[test]
    fn a_loss_before_any_event_is_retried_once_then_ends() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        let gone = LostReason::Closed(None);
        assert_eq!(run(&mut m, Input::Lost(&gone), t0), vec![Effect::Retry]);
        assert_eq!(m.phase(), Phase::Leasing);
        run(
            &mut m,
            Input::Sent {
                leg: Leg::Socket,
                replayed: false,
            },
            t0,
        );
        let out = run(&mut m, Input::Lost(&gone), t0);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            end.ending,
            Ending::UpstreamLost(ErrorCode::UpstreamConnectionLost)
        );
        assert!(!end.reusable);
        assert!(out.contains(&Effect::CountError("upstream_connection_lost".into())));
    }

    #[test]
    fn a_loss_after_an_event_ends_at_once_with_what_was_seen() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::Upstream(CREATED), t0);
        let restart = LostReason::Closed(Some(crate::protocol::errors::close::RESTART));
        let out = run(&mut m, Input::Lost(&restart), t0);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            end.ending,
            Ending::UpstreamLost(ErrorCode::UpstreamRestarting)
        );
    }

    #[test]
    fn an_answer_begun_is_never_retried_or_rescued() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Http);
        assert!(run(&mut m, Input::Answered, t0).is_empty());
        assert!(m.committed());
        let out = run(&mut m, Input::Lost(&LostReason::Closed(None)), t0);
        assert!(finish_of(&out).is_some(), "{out:?}");
        let mut m = sent(t0, Leg::Http);
        run(&mut m, Input::Answered, t0);
        let e = error("server_error", "server_error", 500);
        let out = run(&mut m, Input::Upstream(&e), t0);
        assert!(
            !out.iter().any(|e| matches!(e, Effect::Rescue(_))),
            "{out:?}"
        );
    }

    #[test]
    fn a_whole_answer_is_its_terminal_or_a_protocol_error() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Http);
        run(&mut m, Input::Answered, t0);
        let body = br#"{"id":"resp_9","status":"incomplete","output":[],"usage":{"input_tokens":1,"output_tokens":0,"total_tokens":1}}"#;
        let out = run(&mut m, Input::Whole(body), t0);
        assert_eq!(
            finish_of(&out).unwrap().ending,
            Ending::Terminal(TerminalKind::Incomplete)
        );
        assert_eq!(m.tracker.response_id.as_deref(), Some("resp_9"));
        let mut m = sent(t0, Leg::Http);
        run(&mut m, Input::Answered, t0);
        let out = run(&mut m, Input::Whole(b"[]"), t0);
        assert_eq!(
            finish_of(&out).unwrap().ending,
            Ending::UpstreamLost(ErrorCode::UpstreamProtocolError)
        );
    }

    #[test]
    fn garbage_drops_a_socket_but_only_loses_an_http_leg() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        let out = run(&mut m, Input::Upstream("not json"), t0);
        assert!(matches!(
            out.as_slice(),
            [Effect::DropConnection(LostReason::Protocol(_))]
        ));
        let mut m = sent(t0, Leg::Http);
        let out = run(&mut m, Input::Upstream("not json"), t0);
        assert_eq!(out[0], Effect::StopLeg);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            end.ending,
            Ending::UpstreamLost(ErrorCode::UpstreamProtocolError)
        );
    }

    #[test]
    fn an_error_before_anything_relayed_is_rescued_or_stands() {
        let t0 = Instant::now();
        // Replay: once; the same phase while tried.
        let mut m = sent(t0, Leg::Socket);
        let e = error("previous_response_not_found", "invalid_request_error", 400);
        let out = run(&mut m, Input::Upstream(&e), t0);
        assert_eq!(out.last(), Some(&Effect::Rescue(Rescue::Replay)));
        assert_eq!(m.phase(), Phase::Streaming);
        run(
            &mut m,
            Input::Sent {
                leg: Leg::Socket,
                replayed: true,
            },
            t0,
        );
        let out = run(&mut m, Input::Upstream(&e), t0);
        assert!(finish_of(&out).is_some(), "never replayed twice: {out:?}");

        // Failover: the turn looks for another account; none → the error stands, from the
        // phase it was in.
        let mut m = sent(t0, Leg::Socket);
        let e = error("rate_limit_exceeded", "rate_limit_error", 429);
        let out = run(&mut m, Input::Upstream(&e), t0);
        assert_eq!(
            out.last(),
            Some(&Effect::Rescue(Rescue::FailOver(
                "rate_limit_exceeded".into()
            )))
        );
        assert_eq!(m.phase(), Phase::Leasing);
        let out = run(&mut m, Input::NotRescued, t0);
        assert_eq!(m.phase(), Phase::Streaming);
        let end = finish_of(&out).unwrap();
        assert_eq!(end.last, Last::Upstream);
        assert_eq!(
            end.ending,
            Ending::UpstreamError(Some("rate_limit_exceeded".into()))
        );

        // After something was relayed, nothing is rescued.
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::Upstream(CREATED), t0);
        let out = run(&mut m, Input::Upstream(&e), t0);
        assert!(finish_of(&out).is_some());
        assert!(!out.iter().any(|e| matches!(e, Effect::Rescue(_))));
    }

    #[test]
    fn an_unreachable_account_is_failed_over_else_refused() {
        let t0 = Instant::now();
        for (why, rescue) in [
            (Unreachable::Timeout, Some(Rescue::OtherAccount)),
            (Unreachable::Down, Some(Rescue::OtherAccount)),
            (Unreachable::NoWebSocket, Some(Rescue::Http)),
            (
                Unreachable::LegDown,
                Some(Rescue::FailOver("unreachable".into())),
            ),
            (Unreachable::Final, None),
        ] {
            let mut m = machine(t0);
            run(&mut m, Input::Admitted, t0);
            let input = Input::Unreachable {
                why: why.clone(),
                message: "none".into(),
                close: true,
            };
            let out = run(&mut m, input, t0);
            let end = match rescue {
                Some(r) => {
                    assert_eq!(out, vec![Effect::Rescue(r)], "{why:?}");
                    run(&mut m, Input::NotRescued, t0)
                }
                None => out,
            };
            let end = finish_of(&end).unwrap();
            assert_eq!(end.ending, Ending::Rejected(ErrorCode::UpstreamUnavailable));
            assert!(end.close && end.reusable, "{why:?}");
        }
        // An HTTP leg's refusal: the upstream's words if no other account takes it.
        let mut m = sent(t0, Leg::Http);
        let event = error("rate_limit_exceeded", "rate_limit_error", 429);
        let out = run(
            &mut m,
            Input::Unreachable {
                why: Unreachable::Refused {
                    event: event.clone(),
                },
                message: String::new(),
                close: false,
            },
            t0,
        );
        assert_eq!(
            out,
            vec![
                Effect::StopLeg,
                Effect::Rescue(Rescue::FailOver("rate_limit_exceeded".into()))
            ]
        );
        let out = run(&mut m, Input::NotRescued, t0);
        assert_eq!(finish_of(&out).unwrap().last, Last::Verbatim(event));
    }

    #[test]
    fn cancel_depends_on_the_phase_and_the_leg() {
        let t0 = Instant::now();
        // Not yet sent: ends at once.
        let mut m = machine(t0);
        let out = run(&mut m, Input::Cancel, t0);
        assert_eq!(finish_of(&out).unwrap().ending, Ending::Cancelled);
        // On a socket: forwarded; the upstream's terminal ends it, else the grace does.
        let mut m = sent(t0, Leg::Socket);
        assert_eq!(run(&mut m, Input::Cancel, t0), vec![Effect::ForwardCancel]);
        let tick = |m: &mut TurnMachine, at| {
            run(
                m,
                Input::Tick {
                    connection_silent: None,
                    others: false,
                },
                at,
            )
        };
        assert!(tick(&mut m, t0 + 99 * MS).is_empty());
        let out = tick(&mut m, t0 + 100 * MS);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            (&end.ending, &end.last),
            (&Ending::Cancelled, &Last::Cancelled)
        );
        assert!(!end.reusable, "the connection's state is unknown");
        // Over HTTP: the leg is dropped, which stops the upstream.
        let mut m = sent(t0, Leg::Http);
        let out = run(&mut m, Input::Cancel, t0);
        assert_eq!(out[0], Effect::StopLeg);
        assert!(finish_of(&out).unwrap().reusable);
    }

    #[test]
    fn preemption_drains_a_socket_turn_and_ends_the_others() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        assert_eq!(
            run(&mut m, Input::Preempt("newer".into()), t0),
            vec![Effect::Drain("newer".into())]
        );
        assert_eq!(m.phase(), Phase::Finishing);
        let mut m = machine(t0);
        run(&mut m, Input::Admitted, t0);
        let out = run(&mut m, Input::Preempt("newer".into()), t0);
        let end = finish_of(&out).unwrap();
        assert_eq!(end.ending, Ending::Preempted);
        assert_eq!(
            end.last,
            Last::Error(ErrorCode::ResponsePreempted, "newer".into())
        );
    }

    #[test]
    fn a_client_gone_mid_stream_is_drained_for_its_usage() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::Upstream(CREATED), t0);
        assert_eq!(run(&mut m, Input::ClientGone, t0), vec![Effect::FreeSlots]);
        // Its terminal still ends it with the usage reported.
        let out = run(&mut m, Input::Upstream(COMPLETED), t0 + MS);
        assert!(matches!(
            finish_of(&out).unwrap().ending,
            Ending::Terminal(_)
        ));
        // No terminal within the drain: it ends, billed from what was seen.
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::ClientGone, t0);
        let quiet = Input::Tick {
            connection_silent: Some(Duration::ZERO),
            others: true,
        };
        let out = run(&mut m, quiet, t0 + 1000 * MS);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            (&end.ending, &end.last),
            (&Ending::ClientGone, &Last::Nothing)
        );
        // A loss after the client left is never retried (nobody waits for it).
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::ClientGone, t0);
        let out = run(&mut m, Input::Lost(&LostReason::Closed(None)), t0);
        assert!(finish_of(&out).is_some(), "{out:?}");
        // Over HTTP the leg is dropped (which stops the upstream) and the turn ends now.
        let mut m = sent(t0, Leg::Http);
        let out = run(&mut m, Input::ClientGone, t0);
        assert_eq!(out[0], Effect::StopLeg);
        assert_eq!(finish_of(&out).unwrap().ending, Ending::ClientGone);
        // Without a drain (an HTTP client's socket), a socket turn ends now, its socket spent.
        let mut m = TurnMachine::new(
            TurnTracker::new(t0),
            Limits {
                drain: Duration::ZERO,
                ..limits()
            },
            t0,
        );
        run(&mut m, Input::Admitted, t0);
        run(
            &mut m,
            Input::Sent {
                leg: Leg::Socket,
                replayed: false,
            },
            t0,
        );
        let out = run(&mut m, Input::ClientGone, t0);
        assert!(!finish_of(&out).unwrap().reusable);
        // Not yet streaming: it ends now, nobody to tell.
        let mut m = machine(t0);
        let out = run(&mut m, Input::ClientGone, t0);
        assert_eq!(finish_of(&out).unwrap().last, Last::Nothing);
    }

    #[test]
    fn silence_ends_a_lane_or_its_connection() {
        let t0 = Instant::now();
        let tick = |m: &mut TurnMachine, at, connection_silent, others| {
            run(
                m,
                Input::Tick {
                    connection_silent,
                    others,
                },
                at,
            )
        };
        // No first event in time, the connection silent too: it goes.
        let mut m = sent(t0, Leg::Socket);
        assert!(tick(&mut m, t0 + 4999 * MS, None, false).is_empty());
        let out = tick(&mut m, t0 + 5000 * MS, None, false);
        assert_eq!(
            out,
            vec![Effect::DropConnection(LostReason::Error(
                "no first event".into()
            ))]
        );
        // Other lanes are answered: this one alone ends, the connection is spent.
        let mut m = sent(t0, Leg::Socket);
        run(&mut m, Input::Upstream(CREATED), t0);
        let out = tick(&mut m, t0 + 2000 * MS, Some(MS), true);
        let end = finish_of(&out).unwrap();
        assert_eq!(
            end.ending,
            Ending::UpstreamLost(ErrorCode::UpstreamConnectionLost)
        );
        assert!(!end.reusable);
        // An HTTP leg times its own silence.
        let mut m = sent(t0, Leg::Http);
        assert!(tick(&mut m, t0 + 60_000 * MS, None, false).is_empty());
    }

    #[test]
    fn a_turn_whose_transport_changes_leases_again() {
        let t0 = Instant::now();
        let mut m = sent(t0, Leg::Socket);
        assert_eq!(run(&mut m, Input::Resend, t0), vec![Effect::Lease]);
        assert_eq!(m.phase(), Phase::Leasing);
        run(
            &mut m,
            Input::Sent {
                leg: Leg::Http,
                replayed: false,
            },
            t0,
        );
        assert_eq!(m.leg(), Leg::Http);
        assert!(!m.on_socket());
    }

    #[test]
    fn aborts_end_every_phase() {
        let t0 = Instant::now();
        for leg in [Leg::Socket, Leg::Http] {
            let mut m = sent(t0, leg);
            let out = run(
                &mut m,
                Input::Abort(ErrorCode::ShuttingDown, "bye".into()),
                t0,
            );
            let end = finish_of(&out).unwrap();
            assert_eq!(end.ending, Ending::Aborted(ErrorCode::ShuttingDown));
            assert_eq!(out.first() == Some(&Effect::StopLeg), leg == Leg::Http);
            let mut m = sent(t0, leg);
            let out = run(
                &mut m,
                Input::Abort(ErrorCode::ClientTooSlow, String::new()),
                t0,
            );
            assert_eq!(finish_of(&out).unwrap().last, Last::Nothing);
        }
    }
}
