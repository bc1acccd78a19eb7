//! A stack with the admin API on, and reading it (shared by the tests that look at the relay
//! through its admin listener).

use super::TestDb;
use super::stack::{Stack, StackOptions};

/// The admin token of these stacks (32 characters or more, as the relay requires).
pub const TOKEN: &str = "admin-secret-token-of-32-characters";

/// A stack with the admin API on (`TOKEN`, a loopback port the relay picks) plus `env`;
/// returns it and the admin address, read from the relay's log (never a port chosen before
/// the relay binds it: another process could take it in between).
pub fn start(
    db: TestDb,
    env: &[(&'static str, &'static str)],
    opts: StackOptions<'static>,
) -> (Stack, String) {
    let mut all: Vec<(&'static str, &'static str)> = vec![
        ("TURNPIKE_ADMIN__TOKEN", TOKEN),
        ("TURNPIKE_ADMIN__BIND", "127.0.0.1:0"),
    ];
    all.extend_from_slice(env);
    let s = Stack::start(
        db,
        StackOptions {
            env: Box::leak(all.into_boxed_slice()),
            ..opts
        },
    );
    let admin = s
        .relay
        .startup_addr("admin API on http://")
        .expect("the relay logs its admin address before it listens");
    (s, admin)
}

/// The Prometheus text of `GET /metrics`.
pub fn scrape(admin: &str) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(admin).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw
}

/// The sum of the samples of the series starting with `name` (labels included in `name`).
pub fn metric(admin: &str, name: &str) -> f64 {
    scrape(admin)
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
