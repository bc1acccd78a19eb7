//! Every live session, so that shutdown (and the admin API) can reach them.

use std::collections::HashMap;

use actix::prelude::*;

use super::messages::{EndSession, EndWhenIdle};
use crate::protocol::errors::ErrorCode;

#[derive(Default)]
pub struct Registry {
    sessions: HashMap<String, (Recipient<EndSession>, Recipient<EndWhenIdle>)>,
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
        self.sessions.insert(msg.id, (msg.session, msg.when_idle));
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
        for (s, _) in self.sessions.values() {
            s.do_send(EndSession(msg.0));
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
        for (_, s) in self.sessions.values() {
            s.do_send(EndWhenIdle);
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
