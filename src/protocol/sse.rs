//! Server-sent events as the upstream writes them (docs/DESIGN.md#http-surface): bytes in,
//! whole events out, each with its place in the buffer (its bytes are relayed unchanged) and
//! its `data` (what the turn's bookkeeping reads). Pure and incremental: chunks may split an
//! event anywhere. The common event — one `data:` line — is read in place, without a copy.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// Accumulates bytes and finds whole events.
#[derive(Debug, Default)]
pub struct SseReader {
    buf: BytesMut,
    /// Bytes of `buf` already searched for an event end.
    scanned: usize,
}

/// One whole event at the front of the reader's buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanned {
    /// Its bytes in the buffer, its blank line included.
    pub span: Range<usize>,
    /// Its `event:` field, in the buffer.
    event: Option<Range<usize>>,
    data: Data,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Data {
    /// One `data:` line (or none: empty), in the buffer.
    Span(Range<usize>),
    /// Several `data:` lines, joined by `\n`.
    Joined(String),
}

/// An event bigger than the reader's bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an upstream event exceeded {0} bytes")]
pub struct TooLarge(pub usize);

impl SseReader {
    /// Adds a chunk.
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Every whole event at the front of the buffer, in order; `max` bounds the bytes of the
    /// event still arriving. The caller `take`s what it scanned before the next scan (the
    /// search resumes where this one stopped).
    pub fn scan(&mut self, max: usize) -> Result<Vec<Scanned>, TooLarge> {
        let b = &self.buf[..];
        let mut ends = Vec::new();
        // An end split across chunks is found: the search resumes 3 bytes back.
        for i in self.scanned.saturating_sub(3).max(1)..b.len() {
            if b[i] == b'\n' && (b[i - 1] == b'\n' || (i >= 3 && &b[i - 3..i] == b"\r\n\r")) {
                ends.push(i + 1);
            }
        }
        self.scanned = b.len();
        let last = ends.last().copied().unwrap_or(0);
        if b.len() - last > max {
            return Err(TooLarge(max));
        }
        let mut start = 0;
        Ok(ends
            .into_iter()
            .map(|end| {
                let e = parse(b, start..end);
                start = end;
                e
            })
            .collect())
    }

    /// The `data` of a scanned event (valid until the next `take`).
    pub fn data<'a>(&'a self, e: &'a Scanned) -> &'a str {
        match &e.data {
            Data::Span(r) => std::str::from_utf8(&self.buf[r.clone()]).unwrap_or(""),
            Data::Joined(s) => s,
        }
    }

    /// The `event` field of a scanned event (valid until the next `take`).
    pub fn event<'a>(&'a self, e: &'a Scanned) -> Option<&'a str> {
        e.event
            .as_ref()
            .and_then(|r| std::str::from_utf8(&self.buf[r.clone()]).ok())
    }

    /// Removes the first `n` bytes (whole events) and hands them over, to be relayed as they
    /// came; spans of events scanned before are invalid afterwards.
    pub fn take(&mut self, n: usize) -> Bytes {
        let n = n.min(self.buf.len());
        self.scanned = self.scanned.saturating_sub(n);
        self.buf.split_to(n).freeze()
    }

    /// Bytes received that are not a whole event yet (after a `take` of every scanned event).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The fields of the event at `span` of `b`.
fn parse(b: &[u8], span: Range<usize>) -> Scanned {
    let mut event = None;
    let mut lines: Vec<Range<usize>> = Vec::new();
    let mut at = span.start;
    while at < span.end {
        let len = b[at..span.end]
            .iter()
            .position(|&c| c == b'\n' || c == b'\r')
            .unwrap_or(span.end - at);
        let line = at..at + len;
        at += len + 1;
        let text = &b[line.clone()];
        if text.is_empty() || text[0] == b':' {
            continue;
        }
        let colon = text.iter().position(|&c| c == b':').unwrap_or(text.len());
        let mut value = line.start + (colon + 1).min(text.len())..line.end;
        if b.get(value.start) == Some(&b' ') && value.start < value.end {
            value.start += 1;
        }
        match &text[..colon] {
            b"event" => event = Some(value),
            b"data" => lines.push(value),
            _ => {}
        }
    }
    let data = match lines.len() {
        0 => Data::Span(span.start..span.start),
        1 => Data::Span(lines[0].clone()),
        _ => Data::Joined(
            lines
                .iter()
                .map(|r| String::from_utf8_lossy(&b[r.clone()]))
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    };
    Scanned { span, event, data }
}

/// An SSE `error` event carrying the OpenAI error object (what a client reads after the
/// stream started).
pub fn error_event(body: &serde_json::Value) -> Bytes {
    event(&"error", &body.to_string())
}

/// One SSE event: its `event` field and its one-line `data` (JSON has no raw newline).
pub fn event(kind: &impl std::fmt::Display, data: &str) -> Bytes {
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every whole event now in the reader: (event, data, bytes), consumed.
    fn all(reader: &mut SseReader) -> Vec<(Option<String>, String, Vec<u8>)> {
        let scanned = reader.scan(1 << 20).unwrap();
        let fields: Vec<_> = scanned
            .iter()
            .map(|e| {
                (
                    reader.event(e).map(str::to_string),
                    reader.data(e).to_string(),
                    e.span.clone(),
                )
            })
            .collect();
        let total = scanned.last().map_or(0, |e| e.span.end);
        let bytes = reader.take(total);
        fields
            .into_iter()
            .map(|(ev, data, span)| (ev, data, bytes[span].to_vec()))
            .collect()
    }

    #[test]
    fn events_split_anywhere() {
        let stream = b"event: response.created\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n";
        for cut in 0..stream.len() {
            let mut r = SseReader::default();
            r.push(&stream[..cut]);
            let mut got = all(&mut r);
            r.push(&stream[cut..]);
            got.extend(all(&mut r));
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(got[0].0.as_deref(), Some("response.created"));
            assert_eq!(got[0].1, "{\"a\":1}");
            assert_eq!(got[1].1, "");
            assert_eq!(got[2].1, "{\"delta\":\"x\"}");
            let raw: Vec<u8> = got.iter().flat_map(|e| e.2.clone()).collect();
            assert_eq!(raw, stream, "relayed bytes are the received bytes");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn crlf_and_multiline_data() {
        let mut r = SseReader::default();
        r.push(b"data: a\r\ndata: b\r\n\r\ndata:c\n\n");
        let got = all(&mut r);
        assert_eq!(got[0].1, "a\nb");
        assert_eq!(got[1].1, "c");
    }

    #[test]
    fn partial_take_keeps_the_rest() {
        let mut r = SseReader::default();
        r.push(b"data: 1\n\ndata: 2\n\ndata: 3");
        let s = r.scan(1 << 20).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(r.data(&s[1]), "2");
        // Relay the first, keep the second (a terminal held back), then the third arrives.
        assert_eq!(&r.take(s[0].span.end)[..], b"data: 1\n\n");
        let held = r.take(s[1].span.end - s[1].span.start);
        assert_eq!(&held[..], b"data: 2\n\n");
        r.push(b"\n\n");
        let s = r.scan(1 << 20).unwrap();
        assert_eq!((s.len(), r.data(&s[0])), (1, "3"));
    }

    #[test]
    fn bounded() {
        let mut r = SseReader::default();
        r.push(&[b'x'; 100]);
        assert!(r.scan(64).is_err());
        let mut r = SseReader::default();
        // Whole events do not count against the bound: only the one still arriving.
        r.push(b"data: 1\n\nda");
        let s = r.scan(4).unwrap();
        assert_eq!(s.len(), 1);
        r.take(s[0].span.end);
        r.push(b"ta: 2345");
        assert!(r.scan(4).is_err());
    }
}
