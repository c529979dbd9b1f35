//! Self-test of the loopback origin in `support::origin`, driven by a minimal raw
//! HTTP/1.1 client (one request per connection, `Connection: close`) so the origin is
//! checked against the wire format rather than against another HTTP library.

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::origin::{Fault, Origin, http_date};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed response: status, lower-cased header names, raw body bytes.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        let mut found = self.headers.iter().filter(|(n, _)| n == name);
        found.next().map(|(_, v)| v.as_str())
    }

    fn content_length(&self) -> usize {
        let value = self.header("content-length").expect("content-length");
        value.parse().expect("numeric content-length")
    }
}

fn request_text(origin: &Origin, method: &str, path: &str, extra: &[(&str, &str)]) -> String {
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", origin.addr());
    for (name, value) in extra {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    text + "Connection: close\r\n\r\n"
}

async fn open(origin: &Origin, method: &str, path: &str, extra: &[(&str, &str)]) -> TcpStream {
    let mut stream = TcpStream::connect(origin.addr()).await.expect("connect");
    let text = request_text(origin, method, path, extra);
    stream.write_all(text.as_bytes()).await.expect("send");
    stream
}

/// Sends one request and reads until the server closes (errors end the read too).
async fn send(origin: &Origin, method: &str, path: &str, extra: &[(&str, &str)]) -> Raw {
    let mut stream = open(origin, method, path, extra).await;
    let mut wire = Vec::new();
    let _ = stream.read_to_end(&mut wire).await;
    parse(&wire)
}

async fn get(origin: &Origin, path: &str, extra: &[(&str, &str)]) -> Raw {
    send(origin, "GET", path, extra).await
}

fn parse(wire: &[u8]) -> Raw {
    let end = wire.windows(4).position(|w| w == b"\r\n\r\n");
    let end = end.expect("complete response head");
    let head = std::str::from_utf8(&wire[..end]).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line.split(' ').nth(1).expect("status code");
    let headers = lines.map(split_header).collect();
    let status = status.parse().expect("numeric status");
    let body = wire[end + 4..].to_vec();
    Raw {
        status,
        headers,
        body,
    }
}

fn split_header(line: &str) -> (String, String) {
    let (name, value) = line.split_once(':').expect("header colon");
    (name.trim().to_ascii_lowercase(), value.trim().to_owned())
}

/// Deterministic non-repeating-ish test content.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_get_head_and_error_statuses() {
    let origin = Origin::start().await;
    let body = pattern(300_000);
    origin.put("/blob", body.clone());
    origin.put("/empty", Vec::new());

    let full = get(&origin, "/blob", &[("Accept-Encoding", "gzip")]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.body, body);
    assert_eq!(full.content_length(), body.len());
    assert_eq!(full.header("etag"), origin.etag("/blob").as_deref());
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        full.header("content-type"),
        Some("application/octet-stream")
    );
    assert_eq!(full.header("content-encoding"), None);
    assert!(full.header("last-modified").unwrap().ends_with(" GMT"));

    let head = send(&origin, "HEAD", "/blob", &[]).await;
    assert_eq!((head.status, head.content_length()), (200, body.len()));
    assert!(head.body.is_empty());

    let empty_head = send(&origin, "HEAD", "/empty", &[]).await;
    assert_eq!((empty_head.status, empty_head.content_length()), (200, 0));
    let empty = get(&origin, "/empty", &[]).await;
    assert_eq!((empty.status, empty.body.len()), (200, 0));

    assert_eq!(get(&origin, "/missing", &[]).await.status, 404);
    assert_eq!(send(&origin, "POST", "/blob", &[]).await.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_ranges_return_exact_slices() {
    let origin = Origin::start().await;
    let body = pattern(1000);
    origin.put("/r", body.clone());

    let cases = [
        ("bytes=10-19", 10, 19),
        ("bytes=990-", 990, 999),
        ("bytes=-5", 995, 999),
        ("bytes=900-5000", 900, 999),
        ("bytes=-5000", 0, 999),
    ];
    for (range, first, last) in cases {
        let part = get(&origin, "/r", &[("Range", range)]).await;
        assert_eq!(part.status, 206, "{range}");
        let expected = format!("bytes {first}-{last}/1000");
        assert_eq!(part.header("content-range"), Some(expected.as_str()));
        assert_eq!(part.body, body[first..=last], "{range}");
        assert_eq!(part.content_length(), last - first + 1);
    }
    let multi = get(&origin, "/r", &[("Range", "bytes=0-1,5-6")]).await;
    assert_eq!((multi.status, multi.body.len()), (200, 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsatisfiable_ranges_are_416() {
    let origin = Origin::start().await;
    origin.put("/r", pattern(100));
    origin.put("/empty", Vec::new());

    for range in ["bytes=100-", "bytes=200-300", "bytes=-0"] {
        let answer = get(&origin, "/r", &[("Range", range)]).await;
        assert_eq!(answer.status, 416, "{range}");
        assert_eq!(answer.header("content-range"), Some("bytes */100"));
    }
    let empty = get(&origin, "/empty", &[("Range", "bytes=0-")]).await;
    assert_eq!(empty.status, 416);
    assert_eq!(empty.header("content-range"), Some("bytes */0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_if_match_and_if_range() {
    let origin = Origin::start().await;
    origin.put("/p", pattern(100));
    let etag = origin.etag("/p").unwrap();

    let stale = [("If-Match", "\"stale\""), ("Range", "bytes=0-9")];
    assert_eq!(get(&origin, "/p", &stale).await.status, 412);
    let fresh = [("If-Match", etag.as_str()), ("Range", "bytes=0-9")];
    assert_eq!(get(&origin, "/p", &fresh).await.status, 206);

    let other = [("If-Range", "\"other\""), ("Range", "bytes=0-9")];
    let ignored = get(&origin, "/p", &other).await;
    assert_eq!((ignored.status, ignored.body.len()), (200, 100));
    let same = [("If-Range", etag.as_str()), ("Range", "bytes=0-9")];
    assert_eq!(get(&origin, "/p", &same).await.status, 206);

    origin.put("/p", pattern(100));
    assert_ne!(
        origin.etag("/p").unwrap(),
        etag,
        "every put gets a new ETag"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_and_validator_faults() {
    let origin = Origin::start().await;
    let body = pattern(100);
    for path in ["/ignore", "/shift", "/novalidator"] {
        origin.put(path, body.clone());
    }
    origin.set_fault("/ignore", Fault::IgnoreRange);
    origin.set_fault("/shift", Fault::WrongContentRange);
    origin.set_fault("/novalidator", Fault::NoValidator);
    let range = [("Range", "bytes=10-19")];

    let ignored = get(&origin, "/ignore", &range).await;
    assert_eq!((ignored.status, ignored.body), (200, body.clone()));

    let shifted = get(&origin, "/shift", &range).await;
    assert_eq!(shifted.status, 206);
    assert_eq!(shifted.header("content-range"), Some("bytes 11-20/100"));
    assert_eq!(shifted.body, body[10..20]);

    let bare = send(&origin, "HEAD", "/novalidator", &[]).await;
    assert_eq!(bare.status, 200);
    assert_eq!(bare.header("etag"), None);
    assert_eq!(bare.header("last-modified"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_fault_then_normal_service() {
    let origin = Origin::start().await;
    origin.put("/s", pattern(50));
    let retry_after = Some("1".to_owned());
    let fault = Fault::Status {
        status: 503,
        retry_after,
        times: 2,
    };
    origin.set_fault("/s", fault);

    assert_eq!(send(&origin, "HEAD", "/s", &[]).await.status, 200);
    for _ in 0..2 {
        let refused = get(&origin, "/s", &[]).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert!(refused.body.is_empty());
    }
    let served = get(&origin, "/s", &[]).await;
    assert_eq!((served.status, served.body.len()), (200, 50));
    assert_eq!(origin.get_count("/s"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_body_and_bytes_sent() {
    let origin = Origin::start().await;
    let body = pattern(4 << 20);
    origin.put("/c", body.clone());
    origin.set_fault(
        "/c",
        Fault::CutBody {
            after: 100_000,
            times: 1,
        },
    );

    let cut = get(&origin, "/c", &[]).await;
    assert_eq!((cut.status, cut.content_length()), (200, body.len()));
    assert_eq!(cut.body, body[..100_000]);
    let range = [("Range", "bytes=1000-1999")];
    let part = get(&origin, "/c", &range).await;
    assert_eq!((part.status, part.body.len()), (206, 1000));
    let whole = get(&origin, "/c", &[]).await;
    assert_eq!(whole.body, body);

    let expected = 100_000 + 1000 + body.len() as u64;
    assert_eq!(origin.body_bytes_sent("/c"), expected);
    assert_eq!(origin.body_bytes_sent("/never"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_answers_head_and_get() {
    let origin = Origin::start().await;
    origin.put("/moved", pattern(10));
    let location = origin.url("/elsewhere");
    let fault = Fault::Redirect {
        location: location.clone(),
        status: 307,
    };
    origin.set_fault("/moved", fault);

    for method in ["HEAD", "GET"] {
        let answer = send(&origin, method, "/moved", &[]).await;
        assert_eq!(answer.status, 307);
        assert_eq!(answer.header("location"), Some(location.as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_after_swaps_object_and_etag() {
    let origin = Origin::start().await;
    origin.put("/v", pattern(100));
    let old = origin.etag("/v").unwrap();
    let new_body = bytes::Bytes::from_static(b"second version");
    origin.set_fault("/v", Fault::ChangeAfter { gets: 2, new_body });
    let pinned = [("If-Match", old.as_str())];

    for _ in 0..2 {
        let served = get(&origin, "/v", &pinned).await;
        assert_eq!((served.status, served.body.len()), (200, 100));
    }
    assert_eq!(get(&origin, "/v", &pinned).await.status, 412);
    let fresh = get(&origin, "/v", &[]).await;
    assert_eq!(fresh.body, b"second version");
    assert_ne!(fresh.header("etag"), Some(old.as_str()));
    assert_eq!(fresh.header("etag"), origin.etag("/v").as_deref());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_log_records_headers_and_status() {
    let origin = Origin::start().await;
    origin.put("/l", pattern(10));
    let extra = [
        ("Range", "bytes=0-3"),
        ("Authorization", "Bearer t0ken"),
        ("Accept-Encoding", "identity"),
        ("If-Range", "\"nope\""),
    ];
    get(&origin, "/l", &extra).await;
    send(&origin, "HEAD", "/missing", &[]).await;

    let log = origin.requests();
    assert_eq!(log.len(), 2);
    let first = &log[0];
    assert_eq!((first.method.as_str(), first.path.as_str()), ("GET", "/l"));
    assert_eq!(first.range.as_deref(), Some("bytes=0-3"));
    assert_eq!(first.authorization.as_deref(), Some("Bearer t0ken"));
    assert_eq!(first.accept_encoding.as_deref(), Some("identity"));
    assert_eq!(first.if_range.as_deref(), Some("\"nope\""));
    assert_eq!((first.if_match.as_deref(), first.status), (None, 200));
    assert_eq!((log[1].method.as_str(), log[1].status), ("HEAD", 404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_one_connection_without_blocking_others() {
    let origin = Origin::start().await;
    origin.put("/st", pattern(200_000));
    origin.set_fault(
        "/st",
        Fault::Stall {
            after: 1000,
            times: 1,
        },
    );

    let mut stalled = open(&origin, "GET", "/st", &[]).await;
    let mut wire = Vec::new();
    let mut buf = [0u8; 8192];
    let window = Duration::from_millis(300);
    while let Ok(Ok(n @ 1..)) = tokio::time::timeout(window, stalled.read(&mut buf)).await {
        wire.extend_from_slice(&buf[..n]);
    }
    let partial = parse(&wire);
    assert_eq!((partial.status, partial.content_length()), (200, 200_000));
    assert_eq!(partial.body.len(), 1000);

    let other = get(&origin, "/st", &[]).await;
    assert_eq!(other.body.len(), 200_000);
    assert_eq!(origin.max_concurrent(), 2);
    drop(stalled);
}

#[test]
fn http_date_matches_rfc_example() {
    let t = UNIX_EPOCH + Duration::from_secs(784_111_777);
    assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
    assert_eq!(http_date(leap), "Tue, 29 Feb 2000 00:00:00 GMT");
    assert!(http_date(SystemTime::now()).ends_with(" GMT"));
}
