//! A WebSocket load generator for the benchmarks in BENCHMARKS.md: N connections, each running
//! turns back to back against a Responses WebSocket endpoint (`turnpike sim` directly, or
//! turnpike in front of it), asking the sim for D deltas of S bytes per turn. Reports events/s
//! and the delivery latency of events (sim send stamp `sim_ts_ns` → client receive).
//!
//! cargo run --release --example loadgen -- ws://127.0.0.1:18080/v1/responses KEY CONNS TURNS DELTAS SIZE

use std::net::TcpStream;
use std::time::Instant;

use tungstenite::Message;
use tungstenite::client::IntoClientRequest;

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "ws://127.0.0.1:18080/v1/responses".into());
    let key = args.get(2).cloned().unwrap_or_else(|| "sk-load".into());
    let conns: usize = arg(&args, 3, 50);
    let turns: usize = arg(&args, 4, 20);
    let deltas: usize = arg(&args, 5, 200);
    let size: usize = arg(&args, 6, 40);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            let (url, key) = (url.clone(), key.clone());
            std::thread::spawn(move || run(&url, &key, turns, deltas, size))
        })
        .collect();
    let mut events = 0u64;
    let mut lat: Vec<u64> = Vec::new();
    let mut failed = 0;
    let mut error_turns = 0;
    for h in handles {
        match h.join() {
            Ok(Ok((n, l, e))) => {
                events += n;
                lat.extend(l);
                error_turns += e;
            }
            _ => failed += 1,
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "conns={conns} turns={turns} deltas={deltas} size={size} failed_conns={failed} error_turns={error_turns} events={events} secs={secs:.2} events_per_s={:.0} latency_us p50={} p99={} max={}",
        events as f64 / secs,
        pct(0.50) / 1000,
        pct(0.99) / 1000,
        lat.last().copied().unwrap_or(0) / 1000
    );
}

fn run(
    url: &str,
    key: &str,
    turns: usize,
    deltas: usize,
    size: usize,
) -> Result<(u64, Vec<u64>, u64), String> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().map_err(|_| "key")?,
    );
    let host = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    let stream = TcpStream::connect(host).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).ok();
    let (mut ws, _) = tungstenite::client(req, stream).map_err(|e| e.to_string())?;
    let create = format!(
        r#"{{"type":"response.create","model":"gpt-load","store":false,"input":"load","metadata":{{"sim":"deltas={deltas} delta_size={size}"}}}}"#
    );
    let mut events = 0u64;
    let mut errors = 0u64;
    let mut lat = Vec::new();
    for _ in 0..turns {
        ws.send(Message::text(create.clone()))
            .map_err(|e| e.to_string())?;
        loop {
            match ws.read().map_err(|e| e.to_string())? {
                Message::Text(t) => {
                    let now = turnpike::sim::monotonic_ns();
                    events += 1;
                    let t = t.as_str();
                    if let Some(at) = t.rfind("\"sim_ts_ns\":") {
                        let digits: String = t[at + 12..]
                            .chars()
                            .take_while(char::is_ascii_digit)
                            .collect();
                        if let Ok(sent) = digits.parse::<u64>() {
                            lat.push(now.saturating_sub(sent));
                        }
                    }
                    if t.starts_with(r#"{"type":"error""#) {
                        errors += 1;
                        break;
                    }
                    if t.starts_with(r#"{"type":"response.completed""#) {
                        break;
                    }
                }
                Message::Close(_) => return Err("closed".into()),
                _ => {}
            }
        }
    }
    let _ = ws.close(None);
    Ok((events, lat, errors))
}
