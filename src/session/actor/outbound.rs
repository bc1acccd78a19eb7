//! Writing to the client: every frame counts against the send buffer (docs/DESIGN.md#slow-clients), refusals
//! and closes.

use super::*;

impl SessionActor {
    /// Queues a frame for the client. Every byte counts against
    /// `limits.client_send_buffer_bytes`, the relay's own error events included (docs/DESIGN.md#slow-clients).
    /// The largest frame not yet shown read is allowed on top of the limit, so a client that
    /// reads is never cut off because one event is large; a client that does not read is cut
    /// off before this frame is queued once the rest of what it left unread is over the limit —
    /// what one connection holds queued never exceeds the limit plus its largest frame.
    pub(super) fn send(&mut self, text: impl Into<ByteString>, ctx: &mut Context<Self>) {
        if self.client.gone {
            return;
        }
        let text: ByteString = text.into();
        if self.client.cut_off {
            // Only the cut-off's own last frame, right before the close.
            return self.out(Outbound::Text(text));
        }
        if self.client.acked_bytes >= self.client.largest_unread.1 {
            self.client.largest_unread = (0, 0);
        }
        let unread = self
            .client
            .sent_bytes
            .saturating_sub(self.client.acked_bytes);
        let beyond_largest = unread.saturating_sub(self.client.largest_unread.0);
        if crate::num::len(beyond_largest) > self.deps.settings.limits.client_send_buffer_bytes {
            return self.too_slow(unread, ctx);
        }
        let len = crate::num::count(text.len());
        self.client.sent_bytes += len;
        if len >= self.client.largest_unread.0 {
            self.client.largest_unread = (len, self.client.sent_bytes);
        }
        self.out(Outbound::Text(text));
        if self.client.sent_bytes - self.client.pinged_at >= PING_EVERY_BYTES {
            // The pong comes back only after the client has read everything before the ping.
            self.client.pinged_at = self.client.sent_bytes;
            self.out(Outbound::Ping(actix_web::web::Bytes::copy_from_slice(
                &self.client.sent_bytes.to_be_bytes(),
            )));
        }
    }

    /// The client does not read: `client_too_slow`, close 1008 (a turn in flight ends first).
    pub(super) fn too_slow(&mut self, unread: u64, ctx: &mut Context<Self>) {
        self.client.cut_off = true;
        warn!(parent: &self.span, unread, "client not reading: cut off (client_too_slow)");
        let e = Self::error_event(
            ErrorCode::ClientTooSlow,
            "the client is not reading its events",
        );
        if self.turns.is_empty() {
            self.out(Outbound::Text(e.into()));
            return self.close(close::POLICY, "client_too_slow", ctx);
        }
        // Every turn in flight ends; the error is the last frame, then the close.
        self.close_when_idle = Some((close::POLICY, "client_too_slow"));
        let mut last = Some(e);
        for index in self.running() {
            self.finish(
                index,
                Ending::Aborted(ErrorCode::ClientTooSlow),
                Delivery::spent(last.take()),
                ctx,
            );
        }
        if let Some(e) = last {
            // Only turns already finishing: the error goes out before their close.
            self.out(Outbound::Text(e.into()));
        }
    }

    /// Turns in flight that have not ended yet.
    pub(super) fn running(&self) -> Vec<i32> {
        self.turns
            .iter()
            .filter(|t| t.m.phase() != Phase::Finishing)
            .map(|t| t.index)
            .collect()
    }

    pub(super) fn error_event(code: ErrorCode, message: &str) -> String {
        code.ws_event(message).to_string()
    }

    /// The error event answering one `response.create` (tagged with its lane).
    pub(super) fn frame_error(frame: &CreateFrame, code: ErrorCode, message: &str) -> String {
        code.ws_event_on(message, frame.stream_id.as_deref())
            .to_string()
    }

    /// The error event of turn `index` (tagged with its lane).
    pub(super) fn turn_error(&self, index: i32, code: ErrorCode, message: &str) -> String {
        match self.at(index) {
            Some(t) => Self::frame_error(&t.frame, code, message),
            None => Self::error_event(code, message),
        }
    }

    /// Answers every create still waiting with `code` (they will not run).
    pub(super) fn answer_waiting(&mut self, code: ErrorCode, ctx: &mut Context<Self>) {
        let message = "the session is closing before this response.create could start";
        for frame in self.lanes.take_all() {
            let e = Self::frame_error(&frame, code, message);
            self.send(e, ctx);
        }
    }

    pub(super) fn close(&mut self, code: u16, reason: &str, ctx: &mut Context<Self>) {
        let answer = match code {
            close::GOING_AWAY => ErrorCode::ShuttingDown,
            _ => ErrorCode::SessionEnded,
        };
        self.answer_waiting(answer, ctx);
        self.out(Outbound::Close(code, reason.to_string()));
        ctx.stop();
    }

    /// A refusal that is not a turn: the error event, then the close its table row says.
    pub(super) fn protocol_error(
        &mut self,
        code: ErrorCode,
        message: &str,
        ctx: &mut Context<Self>,
    ) {
        self.refuse_frame(code, message, code.spec().close, ctx)
    }

    /// The error event of `code`, then close with `close` (after ending a turn in flight).
    pub(super) fn refuse_frame(
        &mut self,
        code: ErrorCode,
        message: &str,
        close: Option<u16>,
        ctx: &mut Context<Self>,
    ) {
        let event = Self::error_event(code, message);
        match close {
            Some(close) if !self.turns.is_empty() => {
                // The turns in flight end first, the last frame of the first being this error.
                self.close_when_idle = Some((close, code.code()));
                let mut last = Some(event);
                for index in self.running() {
                    self.finish(
                        index,
                        Ending::Aborted(code),
                        Delivery::spent(last.take()),
                        ctx,
                    );
                }
                if let Some(event) = last {
                    self.send(event, ctx);
                }
            }
            Some(close) => {
                self.send(event, ctx);
                self.close(close, code.code(), ctx);
            }
            None => self.send(event, ctx),
        }
    }
}
