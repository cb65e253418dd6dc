//! A TCP proxy on 127.0.0.1 between the daemon and MariaDB that can break
//! the connection in the precise ways the fault tests need:
//!
//! - [`Proxy::swallow_next_commit_reply`]: the next `COMMIT` reaches the
//!   server and is carried out, but its OK packet never reaches the client,
//!   whose connection is closed instead: the client cannot tell whether the
//!   transaction was applied (the ambiguous outcome of SPEC §6);
//! - [`Proxy::freeze`]: nothing passes in either direction, new connections
//!   included (a server that stopped answering without closing anything);
//! - [`Proxy::thaw`]: everything flows again.
//!
//! It runs on a thread and runtime of its own, so tests that block (waiting
//! for a spawned binary's log line) do not stall it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What passes through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Pass,
    Frozen,
}

struct State {
    flow: watch::Sender<Flow>,
    /// Armed by `swallow_next_commit_reply`; the first connection to send a
    /// COMMIT takes it.
    swallow_commit: AtomicBool,
    /// COMMITs whose reply was swallowed.
    swallowed: AtomicU64,
    /// Connections accepted.
    connections: AtomicU64,
    /// Pieces of client data that arrived while frozen (a query waiting).
    held: AtomicU64,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Forwards 127.0.0.1:<port> to `target` (host:port).
    pub fn start(target: &str) -> Proxy {
        let target: SocketAddr = target.parse().expect("target is IP:PORT");
        let (flow, _) = watch::channel(Flow::Pass);
        let state = Arc::new(State {
            flow,
            swallow_commit: AtomicBool::new(false),
            swallowed: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            held: AtomicU64::new(0),
        });
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                let accept = async {
                    loop {
                        let Ok((client, _)) = listener.accept().await else {
                            continue;
                        };
                        st.connections.fetch_add(1, Ordering::SeqCst);
                        tokio::spawn(serve(client, target, Arc::clone(&st)));
                    }
                };
                tokio::select! {
                    () = accept => {}
                    _ = stopped => {}
                }
            });
            rt.shutdown_background();
        });
        Proxy {
            port,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `mysql://user@127.0.0.1:<port>/db` for a URL naming the real server.
    /// mysql_async would otherwise switch a connection to 127.0.0.1 over to
    /// the server's unix socket (`prefer_socket`), around the proxy.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme_user, rest) = url.split_once('@').expect("URL with user@host");
        let (_, path) = rest.split_once('/').expect("URL with a database");
        let sep = if path.contains('?') { '&' } else { '?' };
        format!(
            "{scheme_user}@127.0.0.1:{}/{path}{sep}prefer_socket=false",
            self.port
        )
    }

    /// The next COMMIT is carried out by the server, but its reply is
    /// dropped and the client's connection closed.
    pub fn swallow_next_commit_reply(&self) {
        self.state.swallow_commit.store(true, Ordering::SeqCst);
    }

    /// How many COMMIT replies were swallowed so far.
    pub fn swallowed(&self) -> u64 {
        self.state.swallowed.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Pieces of client data held back by a freeze so far (a client is
    /// waiting for an answer).
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Nothing passes any more (connections stay open).
    pub fn freeze(&self) {
        self.state.flow.send_replace(Flow::Frozen);
    }

    /// Everything flows again.
    pub fn thaw(&self) {
        self.state.flow.send_replace(Flow::Pass);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits while the proxy is frozen.
async fn wait_flowing(flow: &mut watch::Receiver<Flow>) {
    let _ = flow.wait_for(|f| *f == Flow::Pass).await;
}

async fn serve(client: TcpStream, target: SocketAddr, state: Arc<State>) {
    let mut flow = state.flow.subscribe();
    wait_flowing(&mut flow).await;
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    // Set when this connection's COMMIT went out with its reply to be dropped.
    let commit_sent = Arc::new(AtomicBool::new(false));

    let up = {
        let state = Arc::clone(&state);
        let commit_sent = Arc::clone(&commit_sent);
        let mut flow = state.flow.subscribe();
        async move {
            let mut framer = Framer::default();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if *flow.borrow() == Flow::Frozen {
                    state.held.fetch_add(1, Ordering::SeqCst);
                }
                wait_flowing(&mut flow).await;
                let saw_commit = framer.push(&buf[..n]);
                if saw_commit && state.swallow_commit.swap(false, Ordering::SeqCst) {
                    commit_sent.store(true, Ordering::SeqCst);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = sw.shutdown().await;
        }
    };
    let down = {
        let state = Arc::clone(&state);
        let mut flow = state.flow.subscribe();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                wait_flowing(&mut flow).await;
                if commit_sent.load(Ordering::SeqCst) {
                    // The server has answered the COMMIT: it was carried
                    // out. Drop the answer and cut the client off.
                    state.swallowed.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                if cw.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            let _ = cw.shutdown().await;
        }
    };
    // Either direction ending ends the connection (dropping both halves).
    tokio::select! {
        () = up => {}
        () = down => {}
    }
}

/// Splits the client's byte stream into MySQL packets (3-byte little-endian
/// length, 1-byte sequence, payload) and spots `COM_QUERY "COMMIT"`.
#[derive(Default)]
struct Framer {
    pending: Vec<u8>,
}

impl Framer {
    /// Adds bytes; true if a complete COMMIT packet was among them.
    fn push(&mut self, bytes: &[u8]) -> bool {
        self.pending.extend_from_slice(bytes);
        let mut found = false;
        loop {
            if self.pending.len() < 4 {
                return found;
            }
            let len = usize::from(self.pending[0])
                | usize::from(self.pending[1]) << 8
                | usize::from(self.pending[2]) << 16;
            if self.pending.len() < 4 + len {
                return found;
            }
            let payload = &self.pending[4..4 + len];
            // COM_QUERY is 0x03, followed by the statement text.
            if payload.first() == Some(&0x03) && payload[1..].eq_ignore_ascii_case(b"COMMIT") {
                found = true;
            }
            self.pending.drain(..4 + len);
        }
    }
}
