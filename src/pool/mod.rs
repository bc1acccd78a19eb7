//! One `ContextPool` actor per upstream account: capacity, waiters with a lease timeout, idle
//! bounds, eviction of broken connections at once, recycling before `pool.max_age_s`, and no
//! connection ever handed to a second session while one holds it.
//!
//! - `messages`: `Acquire`, `Release`, `PoolStats`, `ShutdownPool`.
//! - `policy`: which idle connection serves a request, which are retired (pure).
//! - `dispatch`: who gets which connection, who is dialled for, what is closed or asked back
//!   (pure, over a view of the pool).
//! - `health`: an account cools down after failed dials (backoff, pure rule).
//! - `placement`: which worker thread a new session runs on (beside its identity's idle
//!   connection), from what the pools publish.
//! - `routing`: which account a turn goes to: priority, weight, stickiness (pure).
//! - `facts`: what relays learnt of accounts' transports, shared through the database.
//! - `actor`: the pool actor.

pub mod actor;
pub mod dispatch;
pub mod facts;
pub mod health;
pub mod messages;
pub mod placement;
pub mod policy;
pub mod routing;

pub use actor::ContextPool;

/// Tests: this thread's id and another's.
#[cfg(test)]
fn two_threads() -> (std::thread::ThreadId, std::thread::ThreadId) {
    let other = std::thread::spawn(|| std::thread::current().id()).join();
    (
        std::thread::current().id(),
        other.unwrap_or_else(|_| panic!("no thread")),
    )
}
