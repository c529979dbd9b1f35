//! A refusing front for the loopback origin: a TCP relay on 127.0.0.1:0 that answers the
//! first `refusals` ranged GETs (any `Range` but the `bytes=0-0` probe a fetch starts with)
//! itself with `503 Service Unavailable` and a `Retry-After`, and relays everything else to
//! the origin unchanged. It exists because the origin's `Fault::Status` counts every GET,
//! the probe included, so it cannot make only a content range fail. Every request head it
//! inspects is logged with its arrival time, which lets a test check how long a client
//! waited before retrying. A relayed request is sent upstream with `Connection: close` and
//! its connection ends with the answer, so every request arrives at the front on a fresh or
//! refused-and-kept-alive connection, and none escapes inspection.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// One request head the front inspected.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub range: Option<String>,
    /// Whether the front answered it with 503 (otherwise it was relayed).
    pub refused: bool,
}

/// A running front; dropping it stops the accept loop and every relayed connection.
pub struct Front {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    accept: JoinHandle<()>,
}

struct State {
    upstream: SocketAddr,
    refusals: usize,
    retry_after: String,
    seen: Vec<Seen>,
}

impl Front {
    /// Starts a front relaying to `upstream` that refuses `refusals` ranged GETs.
    pub async fn start(upstream: SocketAddr, refusals: usize, retry_after: &str) -> Front {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind front");
        let addr = listener.local_addr().expect("front address");
        let state = Arc::new(Mutex::new(State {
            upstream,
            refusals,
            retry_after: retry_after.to_owned(),
            seen: Vec::new(),
        }));
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Front {
            addr,
            state,
            accept,
        }
    }

    /// `http://127.0.0.1:FRONT_PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request head inspected so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        while connections.try_join_next().is_some() {}
        connections.spawn(serve(stream, state.clone()));
    }
}

/// Answers or relays the requests of one client connection.
async fn serve(mut client: TcpStream, state: Arc<Mutex<State>>) -> io::Result<()> {
    let mut pending = Vec::new();
    loop {
        let Some(head) = read_head(&mut client, &mut pending).await? else {
            return Ok(());
        };
        let (refusal, upstream) = decide(&state, &head);
        if let Some(answer) = refusal {
            client.write_all(answer.as_bytes()).await?;
            continue;
        }
        let mut origin = TcpStream::connect(upstream).await?;
        origin.write_all(&closing(&head)).await?;
        origin.write_all(&pending).await?;
        tokio::io::copy(&mut origin, &mut client).await?;
        return client.shutdown().await;
    }
}

/// `head` with any `Connection` header replaced by `Connection: close`.
fn closing(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let lines = text.split("\r\n").filter(|l| !l.is_empty());
    let kept = lines.filter(|l| !l.to_ascii_lowercase().starts_with("connection:"));
    let mut out: String = kept.map(|l| format!("{l}\r\n")).collect();
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// Logs `head` and returns the 503 to send, if this request is refused, and the upstream.
fn decide(state: &Mutex<State>, head: &[u8]) -> (Option<String>, SocketAddr) {
    let text = String::from_utf8_lossy(head);
    let method = text.split(' ').next().unwrap_or("").to_owned();
    let range = header(&text, "range");
    let mut state = lock(state);
    let ranged = method == "GET" && range.as_deref().is_some_and(|r| r != "bytes=0-0");
    let refused = ranged && state.refusals > 0;
    if refused {
        state.refusals -= 1;
    }
    let at = Instant::now();
    state.seen.push(Seen {
        at,
        method,
        range,
        refused,
    });
    let answer = refused.then(|| {
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {}\r\nContent-Length: 0\r\n\r\n",
            state.retry_after
        )
    });
    (answer, state.upstream)
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

/// The value of header `name` (lower case) in a request head.
fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (field, value) = line.split_once(':')?;
        field
            .trim()
            .eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}
