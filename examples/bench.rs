//! The relay benchmark's two ends (driven by `scripts/bench.sh`, figures in BENCHMARKS.md).
//!
//! `bench upstream ADDR` — a minimal Responses WebSocket upstream: a thread per connection; each
//! `response.create` is answered with `response.created`, E deltas of ~200 bytes each stamped
//! with CLOCK_MONOTONIC at send (`"t":ns`), paced G µs apart on an absolute schedule, and a
//! `response.completed` with usage. Parameters come in the request's `metadata.bench`
//! (`events=E gap_us=G`). No auth and no JSON parser: it costs the same whatever is in front.
//!
//! `bench upstream-async ADDR` — the second workload's upstream: one single-threaded async
//! server (tokio, a task per connection) whose deltas are small (~60 bytes, a token or two, as
//! real `response.output_text.delta` events carry), each written and flushed on its own.
//!
//! `bench stream URL KEY SESSIONS TURNS EVENTS GAP_US [PID]` — SESSIONS threads, each one
//! WebSocket running TURNS turns back to back; prints one JSON line: events, seconds, events/s,
//! per-event latency (upstream stamp → client receive) p50/p99/p99.9/max in µs, its own CPU
//! seconds, with PID that process's CPU seconds over the run (the relay's), and with
//! `BENCH_UPSTREAM_PID` the upstream's. With `BENCH_LANES=N` each turn is N
//! creates at once on lanes `l0`…, read until all N have completed (the thread upstream plays
//! the creates of named lanes side by side, each event tagged with its `stream_id`). With
//! `BENCH_SLOW_US=N` every event slower than N µs is printed to stderr with its index in its turn
//! and its stamp (when the tail happens; `scripts/sched_gaps.py` says what ran meanwhile).
//!
//! `bench ttfe URL KEY N` — N fresh WebSockets one after another (each with its own `session-id`,
//! so a relay cannot lend it an upstream socket dialled for another): time to first event of
//! turn 1 (fresh dial) and turns 2–3 (warm lease), p50/p90 in µs.
//!
//! `bench http ADDR KEY N EVENTS [PID]` — N streamed `POST /v1/responses` one after another on
//! one keep-alive connection to ADDR, EVENTS deltas each, unpaced: time to first SSE event
//! (request written → first event read) p50/p90 in µs, the first delta's two legs (request
//! written → the upstream's stamp, stamp → read) p50 in µs, events/s, and PID's CPU seconds.
//!
//! `bench idle URL KEY N PID [no-turn]` — N WebSockets, each runs one turn (none with `no-turn`)
//! and stays open, opened in two halves; prints PID's RSS before, after the first half and with
//! all, per session overall and per session of the second half (the marginal cost).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark tool: it stops at the first thing it cannot do

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

const PAD: &str = "lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor";

fn now_ns() -> u64 {
    turnpike::sim::monotonic_ns()
}

/// The upstream's send stamp of an event (`"t":ns`, deltas only).
fn stamp_of(event: &str) -> Option<u64> {
    let i = event.rfind("\"t\":")?;
    Some(param(&event[i..], "\"t\":")).filter(|&t| t > 0)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a = |i: usize| args.get(i).cloned().unwrap_or_default();
    let n = |i: usize| a(i).parse::<u64>().unwrap_or(0);
    match a(0).as_str() {
        "upstream" => upstream(&a(1)),
        "upstream-async" => upstream_async(&a(1)),
        "stream" => stream(&a(1), &a(2), n(3), n(4), n(5), n(6), a(7).parse().ok()),
        "ttfe" => ttfe(&a(1), &a(2), n(3)),
        "http" => http(&a(1), &a(2), n(3), n(4), a(5).parse().ok()),
        "idle" => idle(&a(1), &a(2), n(3), n(4) as u32, a(5) != "no-turn"),
        _ => {
            eprintln!(
                "usage: bench upstream ADDR | stream URL KEY SESSIONS TURNS EVENTS GAP_US [PID] | ttfe URL KEY N | http ADDR KEY N EVENTS [PID] | idle URL KEY N PID"
            );
            std::process::exit(2);
        }
    }
}

// ---- upstream ---------------------------------------------------------------------------------

fn upstream(addr: &str) {
    let listener = TcpListener::bind(addr).expect("bind");
    // std listens with a backlog of 128: thousands of relay dials at once would be refused.
    rustix::net::listen(&listener, 4096).expect("listen");
    for (n, conn) in listener.incoming().enumerate() {
        let Ok(conn) = conn else { continue };
        conn.set_nodelay(true).ok();
        let _ = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || serve_conn(conn, n));
    }
}

fn param(frame: &str, key: &str) -> u64 {
    frame
        .find(key)
        .map(|at| {
            frame[at + key.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
        })
        .and_then(|d| d.parse().ok())
        .unwrap_or(0)
}

/// The events of one turn of the thread upstream, each written by `send` when due (paced `gap`
/// apart on an absolute schedule); `false` when the client has gone.
fn play_turn(
    frame: &str,
    id: &str,
    conn_no: usize,
    mut send: impl FnMut(&str, String) -> bool,
) -> bool {
    let events = param(frame, "events=").max(1);
    let gap = Duration::from_micros(param(frame, "gap_us="));
    let head = format!(
        r#"{{"type":"response.created","sequence_number":0,"response":{{"id":"{id}","object":"response","status":"in_progress","model":"gpt-bench","output":[]}}}}"#
    );
    if !send("response.created", head) {
        return false;
    }
    let start = Instant::now();
    for i in 0..events {
        if !gap.is_zero() {
            let due = start + gap * i as u32;
            let left = due.saturating_duration_since(Instant::now());
            if !left.is_zero() {
                std::thread::sleep(left);
            }
        }
        let ev = format!(
            r#"{{"type":"response.output_text.delta","sequence_number":{},"item_id":"msg_{conn_no}","output_index":0,"content_index":0,"delta":"{PAD}","t":{}}}"#,
            i + 1,
            now_ns()
        );
        if !send("response.output_text.delta", ev) {
            return false;
        }
    }
    let done = format!(
        r#"{{"type":"response.completed","sequence_number":{},"response":{{"id":"{id}","object":"response","status":"completed","model":"gpt-bench","output":[],"usage":{{"input_tokens":12,"input_tokens_details":{{"cached_tokens":0}},"output_tokens":{events},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{}}}}}}}"#,
        events + 1,
        events + 12
    );
    send("response.completed", done)
}

/// A server text frame (unmasked), for writers that share a socket with tungstenite's reader.
fn text_frame(payload: &str) -> Vec<u8> {
    let len = payload.len();
    let mut f = Vec::with_capacity(len + 10);
    f.push(0x81);
    if len < 126 {
        f.push(len as u8);
    } else if len < 65536 {
        f.push(126);
        f.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        f.push(127);
        f.extend_from_slice(&(len as u64).to_be_bytes());
    }
    f.extend_from_slice(payload.as_bytes());
    f
}

fn serve_conn(conn: TcpStream, conn_no: usize) {
    let mut method = [0u8; 4];
    if conn.peek(&mut method).is_ok_and(|n| n == 4) && &method == b"POST" {
        return serve_http(conn, conn_no);
    }
    // Creates on named lanes are played side by side by threads writing whole frames here.
    let writer = std::sync::Arc::new(std::sync::Mutex::new(conn.try_clone().expect("clone")));
    let Ok(mut ws) = tungstenite::accept(conn) else {
        return;
    };
    let mut turn = 0u64;
    while let Ok(msg) = ws.read() {
        let Message::Text(frame) = msg else {
            if matches!(msg, Message::Close(_)) {
                let _ = ws.flush();
                break;
            }
            continue;
        };
        if !frame.contains("\"response.create\"") {
            continue;
        }
        turn += 1;
        let id = format!("resp_b{conn_no}x{turn}");
        if let Some(at) = frame.find(r#""stream_id":""#) {
            let lane: String = frame[at + 13..].chars().take_while(|c| *c != '"').collect();
            let (frame, writer) = (frame.to_string(), writer.clone());
            spawn(move || {
                play_turn(&frame, &id, conn_no, |_, ev| {
                    let ev = format!(r#"{},"stream_id":"{lane}"}}"#, &ev[..ev.len() - 1]);
                    let mut w = writer.lock().expect("writer");
                    w.write_all(&text_frame(&ev)).is_ok()
                })
            });
            continue;
        }
        if !play_turn(&frame, &id, conn_no, |_, ev| {
            ws.send(Message::text(ev)).is_ok()
        }) {
            return;
        }
    }
}

/// `POST /v1/responses` with `stream: true` on a keep-alive connection: the same turn as SSE,
/// each event a chunk of its own, written and flushed as it is due.
fn serve_http(conn: TcpStream, conn_no: usize) {
    use std::io::{BufRead, BufReader, Read};
    let mut r = BufReader::new(conn);
    let mut turn = 0u64;
    loop {
        let mut len = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let frame = String::from_utf8_lossy(&body).into_owned();
        turn += 1;
        let id = format!("resp_h{conn_no}x{turn}");
        let w = r.get_mut();
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if w.write_all(head.as_bytes()).is_err() {
            return;
        }
        let ok = play_turn(&frame, &id, conn_no, |kind, ev| {
            let event = format!("event: {kind}\ndata: {ev}\n\n");
            write!(w, "{:x}\r\n{event}\r\n", event.len()).is_ok() && w.flush().is_ok()
        });
        if !ok || w.write_all(b"0\r\n\r\n").is_err() {
            return;
        }
    }
}

/// The second workload's upstream (see the module doc).
fn upstream_async(addr: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let std_listener = TcpListener::bind(addr).expect("bind");
        rustix::net::listen(&std_listener, 4096).expect("listen");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        let mut n = 0usize;
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            conn.set_nodelay(true).ok();
            n += 1;
            tokio::task::spawn_local(serve_async(conn, n));
        }
    });
}

async fn serve_async(mut conn: tokio::net::TcpStream, conn_no: usize) {
    use actix_codec::{Decoder, Encoder};
    use actix_http::ws::{Codec, Frame, Message as WsMessage};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = actix_web::web::BytesMut::with_capacity(4096);
    // The handshake: read the request head, answer 101 with the accept key.
    let head_end = loop {
        if conn.read_buf(&mut buf).await.unwrap_or(0) == 0 {
            return;
        }
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let _ = buf.split_to(head_end);
    let Some(key) = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    }) else {
        return;
    };
    let accept = actix_http::ws::hash_key(key.as_bytes());
    let accept = String::from_utf8_lossy(&accept);
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if conn.write_all(reply.as_bytes()).await.is_err() {
        return;
    }
    let mut codec = Codec::new().max_size(16 * 1024 * 1024);
    let mut out = actix_web::web::BytesMut::new();
    let mut turn = 0u64;
    // Each event: encoded, written and flushed on its own.
    macro_rules! send_msg {
        ($msg:expr) => {{
            out.clear();
            if codec.encode($msg, &mut out).is_err()
                || conn.write_all(&out).await.is_err()
                || conn.flush().await.is_err()
            {
                return;
            }
        }};
    }
    macro_rules! send {
        ($text:expr) => {{ send_msg!(WsMessage::Text($text.into())) }};
    }
    loop {
        let frame = loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => break f,
                Ok(None) => {}
                Err(_) => return,
            }
            if conn.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        };
        let text = match frame {
            Frame::Text(text) => text,
            Frame::Close(_) => return,
            // A relay probes a connection idle for a while before it writes on it.
            Frame::Ping(p) => {
                send_msg!(WsMessage::Pong(p));
                continue;
            }
            _ => continue,
        };
        let frame = String::from_utf8_lossy(&text).to_string();
        if !frame.contains("\"response.create\"") {
            continue;
        }
        turn += 1;
        let events = param(&frame, "events=").max(1);
        let gap = Duration::from_micros(param(&frame, "gap_us="));
        let id = format!("resp_a{conn_no}x{turn}");
        send!(format!(
            r#"{{"type":"response.created","response":{{"id":"{id}","status":"in_progress","output":[]}}}}"#
        ));
        let start = tokio::time::Instant::now();
        for i in 0..events {
            if !gap.is_zero() {
                tokio::time::sleep_until(start + gap * i as u32).await;
            }
            send!(format!(
                r#"{{"type":"response.output_text.delta","delta":"ab","t":{}}}"#,
                now_ns()
            ));
        }
        send!(format!(
            r#"{{"type":"response.completed","response":{{"id":"{id}","status":"completed","output":[],"usage":{{"input_tokens":12,"output_tokens":{events},"total_tokens":{}}}}}}}"#,
            events + 12
        ));
    }
}

// ---- clients ----------------------------------------------------------------------------------

fn connect(
    url: &str,
    key: &str,
    session: &str,
) -> Result<tungstenite::WebSocket<TcpStream>, String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let h = req.headers_mut();
    h.insert(
        "authorization",
        format!("Bearer {key}").parse().map_err(|_| "key")?,
    );
    h.insert("session-id", session.parse().map_err(|_| "session")?);
    let host = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let stream = TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).ok();
    let (ws, _) = tungstenite::client(req, stream).map_err(|e| e.to_string())?;
    Ok(ws)
}

fn create(events: u64, gap_us: u64) -> Message {
    create_on(None, events, gap_us)
}

fn create_on(lane: Option<&str>, events: u64, gap_us: u64) -> Message {
    let lane = lane.map_or(String::new(), |l| format!(r#","stream_id":"{l}""#));
    Message::text(format!(
        r#"{{"type":"response.create","model":"gpt-bench","store":false,"input":"bench"{lane},"metadata":{{"bench":"events={events} gap_us={gap_us}"}}}}"#
    ))
}

/// Lanes per turn (`BENCH_LANES`, default 1: no `stream_id`).
fn lanes() -> usize {
    std::env::var("BENCH_LANES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// One turn: sends the request, reads to the terminal. Latencies (ns) of stamped events are
/// pushed to `lat`; returns (events, ns from send to first event).
fn turn(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    msg: Message,
    lat: &mut Vec<u64>,
) -> Result<(u64, u64), String> {
    turn_of(ws, vec![msg], lat)
}

/// `msgs` sent at once (creates on distinct lanes), read until each has completed.
fn turn_of(
    ws: &mut tungstenite::WebSocket<TcpStream>,
    msgs: Vec<Message>,
    lat: &mut Vec<u64>,
) -> Result<(u64, u64), String> {
    let sent = now_ns();
    let mut open = msgs.len();
    for msg in msgs {
        ws.send(msg).map_err(|e| e.to_string())?;
    }
    let mut events = 0u64;
    let mut first = 0u64;
    loop {
        let text = match ws.read().map_err(|e| e.to_string())? {
            Message::Text(t) => t,
            Message::Binary(b) => String::from_utf8_lossy(&b).into_owned().into(),
            Message::Close(c) => return Err(format!("closed: {c:?}")),
            _ => continue,
        };
        let at = now_ns();
        if events == 0 {
            first = at - sent;
        }
        events += 1;
        let t = text.as_str();
        if let Some(stamp) = stamp_of(t) {
            let took = at.saturating_sub(stamp);
            lat.push(took);
            if took > slow_ns() {
                eprintln!(
                    "slow: {} µs, event {events} of its turn, stamp {stamp}",
                    took / 1000
                );
            }
        }
        if t.starts_with(r#"{"type":"error""#) {
            return Err(t.chars().take(200).collect());
        }
        if t.starts_with(r#"{"type":"response.completed""#) {
            open -= 1;
            if open == 0 {
                return Ok((events, first));
            }
        }
    }
}

/// `BENCH_SLOW_US` in ns (never, unset).
fn slow_ns() -> u64 {
    static SLOW: OnceLock<u64> = OnceLock::new();
    *SLOW.get_or_init(|| {
        std::env::var("BENCH_SLOW_US")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(u64::MAX, |us| us.saturating_mul(1000))
    })
}

fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    std::thread::Builder::new()
        .stack_size(256 * 1024)
        .spawn(f)
        .expect("thread")
}

/// utime + stime of a process, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let (user, system) = cpu_times(pid);
    user + system
}

/// A process's user and system CPU seconds.
fn cpu_times(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    (ticks(11) / 100.0, ticks(12) / 100.0)
}

/// Context switches of each of a process's threads: voluntary (it waited) and involuntary
/// (preempted while it could run).
fn switches(pid: u32) -> std::collections::HashMap<std::ffi::OsString, (u64, u64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .map(|task| {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|rest| rest.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            let counts = (
                field("voluntary_ctxt_switches:"),
                field("nonvoluntary_ctxt_switches:"),
            );
            (task.file_name(), counts)
        })
        .collect()
}

/// The switches made between two readings by the threads alive at the second (a thread that
/// exited in between takes its count with it; one that started counts from zero).
fn switches_since(
    before: &std::collections::HashMap<std::ffi::OsString, (u64, u64)>,
    pid: u32,
) -> (u64, u64) {
    switches(pid)
        .iter()
        .fold((0, 0), |(v, i), (tid, (v1, i1))| {
            let (v0, i0) = before.get(tid).copied().unwrap_or_default();
            (v + v1.saturating_sub(v0), i + i1.saturating_sub(i0))
        })
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

#[allow(clippy::too_many_arguments)]
fn stream(
    url: &str,
    key: &str,
    sessions: u64,
    turns: u64,
    events: u64,
    gap_us: u64,
    pid: Option<u32>,
) {
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(sessions as usize + 1));
    let handles: Vec<_> = (0..sessions)
        .map(|s| {
            let (url, key, barrier) = (url.to_string(), key.to_string(), barrier.clone());
            spawn(move || -> Result<(u64, Vec<u64>), String> {
                let ws = connect(&url, &key, &format!("bench-{s}"));
                barrier.wait();
                let mut ws = ws?;
                let mut lat = Vec::with_capacity((turns * events) as usize);
                let mut n = 0;
                let lanes = lanes();
                for _ in 0..turns {
                    let msgs = if lanes == 1 {
                        vec![create(events, gap_us)]
                    } else {
                        (0..lanes)
                            .map(|l| create_on(Some(&format!("l{l}")), events, gap_us))
                            .collect()
                    };
                    n += turn_of(&mut ws, msgs, &mut lat)?.0;
                }
                let _ = ws.close(None);
                let _ = ws.flush();
                Ok((n, lat))
            })
        })
        .collect();
    barrier.wait();
    let cpu0 = pid.map(cpu_times);
    let switches0 = pid.map(switches);
    // The load generator's own CPU and the upstream's (`BENCH_UPSTREAM_PID`) over the same
    // window: neither may be the bottleneck of a row.
    let upstream = std::env::var("BENCH_UPSTREAM_PID")
        .ok()
        .and_then(|p| p.parse().ok());
    let (own0, up0) = (cpu_s(std::process::id()), upstream.map(cpu_s));
    let t0 = Instant::now();
    let (mut total, mut lat, mut failed) = (0u64, Vec::new(), Vec::new());
    for h in handles {
        match h.join() {
            Ok(Ok((n, l))) => {
                total += n;
                lat.extend(l);
            }
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("panic".into()),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let own = cpu_s(std::process::id()) - own0;
    let up = upstream.zip(up0).map(|(p, u0)| cpu_s(p) - u0);
    // User and system time apart: which side a difference between relays is on.
    let (cpu, user) = match (pid.map(cpu_times), cpu0) {
        (Some((u1, s1)), Some((u0, s0))) => (Some(u1 + s1 - u0 - s0), Some(u1 - u0)),
        _ => (None, None),
    };
    // Per event: how often the relay waited and how often it was preempted (the cost of a
    // second worker on a shared host, BENCHMARKS.md).
    let per_event = |n: u64| format!("{:.3}", n as f64 / total.max(1) as f64);
    let (vol, invol) = match pid.zip(switches0) {
        Some((p, before)) => {
            let (v, i) = switches_since(&before, p);
            (per_event(v), per_event(i))
        }
        None => ("null".into(), "null".into()),
    };
    lat.sort_unstable();
    let us = |p: f64| pct(&lat, p) as f64 / 1000.0;
    println!(
        "{{\"sessions\":{sessions},\"turns\":{turns},\"events_per_turn\":{events},\"gap_us\":{gap_us},\"failed\":{},\"first_failure\":{:?},\"events\":{total},\"secs\":{secs:.3},\"events_per_s\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"relay_cpu_s\":{},\"relay_user_s\":{},\"cpu_s_per_m_events\":{},\"loadgen_cpu_s\":{own:.2},\"upstream_cpu_s\":{},\"relay_vol_switches_per_event\":{vol},\"relay_invol_switches_per_event\":{invol}}}",
        failed.len(),
        failed.first().cloned().unwrap_or_default(),
        total as f64 / secs,
        us(0.5),
        us(0.99),
        us(0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        cpu.map_or("null".into(), |c| format!("{c:.2}")),
        user.map_or("null".into(), |u| format!("{u:.2}")),
        cpu.map_or("null".into(), |c| format!(
            "{:.2}",
            c / total.max(1) as f64 * 1e6
        )),
        up.map_or("null".into(), |u| format!("{u:.2}")),
    );
}

fn ttfe(url: &str, key: &str, n: u64) {
    let (mut fresh, mut warm) = (Vec::new(), Vec::new());
    let run_id = now_ns();
    for s in 0..n {
        let mut ws = match connect(url, key, &format!("ttfe-{run_id}-{s}")) {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("connect: {e}");
                continue;
            }
        };
        let mut lat = Vec::new();
        for t in 0..3 {
            match turn(&mut ws, create(1, 0), &mut lat) {
                Ok((_, first)) if t == 0 => fresh.push(first),
                Ok((_, first)) => warm.push(first),
                Err(e) => eprintln!("turn: {e}"),
            }
        }
        let _ = ws.close(None);
        let _ = ws.flush();
    }
    fresh.sort_unstable();
    warm.sort_unstable();
    let us = |v: &[u64], p| pct(v, p) as f64 / 1000.0;
    println!(
        "{{\"sessions\":{n},\"fresh_p50_us\":{:.0},\"fresh_p90_us\":{:.0},\"warm_p50_us\":{:.0},\"warm_p90_us\":{:.0}}}",
        us(&fresh, 0.5),
        us(&fresh, 0.9),
        us(&warm, 0.5),
        us(&warm, 0.9)
    );
}

fn http(addr: &str, key: &str, n: u64, events: u64, pid: Option<u32>) {
    use std::io::{BufRead, BufReader, Read};
    let conn = TcpStream::connect(addr).expect("connect");
    conn.set_nodelay(true).ok();
    let mut r = BufReader::new(conn);
    let body = format!(
        r#"{{"model":"gpt-bench","stream":true,"store":false,"input":"bench","metadata":{{"bench":"events={events} gap_us=0"}}}}"#
    );
    let (cpu0, t0) = (pid.map(cpu_s), Instant::now());
    let (mut first, mut seen, mut failed) = (Vec::new(), 0u64, 0u64);
    // The first delta's legs: request written → the upstream stamps it, stamp → read here.
    let (mut there, mut back) = (Vec::new(), Vec::new());
    for _ in 0..n {
        let (sent, sent_ns) = (Instant::now(), now_ns());
        let req = format!(
            "POST /v1/responses HTTP/1.1\r\nhost: bench\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if r.get_mut().write_all(req.as_bytes()).is_err() {
            failed += 1;
            break;
        }
        let mut line = String::new();
        let mut status_ok = false;
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            status_ok |= line.starts_with("HTTP/1.1 200");
            if line.trim_end().is_empty() {
                break;
            }
        }
        // Chunked SSE: count events (blank-line ends) until the terminating chunk.
        let mut got_first = false;
        let mut stamped = false;
        let mut pending = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            let size = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            if r.read_exact(&mut chunk).is_err() || size == 0 {
                break;
            }
            pending.push_str(&String::from_utf8_lossy(&chunk[..size]));
            while let Some(end) = pending.find("\n\n") {
                if !got_first {
                    got_first = true;
                    first.push(sent.elapsed().as_nanos() as u64);
                }
                if !stamped && let Some(t) = stamp_of(&pending[..end]) {
                    stamped = true;
                    there.push(t.saturating_sub(sent_ns));
                    back.push(now_ns().saturating_sub(t));
                }
                seen += 1;
                pending.drain(..end + 2);
            }
        }
        if !status_ok || !got_first {
            failed += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = pid.zip(cpu0).map(|(p, c0)| cpu_s(p) - c0);
    for v in [&mut first, &mut there, &mut back] {
        v.sort_unstable();
    }
    let us = |v: &[u64], p| pct(v, p) as f64 / 1000.0;
    println!(
        "{{\"requests\":{n},\"failed\":{failed},\"events\":{seen},\"secs\":{secs:.3},\"events_per_s\":{:.0},\"first_p50_us\":{:.0},\"first_p90_us\":{:.0},\"delta_there_p50_us\":{:.0},\"delta_back_p50_us\":{:.0},\"relay_cpu_s\":{},\"cpu_s_per_m_events\":{}}}",
        seen as f64 / secs,
        us(&first, 0.5),
        us(&first, 0.9),
        us(&there, 0.5),
        us(&back, 0.5),
        cpu.map_or("null".into(), |c| format!("{c:.2}")),
        cpu.map_or("null".into(), |c| format!(
            "{:.2}",
            c / seen.max(1) as f64 * 1e6
        )),
    );
}

fn idle(url: &str, key: &str, n: u64, pid: u32, with_turn: bool) {
    let before = rss_kib(pid);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut handles = Vec::new();
    let (mut ok, mut failed) = (0u64, Vec::new());
    // Two halves: the second half's growth is the marginal cost of a session, free of what the
    // first sessions warmed once (database page cache, request pools, thread stacks).
    let mut rss = Vec::new();
    for half in [n / 2, n - n / 2] {
        let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for s in 0..half {
            let (url, key, tx, done) = (url.to_string(), key.to_string(), tx.clone(), done.clone());
            handles.push(
                std::thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let r = connect(&url, &key, "idle").and_then(|mut ws| {
                            if with_turn {
                                turn(&mut ws, create(1, 0), &mut Vec::new())?;
                            }
                            Ok(ws)
                        });
                        match r {
                            Ok(ws) => {
                                let _ = tx.send(Ok(()));
                                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                                    std::thread::sleep(Duration::from_millis(200));
                                }
                                drop(ws);
                            }
                            Err(e) => {
                                let _ = tx.send(Err(e));
                            }
                        }
                    })
                    .expect("thread"),
            );
            // Opened in waves so the listen backlog is never the limit.
            if s % 200 == 199 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        drop(tx);
        for r in rx.iter().take(half as usize) {
            match r {
                Ok(()) => ok += 1,
                Err(e) => failed.push(e),
            }
        }
        // Let the relay settle (buffers released after the turn) before reading its memory.
        std::thread::sleep(Duration::from_secs(2));
        rss.push(rss_kib(pid));
    }
    let (half, with) = (rss[0], rss[1]);
    println!(
        "{{\"sessions\":{n},\"open\":{ok},\"failed\":{},\"first_failure\":{:?},\"rss_before_kib\":{before},\"rss_half_kib\":{half},\"rss_with_kib\":{with},\"kib_per_session\":{:.1},\"marginal_kib_per_session\":{:.1}}}",
        failed.len(),
        failed.first().cloned().unwrap_or_default(),
        (with.saturating_sub(before)) as f64 / ok.max(1) as f64,
        (with.saturating_sub(half)) as f64 / (n - n / 2).max(1) as f64
    );
    let _ = std::io::stdout().flush();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
}
