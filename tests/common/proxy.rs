//! A TCP proxy the test controls. `cut`: every connection through it dies and new ones are
//! dropped at once, as when the database host goes away. `blackhole`: connections stay open
//! but nothing is forwarded any more and new ones are accepted and never answered — a server
//! that accepts connections but never answers. `restore`: connections work again (those held
//! by a blackhole are dropped, so clients reconnect). `retarget`: a graceful restart behind a
//! load balancer — the existing connections stay open and go silent, new ones reach `target`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

const UP: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

/// One proxied connection: its mode and both sockets.
struct Conn {
    mode: Arc<AtomicU8>,
    sockets: Vec<TcpStream>,
}

pub struct Proxy {
    pub addr: String,
    /// What new connections get.
    mode: Arc<AtomicU8>,
    target: Arc<Mutex<String>>,
    conns: Arc<Mutex<Vec<Conn>>>,
}

/// Copies `from` → `to` while the connection is up; in a blackhole, reads and drops.
fn pipe(mut from: TcpStream, mut to: TcpStream, mode: Arc<AtomicU8>) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match mode.load(Ordering::SeqCst) {
                UP => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                BLACKHOLE => {}
                _ => break,
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let mode = Arc::new(AtomicU8::new(UP));
        let target = Arc::new(Mutex::new(target.to_string()));
        let conns: Arc<Mutex<Vec<Conn>>> = Arc::default();
        let (mode2, conns2, target2) = (mode.clone(), conns.clone(), target.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                match mode2.load(Ordering::SeqCst) {
                    CUT => {
                        drop(client);
                        continue;
                    }
                    BLACKHOLE => {
                        // Accepted, never answered.
                        conns2.lock().unwrap().push(Conn {
                            mode: Arc::new(AtomicU8::new(BLACKHOLE)),
                            sockets: vec![client],
                        });
                        continue;
                    }
                    _ => {}
                }
                let to = target2.lock().unwrap().clone();
                let Ok(server) = TcpStream::connect(&to) else {
                    continue;
                };
                if let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) {
                    let conn_mode = Arc::new(AtomicU8::new(UP));
                    conns2.lock().unwrap().push(Conn {
                        mode: conn_mode.clone(),
                        sockets: vec![c3, s3],
                    });
                    pipe(client, s2, conn_mode.clone());
                    pipe(server, c2, conn_mode);
                }
            }
        });
        Proxy {
            addr,
            mode,
            target,
            conns,
        }
    }

    fn set_all(&self, mode: u8, drop_them: bool) {
        let mut conns = self.conns.lock().unwrap();
        for c in conns.iter() {
            c.mode.store(mode, Ordering::SeqCst);
            if drop_them {
                for s in &c.sockets {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        if drop_them {
            conns.clear();
        }
    }

    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.set_all(CUT, true);
    }

    pub fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::SeqCst);
        self.set_all(BLACKHOLE, false);
    }

    pub fn restore(&self) {
        let was = self.mode.swap(UP, Ordering::SeqCst);
        if was == BLACKHOLE {
            self.set_all(CUT, true);
        }
    }

    /// Existing connections stay open and silent; new ones go to `target`.
    pub fn retarget(&self, target: &str) {
        self.set_all(BLACKHOLE, false);
        *self.target.lock().unwrap() = target.to_string();
    }
}
