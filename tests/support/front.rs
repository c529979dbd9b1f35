//! A front for the loopback origin: a TCP relay on 127.0.0.1:0 between the agent and the
//! origin, for what the origin's own knobs cannot show. It can answer the first `refusals`
//! ranged GETs (any `Range` but the `bytes=0-0` probe a fetch starts with) itself with
//! `503 Service Unavailable` and a `Retry-After` (the origin's `Fault::Status` counts every
//! GET, the probe included, so it cannot make only a content range fail), and it can hold
//! every relayed request for a `delay` before passing it on, so that requests the agent
//! sends in parallel are visibly in flight together (the origin answers a 64 KiB range in
//! well under a millisecond, too fast for its own concurrency count to be reliable).
//!
//! A [`Judge`] may answer any request itself instead (a gate that refuses what the upstream
//! server cannot: an expired session token, say), and `upstream_host` rewrites the `Host`
//! header to the upstream address, for servers that route by it (fake-gcs-server).
//!
//! Every request head is logged with its arrival time. A relayed request goes upstream with
//! `Connection: close`; its whole answer is read, then passed on, and the client connection
//! ends with it. A refused one keeps its connection open. So every request reaches the front
//! on a fresh or refused connection, and none escapes inspection. Answers are buffered whole:
//! the front is meant for objects of a few MiB, and for answers that end.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// What the front does besides relaying.
#[derive(Clone, Debug, Default)]
pub struct FrontOptions {
    /// How many ranged GETs to answer with 503 before relaying them.
    pub refusals: usize,
    /// The `Retry-After` value of those answers, if any.
    pub retry_after: Option<String>,
    /// How long to hold each relayed request before passing it on.
    pub delay: Duration,
    /// Answers a request head itself when it returns a whole HTTP response.
    pub judge: Option<Judge>,
    /// Whether relayed requests carry `Host: <upstream address>` instead of their own.
    pub upstream_host: bool,
}

/// Given a request head, the whole response to answer it with, or `None` to relay it.
pub type Verdict = dyn Fn(&str) -> Option<String> + Send + Sync;

/// See [`FrontOptions::judge`].
#[derive(Clone)]
pub struct Judge(pub Arc<Verdict>);

impl std::fmt::Debug for Judge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Judge")
    }
}

/// One request head the front inspected.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub range: Option<String>,
    /// Whether the front answered it with 503 or its judge answered it (otherwise it was
    /// relayed).
    pub refused: bool,
}

/// A running front; dropping it stops the accept loop and every relayed connection.
pub struct Front {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

struct Shared {
    upstream: SocketAddr,
    delay: Duration,
    retry_after: Option<String>,
    judge: Option<Judge>,
    upstream_host: bool,
    state: Mutex<State>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct State {
    refusals: usize,
    seen: Vec<Seen>,
}

impl Front {
    /// Starts a front relaying to `upstream`.
    pub async fn start(upstream: SocketAddr, options: FrontOptions) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let addr = listener.local_addr().expect("front address");
        let shared = Arc::new(Shared {
            upstream,
            delay: options.delay,
            retry_after: options.retry_after,
            judge: options.judge,
            upstream_host: options.upstream_host,
            state: Mutex::new(State {
                refusals: options.refusals,
                seen: Vec::new(),
            }),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Front {
            addr,
            shared,
            accept,
        }
    }

    /// `http://127.0.0.1:FRONT_PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request head inspected so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Highest number of relayed requests in flight at once, each from the arrival of its
    /// head until the origin's whole answer is in (before the client gets any of it), so
    /// this never exceeds the number of requests the client really had outstanding.
    pub fn max_concurrent(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Logs `head` and returns the 503 to send if this request is refused.
    fn decide(&self, head: &[u8]) -> Option<String> {
        let text = String::from_utf8_lossy(head);
        let method = text.split(' ').next().unwrap_or("").to_owned();
        let range = header(&text, "range");
        let mut state = self.lock();
        let ranged = method == "GET" && range.as_deref().is_some_and(|r| r != "bytes=0-0");
        let judged = self.judge.as_ref().and_then(|judge| (judge.0)(&text));
        let refused = judged.is_none() && ranged && state.refusals > 0;
        if refused {
            state.refusals -= 1;
        }
        let at = Instant::now();
        state.seen.push(Seen {
            at,
            method,
            range,
            refused: refused || judged.is_some(),
        });
        judged.or_else(|| refused.then(|| self.refusal()))
    }

    fn refusal(&self) -> String {
        let retry_after = self.retry_after.as_ref();
        let retry_after = retry_after.map_or(String::new(), |v| format!("Retry-After: {v}\r\n"));
        format!("HTTP/1.1 503 Service Unavailable\r\n{retry_after}Content-Length: 0\r\n\r\n")
    }
}

/// Counts a relayed request as in flight until dropped.
struct Flight(Arc<Shared>);

impl Flight {
    fn enter(shared: &Arc<Shared>) -> Flight {
        let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Flight(shared.clone())
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        connections.spawn(serve(stream, shared.clone()));
    }
}

/// Answers or relays the requests of one client connection.
async fn serve(mut client: TcpStream, shared: Arc<Shared>) -> io::Result<()> {
    let mut pending = Vec::new();
    loop {
        let Some(head) = read_head(&mut client, &mut pending).await? else {
            return Ok(());
        };
        if let Some(answer) = shared.decide(&head) {
            client.write_all(answer.as_bytes()).await?;
            continue;
        }
        let flight = Flight::enter(&shared);
        tokio::time::sleep(shared.delay).await;
        let mut origin = TcpStream::connect(shared.upstream).await?;
        let host = shared.upstream_host.then(|| shared.upstream.to_string());
        origin.write_all(&closing(&head, host.as_deref())).await?;
        origin.write_all(&pending).await?;
        let mut answer = Vec::new();
        origin.read_to_end(&mut answer).await?;
        // Out of flight before the client sees a byte, so that a request the client sends
        // once this answer is complete can never be counted as overlapping it.
        drop(flight);
        client.write_all(&answer).await?;
        return client.shutdown().await;
    }
}

/// `head` with any `Connection` header replaced by `Connection: close`, and its `Host` by
/// `host` when given.
fn closing(head: &[u8], host: Option<&str>) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let lines = text.split("\r\n").filter(|l| !l.is_empty());
    let replaced = |l: &&str| {
        let l = l.to_ascii_lowercase();
        l.starts_with("connection:") || host.is_some() && l.starts_with("host:")
    };
    let kept = lines.filter(|l| !replaced(l));
    let mut out: String = kept.map(|l| format!("{l}\r\n")).collect();
    if let Some(host) = host {
        out.push_str(&format!("Host: {host}\r\n"));
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Reads up to the end of the next request head; bytes after it stay in `pending`.
/// `None` when the client closed the connection between requests.
async fn read_head(client: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = pending.split_off(end + 4);
            return Ok(Some(std::mem::replace(pending, rest)));
        }
        let mut buffer = [0u8; 4096];
        let read = client.read(&mut buffer).await?;
        if read == 0 {
            return Ok(None);
        }
        pending.extend_from_slice(&buffer[..read]);
    }
}

/// The value of header `name` in a request head, matched case-insensitively.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}
