//! [`DelayRelay`]: a TCP relay on 127.0.0.1 that holds every chunk of bytes for a set one-way
//! delay before passing it on, each way, in order. It stands in for `tc netem delay` on kernels
//! built without netem: a client pointed at the relay sees the upstream's round trip grow by
//! twice the delay. Loss and partitions are the kernel's job ([`crate::NetLink`]); the relay
//! only adds time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Bytes read at a time from either side.
const CHUNK_BYTES: usize = 16 * 1024;
/// Chunks in flight per direction of a connection; a full line makes the reader wait (the
/// sender's TCP window then fills, as behind a slow link).
const CHUNKS_IN_FLIGHT: usize = 1_024;
/// How long connecting to the upstream may take before the client's connection is closed.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections relayed at once; more are closed at accept (a test needs a handful).
const MAX_CONNECTIONS: usize = 256;

/// Relays `127.0.0.1:<port>` to `upstream` with a delay each way. Dropping it closes every
/// relayed connection.
pub struct DelayRelay {
    addr: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on 127.0.0.1:0 and relays each connection to `upstream`, holding bytes
    /// `one_way_delay` in each direction.
    pub fn start(upstream: SocketAddr, one_way_delay: Duration) -> Result<DelayRelay> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding the relay")?;
        let addr = listener.local_addr()?;
        let delay_ms = Arc::new(AtomicU64::new(one_way_delay.as_millis() as u64));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (delay_ms, stop, conns) = (delay_ms.clone(), stop.clone(), conns.clone());
            thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let delay_ms = delay_ms.clone();
                    let conns = conns.clone();
                    thread::spawn(move || relay(client, upstream, delay_ms, conns));
                }
            })
        };
        Ok(DelayRelay {
            addr,
            delay_ms,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }

    /// Where clients connect: `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the one-way delay for bytes read from now on.
    pub fn set_delay(&self, one_way_delay: Duration) {
        self.delay_ms
            .store(one_way_delay.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor, blocked in accept(), so it sees `stop`.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for s in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// One connection: two one-way pipes, each a reader and a writer thread with a bounded line of
/// (due time, bytes) between them.
fn relay(
    client: TcpStream,
    upstream: SocketAddr,
    delay_ms: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
) {
    let Ok(server) = TcpStream::connect_timeout(&upstream, UPSTREAM_CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
        // Forget connections that have ended (a shut-down clone is harmless to keep, but the
        // list must stay bounded).
        conns.retain(|s| s.peer_addr().is_ok());
        if conns.len() >= MAX_CONNECTIONS {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        for s in [&client, &server] {
            if let Ok(c) = s.try_clone() {
                conns.push(c);
            }
        }
    }
    for (from, to) in [(&client, &server), (&server, &client)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        };
        let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT);
        let delay_ms = delay_ms.clone();
        thread::spawn(move || read_side(from, tx, delay_ms));
        thread::spawn(move || write_side(to, rx));
    }
}

fn read_side(mut from: TcpStream, tx: SyncSender<(Instant, Vec<u8>)>, delay_ms: Arc<AtomicU64>) {
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = Instant::now() + Duration::from_millis(delay_ms.load(Ordering::SeqCst));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    // Dropping `tx` tells the writer the stream ended once it has passed on what it holds.
}

fn write_side(mut to: TcpStream, rx: Receiver<(Instant, Vec<u8>)>) {
    for (due, bytes) in rx {
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        if to.write_all(&bytes).is_err() {
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
