//! Every live session, so that shutdown (and the admin API) can reach them.

use std::collections::HashMap;

use actix::prelude::*;

use super::messages::{Describe, EndSession, EndWhenIdle, SessionInfo};
use crate::protocol::errors::ErrorCode;

#[derive(Default)]
pub struct Registry {
    sessions: HashMap<String, Entry>,
}

struct Entry {
    end: Recipient<EndSession>,
    when_idle: Recipient<EndWhenIdle>,
    describe: Recipient<Describe>,
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Register {
    pub id: String,
    pub session: Recipient<EndSession>,
    pub when_idle: Recipient<EndWhenIdle>,
    pub describe: Recipient<Describe>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unregister {
    pub id: String,
}

/// Ends every session; returns how many were asked.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct EndAll(pub ErrorCode);

/// How many sessions are live.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Count;

impl Handler<Register> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Register, _: &mut Context<Self>) {
        self.sessions.insert(
            msg.id,
            Entry {
                end: msg.session,
                when_idle: msg.when_idle,
                describe: msg.describe,
            },
        );
    }
}

impl Handler<Unregister> for Registry {
    type Result = ();
    fn handle(&mut self, msg: Unregister, _: &mut Context<Self>) {
        self.sessions.remove(&msg.id);
    }
}

impl Handler<EndAll> for Registry {
    type Result = usize;
    fn handle(&mut self, msg: EndAll, _: &mut Context<Self>) -> usize {
        for s in self.sessions.values() {
            s.end.do_send(EndSession(msg.0));
        }
        self.sessions.len()
    }
}

/// Asks every session to close after its turn in flight (`EndWhenIdle`); returns how many.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct EndAllWhenIdle;

impl Handler<EndAllWhenIdle> for Registry {
    type Result = usize;
    fn handle(&mut self, _: EndAllWhenIdle, _: &mut Context<Self>) -> usize {
        for s in self.sessions.values() {
            s.when_idle.do_send(EndWhenIdle);
        }
        self.sessions.len()
    }
}

impl Handler<Count> for Registry {
    type Result = usize;
    fn handle(&mut self, _: Count, _: &mut Context<Self>) -> usize {
        self.sessions.len()
    }
}

/// Ends one session (`DELETE /admin/sessions/{id}`); `false` when there is no such session.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct EndOne {
    pub id: String,
    pub code: ErrorCode,
}

impl Handler<EndOne> for Registry {
    type Result = bool;
    fn handle(&mut self, msg: EndOne, _: &mut Context<Self>) -> bool {
        match self.sessions.get(&msg.id) {
            Some(s) => {
                s.end.do_send(EndSession(msg.code));
                true
            }
            None => false,
        }
    }
}

/// Every live session described (each asked, at most one second).
#[derive(Message)]
#[rtype(result = "Vec<SessionInfo>")]
pub struct ListSessions;

impl Handler<ListSessions> for Registry {
    type Result = ResponseFuture<Vec<SessionInfo>>;
    fn handle(&mut self, _: ListSessions, _: &mut Context<Self>) -> Self::Result {
        let asks: Vec<_> = self
            .sessions
            .values()
            .map(|s| s.describe.send(Describe))
            .collect();
        Box::pin(async move {
            let all = futures_util::future::join_all(asks);
            let answers = tokio::time::timeout(std::time::Duration::from_secs(1), all)
                .await
                .unwrap_or_default();
            let mut out: Vec<SessionInfo> = answers.into_iter().filter_map(Result::ok).collect();
            out.sort_by(|a, b| a.id.cmp(&b.id));
            out
        })
    }
}
