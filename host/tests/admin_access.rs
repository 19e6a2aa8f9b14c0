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
    let (status, body) = http(&addr, "GET", "/healthz", "");
    assert_eq!(status, 503, "{body}");
    drop(first);
    // The slot frees once the host sees the close; it sees it promptly, but not instantly.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, _) = http(&addr, "GET", "/healthz", "");
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
