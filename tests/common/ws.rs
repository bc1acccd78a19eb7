//! A plain blocking WebSocket client (tungstenite), independent of the actix stack under test.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::client::IntoClientRequest;
use tungstenite::protocol::WebSocket;
use tungstenite::{Error, Message};

/// What the next read saw.
#[derive(Debug)]
pub enum Recv {
    /// A text frame that parsed as JSON.
    Json(Value),
    /// A text frame that did not.
    Text(String),
    Binary(Vec<u8>),
    Ping,
    Pong,
    /// A close frame with its code (1005 when none).
    Close(u16),
    /// The connection ended without a close frame.
    Gone(String),
    Timeout,
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    /// The 101's headers, lower-case names (empty for `with_first_frame`).
    pub handshake: Vec<(String, String)>,
}

impl Client {
    /// Opens `ws://addr{path}` with these headers; Err((status, body)) when the server refuses.
    pub fn connect(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, (u16, String)> {
        let mut req = format!("ws://{addr}{path}")
            .into_client_request()
            .expect("request");
        for (k, v) in headers {
            req.headers_mut().insert(
                tungstenite::http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
                v.parse().expect("header value"),
            );
        }
        let stream = TcpStream::connect(addr).expect("tcp connect");
        stream.set_nodelay(true).ok();
        match tungstenite::client(req, stream) {
            Ok((ws, res)) => {
                let handshake = res
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                    .collect();
                Ok(Client { ws, handshake })
            }
            Err(tungstenite::HandshakeError::Failure(Error::Http(resp))) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned());
                Err((resp.status().as_u16(), body.unwrap_or_default()))
            }
            Err(e) => Err((0, e.to_string())),
        }
    }

    /// A WebSocket on `/v1/responses` whose first frame (masked text) goes out in the same write
    /// as its handshake, before the 101: the server finds it among the bytes it read with the
    /// request's head, and must not drop them.
    pub fn with_first_frame(addr: &str, headers: &[(&str, &str)], frame: &str) -> Client {
        use std::io::{Read, Write};
        let mut bytes = String::from("GET /v1/responses HTTP/1.1\r\nHost: x\r\n");
        for (k, v) in headers {
            bytes.push_str(&format!("{k}: {v}\r\n"));
        }
        bytes.push_str(
            "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        let mut bytes = bytes.into_bytes();
        let len = u16::try_from(frame.len()).expect("a frame under 64 KiB");
        // The all-zero mask leaves the payload as it is.
        bytes.extend_from_slice(&[0x81, 0x80 | 126]);
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        bytes.extend_from_slice(frame.as_bytes());
        let mut t = TcpStream::connect(addr).expect("tcp connect");
        t.write_all(&bytes).expect("write");
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            t.read_exact(&mut byte).expect("response head");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Client {
            ws: WebSocket::from_raw_socket(t, tungstenite::protocol::Role::Client, None),
            handshake: Vec::new(),
        }
    }

    pub fn bearer(addr: &str, key: &str) -> Client {
        let auth = format!("Bearer {key}");
        Client::connect(addr, "/v1/responses", &[("authorization", &auth)]).expect("connect")
    }

    pub fn send(&mut self, v: &Value) {
        self.ws.send(Message::text(v.to_string())).expect("send");
    }

    /// A header of the 101, by its lower-case name.
    pub fn handshake_header(&self, name: &str) -> Option<&str> {
        self.handshake
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(Message::text(t)).expect("send");
    }

    pub fn recv(&mut self, timeout: Duration) -> Recv {
        self.ws
            .get_mut()
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
            .ok();
        match self.ws.read() {
            Ok(Message::Text(t)) => match serde_json::from_str(t.as_str()) {
                Ok(v) => Recv::Json(v),
                Err(_) => Recv::Text(t.to_string()),
            },
            Ok(Message::Binary(b)) => Recv::Binary(b.to_vec()),
            Ok(Message::Ping(_)) => Recv::Ping,
            Ok(Message::Pong(_)) => Recv::Pong,
            Ok(Message::Close(c)) => Recv::Close(c.map_or(1005, |c| u16::from(c.code))),
            Ok(Message::Frame(_)) => Recv::Text(String::new()),
            Err(Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Recv::Timeout
            }
            Err(e) => Recv::Gone(e.to_string()),
        }
    }

    /// The next JSON event, skipping control frames; panics on anything else.
    pub fn next_event(&mut self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Recv::Json(v) => return v,
                Recv::Ping | Recv::Pong => continue,
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// Events up to and including the terminal (or a wrapped error).
    pub fn until_terminal(&mut self, timeout: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let e = self.next_event(timeout);
            let done = is_terminal(&e);
            out.push(e);
            if done {
                return out;
            }
        }
    }
}

pub fn is_terminal(e: &Value) -> bool {
    matches!(
        e["type"].as_str(),
        Some(
            "response.completed"
                | "response.incomplete"
                | "response.failed"
                | "response.cancelled"
                | "error"
        )
    )
}
