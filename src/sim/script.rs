//! The directive grammar that scripts one simulated turn.
//!
//! A directive is a list of whitespace-separated tokens, `key=value` or a bare flag, given either
//! as `metadata.sim` of the `response.create` or inside a `[[sim: …]]` marker in the latest user
//! text (so clients that cannot set metadata, such as Codex, can drive it too). `metadata.sim`
//! wins when both are present. Unknown keys and bad values are errors (the sim answers them with
//! a wrapped 400 `invalid_sim_directive`), so a typo never silently runs the default turn.

use std::time::Duration;

/// What happens instead of (or in the middle of) the normal event sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// A wrapped `error` event with this code and status; ends the response.
    Error { code: String, status: u16 },
    /// A wrapped `error` event of no lane (no `stream_id`, whatever the response's lane): an
    /// error of the connection; nothing more of the response follows.
    ConnectionError(String),
    /// A WebSocket close frame with this code; ends the connection.
    Close(u16),
    /// The TCP connection dropped without a close frame.
    Drop,
    /// Nothing more is sent (pings are still answered).
    Stall,
    /// A binary frame, then the sequence continues.
    Binary,
    /// A text frame that is not JSON, then the sequence continues.
    InvalidJson,
    /// An extra delta event whose frame is this many bytes, then the sequence continues.
    Oversize(usize),
    /// HTTP: the answer's head waits this long (an upstream that took the request and does not
    /// answer in time); over WebSocket nothing (there is no head).
    HeadDelay(Duration),
}

impl Fault {
    /// Faults after which the response goes on.
    pub fn continues(&self) -> bool {
        matches!(
            self,
            Fault::Binary | Fault::InvalidJson | Fault::Oversize(_) | Fault::HeadDelay(_)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageMode {
    /// Full usage on the terminal event.
    Normal,
    /// No usage at all (`usage: null`).
    Missing,
    /// A usage that is not an object of numbers.
    Malformed,
    /// Input tokens on `response.in_progress`, output tokens on the terminal (input 0 there).
    Split,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    Completed,
    Incomplete,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub first_delay: Duration,
    pub delta_delay: Duration,
    pub terminal_delay: Duration,
    /// Number of text deltas; `None`: one per word of the default reply.
    pub deltas: Option<usize>,
    /// Characters per delta when `deltas` is set.
    pub delta_size: usize,
    pub usage: UsageMode,
    pub terminal: Terminal,
    /// `incomplete_details.reason` (incomplete) or `error.code` (failed).
    pub reason: Option<String>,
    pub fault: Option<Fault>,
    /// Events sent before the fault.
    pub after: usize,
    pub ignore_pings: bool,
    /// The fault fires only the first time the sim sees this directive (so a client's or
    /// relay's retry of the same request succeeds).
    pub once: bool,
    /// Answer with a function call (to this tool, or the first function tool offered).
    pub tool: Option<Option<String>>,
    pub cached_tokens: u64,
    /// Cache writes reported, kept 30 minutes and 12 hours (`cache_write_30m=N`, …).
    pub cache_write_30m: u64,
    pub cache_write_12h: u64,
    /// The `service_tier` reported for the response, whatever was asked (`served_tier=X`).
    pub served_tier: Option<String>,
    pub reasoning_tokens: u64,
    /// Report these counts instead of the computed ones (an upstream reporting nonsense).
    pub report_input: Option<u64>,
    pub report_output: Option<u64>,
    /// A `response.steer` lets the response complete normally (then the successor starts)
    /// instead of ending it `incomplete` (reason `steered`).
    pub steer_completes: bool,
    /// Over HTTP, an error answered before any byte carries `Retry-After: N`.
    pub retry_after: Option<u64>,
    /// Event types sent right after `response.created` (`extra=a,b`): events a client or relay
    /// does not know yet (`response.queued`, `response.metadata`, …), each with the response id.
    pub extra: Vec<String>,
    /// Event types sent right after the terminal (`trailing=a,b`): what an upstream sends
    /// after a response ended (`codex.rate_limits`, …).
    pub trailing: Vec<String>,
    /// Right after `response.created`, a `response.completed` of another response (usage
    /// 999/999): an upstream repeating an old terminal (`stray`).
    pub stray: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            first_delay: Duration::ZERO,
            delta_delay: Duration::ZERO,
            terminal_delay: Duration::ZERO,
            deltas: None,
            delta_size: 8,
            usage: UsageMode::Normal,
            terminal: Terminal::Completed,
            reason: None,
            fault: None,
            after: 0,
            ignore_pings: false,
            once: false,
            tool: None,
            cached_tokens: 0,
            cache_write_30m: 0,
            cache_write_12h: 0,
            served_tier: None,
            reasoning_tokens: 0,
            report_input: None,
            report_output: None,
            steer_completes: false,
            retry_after: None,
            extra: Vec::new(),
            trailing: Vec::new(),
            stray: false,
        }
    }
}

const MARKER_OPEN: &str = "[[sim:";
const MARKER_CLOSE: &str = "]]";

/// The directive inside the last `[[sim: …]]` marker of `text`, if any.
pub fn find_marker(text: &str) -> Option<&str> {
    let start = text.rfind(MARKER_OPEN)? + MARKER_OPEN.len();
    let len = text[start..].find(MARKER_CLOSE)?;
    Some(text[start..start + len].trim())
}

/// A comma-separated list of event types.
fn types(list: &str) -> Vec<String> {
    list.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

impl Script {
    pub fn parse(directive: &str) -> Result<Script, String> {
        let mut s = Script::default();
        let set_fault = |s: &mut Script, f: Fault| -> Result<(), String> {
            if s.fault.is_some() {
                return Err(
                    "only one of error/close/drop/stall/binary/invalid_json/oversize/head_delay_ms per turn"
                        .into(),
                );
            }
            s.fault = Some(f);
            Ok(())
        };
        let mut status: Option<u16> = None;
        for token in directive.split_whitespace() {
            let (key, value) = match token.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (token, None),
            };
            let need = || value.ok_or_else(|| format!("{key} needs a value ({key}=…)"));
            let num = |v: &str| -> Result<u64, String> {
                v.parse::<u64>()
                    .map_err(|_| format!("{key}={v}: expected a whole number"))
            };
            let ms = |v: &str| num(v).map(Duration::from_millis);
            match key {
                "first_delay_ms" => s.first_delay = ms(need()?)?,
                "delta_delay_ms" => s.delta_delay = ms(need()?)?,
                "terminal_delay_ms" => s.terminal_delay = ms(need()?)?,
                "deltas" => s.deltas = Some(crate::num::len(num(need()?)?)),
                "delta_size" => s.delta_size = crate::num::len(num(need()?)?.max(1)),
                "usage" => {
                    s.usage = match need()? {
                        "normal" => UsageMode::Normal,
                        "missing" => UsageMode::Missing,
                        "malformed" => UsageMode::Malformed,
                        "split" => UsageMode::Split,
                        v => {
                            return Err(format!(
                                "usage={v}: expected normal|missing|malformed|split"
                            ));
                        }
                    }
                }
                "terminal" => {
                    s.terminal = match need()? {
                        "completed" => Terminal::Completed,
                        "incomplete" => Terminal::Incomplete,
                        "failed" => Terminal::Failed,
                        v => {
                            return Err(format!(
                                "terminal={v}: expected completed|incomplete|failed"
                            ));
                        }
                    }
                }
                "reason" => s.reason = Some(need()?.to_string()),
                "error" => set_fault(
                    &mut s,
                    Fault::Error {
                        code: need()?.to_string(),
                        status: 0,
                    },
                )?,
                "connection_error" => {
                    set_fault(&mut s, Fault::ConnectionError(need()?.to_string()))?
                }
                "status" => {
                    let v = num(need()?)?;
                    if !(100..=599).contains(&v) {
                        return Err(format!("status={v}: expected an HTTP status"));
                    }
                    status = u16::try_from(v).ok();
                }
                "close" => {
                    let code = num(need()?)?;
                    if !(1000..=4999).contains(&code) {
                        return Err(format!("close={code}: expected a close code 1000..4999"));
                    }
                    set_fault(&mut s, Fault::Close(u16::try_from(code).unwrap_or(1011)))?
                }
                "drop" => set_fault(&mut s, Fault::Drop)?,
                "stall" => set_fault(&mut s, Fault::Stall)?,
                "head_delay_ms" => set_fault(&mut s, Fault::HeadDelay(ms(need()?)?))?,
                "binary" => set_fault(&mut s, Fault::Binary)?,
                "invalid_json" => set_fault(&mut s, Fault::InvalidJson)?,
                "oversize" => set_fault(&mut s, Fault::Oversize(crate::num::len(num(need()?)?)))?,
                "after" => s.after = crate::num::len(num(need()?)?),
                "ignore_pings" => s.ignore_pings = true,
                "once" => s.once = true,
                "tool" => s.tool = Some(value.map(str::to_string)),
                "cached" => s.cached_tokens = num(need()?)?,
                "cache_write_30m" => s.cache_write_30m = num(need()?)?,
                "cache_write_12h" => s.cache_write_12h = num(need()?)?,
                "served_tier" => s.served_tier = Some(need()?.to_string()),
                "reasoning" => s.reasoning_tokens = num(need()?)?,
                "report_input" => s.report_input = Some(num(need()?)?),
                "report_output" => s.report_output = Some(num(need()?)?),
                "steer_completes" => s.steer_completes = true,
                "retry_after" => s.retry_after = Some(num(need()?)?),
                "extra" => s.extra = types(need()?),
                "trailing" => s.trailing = types(need()?),
                "stray" => s.stray = true,
                other => return Err(format!("unknown directive key {other:?}")),
            }
        }
        if let Some(Fault::Error { status: st, .. }) = &mut s.fault {
            *st = status.unwrap_or(400);
        } else if status.is_some() {
            return Err("status= goes with error=CODE".into());
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_empty() {
        assert_eq!(Script::parse("").unwrap(), Script::default());
    }

    #[test]
    fn parses_every_key() {
        let s = Script::parse(
            "first_delay_ms=150 delta_delay_ms=5 terminal_delay_ms=300 deltas=4 delta_size=3 \
             usage=split terminal=incomplete reason=max_output_tokens ignore_pings cached=7 reasoning=2",
        )
        .unwrap();
        assert_eq!(s.first_delay, Duration::from_millis(150));
        assert_eq!(s.delta_delay, Duration::from_millis(5));
        assert_eq!(s.terminal_delay, Duration::from_millis(300));
        assert_eq!((s.deltas, s.delta_size), (Some(4), 3));
        assert_eq!(s.usage, UsageMode::Split);
        assert_eq!(s.terminal, Terminal::Incomplete);
        assert_eq!(s.reason.as_deref(), Some("max_output_tokens"));
        assert!(s.ignore_pings);
        assert_eq!((s.cached_tokens, s.reasoning_tokens), (7, 2));
    }

    #[test]
    fn faults() {
        let s = Script::parse("error=rate_limit_exceeded status=429 after=2").unwrap();
        assert_eq!(
            s.fault,
            Some(Fault::Error {
                code: "rate_limit_exceeded".into(),
                status: 429
            })
        );
        assert_eq!(s.after, 2);
        assert_eq!(
            Script::parse("error=x").unwrap().fault,
            Some(Fault::Error {
                code: "x".into(),
                status: 400
            })
        );
        assert_eq!(
            Script::parse("close=1012").unwrap().fault,
            Some(Fault::Close(1012))
        );
        assert_eq!(
            Script::parse("drop after=3").unwrap().fault,
            Some(Fault::Drop)
        );
        assert_eq!(
            Script::parse("oversize=70000").unwrap().fault,
            Some(Fault::Oversize(70000))
        );
        assert_eq!(Script::parse("tool").unwrap().tool, Some(None));
        assert_eq!(
            Script::parse("tool=shell").unwrap().tool,
            Some(Some("shell".into()))
        );
    }

    #[test]
    fn errors_are_specific() {
        assert!(
            Script::parse("bogus")
                .unwrap_err()
                .contains("unknown directive key")
        );
        assert!(
            Script::parse("deltas=x")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(
            Script::parse("close=99")
                .unwrap_err()
                .contains("close code")
        );
        assert!(
            Script::parse("drop stall")
                .unwrap_err()
                .contains("only one")
        );
        assert!(
            Script::parse("status=500")
                .unwrap_err()
                .contains("goes with error")
        );
        assert!(
            Script::parse("deltas")
                .unwrap_err()
                .contains("needs a value")
        );
    }

    #[test]
    fn marker_is_found_in_text() {
        assert_eq!(
            find_marker("hi [[sim: deltas=3 drop]] there"),
            Some("deltas=3 drop")
        );
        assert_eq!(find_marker("[[sim: a]] then [[sim: b]]"), Some("b"));
        assert_eq!(find_marker("no marker"), None);
        assert_eq!(find_marker("[[sim: unterminated"), None);
    }
}
