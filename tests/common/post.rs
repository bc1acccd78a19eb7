//! A plain HTTP/1.1 client for the HTTP surface: keep-alive requests on one connection, bodies
//! read by `Content-Length` or chunk by chunk (so a test sees each SSE event when it arrives).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use turnpike::protocol::sse::SseReader;

pub struct Conn {
    r: BufReader<TcpStream>,
}

#[derive(Debug, Clone)]
pub struct Head {
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

/// One SSE event as the client saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub event: Option<String>,
    pub data: Value,
    pub raw: String,
}

impl Conn {
    pub fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        Conn {
            r: BufReader::new(s),
        }
    }

    /// Sends a request and reads the response head.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: &[u8],
        extra: &[(&str, &str)],
    ) -> Head {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(k) = key {
            req.push_str(&format!("Authorization: Bearer {k}\r\n"));
        }
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let s = self.r.get_mut();
        s.write_all(req.as_bytes()).expect("write head");
        s.write_all(body).expect("write body");
        self.head()
    }

    pub fn post(&mut self, path: &str, key: &str, body: &Value) -> Head {
        self.send("POST", path, Some(key), body.to_string().as_bytes(), &[])
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("read line");
        l.trim_end_matches(['\r', '\n']).to_string()
    }

    fn head(&mut self) -> Head {
        let status_line = self.line();
        let status = status_line
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        Head { status, headers }
    }

    /// The next chunk of a chunked body (`None` at its end).
    pub fn chunk(&mut self) -> Option<Vec<u8>> {
        let size = self.line();
        let n = usize::from_str_radix(size.trim(), 16).ok()?;
        let mut buf = vec![0; n + 2];
        self.r.read_exact(&mut buf).ok()?;
        buf.truncate(n);
        (n > 0).then_some(buf)
    }

    /// The whole body of the response whose head is `head`.
    pub fn body(&mut self, head: &Head) -> Vec<u8> {
        if head.chunked() {
            let mut out = Vec::new();
            while let Some(c) = self.chunk() {
                out.extend(c);
            }
            return out;
        }
        let n: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut buf = vec![0; n];
        self.r.read_exact(&mut buf).expect("body");
        buf
    }

    pub fn json(&mut self, head: &Head) -> Value {
        let b = self.body(head);
        serde_json::from_slice(&b)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&b)))
    }

    /// SSE events as they arrive, until the body ends or `stop` says so.
    pub fn events_until(&mut self, stop: impl Fn(&Seen) -> bool) -> Vec<Seen> {
        let mut reader = SseReader::default();
        let mut seen = Vec::new();
        while let Some(c) = self.chunk() {
            reader.push(&c);
            let events = reader.scan(1 << 26).expect("event size");
            let at = Instant::now();
            let mut batch = Vec::new();
            for e in &events {
                batch.push(Seen {
                    at,
                    event: reader.event(e).map(str::to_string),
                    data: serde_json::from_str(reader.data(e)).unwrap_or(Value::Null),
                    raw: String::new(),
                });
            }
            let total = events.last().map_or(0, |e| e.span.end);
            let bytes = reader.take(total);
            for (s, e) in batch.iter_mut().zip(&events) {
                s.raw = String::from_utf8_lossy(&bytes[e.span.clone()]).into_owned();
            }
            for s in batch {
                let done = stop(&s);
                seen.push(s);
                if done {
                    return seen;
                }
            }
        }
        seen
    }

    pub fn events(&mut self) -> Vec<Seen> {
        self.events_until(|_| false)
    }
}

/// One request on a fresh connection: (status, JSON body) — for an SSE answer, its last
/// event's data.
pub fn post_json(addr: &str, path: &str, key: &str, body: &Value) -> (u16, Value) {
    let mut c = Conn::open(addr);
    let head = c.post(path, key, body);
    if head
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream"))
    {
        let last = c.events().pop().map(|e| e.data).unwrap_or(Value::Null);
        return (head.status, last);
    }
    let v = c.json(&head);
    (head.status, v)
}
