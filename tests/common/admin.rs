//! A stack with the admin API on, and reading it (shared by the tests that look at the relay
//! through its admin listener).

use std::time::{Duration, Instant};

use super::TestDb;
use super::stack::{Stack, StackOptions};

/// The admin token of these stacks (32 characters or more, as the relay requires).
pub const TOKEN: &str = "admin-secret-token-of-32-characters";

/// A free loopback address.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// A stack with the admin API on (`TOKEN`, a free address) plus `env`; returns it and the
/// admin address, once the admin listener answers.
pub fn start(
    db: TestDb,
    env: &[(&'static str, &'static str)],
    opts: StackOptions<'static>,
) -> (Stack, String) {
    let admin = free_addr();
    let mut all: Vec<(&'static str, &'static str)> = vec![
        ("TURNPIKE_ADMIN__TOKEN", TOKEN),
        (
            "TURNPIKE_ADMIN__BIND",
            Box::leak(admin.clone().into_boxed_str()),
        ),
    ];
    all.extend_from_slice(env);
    let s = Stack::start(
        db,
        StackOptions {
            env: Box::leak(all.into_boxed_slice()),
            ..opts
        },
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(&admin).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
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
