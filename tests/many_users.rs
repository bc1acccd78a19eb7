//! A gateway for many users, and a few hostile ones (docs/DESIGN.md#handshake, §4.4b, §4.5): a thousand
//! sessions holding their upstream sockets, a client that never reads while it sends, one very
//! large event to a client that reads, an upstream restarting behind pooled connections.

mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::stack::{Stack, StackOptions, wait_log};
use common::ws::{Client, Recv};
use common::{TestDb, http_get};
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(60);

/// The tests of this file load the machine (thousands of sockets and threads): one at a time.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(|p| p.into_inner())
}

/// A relay (SQLite) for `n` sessions of one key, each able to hold an upstream socket.
fn crowd(n: usize, env: &[(&'static str, &'static str)]) -> Stack {
    turnpike::app::raise_fd_limit();
    let mut all = vec![
        ("TURNPIKE_LIMITS__DEFAULT_MAX_SESSIONS_PER_KEY", "2000"),
        ("TURNPIKE_LOG__LEVEL", "warn,turnpike=info"),
    ];
    all.extend_from_slice(env);
    Stack::start(
        TestDb::sqlite(),
        StackOptions {
            max_conns: n + 50,
            env: &all,
            ..StackOptions::default()
        },
    )
}

fn create(directive: &str) -> Value {
    json!({"type": "response.create", "model": "gpt-test", "store": false,
        "input": "hello", "metadata": {"sim": directive}})
}

fn last_type(events: &[Value]) -> String {
    events
        .last()
        .map(|e| e["type"].as_str().unwrap_or("").to_string())
        .unwrap_or_default()
}

/// Codex sends a `session-id` per conversation, so every session has an upstream identity of its
/// own and no dial can serve another. 600 such sessions arrive at once, with the default lease
/// timeout (5 s): every first turn gets its own socket — one dial each, none for a waiter
/// already covered, none retired before its waiter got it (the pool once dialled for the head
/// of the queue again and again, and scanned every connection for every waiter: 957 of 1,000
/// such sessions got `upstream_unavailable` in the benchmark).
#[test]
fn sessions_of_distinct_identities_each_get_one_dial() {
    let _serial = one_at_a_time();
    const N: usize = 600;
    // No idle connection kept: a dial that finished during the burst is idle until the dispatch
    // lends it, and must not be retired meanwhile (it was, once a second, and dialled again).
    let s = crowd(N, &[("TURNPIKE_POOL__MAX_IDLE", "0")]);
    let barrier = Arc::new(Barrier::new(N));
    let handles: Vec<_> = (0..N)
        .map(|n| {
            let (addr, key, barrier) = (s.addr.clone(), s.key.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let auth = format!("Bearer {key}");
                    let sid = format!("conversation-{n}");
                    let mut c = Client::connect(
                        &addr,
                        "/v1/responses",
                        &[("authorization", &auth), ("session-id", &sid)],
                    )
                    .expect("connect");
                    barrier.wait();
                    c.send(&create(""));
                    let events = c.until_terminal(T);
                    let last = events.last().cloned().unwrap_or_default();
                    (last_type(&events), last["error"]["code"].clone())
                })
                .unwrap()
        })
        .collect();
    let outcomes: Vec<(String, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let failed: Vec<&(String, Value)> = outcomes
        .iter()
        .filter(|(t, _)| t != "response.completed")
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {N} turns did not complete, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let stats = s.sim_stats();
    assert_eq!(
        stats["accepted"],
        N as u64,
        "one dial per session: {stats}; what the relay logged: {:?}",
        s.dial_notes()
    );
    assert_eq!(s.rows(N).len(), N);
    s.finish();
}

/// 1,000 sessions (ten times awc's old default connector limit) each run a turn, all hold their
/// session and upstream socket at once, then each runs a second turn on the same socket.
#[test]
fn a_thousand_sessions_hold_their_upstream_sockets_across_two_turns() {
    let _serial = one_at_a_time();
    const N: usize = 1_000;
    let s = crowd(N, &[("TURNPIKE_POOL__LEASE_TIMEOUT_MS", "30000")]);
    let barrier = Arc::new(Barrier::new(N + 1));
    let handles: Vec<_> = (0..N)
        .map(|_| {
            let (addr, key, barrier) = (s.addr.clone(), s.key.clone(), barrier.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut outcomes = Vec::new();
                    let mut c = Client::bearer(&addr, &key);
                    let turn = |c: &mut Client| {
                        if let Err(e) =
                            c.ws.send(tungstenite::Message::text(create("").to_string()))
                        {
                            return format!("send: {e}");
                        }
                        loop {
                            match c.recv(T) {
                                Recv::Json(e) if common::ws::is_terminal(&e) => {
                                    return e["type"].as_str().unwrap_or("").to_string();
                                }
                                Recv::Json(_) | Recv::Ping | Recv::Pong => {}
                                other => return format!("{other:?}"),
                            }
                        }
                    };
                    outcomes.push(turn(&mut c));
                    barrier.wait();
                    // Everyone holds a session and an upstream socket now; the test looks.
                    barrier.wait();
                    outcomes.push(turn(&mut c));
                    outcomes
                })
                .unwrap()
        })
        .collect();
    barrier.wait();
    let held = s.sim_stats();
    barrier.wait();
    let outcomes: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let odd: Vec<&String> = outcomes
        .iter()
        .filter(|o| *o != "response.completed")
        .take(5)
        .collect();
    eprintln!("outcomes other than completed: {odd:?}");
    let done = outcomes
        .iter()
        .filter(|o| *o == "response.completed")
        .count();
    assert_eq!(done, 2 * N, "{:?}", s.problems());
    // Every session holds its socket; besides them at most one spare per worker thread, dialled
    // when the burst's last sessions were lent another thread's connection
    // (docs/DESIGN.md#leases, threads).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()) as u64;
    let open = held["open"].as_u64().unwrap_or(0);
    assert!(
        (N as u64..=N as u64 + workers).contains(&open),
        "every session held its upstream socket: {held}"
    );
    let after = s.sim_stats();
    let accepted = after["accepted"].as_u64().unwrap_or(0);
    assert!(
        (N as u64..=N as u64 + workers).contains(&accepted),
        "second turns reused their sockets (no redial): before the second turns {held}, after {after}; what the relay logged: {:?}",
        s.dial_notes()
    );
    assert_eq!(s.rows(2 * N).len(), 2 * N);
    s.finish();
}

/// With one worker thread every session shares its thread with its upstream connection, so it
/// reads each lease's frames from the socket itself (docs/DESIGN.md#direct-reads) — also on a
/// connection lent again, where the grant can reach the session before the connection has
/// learnt of the lease: the session then attaches at the first frame relayed to it as a message
/// (it once stayed on messages for the whole turn). Three waves of sessions arriving at once,
/// the later ones on the connections of the earlier.
#[test]
fn sessions_read_every_lease_directly_on_their_connections_thread() {
    let _serial = one_at_a_time();
    const N: usize = 60;
    const WAVES: usize = 3;
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[
            ("TURNPIKE_SERVER__WORKERS", "1"),
            ("TURNPIKE_POOL__MAX_IDLE", "500"),
            ("TURNPIKE_LIMITS__DEFAULT_MAX_SESSIONS_PER_KEY", "500"),
            ("TURNPIKE_LOG__LEVEL", "warn,turnpike=info"),
        ],
        StackOptions {
            max_conns: N + 10,
            ..StackOptions::default()
        },
    );
    for _ in 0..WAVES {
        let barrier = Arc::new(Barrier::new(N));
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (addr, key, barrier) = (s.addr.clone(), s.key.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let mut c = Client::bearer(&addr, &key);
                    barrier.wait();
                    c.send(&create("deltas=40"));
                    let events = c.until_terminal(T);
                    (last_type(&events), events.len())
                })
            })
            .collect();
        for h in handles {
            let (last, n) = h.join().unwrap();
            assert_eq!(
                (last.as_str(), n),
                ("response.completed", 48),
                "40 deltas and 8 others"
            );
        }
    }
    let reads = |how: &str| {
        common::admin::metric(
            &admin,
            &format!("turnpike_upstream_lease_reads_total{{account=\"sim\",reads=\"{how}\"}}"),
        )
    };
    let pools = common::http(&admin, "GET", "/admin/pools", Some(common::admin::TOKEN)).1;
    assert_eq!(
        (reads("direct"), reads("relayed")),
        ((N * WAVES) as f64, 0.0),
        "every lease read by its session; pools: {pools}"
    );
    assert_eq!(s.rows(N * WAVES).len(), N * WAVES);
    s.finish();
}

/// docs/DESIGN.md#placement: a client that reconnects with its `session-id` (a pool identity)
/// is accepted by either worker in turn; its session starts on the worker holding the idle
/// connection its last session used (its first frame, sent with the handshake, goes with the
/// socket), so every lease is read directly and no second connection is dialled. Without
/// placement, every session accepted by the other worker borrowed the connection across threads
/// (`relayed`) and a spare was dialled on its own.
#[test]
fn a_reconnecting_client_runs_beside_its_idle_connection() {
    let _serial = one_at_a_time();
    const N: usize = 8;
    let (s, admin) = common::admin::start(
        TestDb::sqlite(),
        &[
            ("TURNPIKE_SERVER__WORKERS", "2"),
            ("TURNPIKE_LOG__LEVEL", "warn,turnpike=info"),
        ],
        StackOptions::default(),
    );
    let pool = || {
        let (_, body) = common::http(&admin, "GET", "/admin/pools", Some(common::admin::TOKEN));
        body["pools"][0].clone()
    };
    let auth = format!("Bearer {}", s.key);
    for _ in 0..N {
        // The first frame comes with the handshake: a moved session gets those bytes too.
        let headers = [
            ("authorization", auth.as_str()),
            ("session-id", "returning"),
        ];
        let mut c = Client::with_first_frame(&s.addr, &headers, &create("deltas=5").to_string());
        let events = c.until_terminal(T);
        assert_eq!(last_type(&events), "response.completed");
        drop(c);
        // The next client comes once the connection is idle again (its session gave it back).
        let deadline = Instant::now() + T;
        while pool()["idle"] != 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool()["idle"], 1, "{}", pool());
    }
    let metric = |name: &str| common::admin::metric(&admin, name);
    let reads = |how: &str| {
        metric(&format!(
            "turnpike_upstream_lease_reads_total{{account=\"sim\",reads=\"{how}\"}}"
        ))
    };
    assert_eq!(
        (reads("direct"), reads("relayed")),
        (N as f64, 0.0),
        "every lease read by its session; pool: {}",
        pool()
    );
    assert_eq!(
        pool()["dialled_total"],
        1,
        "one connection for the one identity"
    );
    assert!(
        metric("turnpike_sessions_moved_total") >= 1.0,
        "the accepting workers alternate: some sessions moved"
    );
    assert_eq!(s.rows(N).len(), N);
    s.finish();
}

/// A client that never reads while it sends frames in a loop (each answered by an error event)
/// is cut off before its queue exceeds the limit plus one frame; the relay logs how much was
/// unread; the session's resources go.
#[test]
fn a_client_that_never_reads_is_cut_off() {
    let _serial = one_at_a_time();
    const LIMIT: usize = 64 * 1024;
    let limit = LIMIT.to_string();
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_LIMITS__CLIENT_SEND_BUFFER_BYTES", &limit),
                ("TURNPIKE_LIMITS__CLIENT_STALL_TIMEOUT_MS", "1500"),
            ],
            ..StackOptions::default()
        },
    );
    let mut c = s.client();
    // Never reading: every cancel is answered with `no_active_response`.
    let mut sent = 0;
    let t0 = Instant::now();
    while sent < 20_000 && t0.elapsed() < Duration::from_secs(20) {
        let frame = tungstenite::Message::text(r#"{"type":"response.cancel"}"#);
        if c.ws.send(frame).is_err() {
            break;
        }
        sent += 1;
    }
    let mut log = Vec::new();
    assert!(
        wait_log(
            &s.relay,
            "cut off (client_too_slow)",
            Duration::from_secs(10),
            &mut log
        ),
        "sent {sent}: {log:?}"
    );
    let line = log.iter().find(|l| l.contains("client_too_slow")).unwrap();
    let unread: usize = line
        .split("unread=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("unread in the log line");
    let largest = 200; // the frames are error events of ~150 bytes
    assert!(
        unread > LIMIT && unread <= LIMIT + largest,
        "queue bounded by the limit plus its largest frame: {unread}"
    );
    // The session ended; reading now shows its last words: client_too_slow, close 1008.
    let mut saw = false;
    loop {
        match c.recv(Duration::from_secs(10)) {
            Recv::Json(e) if e["error"]["code"] == "client_too_slow" => saw = true,
            Recv::Json(_) | Recv::Ping | Recv::Pong => {}
            Recv::Close(code) => {
                assert_eq!(code, 1008);
                break;
            }
            // The kernel may have aborted it already (TCP_USER_TIMEOUT).
            Recv::Gone(_) => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(saw || wait_log(&s.relay, "session closed", Duration::from_secs(5), &mut log));
    assert_eq!(http_get(&s.addr, "/healthz").0, 200);
    s.finish();
}

/// One event of 8.4 MB — more than `limits.client_send_buffer_bytes` (8 MiB), under the frame
/// limit — reaches a client that reads; the turn completes.
#[test]
fn one_large_event_reaches_a_reading_client() {
    let _serial = one_at_a_time();
    let s = Stack::start(TestDb::sqlite(), StackOptions::default());
    let mut c = s.client();
    c.send(&create("oversize=8400000 after=3"));
    let events = c.until_terminal(T);
    assert_eq!(
        last_type(&events),
        "response.completed",
        "{:?}",
        events
            .last()
            .map(|e| e.to_string().chars().take(300).collect::<String>())
    );
    let big = events
        .iter()
        .map(|e| e.to_string().len())
        .max()
        .unwrap_or(0);
    assert!(big > 8_388_608, "the large event arrived whole: {big}");
    s.finish();
}

/// An upstream rolling restart: the old process keeps its open sockets silent while a new one
/// takes the address. A turn on a pooled connection completes within seconds, whether the
/// connection was idle long enough to be probed (ping, no pong) or not (no first event).
#[test]
fn upstream_rolling_restart_costs_seconds() {
    let _serial = one_at_a_time();
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            upstream_proxy: true,
            env: &[
                ("TURNPIKE_UPSTREAM__FIRST_EVENT_TIMEOUT_MS", "1500"),
                ("TURNPIKE_UPSTREAM__PROBE_IDLE_MS", "600"),
                ("TURNPIKE_UPSTREAM__PROBE_TIMEOUT_MS", "500"),
            ],
            ..StackOptions::default()
        },
    );
    let proxy = s.upstream_proxy.as_ref().unwrap();
    let mut quick = s.client();
    let mut idle = s.client();
    for c in [&mut quick, &mut idle] {
        c.send(&create(""));
        assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    }
    // The new upstream process; the old one's sockets go mute.
    let (_new_sim, new_addr) = common::start_sim(&[]);
    proxy.retarget(&new_addr);
    // At once (no probe: heard from recently): the first-event deadline moves the turn.
    let t0 = Instant::now();
    quick.send(&create(""));
    assert_eq!(last_type(&quick.until_terminal(T)), "response.completed");
    let took_quick = t0.elapsed();
    // After a pause: the liveness probe finds the connection dead before the request goes.
    std::thread::sleep(Duration::from_millis(800));
    let t0 = Instant::now();
    idle.send(&create(""));
    assert_eq!(last_type(&idle.until_terminal(T)), "response.completed");
    let took_idle = t0.elapsed();
    // Seconds, not `upstream.read_timeout_ms` (300 s): generous bounds, a busy machine is slow.
    assert!(took_quick < Duration::from_secs(30), "{took_quick:?}");
    assert!(took_idle < Duration::from_secs(30), "{took_idle:?}");
    eprintln!(
        "rolling restart: turn on a heard-from connection {took_quick:?}, on an idle one {took_idle:?}"
    );
    let new_stats = http_get(&new_addr, "/sim/stats").1;
    assert_eq!(
        new_stats["responses"], 2,
        "both turns ran on the new upstream: {new_stats}"
    );
    let rows = s.rows(4);
    assert_eq!(
        rows.iter().filter(|r| r.status == "completed").count(),
        4,
        "{rows:?}"
    );
    s.finish();
}

/// 10,000 client sessions open at once on one relay process (each a WebSocket, idle after its
/// handshake); the relay still serves a turn and its probes. Reports the relay's RSS per session.
#[test]
fn ten_thousand_open_sessions() {
    let _serial = one_at_a_time();
    const N: usize = 10_000;
    turnpike::app::raise_fd_limit();
    let s = Stack::start(
        TestDb::sqlite(),
        StackOptions {
            env: &[
                ("TURNPIKE_LIMITS__DEFAULT_MAX_SESSIONS_PER_KEY", "20000"),
                ("TURNPIKE_LOG__LEVEL", "warn,turnpike=info"),
            ],
            ..StackOptions::default()
        },
    );
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let pid = s.relay.child.id();
    let before = rss(pid);
    let mut clients = Vec::with_capacity(N);
    for i in 0..N {
        match Client::connect(
            &s.addr,
            "/v1/responses",
            &[("authorization", &format!("Bearer {}", s.key))],
        ) {
            Ok(c) => clients.push(c),
            Err(e) => panic!("session {i} refused: {e:?}"),
        }
    }
    let after = rss(pid);
    eprintln!(
        "{N} open sessions: relay RSS {before} KiB → {after} KiB ({:.1} KiB per session)",
        (after.saturating_sub(before)) as f64 / N as f64
    );
    assert_eq!(http_get(&s.addr, "/healthz").0, 200);
    let c = clients.last_mut().unwrap();
    c.send(&create(""));
    assert_eq!(last_type(&c.until_terminal(T)), "response.completed");
    drop(clients);
    s.finish();
}
