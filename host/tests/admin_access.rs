//! Who may call the admin API, and how long a caller may hold it: reads need the token
//! unless the API listens on loopback; on loopback only loopback host names are answered
//! (a web page cannot reach it by DNS rebinding); headers and requests have deadlines and
//! connections a cap, so slow or many callers cannot hold the API. No services needed (the
//! embedded default); needs the plugins built (scripts/build-plugins).

#[path = "common/process.rs"]
mod process;

use process::{TOKEN, http, http_as, http_raw, run_host};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn data(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("fh-admin-{name}-{}", std::process::id()))
}

/// The loopback address of a host that reports listening on `0.0.0.0:<port>`.
fn via_loopback(addr: &str) -> String {
    let port = addr.rsplit(':').next().unwrap();
    format!("127.0.0.1:{port}")
}

#[test]
fn reads_need_the_token_unless_the_api_listens_on_loopback() {
    let dir = data("reads");
    let (mut open, addr) = run_host(&dir, &[("FH_ADMIN_ADDR", "0.0.0.0:0")]);
    assert!(addr.starts_with("0.0.0.0:"), "{addr}");
    let addr = via_loopback(&addr);
    for path in [
        "/v1/plugins",
        "/v1/features/user-activity/u1",
        "/v1/jobs",
        "/v1/jobs/some-run",
    ] {
        let (status, body) = http(&addr, "GET", path, "");
        assert_eq!(status, 401, "GET {path} without the token: {body}");
        let (status, body) = http_as(&addr, "GET", path, "", Some("wrong"));
        assert_eq!(status, 401, "GET {path} with a wrong token: {body}");
    }
    assert_eq!(http_as(&addr, "GET", "/v1/plugins", "", Some(TOKEN)).0, 200);
    assert_eq!(
        http_as(
            &addr,
            "GET",
            "/v1/features/user-activity/u1",
            "",
            Some(TOKEN)
        )
        .0,
        404,
        "an unknown entity, once allowed"
    );
    // Probes and the metrics scrape carry no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(http(&addr, "GET", path, "").0, 200, "GET {path}");
    }
    // The operator CLI sends the token it is given for reads too.
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_feature-host"))
        .args(["plugin", "status", "--admin", &addr])
        .env("FH_ADMIN_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "plugin status with FH_ADMIN_TOKEN: {}{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    assert!(open.terminate());

    // Without a token configured, a non-loopback API serves no reads at all.
    let (mut tokenless, addr) = run_host(
        &dir,
        &[("FH_ADMIN_ADDR", "0.0.0.0:0"), ("FH_ADMIN_TOKEN", "")],
    );
    let addr = via_loopback(&addr);
    let (status, body) = http(&addr, "GET", "/v1/plugins", "");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("FH_ADMIN_TOKEN"), "{body}");
    assert_eq!(http(&addr, "GET", "/healthz", "").0, 200);
    assert!(tokenless.terminate());

    // On loopback, reads are open (the machine's own users are trusted with them).
    let (mut local, addr) = run_host(&dir, &[]);
    assert_eq!(http(&addr, "GET", "/v1/plugins", "").0, 200);
    assert_eq!(
        http(&addr, "POST", "/v1/plugins/user-activity/rollback", "").0,
        401,
        "writes still need the token"
    );
    assert!(local.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loopback_api_answers_only_loopback_host_names() {
    let dir = data("host");
    let (mut child, addr) = run_host(&dir, &[]);
    let port = addr.rsplit(':').next().unwrap();
    let get = |host: &str| {
        http_raw(
            &addr,
            &format!("GET /v1/plugins HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
    };
    // A page on attacker.example whose name now resolves to 127.0.0.1 sends its own name.
    for foreign in [
        format!("attacker.example:{port}"),
        "attacker.example".into(),
        format!("127.0.0.1.attacker.example:{port}"),
    ] {
        let (status, body) = get(&foreign);
        assert_eq!(status, 403, "Host: {foreign}: {body}");
        assert!(body.contains("loopback"), "{body}");
    }
    for local in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".into(),
    ] {
        assert_eq!(get(&local).0, 200, "Host: {local}");
    }
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Read until the server closes the connection, or at most 60 s: what it sent, and whether it
/// closed (a read timeout means it did not).
fn until_closed(s: &mut TcpStream) -> (String, bool) {
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return (String::from_utf8_lossy(&out).into_owned(), false);
            }
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), true), // reset
        }
    }
}

#[test]
fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let dir = data("slow-headers");
    let (mut child, addr) = run_host(&dir, &[("FH_ADMIN_HEADER_TIMEOUT", "1s")]);
    let mut slow = TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ")
        .unwrap();
    let (_, closed) = until_closed(&mut slow);
    assert!(
        closed,
        "a connection that never finished its headers was kept open"
    );
    // An idle connection that never sends a request is closed the same way.
    let mut idle = TcpStream::connect(&addr).unwrap();
    let (_, closed) = until_closed(&mut idle);
    assert!(closed, "an idle connection was kept open");
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_request_whose_body_never_arrives_is_answered_408() {
    let dir = data("slow-body");
    let (mut child, addr) = run_host(&dir, &[("FH_ADMIN_REQUEST_TIMEOUT", "1s")]);
    let mut slow = TcpStream::connect(&addr).unwrap();
    write!(
        slow,
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 1000\r\n\r\n{{\"topic\":"
    )
    .unwrap();
    let (answer, closed) = until_closed(&mut slow);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "answer {answer:?} (closed: {closed})"
    );
    assert!(closed);
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connections_over_the_cap_are_answered_503_until_one_closes() {
    let dir = data("cap");
    let (mut child, addr) = run_host(&dir, &[("FH_ADMIN_MAX_CONNECTIONS", "2")]);
    // Two callers that connect and say nothing hold both slots (until the header deadline).
    let first = TcpStream::connect(&addr).unwrap();
    let _second = TcpStream::connect(&addr).unwrap();
    // (Probes would still be answered, on the connections kept for them.)
    let (status, body) = http(&addr, "GET", "/v1/plugins", "");
    assert_eq!(status, 503, "{body}");
    drop(first);
    // The slot frees once the host sees the close; it sees it promptly, but not instantly.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = http(&addr, "GET", "/v1/plugins", "");
        if status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the closed connection's slot never came back (last status {status})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A connection to `to` from the loopback address `from` (127.0.0.2 is another peer than
/// 127.0.0.1: Linux routes all of 127/8 to loopback).
fn connect_from(from: &str, to: &str) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let from: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    s.bind(&from.into()).unwrap();
    let to: std::net::SocketAddr = to.parse().unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// `GET path` from the loopback address `from`: (status, body).
fn get_from(from: &str, addr: &str, path: &str) -> (u16, String) {
    let mut s = connect_from(from, addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let (out, _) = until_closed(&mut s);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {out:?}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

#[test]
fn one_caller_cannot_hold_every_connection() {
    let dir = data("per-peer");
    let (mut child, addr) = run_host(
        &dir,
        &[
            ("FH_ADMIN_MAX_CONNECTIONS", "4"),
            ("FH_ADMIN_MAX_CONNECTIONS_PER_PEER", "2"),
        ],
    );
    // One peer opens every connection the host serves, and says nothing on them.
    let _held: Vec<TcpStream> = (0..4).map(|_| connect_from("127.0.0.1", &addr)).collect();
    std::thread::sleep(Duration::from_millis(200)); // the host has accepted them all
    let (status, body) = get_from("127.0.0.1", &addr, "/v1/plugins");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("FH_ADMIN_MAX_CONNECTIONS_PER_PEER"), "{body}");
    // Probes from that address still pass (kubelet shares the node's address with whatever
    // else runs there).
    assert_eq!(get_from("127.0.0.1", &addr, "/healthz").0, 200);
    // Another peer is still served.
    let (status, body) = get_from("127.0.0.2", &addr, "/v1/plugins");
    assert_eq!(status, 200, "another peer was refused: {body}");
    // The refusal answered on a connection kept for probes is counted like any other.
    let (_, metrics) = get_from("127.0.0.2", &addr, "/metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fh_admin_refusals_total{reason=\"peer\"} "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        refused >= 1,
        "the per-peer refusal is not counted:\n{metrics}"
    );
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn probes_are_answered_when_every_connection_is_taken() {
    let dir = data("probes");
    let (mut child, addr) = run_host(&dir, &[("FH_ADMIN_MAX_CONNECTIONS", "2")]);
    // Two peers hold both connections.
    let _a = connect_from("127.0.0.1", &addr);
    let _b = connect_from("127.0.0.2", &addr);
    std::thread::sleep(Duration::from_millis(200));
    // kubelet's probes still get through (a few connections are kept for them) ...
    for path in ["/healthz", "/readyz"] {
        let (status, body) = get_from("127.0.0.3", &addr, path);
        assert_eq!(
            status, 200,
            "GET {path} with every connection taken: {body}"
        );
    }
    // ... but only probes.
    let (status, body) = get_from("127.0.0.3", &addr, "/v1/plugins");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("FH_ADMIN_MAX_CONNECTIONS"), "{body}");
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

/// One keep-alive `GET /healthz` on `s`: `false` once the host has closed the connection.
fn keep_alive_probe(s: &mut TcpStream, addr: &str) -> bool {
    if write!(s, "GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").is_err() {
        return false;
    }
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return false,
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; length];
    if s.read_exact(&mut body).is_err() {
        return false;
    }
    !head.contains("connection: close")
}

#[test]
fn a_kept_alive_connection_is_closed_after_its_lifetime() {
    let dir = data("lifetime");
    let (mut child, addr) = run_host(&dir, &[("FH_ADMIN_CONNECTION_LIFETIME", "2s")]);
    let mut s = TcpStream::connect(&addr).unwrap();
    // A probe every 200 ms never lets the connection idle past the header deadline; only
    // its lifetime ends it.
    let start = std::time::Instant::now();
    let mut answered = 0;
    while keep_alive_probe(&mut s, &addr) {
        answered += 1;
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a kept-alive connection was served for 30 s ({answered} requests)"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answered > 0, "the connection was never served");
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loopback_api_refuses_a_request_without_a_host() {
    let dir = data("no-host");
    let (mut child, addr) = run_host(&dir, &[]);
    // HTTP/1.0 needs no Host header. A loopback API answers only requests that name a
    // loopback host; naming none is refused too (browsers always send one).
    let (status, body) = http_raw(&addr, "GET /v1/plugins HTTP/1.0\r\n\r\n");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Host"), "{body}");
    // Probes name the host too (kubelet sends the pod's address).
    let (status, _) = http_raw(&addr, "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    assert_eq!(status, 200);
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&dir);
}
