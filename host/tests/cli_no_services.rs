//! The CLI with no services: validation of good and broken specs, and the embedded default
//! (file events → embedded store → `get`). Needs the plugins built (scripts/build-plugins).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn host(args: &[&str], data_dir: Option<&Path>) -> Output {
    host_with(args, data_dir, &[])
}

/// [`host`] with extra environment.
fn host_with(args: &[&str], data_dir: Option<&Path>, env: &[(&str, &str)]) -> Output {
    let plugins = repo().join("plugins/dist");
    assert!(
        plugins.join("user_activity.wasm").is_file(),
        "plugins not built: run scripts/build-plugins"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_feature-host"));
    cmd.current_dir(repo())
        .args(args)
        .env("FH_PLUGIN_DIR", plugins)
        .env("FH_ADMIN_ADDR", "127.0.0.1:0");
    for k in [
        "FH_KAFKA_BROKERS",
        "FH_DYNAMODB_ENDPOINT",
        "FH_REDIS_URL",
        "FH_STORE",
        "FH_CACHE",
        "FH_SOURCE_ROOTS",
        "FH_SOURCE_S3",
    ] {
        cmd.env_remove(k);
    }
    if let Some(d) = data_dir {
        cmd.env("FH_DATA_DIR", d);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn example_specs_are_valid() {
    let out = host(&["validate", "specs"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn broken_specs_yield_one_error_per_problem() {
    let out = host(&["validate", "tests/fixtures/bad-specs"], None);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = [
        ("not-yaml.yaml", "", "not valid YAML"),
        ("structural.yaml", "spec.features[0].type", "\"integer\""),
        ("structural.yaml", "spec", "'featurez' was unexpected"),
        ("wrong-kind.yaml", "apiVersion", "feature-host/v2"),
        ("wrong-kind.yaml", "kind", "unknown kind \"Feature\""),
        (
            "duplicate.yaml",
            "metadata.name",
            "duplicate FeatureGroup \"cycle-group\"",
        ),
        (
            "semantic.yaml#1",
            "spec.features[1].name",
            "duplicate feature \"clicks\"",
        ),
        (
            "semantic.yaml#1",
            "spec.features[2].dim",
            "only valid for type `vector`",
        ),
        (
            "semantic.yaml#1",
            "spec.sources[0].filter",
            "exactly one of `header` and `field`",
        ),
        (
            "semantic.yaml#1",
            "spec.store.ttl",
            "invalid duration \"forever\"",
        ),
        (
            "semantic.yaml#1",
            "spec.plugin.wasm",
            "missing_plugin.wasm not found",
        ),
        (
            "semantic.yaml#2",
            "spec.schedule",
            "invalid cron expression",
        ),
        (
            "semantic.yaml#2",
            "spec.featureGroup",
            "unknown FeatureGroup \"no-such-group\"",
        ),
        (
            "semantic.yaml#2",
            "spec.dependsOn[0]",
            "unknown Ingestion \"ghost\"",
        ),
        (
            "cycle.yaml#2",
            "spec.dependsOn",
            "dependency cycle: first -> second -> first",
        ),
        (
            "hostile-source.yaml#1",
            "spec.source.uri",
            "/proc/self/environ (resolved: /proc/",
        ),
        (
            "hostile-source.yaml#2",
            "spec.source.uri",
            "serviceaccount/token (resolved: ",
        ),
        (
            "hostile-source.yaml#3",
            "spec.source.uri",
            "has a `..` component",
        ),
    ];
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).collect();
    for (file, field, msg) in expected {
        let prefix = if field.is_empty() {
            format!("{file}: ")
        } else {
            format!("{file}: {field}: ")
        };
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("bad-specs/{prefix}")) && l.contains(msg)),
            "missing error {prefix}…{msg} in:\n{stderr}"
        );
    }
    assert_eq!(
        lines.len(),
        expected.len(),
        "one error per problem, no more:\n{stderr}"
    );
}

/// Expected per-user counts, computed from the events file independently of the host.
fn expected_counts(file: &Path) -> std::collections::BTreeMap<String, (i64, i64)> {
    let mut out = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(file).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(p) = e["payload"].as_object() else {
            continue;
        };
        let (Some(user), Some(kind)) = (
            p.get("user_id").and_then(|v| v.as_str()),
            p.get("type").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let c: &mut (i64, i64) = out.entry(user.to_owned()).or_default();
        match kind {
            "click" => c.0 += 1,
            "view" => c.1 += 1,
            _ => {}
        }
    }
    out
}

#[test]
fn embedded_default_ingests_file_and_serves_features_exactly_once() {
    let data = std::env::temp_dir().join(format!("fh-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let events = repo().join("specs/examples/events.jsonl");
    let run = || {
        let out = host(
            &["run", "--events", events.to_str().unwrap(), "--once"],
            Some(&data),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(
        first["dead_lettered"], 2,
        "the two bad example events: {first}"
    );
    assert_eq!(first["replayed"], 0);
    // Re-ingesting the same file is a no-op: every position was already applied.
    let second = run();
    assert_eq!(second["writes"], 0, "{second}");
    assert!(second["replayed"].as_u64().unwrap() > 0);

    for (user, (clicks, views)) in expected_counts(&events) {
        let out = host(
            &["get", "--group", "user-activity", "--entity", &user],
            Some(&data),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["features"]["clicks"].as_i64().unwrap_or(0),
            clicks,
            "{user} clicks: {v}"
        );
        assert_eq!(
            v["features"]["views"].as_i64().unwrap_or(0),
            views,
            "{user} views: {v}"
        );
        let last = v["features"]["last_viewed"].as_array().map_or(0, Vec::len);
        assert_eq!(last as i64, views.min(20), "{user} last_viewed length");
    }
    let dead = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    assert!(
        dead.contains("missing field `user_id`") && dead.contains("not the expected JSON"),
        "{dead}"
    );
    let missing = host(
        &["get", "--group", "user-activity", "--entity", "nobody"],
        Some(&data),
    );
    assert_eq!(missing.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn published_json_schema_is_current() {
    let out = host(&["schema"], None);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo().join("specs/feature-host.schema.json")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        committed.trim(),
        "specs/feature-host.schema.json is stale: run `feature-host schema > specs/feature-host.schema.json`"
    );
    let out = host(&["schema", "--markdown"], None);
    assert!(out.status.success());
    let committed = std::fs::read_to_string(repo().join("docs/spec-reference.md")).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        committed.trim(),
        "docs/spec-reference.md is stale: run `feature-host schema --markdown > docs/spec-reference.md`"
    );
}

/// Minimal HTTP/1.1 request over a plain socket: (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    http_as(addr, method, path, body, None)
}

/// [`http`] with `Authorization: Bearer <token>`.
fn http_as(addr: &str, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The token the push tests start their hosts with.
const TOKEN: &str = "push-test-token-0123456789abcdef0123";

/// A host process, killed if the test ends without stopping it (a failed assertion must not
/// leave it holding the test's output open).
struct Running(std::process::Child);

impl Running {
    /// SIGTERM, and whether it then exited 0.
    fn terminate(&mut self) -> bool {
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

/// `feature-host run` without services (HTTP push on) with `FH_ADMIN_TOKEN` = [`TOKEN`]: the
/// process and its admin address.
fn run_pushable(data: &Path) -> (Running, String) {
    use std::io::BufRead;
    let _ = std::fs::remove_dir_all(data);
    let mut child = Command::new(env!("CARGO_BIN_EXE_feature-host"))
        .current_dir(repo())
        .args(["run"])
        .env("FH_PLUGIN_DIR", repo().join("plugins/dist"))
        .env("FH_DATA_DIR", data)
        .env("FH_ADMIN_ADDR", "127.0.0.1:0")
        .env("FH_ADMIN_TOKEN", TOKEN)
        .env("FH_LOG_FORMAT", "json")
        .env_remove("FH_KAFKA_BROKERS")
        .env_remove("FH_DYNAMODB_ENDPOINT")
        .env_remove("FH_REDIS_URL")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("host exited before listening").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if v["fields"]["message"] == "admin API listening" {
            break v["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop)); // keep draining logs
    (Running(child), addr)
}

/// Pushing is a write: it needs the admin token. And a pushed event cannot choose its
/// position: with one, a caller could pre-claim the positions of another source's events
/// (an events file's explicit offsets share the `local:<topic>` space) so that they are
/// dropped as replays, or grow an entity's applied-offset list without bound.
#[test]
fn http_push_needs_the_token_and_cannot_choose_positions() {
    let data = std::env::temp_dir().join(format!("fh-push-auth-{}", std::process::id()));
    let (mut child, addr) = run_pushable(&data);
    let event = r#"{"topic":"web-events","key":"q1","timestamp":10,"payload":{"type":"view","user_id":"q1","item_id":"a"}}"#;
    assert_eq!(http(&addr, "POST", "/v1/events", event).0, 401);
    assert_eq!(
        http_as(&addr, "POST", "/v1/events", event, Some("wrong")).0,
        401
    );
    let positioned = r#"{"topic":"web-events","key":"q1","offset":4611686018427387904,"timestamp":20,"payload":{"type":"click","user_id":"q1","item_id":"b"}}"#;
    let (status, summary) = http_as(
        &addr,
        "POST",
        "/v1/events",
        &format!("{event}\n{positioned}"),
        Some(TOKEN),
    );
    assert_eq!(status, 200, "{summary}");
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["dead_lettered"], 1, "{summary}");
    let (_, got) = http(&addr, "GET", "/v1/features/user-activity/q1", "");
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(
        (
            got["features"]["views"].as_i64(),
            got["features"]["clicks"].as_i64()
        ),
        (Some(1), None),
        "{got}"
    );
    assert!(child.terminate(), "SIGTERM exits 0");
    let dead = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    assert!(dead.contains("pushed events carry none"), "{dead}");
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn http_push_and_feature_lookup_without_services() {
    let data = std::env::temp_dir().join(format!("fh-push-{}", std::process::id()));
    let (mut child, addr) = run_pushable(&data);

    let body = [
        r#"{"topic":"web-events","key":"p1","timestamp":10,"payload":{"type":"view","user_id":"p1","item_id":"a"}}"#,
        r#"{"topic":"web-events","key":"p1","timestamp":20,"payload":{"type":"click","user_id":"p1","item_id":"b"}}"#,
        r#"{"topic":"web-events","payload":"garbage"}"#,
        r#"not even json"#,
    ]
    .join("\n");
    let (status, summary) = http_as(&addr, "POST", "/v1/events", &body, Some(TOKEN));
    assert_eq!(status, 200, "{summary}");
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["events"], 4);
    assert_eq!(summary["dead_lettered"], 2, "{summary}");

    let (status, got) = http(&addr, "GET", "/v1/features/user-activity/p1", "");
    assert_eq!(status, 200, "{got}");
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(
        (
            got["features"]["views"].as_i64(),
            got["features"]["clicks"].as_i64()
        ),
        (Some(1), Some(1)),
        "{got}"
    );
    assert_eq!(
        http(&addr, "GET", "/v1/features/user-activity/nobody", "").0,
        404
    );
    assert_eq!(
        http(&addr, "GET", "/v1/features/no-such-group/p1", "").0,
        404
    );
    assert_eq!(http(&addr, "GET", "/healthz", "").0, 200);

    assert!(child.terminate(), "SIGTERM exits 0");
    let dead = std::fs::read_to_string(data.join("dead-letters.jsonl")).unwrap();
    assert!(
        dead.contains("request line 4") && dead.contains("not the expected JSON"),
        "{dead}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn plugin_test_prints_checked_writes_per_event() {
    let out = host(
        &[
            "plugin",
            "test",
            "plugins/dist/user_activity.wasm",
            "--spec",
            "specs/user-activity.yaml",
            "--events",
            "specs/examples/events.jsonl",
        ],
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 62, "one line per event");
    assert_eq!(lines[0]["offset"], 1);
    let first_writes = lines[0]["writes"].as_array().unwrap();
    assert!(!first_writes.is_empty() && first_writes.iter().all(|w| w["entity"].is_string()));
    assert!(
        lines[60]["invalid"]
            .as_str()
            .unwrap()
            .contains("not the expected JSON")
    );
    assert!(lines[61]["invalid"].as_str().unwrap().contains("user_id"));

    // A spec whose features do not match the plugin's writes: flagged, exit 1.
    let dir = std::env::temp_dir().join(format!("fh-ptest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = std::fs::read_to_string(repo().join("specs/user-activity.yaml"))
        .unwrap()
        .replace("name: clicks", "name: taps");
    std::fs::write(dir.join("g.yaml"), spec).unwrap();
    let out = host(
        &[
            "plugin",
            "test",
            "plugins/dist/user_activity.wasm",
            "--spec",
            dir.join("g.yaml").to_str().unwrap(),
            "--events",
            "specs/examples/events.jsonl",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("undeclared feature \\\"clicks\\\""));
    let _ = std::fs::remove_dir_all(&dir);
}

/// With FH_OTLP_ENDPOINT, the spans of plugin batches reach an OpenTelemetry collector (here a
/// loopback listener that records what is POSTed) as OTLP/HTTP protobuf, flushed at exit.
#[test]
fn traces_are_exported_over_otlp_when_configured() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, Vec<u8>)>::new()));
    let got = received.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            // Read the head, then Content-Length bytes of body.
            let (head, body) = loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break (String::new(), Vec::new());
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..at]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    while buf.len() < at + 4 + len {
                        let n = s.read(&mut chunk).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    break (head, buf[at + 4..].to_vec());
                }
            };
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            got.lock().unwrap().push((head, body));
        }
    });
    let data = std::env::temp_dir().join(format!("fh-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let out = host_with(
        &["run", "--events", "specs/examples/events.jsonl", "--once"],
        Some(&data),
        &[("FH_OTLP_ENDPOINT", endpoint.as_str())],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = received.lock().unwrap().clone();
    let traces: Vec<_> = requests
        .iter()
        .filter(|(head, _)| head.starts_with("POST /v1/traces"))
        .collect();
    assert!(!traces.is_empty(), "no OTLP export received: {requests:?}");
    let contains = |needle: &[u8]| {
        traces
            .iter()
            .any(|(_, b)| b.windows(needle.len()).any(|w| w == needle))
    };
    assert!(
        traces
            .iter()
            .all(|(h, _)| h.to_ascii_lowercase().contains("application/x-protobuf"))
    );
    assert!(contains(b"process_group"), "no plugin batch span exported");
    assert!(contains(b"feature-host"), "no service name");
    assert!(contains(b"user-activity"), "span attributes missing");
    let _ = std::fs::remove_dir_all(&data);
}

/// The operator's allow-lists reach `validate` through the same variables as the host: a
/// team's CI validates against the shared host's scope.
#[test]
fn validate_refuses_sources_outside_the_operators_scope() {
    let tmp = std::env::temp_dir().join(format!("fh-scope-{}", std::process::id()));
    let (specs, exports) = (tmp.join("specs"), tmp.join("exports"));
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(exports.join("team-a")).unwrap();
    std::fs::write(
        specs.join("group.yaml"),
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {name: user-activity}\nspec:\n  entity: user\n  features: [{name: n, type: int}]\n  plugin: {wasm: user_activity.wasm}\n",
    )
    .unwrap();
    let ingestion = |name: &str, uri: &str| {
        format!(
            "apiVersion: feature-host/v1\nkind: Ingestion\nmetadata: {{name: {name}}}\nspec:\n  featureGroup: user-activity\n  source: {{uri: \"{uri}\", format: jsonl}}\n"
        )
    };
    let team_a = exports.join("team-a/*.jsonl");
    let team_b = exports.join("team-b/*.jsonl");
    std::fs::write(
        specs.join("ingestions.yaml"),
        [
            ingestion("a-local", &team_a.to_string_lossy()),
            ingestion("a-s3", "s3://exports/team-a/dt={date}/*.parquet"),
            ingestion("b-local", &team_b.to_string_lossy()),
            ingestion("b-s3", "s3://exports/team-b/x.parquet"),
        ]
        .join("---\n"),
    )
    .unwrap();
    let roots = exports.join("team-a");
    let env = [
        ("FH_SOURCE_ROOTS", roots.to_str().unwrap()),
        ("FH_SOURCE_S3", "s3://exports/team-a/"),
    ];
    let out = host_with(&["validate", specs.to_str().unwrap()], None, &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(lines.len(), 2, "{stderr}");
    assert!(
        lines[0].contains("ingestions.yaml#3: spec.source.uri: ")
            && lines[0].contains("team-b) is outside the directories"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("ingestions.yaml#4: spec.source.uri: s3://exports/team-b/x.parquet is outside the S3 prefixes batch sources may read (s3://exports/team-a/)"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// A guessable admin token is refused at startup rather than guarded by.
#[test]
fn a_short_admin_token_stops_the_host() {
    let data = std::env::temp_dir().join(format!("fh-short-token-{}", std::process::id()));
    let out = host_with(
        &["run", "--events", "specs/examples/events.jsonl", "--once"],
        Some(&data),
        &[("FH_ADMIN_TOKEN", "secret")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("FH_ADMIN_TOKEN is 6 bytes; it must be at least 32"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&data);
}
