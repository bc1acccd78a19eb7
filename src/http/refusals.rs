//! Refused handshakes, counted rather than logged one by one (docs/DESIGN.md#refusals): anyone
//! on the network can send thousands of bad keys a second, and one log line each would fill a
//! disk. Each refusal is counted (metric by reason, and a tally by reason and address prefix);
//! one summary line per `log.refusal_summary_s` says what was refused. A prefix that keeps
//! failing is answered more slowly; a valid key never waits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::warn;

use crate::telemetry::metric;

/// Prefixes tracked per interval; refusals from more land in one `other` bucket.
const MAX_PREFIXES: usize = 4096;
/// Prefixes named in a summary line.
const TOP_PREFIXES: usize = 5;

#[derive(Debug, Default)]
struct Tally {
    total: u64,
    by_reason: HashMap<&'static str, u64>,
    by_prefix: HashMap<String, u32>,
    other_prefixes: u64,
}

fn tally() -> MutexGuard<'static, Tally> {
    static TALLY: OnceLock<Mutex<Tally>> = OnceLock::new();
    TALLY
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// The address prefix a refusal is counted under: IPv4 /24, IPv6 /48.
pub fn prefix_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => prefix_of(IpAddr::V4(v4)),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
            }
        },
    }
}

/// Counts one refusal; returns how many refusals its prefix has had this interval.
pub fn record(reason: &'static str, peer: Option<IpAddr>) -> u32 {
    ::metrics::counter!(metric::HANDSHAKES_REFUSED, "reason" => reason).increment(1);
    let mut t = tally();
    t.total += 1;
    *t.by_reason.entry(reason).or_default() += 1;
    let Some(ip) = peer else {
        return 0;
    };
    let prefix = prefix_of(ip);
    if t.by_prefix.len() >= MAX_PREFIXES && !t.by_prefix.contains_key(&prefix) {
        t.other_prefixes += 1;
        return 0;
    }
    let n = t.by_prefix.entry(prefix).or_default();
    *n += 1;
    *n
}

/// The summary of the interval that ends now (and a fresh tally), if anything was refused.
fn take_summary() -> Option<String> {
    let t = std::mem::take(&mut *tally());
    if t.total == 0 {
        return None;
    }
    let mut reasons: Vec<_> = t.by_reason.into_iter().collect();
    reasons.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let mut prefixes: Vec<_> = t.by_prefix.into_iter().collect();
    prefixes.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let reasons: Vec<String> = reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
    let mut top: Vec<String> = prefixes
        .iter()
        .take(TOP_PREFIXES)
        .map(|(p, n)| format!("{p}={n}"))
        .collect();
    let rest = prefixes.len().saturating_sub(TOP_PREFIXES);
    if rest > 0 || t.other_prefixes > 0 {
        top.push(format!(
            "{rest} more prefixes (+{} untracked)",
            t.other_prefixes
        ));
    }
    Some(format!(
        "{} handshakes refused: {}; from {}",
        t.total,
        reasons.join(", "),
        top.join(", ")
    ))
}

/// Writes the summary of what was refused since the last one, if anything was.
pub fn log_summary() {
    if let Some(line) = take_summary() {
        warn!("{line}");
    }
}

/// Writes the summary line every `every` (nothing when nothing was refused).
pub fn start_summaries(every: Duration) {
    actix::spawn(async move {
        let mut tick = tokio::time::interval(every.max(Duration::from_secs(1)));
        tick.tick().await;
        loop {
            tick.tick().await;
            log_summary();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_one_summary_per_interval() {
        assert_eq!(prefix_of("10.1.2.3".parse().unwrap()), "10.1.2.0/24");
        assert_eq!(
            prefix_of("2001:db8:1:2::5".parse().unwrap()),
            "2001:db8:1::/48"
        );
        assert_eq!(
            prefix_of("::ffff:192.0.2.9".parse().unwrap()),
            "192.0.2.0/24"
        );
        let _ = take_summary();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.200".parse().unwrap();
        assert_eq!(record("invalid_api_key", Some(a)), 1);
        assert_eq!(record("invalid_api_key", Some(b)), 2, "one /24");
        record("missing_api_key", Some("198.51.100.7".parse().unwrap()));
        let line = take_summary().unwrap();
        assert!(line.starts_with("3 handshakes refused: invalid_api_key=2, missing_api_key=1; from 192.0.2.0/24=2, 198.51.100.0/24=1"), "{line}");
        assert_eq!(take_summary(), None);
        assert_eq!(record("invalid_api_key", Some(a)), 1, "a new interval");
    }
}
