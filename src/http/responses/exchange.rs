//! One HTTP turn, from admission to its durable record (docs/DESIGN.md#http-surface). It runs
//! as a task of its own: the handler only waits for its `Reply`, and a client who leaves (the
//! handler or the SSE body dropped) is noticed here and ends the turn `client_gone`, billed.
//! What happens to the turn is decided by its turn machine (docs/DESIGN.md#turn-machine), as for
//! a WebSocket client's turn; this task carries it out in sequence (`step`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use bytes::Bytes;
use chrono::NaiveDateTime;
use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tracing::{Span, info, warn};

use super::{Kind, Reply};
use crate::auth::Principal;
use crate::db::models::{ApiKey, User};
use crate::http::error::HttpError;
use crate::ids::{SessionId, TurnId};
use crate::pool::health::Failure;
use crate::protocol::errors::ErrorCode;
use crate::protocol::events::EventKind;
use crate::protocol::frames::CreateFrame;
use crate::protocol::sse::SseReader;
use crate::record::Transport;
use crate::session::SessionDeps;
use crate::session::admission::{AccountSlot, KeySlot};
use crate::session::fleet::{SlotKind, Taken};
use crate::session::gate;
use crate::session::machine::{self, Effect, Input, Rescue, TurnMachine, Unreachable};
use crate::session::requests::{InFlight, RequestInfo};
use crate::session::turn::{Ending, TurnTracker};
use crate::upstream::http::{self as upstream, Endpoint, PostError};
use crate::upstream::messages::LostReason;

mod ws_leg;

/// Bytes of an SSE body on their way to the client; the permit is its share of the client's
/// send budget (`limits.client_send_buffer_bytes`), given back when the bytes leave for the
/// socket.
pub(crate) struct Chunk {
    pub bytes: Bytes,
    _budget: Option<OwnedSemaphorePermit>,
}

/// Where the turn's answer goes.
enum Sink {
    /// Nothing answered yet: the handler waits for one reply.
    Waiting(oneshot::Sender<Reply>),
    /// The SSE stream started.
    Streaming {
        tx: mpsc::UnboundedSender<Chunk>,
        budget: Arc<Semaphore>,
        max: usize,
    },
    /// Answered, or the client left.
    Done,
}

/// What the client hears last, once the record is durable.
#[derive(Clone)]
enum Last {
    /// The upstream's JSON answer (its response, or its error with its status).
    Upstream {
        status: StatusCode,
        body: Bytes,
        headers: Vec<(String, String)>,
    },
    /// The upstream's terminal or `error` event, as received (SSE).
    Event(Bytes),
    /// The relay's error: JSON before the stream started, an SSE `error` event after.
    Error(ErrorCode, String),
    /// The client is gone.
    Nothing,
}

/// How the turn ends: the record's ending and the client's last words.
struct End(Ending, Last);

/// A refusal before anything was sent: its code and the client's words.
type Refusal = (ErrorCode, String);

/// What the turn's machine answered, for the exchange's sequence.
enum Next {
    /// Nothing to do but go on.
    Go,
    /// Relay the event.
    Relay,
    /// Send the request again (once: nothing of it was heard).
    Retry,
    /// Try this; `NotRescued` when it cannot be done.
    Rescue(Rescue),
    /// The end, and whether the upstream socket may serve another response.
    End(End, bool),
}

/// Why the turn must stop for a reason of its own.
enum Interrupted {
    ClientGone,
    ShuttingDown,
}

pub(crate) struct Exchange {
    deps: Arc<SessionDeps>,
    principal: Principal,
    frame: CreateFrame,
    kind: Kind,
    headers: Vec<(String, String)>,
    model: String,
    request_id: TurnId,
    session_id: SessionId,
    /// The client's own session id, if it sent one.
    client_session: Option<String>,
    /// Its number in the client's session (1 without one).
    turn_index: i32,
    /// The turn's affinity (docs/DESIGN.md#routing), read at admission.
    affinity: Option<gate::Affinity>,
    accepted_wall: NaiveDateTime,
    /// Its life: phase, tracker (docs/DESIGN.md#turn-machine).
    m: TurnMachine,
    standing: Option<(ApiKey, User)>,
    bound: Option<String>,
    tried: Vec<String>,
    key_slot: Option<KeySlot>,
    account: Option<AccountSlot>,
    in_flight: InFlight,
    /// The upstream response whose last event came, its end still to read.
    rest: Option<awc::ClientResponse>,
    /// The turn ran on a leased upstream WebSocket (docs/DESIGN.md#upstream-transports).
    over_ws: bool,
    span: Span,
}

/// Where a request came from.
pub(crate) struct Origin {
    pub kind: Kind,
    /// The client's headers that pass through to the upstream.
    pub headers: Vec<(String, String)>,
    pub path: String,
    /// The client's session id, if it sent one (else the request is its own session).
    pub session: Option<String>,
}

impl Exchange {
    pub fn new(
        deps: Arc<SessionDeps>,
        principal: Principal,
        frame: CreateFrame,
        origin: Origin,
        accepted: Instant,
    ) -> Result<Self, HttpError> {
        let Origin {
            kind,
            headers,
            path,
            session,
        } = origin;
        let model = frame
            .model
            .clone()
            .ok_or_else(|| HttpError::new(ErrorCode::ModelRequired, "the request needs `model`"))?;
        let request_id = TurnId::random();
        let session_id = session
            .clone()
            .map_or_else(|| SessionId::from(request_id.as_str()), SessionId::from);
        let stream = kind == Kind::Responses && frame.stream;
        let span = crate::turn_span!("http_turn", request_id = %request_id, key = %principal.key_prefix,
            path = %path, stream, account = tracing::field::Empty);
        let in_flight = deps.requests.enter(RequestInfo {
            request_id: request_id.to_string(),
            key_prefix: principal.key_prefix.clone(),
            user: principal.user_name.clone(),
            path,
            model: model.clone(),
            stream,
            account: None,
            started_at: crate::db::now(),
        });
        let up = &deps.settings.upstream;
        let limits = machine::Limits {
            // No cancel message over HTTP.
            cancel_grace: Duration::ZERO,
            // A client that left ends its turn at once (its socket spent, its request dropped).
            drain: Duration::ZERO,
            first_event: Duration::from_millis(up.first_event_timeout_ms),
            read: Duration::from_millis(up.read_timeout_ms),
        };
        let tracker = TurnTracker::new(accepted).prompting(frame.prompt_bytes);
        let turn_index = session.as_deref().map_or(1, |s| deps.requests.turn_of(s));
        Ok(Self {
            m: TurnMachine::new(tracker, limits, accepted),
            deps,
            principal,
            frame,
            kind,
            headers,
            model,
            request_id,
            session_id,
            turn_index,
            client_session: session,
            affinity: None,
            accepted_wall: crate::db::now(),
            standing: None,
            bound: None,
            tried: Vec::new(),
            key_slot: None,
            account: None,
            in_flight,
            rest: None,
            over_ws: false,
            span,
        })
    }

    fn streams(&self) -> bool {
        self.kind == Kind::Responses && self.frame.stream
    }

    /// The turn, start to end: exactly one record, exactly one answer.
    pub async fn run(mut self, reply: oneshot::Sender<Reply>) {
        let mut sink = Sink::Waiting(reply);
        let end = match self.admit().await {
            Err((code, message)) => self.end_with(Input::Refused(code, message), &no_answer),
            Ok(()) => {
                self.step(Input::Admitted, &no_answer);
                self.exchange(&mut sink).await
            }
        };
        self.finish(end, sink).await;
    }

    /// Feeds `input` to the turn's machine (docs/DESIGN.md#turn-machine) and says what the
    /// exchange does next; `answer` renders the upstream's own answer (`Last::Upstream`,
    /// `Last::Verbatim`) should the turn end with it.
    fn step(&mut self, input: Input<'_>, answer: &dyn Fn(&Ending) -> Last) -> Next {
        let mut next = Next::Go;
        for effect in self.m.step(input, Instant::now()) {
            match effect {
                Effect::Forward | Effect::Steer(_) => next = Next::Relay,
                Effect::Retry => next = Next::Retry,
                Effect::Rescue(rescue) => next = Next::Rescue(rescue),
                Effect::CountError(code) => crate::telemetry::upstream_error(&code),
                // Its socket is its own: garbage on it loses the turn.
                Effect::DropConnection(why) => return self.step(Input::Lost(&why), answer),
                Effect::Finish(end) => {
                    let last = match end.last {
                        machine::Last::Upstream | machine::Last::Verbatim(_) => answer(&end.ending),
                        machine::Last::Error(code, message) => Last::Error(code, message),
                        machine::Last::Cancelled | machine::Last::Nothing => Last::Nothing,
                    };
                    return Next::End(End(end.ending, last), end.reusable);
                }
                // The sequence does these itself: it asks for an upstream next, and an answer
                // it stops reading is dropped (which stops the upstream).
                Effect::Lease
                | Effect::StopLeg
                | Effect::ForwardCancel
                | Effect::Drain(_)
                | Effect::FreeSlots => {}
            }
        }
        next
    }

    /// Feeds an `input` that ends the turn; its end.
    fn end_with(&mut self, input: Input<'_>, answer: &dyn Fn(&Ending) -> Last) -> End {
        match self.step(input, answer) {
            Next::End(end, _) => end,
            // Not reached: the exchange stops at the machine's first end.
            _ => End(
                Ending::UpstreamLost(ErrorCode::UpstreamProtocolError),
                Last::Error(
                    ErrorCode::UpstreamProtocolError,
                    "the turn could not go on".into(),
                ),
            ),
        }
    }

    /// Feeds an `input` that ends the turn unless it is tried another way: `Ok` to send the
    /// request again (a retry, or a failover that marks `failure` on the account), else its end.
    fn again(
        &mut self,
        input: Input<'_>,
        failure: &Failure<'_>,
        answer: &dyn Fn(&Ending) -> Last,
    ) -> Result<(), End> {
        match self.step(input, answer) {
            Next::Retry => Ok(()),
            Next::Rescue(Rescue::FailOver(_) | Rescue::OtherAccount) if self.fail_over(failure) => {
                Ok(())
            }
            Next::End(end, _) => Err(end),
            Next::Rescue(_) | Next::Go | Next::Relay => {
                Err(self.end_with(Input::NotRescued, answer))
            }
        }
    }

    /// The end of a turn interrupted for a reason of its own.
    fn interrupt(&mut self, why: Interrupted) -> End {
        let input = match why {
            Interrupted::ClientGone => Input::ClientGone,
            Interrupted::ShuttingDown => {
                Input::Abort(ErrorCode::ShuttingDown, "the relay is shutting down".into())
            }
        };
        self.end_with(input, &no_answer)
    }

    /// Admission (docs/DESIGN.md#turn), as for a WebSocket turn: standing re-read, accounting
    /// and accounts, the stored response's binding, the key's and an account's turn slots,
    /// the reservation.
    async fn admit(&mut self) -> Result<(), Refusal> {
        let deps = self.deps.clone();
        let key = self.principal.key_id;
        let previous = self
            .frame
            .store
            .then(|| self.frame.previous_response_id.clone())
            .flatten();
        let affinity = crate::pool::routing::affinity_key(
            self.frame.prompt_cache_key.as_deref(),
            self.client_session.as_deref(),
        );
        let (standing, binding, affinity) = futures_util::future::join3(
            gate::read_standing(&deps, key),
            gate::read_binding(&deps, previous),
            gate::read_affinity(&deps, key, affinity),
        )
        .await;
        self.affinity = affinity;
        // Unlike a session, a request has no earlier standing to fall back on: a database that
        // does not answer refuses it (a limited key could not be held to its limit).
        let standing = standing.map_err(|_| {
            (
                ErrorCode::AccountingUnavailable,
                gate::ACCOUNTING_UNAVAILABLE.to_string(),
            )
        })?;
        if let Some((code, message)) = gate::standing_refusal(&deps, standing.as_ref())
            .or_else(|| {
                gate::request_refusal(
                    standing.as_ref(),
                    &self.model,
                    self.frame.service_tier.as_deref(),
                )
            })
            .or_else(|| gate::service_refusal(&deps))
        {
            return Err((code, message));
        }
        self.standing = standing;
        self.bound = gate::bound_account(&deps, key, binding, &self.span)
            .map_err(|(code, message)| (code, message.to_string()))?;
        let busy = || {
            (
                ErrorCode::ConcurrencyLimitExceeded,
                "this key has its maximum of turns in flight".to_string(),
            )
        };
        let limit = self.principal.max_concurrent_turns;
        let local = deps.slots.key_turn(key, limit).ok_or_else(busy)?;
        let fleet = match deps.fleet.as_ref().filter(|_| limit.is_some()) {
            None => None,
            Some(fleet) => match fleet.take(key, SlotKind::Turn, limit).await {
                Taken::Full => return Err(busy()),
                Taken::Granted(slot) => slot,
            },
        };
        self.key_slot = Some(KeySlot::new(local, fleet));
        self.take_account()?;
        let ask = gate::ReservationAsk {
            request_id: self.request_id.to_string(),
            model: &self.model,
            service_tier: self.frame.service_tier.as_deref(),
            previous_response_id: self.frame.previous_response_id.as_deref(),
            warmup: self.frame.warmup,
            prompt_bytes: self.frame.prompt_bytes,
            max_output_tokens: self.frame.max_output_tokens,
        };
        if let Some(reservation) = gate::reservation_for(&deps, self.standing.as_ref(), ask) {
            gate::take_reservation(&deps, reservation, self.span.clone())
                .await
                .map_err(|(code, message)| (code, message.to_string()))?;
        }
        Ok(())
    }

    /// A turn slot on the first account that has room (`tried` left out).
    fn take_account(&mut self) -> Result<(), Refusal> {
        let route = gate::Route {
            tried: &self.tried,
            bound: self.bound.as_deref(),
            held: None,
            sticky: self.affinity.as_ref().and_then(|a| a.sticky()),
            seed: self.affinity.as_ref().map_or_else(
                || crate::pool::routing::seed_of(&self.request_id),
                |a| a.seed(),
            ),
        };
        // A cooling or disabled account gets no request until its probe is due (a WebSocket
        // dial is held back by its pool the same way).
        let now = Instant::now();
        let cooling = |name: &str| {
            self.deps
                .accounts
                .iter()
                .any(|a| a.name == name && a.health.cooling(now))
        };
        let candidates: Vec<(String, usize)> = gate::candidates(&self.deps, route)
            .into_iter()
            .filter(|(name, _)| !cooling(name))
            .collect();
        if candidates.is_empty() {
            return Err((
                ErrorCode::UpstreamUnavailable,
                gate::unavailable(&self.deps),
            ));
        }
        let slot = self.deps.slots.account_turn(&candidates).ok_or_else(|| {
            (
                ErrorCode::AccountBusy,
                "every upstream account is at its turn limit".to_string(),
            )
        })?;
        self.in_flight.serving(&slot.account);
        self.span.record("account", slot.account.as_str());
        self.account = Some(slot);
        Ok(())
    }

    fn endpoint(&self) -> Option<Arc<Endpoint>> {
        let name = self.account.as_ref()?.account.as_str();
        let a = self.deps.accounts.iter().find(|a| a.name == name)?;
        Some(a.http.clone())
    }

    /// The account failed the turn before anything was relayed: it cools down, and the turn
    /// moves to the next account that can take it; `false` when none can.
    fn fail_over(&mut self, why: &Failure<'_>) -> bool {
        let Some(failed) = self.account.as_ref().map(|s| s.account.clone()) else {
            return false;
        };
        if let Some(a) = self.deps.accounts.iter().find(|a| a.name == failed) {
            let (wait, first) = a.health.failed(why, Instant::now());
            if first {
                warn!(parent: &self.span, account = %failed, error = why.error, cooling_ms = crate::num::millis(wait),
                    "upstream account refusing requests; they go to other accounts while it cools down");
            }
        }
        self.next_account()
    }

    /// The turn leaves its account (already known to be failing) for the next one that can
    /// take it; `false`, keeping its account, when none can (or the turn is bound to it).
    fn next_account(&mut self) -> bool {
        let Some(held) = self.account.take() else {
            return false;
        };
        let failed = held.account.clone();
        self.tried.push(failed.clone());
        if self.bound.is_some() || self.take_account().is_err() {
            self.account = Some(held);
            return false;
        }
        info!(parent: &self.span, from = %failed, to = ?self.account.as_ref().map(|s| &s.account),
            "failover: the request moves to another account");
        true
    }

    /// Resolves when the turn must end for a reason of its own: the client left (`client_gone`),
    /// or the relay's shutdown grace is over (`shutting_down`).
    fn interrupted<'a>(&self, sink: &'a mut Sink) -> impl Future<Output = Interrupted> + 'a {
        let aborted = self.deps.requests.aborted();
        async move {
            tokio::select! {
                () = sink.closed() => Interrupted::ClientGone,
                () = aborted => Interrupted::ShuttingDown,
            }
        }
    }

    fn recovered(&self) {
        let Some(name) = self.account.as_ref().map(|s| s.account.as_str()) else {
            return;
        };
        if let Some(a) = self.deps.accounts.iter().find(|a| a.name == name)
            && a.health.recovered()
        {
            info!(parent: &self.span, account = name, "upstream account answering again");
        }
    }

    /// The upstream part: the request (with failover while nothing was relayed), then the
    /// answer relayed.
    async fn exchange(&mut self, sink: &mut Sink) -> End {
        if let Some(end) = self.over_websocket(sink).await {
            return end;
        }
        let settings = &self.deps.settings.upstream;
        let first_byte = Duration::from_millis(settings.first_event_timeout_ms);
        let body = Bytes::from(std::mem::take(&mut self.frame.raw));
        let res = loop {
            let Some(endpoint) = self.endpoint() else {
                let refused =
                    Input::Refused(ErrorCode::UpstreamUnavailable, "no upstream account".into());
                return self.end_with(refused, &no_answer);
            };
            let sent_at = Instant::now();
            let sent = Input::Sent {
                leg: machine::Leg::Http,
                replayed: false,
            };
            self.m.step(sent, sent_at);
            let post = upstream::post(
                &endpoint,
                self.kind.upstream_path(),
                &self.headers,
                body.clone(),
                self.streams(),
                first_byte,
            );
            let answer = tokio::select! {
                answer = post => answer,
                why = self.interrupted(sink) => return self.interrupt(why),
            };
            let tried = match answer {
                Err(PostError::Unreachable(why)) => {
                    let input = Input::Unreachable {
                        why: Unreachable::LegDown,
                        message: gate::unavailable(&self.deps),
                        close: false,
                    };
                    let failure = Failure {
                        error: &why,
                        ..Failure::default()
                    };
                    self.again(input, &failure, &no_answer)
                }
                Err(e) => {
                    // Written, not answered: the upstream may bill it.
                    self.m.tracker.clock.written(sent_at);
                    warn!(parent: &self.span, error = %e, "upstream request lost");
                    let lost = LostReason::Error(e.to_string());
                    self.again(Input::Lost(&lost), &Failure::default(), &no_answer)
                }
                Ok(mut res) if !res.status().is_success() => {
                    let status = res.status();
                    let trouble = upstream::account_trouble(status);
                    if !trouble {
                        self.m.tracker.clock.written(sent_at);
                        self.recovered();
                    }
                    let retry_after = header(&res, "retry-after")
                        .as_deref()
                        .and_then(crate::pool::health::retry_after);
                    let (event, answer) = self.error_answer(&mut res).await;
                    let why = format!("the upstream answered HTTP {}", status.as_u16());
                    let failure = Failure {
                        error: &why,
                        retry_after,
                        credential_refused: matches!(status.as_u16(), 401 | 403),
                    };
                    let answer = |_: &Ending| answer.clone();
                    let input = if trouble {
                        // The account's refusal, not the request's: not billed.
                        Input::Unreachable {
                            why: Unreachable::Refused { event },
                            message: String::new(),
                            close: false,
                        }
                    } else {
                        // A request-level error, read as the WebSocket mode's `error` event.
                        Input::Upstream(&event)
                    };
                    self.again(input, &failure, &answer)
                }
                Ok(res) => {
                    self.m.tracker.clock.written(sent_at);
                    self.recovered();
                    self.step(Input::Answered, &no_answer);
                    break res;
                }
            };
            if let Err(end) = tried {
                return end;
            }
        };
        let content_type = upstream::content_type(&res);
        match (
            self.streams(),
            content_type.starts_with("text/event-stream"),
        ) {
            (true, true) => self.relay_stream(res, sink).await,
            (false, _) if content_type.starts_with("application/json") => {
                let mut res = res;
                self.relay_json(&mut res, sink).await
            }
            _ => self.protocol_error(format!(
                "the upstream answered {content_type:?}, neither SSE nor JSON as asked"
            )),
        }
    }

    /// The upstream's answer broke the protocol (`why`, for the client): the turn is lost.
    fn protocol_error(&mut self, why: String) -> End {
        let reason = LostReason::Protocol("the upstream's answer broke the protocol");
        let End(ending, _) = self.end_with(Input::Lost(&reason), &no_answer);
        End(ending, Last::Error(ErrorCode::UpstreamProtocolError, why))
    }

    /// An upstream error answer (any 4xx/5xx): the WebSocket mode's `error` event for the turn
    /// machine, and what the client hears if it ends the turn — the upstream's own status, body
    /// and headers (for 429 and 5xx the status and `Retry-After` tell the client when to come
    /// back), but the relay's words for a refused credential (the client's key is not the one
    /// refused). An account's refusal (401/403/429/5xx) is not billed: nothing was served; a
    /// request-level error is billed like a WebSocket turn the upstream answered with an `error`
    /// event.
    async fn error_answer(&mut self, res: &mut awc::ClientResponse) -> (String, Last) {
        let status = res.status();
        let headers = client_headers(res);
        let limit = Duration::from_millis(self.deps.settings.upstream.read_timeout_ms);
        let body = upstream::read_all(res, 64 * 1024, limit)
            .await
            .unwrap_or_default();
        let event = error_event(status, &body);
        if matches!(status.as_u16(), 401 | 403) {
            let last = Last::Error(
                ErrorCode::UpstreamUnavailable,
                "the upstream refused the relay's credential".into(),
            );
            return (event, last);
        }
        let last = Last::Upstream {
            status,
            body,
            headers,
        };
        (event, last)
    }

    /// A JSON answer: read whole (bounded by `upstream.frame_max_bytes`), billed from its
    /// usage, relayed once its record is durable.
    async fn relay_json(&mut self, res: &mut awc::ClientResponse, sink: &mut Sink) -> End {
        self.m
            .tracker
            .clock
            .event(EventKind::Lifecycle, Instant::now());
        let s = &self.deps.settings.upstream;
        let (max, idle) = (s.frame_max_bytes, Duration::from_millis(s.read_timeout_ms));
        let headers = client_headers(res);
        let body = tokio::select! {
            body = upstream::read_all(res, max, idle) => body,
            why = self.interrupted(sink) => return self.interrupt(why),
        };
        let body = match body {
            Ok(b) => b,
            Err(why) => {
                warn!(parent: &self.span, error = %why, "upstream answer cut short");
                return self.end_with(Input::Lost(&LostReason::Error(why.to_string())), &no_answer);
            }
        };
        let answer = |_: &Ending| Last::Upstream {
            status: StatusCode::OK,
            body: body.clone(),
            headers: headers.clone(),
        };
        self.end_with(Input::Whole(&body), &answer)
    }

    /// An SSE answer: the client's stream starts now; every event is relayed as it arrives,
    /// except the last (the terminal or an `error` event), which waits for the record.
    async fn relay_stream(&mut self, mut res: awc::ClientResponse, sink: &mut Sink) -> End {
        let s = &self.deps.settings;
        let max = s.upstream.frame_max_bytes;
        let first_event = Duration::from_millis(s.upstream.first_event_timeout_ms);
        let idle = Duration::from_millis(s.upstream.read_timeout_ms);
        let stall = Duration::from_millis(s.limits.client_stall_timeout_ms.max(1));
        if !sink.start_stream(s.limits.client_send_buffer_bytes, client_headers(&res)) {
            return self.interrupt(Interrupted::ClientGone);
        }
        let mut reader = SseReader::default();
        loop {
            let wait = self.m.tracker.silence_allowed(first_event, idle);
            let chunk = tokio::select! {
                chunk = upstream::next_chunk(&mut res, wait) => chunk,
                why = self.interrupted(sink) => return self.interrupt(why),
            };
            let lost = match chunk {
                Ok(Some(chunk)) => {
                    reader.push(&chunk);
                    None
                }
                Ok(None) => {
                    Some("the upstream's stream ended before the response finished".to_string())
                }
                Err(why) => {
                    warn!(parent: &self.span, error = %why, "upstream stream lost");
                    Some(why.to_string())
                }
            };
            if let Some(why) = lost {
                return self.end_with(Input::Lost(&LostReason::Error(why)), &no_answer);
            }
            let Ok(events) = reader.scan(max) else {
                return self.protocol_error(format!("an upstream event exceeded {max} bytes"));
            };
            // The events of one read arrived together: one write to the client.
            let mut relay_upto = 0;
            let mut last: Option<(std::ops::Range<usize>, End)> = None;
            for e in &events {
                let data = reader.data(e).trim();
                if !data.is_empty() && data != "[DONE]" {
                    // The event itself is the client's last words; filled in below.
                    let answer = |_: &Ending| Last::Event(Bytes::new());
                    let next = match self.step(Input::Upstream(data), &answer) {
                        // The stream has started: nothing is rescued any more.
                        Next::Rescue(_) => self.step(Input::NotRescued, &answer),
                        next => next,
                    };
                    if let Next::End(end, _) = next {
                        last = Some((e.span.clone(), end));
                        break;
                    }
                }
                relay_upto = e.span.end;
            }
            if relay_upto > 0 {
                match sink.send(reader.take(relay_upto), stall).await {
                    Sent::Yes => {}
                    Sent::Gone => return self.interrupt(Interrupted::ClientGone),
                    Sent::Stalled => {
                        let abort = Input::Abort(ErrorCode::ClientTooSlow, String::new());
                        return self.end_with(abort, &no_answer);
                    }
                }
            }
            let Some((span, End(ending, last))) = last else {
                continue;
            };
            let raw = reader.take(span.end - span.start);
            if matches!(ending, Ending::Terminal(_)) {
                self.rest = Some(res);
            }
            return match last {
                Last::Event(_) => End(ending, Last::Event(raw)),
                other => End(ending, other),
            };
        }
    }

    /// The end: the record goes to accounting, and only once it is durable does the client
    /// hear the last words (a record not durable in time: `accounting_unavailable` instead —
    /// never a 200 or a terminal without one). Refusals that bill nothing do not wait.
    async fn finish(mut self, End(ending, last): End, sink: Sink) {
        let wait = !matches!(ending, Ending::Rejected(_));
        let account = self
            .account
            .as_ref()
            .map(|s| s.account.clone())
            .or_else(|| self.tried.last().cloned())
            .unwrap_or_default();
        // Slots are free as soon as the turn is over; the client hears the end once the
        // fleet's count has the key's slot back.
        let released = KeySlot::release(self.key_slot.take());
        self.account = None;
        let outcome = self.m.tracker.finish(ending, Instant::now());
        let who = gate::TurnIdentity {
            request_id: &self.request_id,
            session_id: &self.session_id,
            turn_index: self.turn_index,
            model: &self.model,
            warmup: self.frame.warmup,
            accepted_at: self.accepted_wall,
            origin: match self.kind {
                Kind::Responses if !self.frame.compaction => crate::record::Origin::Create,
                Kind::Responses | Kind::Compact => crate::record::Origin::Compaction,
            },
            service_tier: self.frame.service_tier.as_deref(),
            transport: Transport::Http,
            upstream_transport: if self.over_ws {
                Transport::Ws
            } else {
                Transport::Http
            },
            span: &self.span,
        };
        let record = gate::record_of(&self.deps, &self.principal, who, outcome, account);
        let remembered = gate::turn_ended(
            &self.deps,
            self.affinity.as_ref(),
            &record,
            self.m.tracker.usage_malformed,
            &self.span,
        );
        let bind = gate::bind_stored(&self.deps, &record, self.frame.store, self.span.clone());
        let durable = gate::make_durable(&self.deps, record, wait, self.standing.as_ref());
        let after = async move { futures_util::future::join(released, remembered).await.0 };
        let (durable, (), (), ()) =
            futures_util::future::join4(durable, bind, read_rest(self.rest.take()), after).await;
        let last = if durable {
            last
        } else {
            warn!(parent: &self.span, "turn record not durable in time: accounting_unavailable instead of the answer");
            Last::Error(
                ErrorCode::AccountingUnavailable,
                gate::ACCOUNTING_UNAVAILABLE.into(),
            )
        };
        sink.deliver(last);
    }
}

/// The end of a body whose answer is complete (the upstream's last chunk), read while the
/// record is made durable: a connection read to its end goes back to the keep-alive pool, one
/// dropped before is closed. Bounded, so a lingering upstream delays nobody.
async fn read_rest(res: Option<awc::ClientResponse>) {
    const REST: Duration = Duration::from_millis(250);
    let Some(mut res) = res else {
        return;
    };
    let _ = tokio::time::timeout(REST, upstream::read_all(&mut res, 64 * 1024, REST)).await;
}

/// No upstream answer to render: the turn's end is the relay's words.
fn no_answer(_: &Ending) -> Last {
    Last::Nothing
}

/// An HTTP error answer as the WebSocket mode's `error` event (`status` and the body's
/// `error`), the form the turn machine reads.
fn error_event(status: StatusCode, body: &[u8]) -> String {
    let error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .unwrap_or_default();
    serde_json::json!({"type": "error", "status": status.as_u16(), "error": error}).to_string()
}

/// The upstream's response headers that reach the client (docs/DESIGN.md#headers).
fn client_headers(res: &awc::ClientResponse) -> Vec<(String, String)> {
    let all = res
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_bytes()));
    crate::protocol::headers::filtered(all, crate::protocol::headers::response_passes)
}

fn header(res: &awc::ClientResponse, name: &str) -> Option<String> {
    res.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Whether a chunk went to the client.
enum Sent {
    Yes,
    Gone,
    /// The client read nothing while its send budget stayed full for the stall timeout.
    Stalled,
}

impl Sink {
    /// Resolves when the client has gone (never while it is there).
    async fn closed(&mut self) {
        match self {
            Sink::Waiting(tx) => tx.closed().await,
            Sink::Streaming { tx, .. } => tx.closed().await,
            Sink::Done => std::future::pending().await,
        }
    }

    /// Answers the handler with the SSE stream and the upstream's `headers` that pass;
    /// `false` if the client has gone.
    fn start_stream(&mut self, budget: usize, headers: Vec<(String, String)>) -> bool {
        let Sink::Waiting(reply) = std::mem::replace(self, Sink::Done) else {
            return false;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        if reply.send(Reply::Stream(rx, headers)).is_err() {
            return false;
        }
        let max = budget.clamp(1, Semaphore::MAX_PERMITS);
        *self = Sink::Streaming {
            tx,
            budget: Arc::new(Semaphore::new(max)),
            max,
        };
        true
    }

    /// Queues bytes for the client once its send budget has room for them.
    async fn send(&mut self, bytes: Bytes, stall: Duration) -> Sent {
        let Sink::Streaming { tx, budget, max } = self else {
            return Sent::Gone;
        };
        let want = u32::try_from(bytes.len().min(*max)).unwrap_or(u32::MAX);
        let permit = tokio::select! {
            p = tokio::time::timeout(stall, budget.clone().acquire_many_owned(want)) => p,
            () = tx.closed() => return Sent::Gone,
        };
        let Ok(Ok(permit)) = permit else {
            return Sent::Stalled;
        };
        match tx.send(Chunk {
            bytes,
            _budget: Some(permit),
        }) {
            Ok(()) => Sent::Yes,
            Err(_) => Sent::Gone,
        }
    }

    /// The client's last words, in the form its answer has taken.
    fn deliver(self, last: Last) {
        match (self, last) {
            (_, Last::Nothing) | (Sink::Done, _) => {}
            (
                Sink::Waiting(reply),
                Last::Upstream {
                    status,
                    body,
                    headers,
                },
            ) => {
                let _ = reply.send(Reply::Upstream {
                    status,
                    body,
                    headers,
                });
            }
            (Sink::Waiting(reply), Last::Error(code, message)) => {
                let _ = reply.send(Reply::Error(HttpError::new(code, message)));
            }
            (Sink::Waiting(reply), Last::Event(bytes)) => {
                // Not reached (events come after the stream started); answered all the same.
                let _ = reply.send(Reply::Upstream {
                    status: StatusCode::OK,
                    body: bytes,
                    headers: Vec::new(),
                });
            }
            (Sink::Streaming { tx, .. }, Last::Event(bytes)) => {
                let _ = tx.send(Chunk {
                    bytes,
                    _budget: None,
                });
            }
            (Sink::Streaming { tx, .. }, Last::Error(code, message)) => {
                let _ = tx.send(Chunk {
                    bytes: crate::protocol::sse::error_event(&code.sse_data(&message)),
                    _budget: None,
                });
            }
            (Sink::Streaming { tx, .. }, Last::Upstream { body, .. }) => {
                let _ = tx.send(Chunk {
                    bytes: body,
                    _budget: None,
                });
            }
        }
    }
}
