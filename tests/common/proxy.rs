//! A TCP proxy the test controls. `cut`: every connection through it dies and new ones are
//! dropped at once, as when the database host goes away. `blackhole`: connections stay open
//! but nothing is forwarded any more and new ones are accepted and never answered — a database
//! that accepts connections but never answers. `restore`: connections work again (those held
//! by a blackhole are dropped, so clients reconnect).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

const UP: u8 = 0;
const CUT: u8 = 1;
const BLACKHOLE: u8 = 2;

pub struct Proxy {
    pub addr: String,
    mode: Arc<AtomicU8>,
    live: Arc<Mutex<Vec<TcpStream>>>,
}

/// Copies `from` → `to` while the proxy is up; in a blackhole, reads and drops.
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
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (mode2, live2, target) = (mode.clone(), live.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                match mode2.load(Ordering::SeqCst) {
                    CUT => {
                        drop(client);
                        continue;
                    }
                    BLACKHOLE => {
                        // Accepted, never answered.
                        live2.lock().unwrap().push(client);
                        continue;
                    }
                    _ => {}
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                if let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) {
                    live2.lock().unwrap().extend([c3, s3]);
                    pipe(client, s2, mode2.clone());
                    pipe(server, c2, mode2.clone());
                }
            }
        });
        Proxy { addr, mode, live }
    }

    fn drop_all(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    pub fn cut(&self) {
        self.mode.store(CUT, Ordering::SeqCst);
        self.drop_all();
    }

    pub fn blackhole(&self) {
        self.mode.store(BLACKHOLE, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        let was = self.mode.swap(UP, Ordering::SeqCst);
        if was == BLACKHOLE {
            self.drop_all();
        }
    }
}
