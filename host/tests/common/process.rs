//! A `feature-host run` process without services (the embedded store, HTTP push on) and a
//! bare HTTP/1.1 client for its admin API. Included by the tests that start a host
//! (`#[path = "common/process.rs"] mod process;`).

#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The token [`run_host`] starts a host with.
pub const TOKEN: &str = "push-test-token-0123456789abcdef0123";

/// A host process, killed if the test ends without stopping it (a failed assertion must not
/// leave it holding the test's output open).
pub struct Running(pub std::process::Child);

impl Running {
    /// SIGTERM, and whether it then exited 0.
    pub fn terminate(&mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.0.id().to_string())
            .status();
        self.0.wait().unwrap().success()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `feature-host run` without services, its data in `data` (emptied first), the admin API on
/// a free loopback port and `FH_ADMIN_TOKEN` = [`TOKEN`], unless `env` says otherwise (an
/// empty value unsets): the process and the address it reports listening on.
pub fn run_host(data: &Path, env: &[(&str, &str)]) -> (Running, String) {
    use std::io::BufRead;
    let _ = std::fs::remove_dir_all(data);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_feature-host"));
    cmd.current_dir(repo())
        .args(["run"])
        .env("FH_PLUGIN_DIR", repo().join("plugins/dist"))
        .env("FH_DATA_DIR", data)
        .env("FH_ADMIN_ADDR", "127.0.0.1:0")
        .env("FH_ADMIN_TOKEN", TOKEN)
        .env("FH_LOG_FORMAT", "json")
        .env_remove("FH_KAFKA_BROKERS")
        .env_remove("FH_DYNAMODB_ENDPOINT")
        .env_remove("FH_REDIS_URL")
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        match *v {
            "" => cmd.env_remove(k),
            v => cmd.env(k, v),
        };
    }
    let mut child = Running(cmd.spawn().unwrap());
    let mut lines = std::io::BufReader::new(child.0.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("host exited before listening").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "admin API listening" {
            break v["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop)); // keep draining logs
    (child, addr)
}

/// Minimal HTTP/1.1 request over a plain socket: (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_as(addr, method, path, body, None)
}

/// [`http`] with `Authorization: Bearer <token>`.
pub fn http_as(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_raw(
        addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// Send `request` as written; (status, body) of the answer.
pub fn http_raw(addr: &str, request: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {out:?}"));
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}
