//! Server-sent events as the upstream writes them (docs/DESIGN.md#http-surface): bytes in,
//! whole events out, each with its exact bytes (relayed unchanged) and its `data` (what the
//! turn's bookkeeping reads). Pure and incremental: chunks may split an event anywhere.

use bytes::{Bytes, BytesMut};

/// One whole event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event's bytes as received, its blank line included.
    pub raw: Bytes,
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines joined by `\n` (empty for a comment-only block).
    pub data: String,
}

/// Accumulates bytes and hands out whole events.
#[derive(Debug, Default)]
pub struct SseReader {
    buf: BytesMut,
    /// Bytes of `buf` already searched for an event end.
    scanned: usize,
}

/// An event bigger than the reader's bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an upstream event exceeded {0} bytes")]
pub struct TooLarge(pub usize);

impl SseReader {
    /// Adds a chunk; `max` bounds the bytes of one event.
    pub fn push(&mut self, chunk: &[u8], max: usize) -> Result<(), TooLarge> {
        self.buf.extend_from_slice(chunk);
        if self.buf.len() > max && self.end_of_event().is_none() {
            return Err(TooLarge(max));
        }
        Ok(())
    }

    /// The next whole event, if one has arrived.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        let end = self.end_of_event()?;
        let raw = self.buf.split_to(end).freeze();
        self.scanned = 0;
        Some(parse(raw))
    }

    /// Bytes received that are not a whole event yet.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Where the first event ends (after its blank line: `\n\n` or `\r\n\r\n`).
    fn end_of_event(&mut self) -> Option<usize> {
        let b = &self.buf[..];
        // An end split across chunks is found: the search resumes 3 bytes back.
        let from = self.scanned.saturating_sub(3).max(1);
        for i in from..b.len() {
            if b[i] == b'\n' && (b[i - 1] == b'\n' || (i >= 3 && &b[i - 3..i] == b"\r\n\r")) {
                return Some(i + 1);
            }
        }
        self.scanned = b.len();
        None
    }
}

fn parse(raw: Bytes) -> SseEvent {
    let text = String::from_utf8_lossy(&raw);
    let mut event = None;
    let mut data: Option<String> = None;
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_string()),
            "data" => match &mut data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => data = Some(value.to_string()),
            },
            _ => {}
        }
    }
    SseEvent {
        raw,
        event,
        data: data.unwrap_or_default(),
    }
}

/// An SSE `error` event carrying the OpenAI error object (what a client reads after the
/// stream started).
pub fn error_event(body: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(reader: &mut SseReader) -> Vec<SseEvent> {
        std::iter::from_fn(|| reader.next_event()).collect()
    }

    #[test]
    fn events_split_anywhere() {
        let stream = b"event: response.created\ndata: {\"a\":1}\n\n: keep-alive\n\nevent: response.output_text.delta\ndata: {\"delta\":\"x\"}\n\n";
        for cut in 0..stream.len() {
            let mut r = SseReader::default();
            r.push(&stream[..cut], 1 << 20).unwrap();
            let mut got = all(&mut r);
            r.push(&stream[cut..], 1 << 20).unwrap();
            got.extend(all(&mut r));
            assert_eq!(got.len(), 3, "cut at {cut}");
            assert_eq!(got[0].event.as_deref(), Some("response.created"));
            assert_eq!(got[0].data, "{\"a\":1}");
            assert_eq!(got[1].data, "");
            assert_eq!(got[2].data, "{\"delta\":\"x\"}");
            let raw: Vec<u8> = got.iter().flat_map(|e| e.raw.to_vec()).collect();
            assert_eq!(raw, stream, "relayed bytes are the received bytes");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn crlf_and_multiline_data() {
        let mut r = SseReader::default();
        r.push(b"data: a\r\ndata: b\r\n\r\ndata:c\n\n", 1 << 20)
            .unwrap();
        let got = all(&mut r);
        assert_eq!(got[0].data, "a\nb");
        assert_eq!(got[1].data, "c");
    }

    #[test]
    fn bounded() {
        let mut r = SseReader::default();
        assert!(r.push(&[b'x'; 100], 64).is_err());
        let mut r = SseReader::default();
        // A whole event in the buffer does not count against the bound.
        r.push(b"data: 1\n\n", 4).unwrap();
        assert_eq!(all(&mut r).len(), 1);
    }
}
