//! The CLI with no services: validation of good and broken specs, and the embedded default
//! (file events → embedded store → `get`). Needs the plugins built (scripts/build-plugins).

#[path = "common/process.rs"]
mod process;

use process::{TOKEN, http, http_as, repo, run_host};
use std::path::Path;
use std::process::{Command, Output};

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

/// Pushing is a write: it needs the admin token. And a pushed event cannot choose its
/// position: with one, a caller could pre-claim the positions of another source's events
/// (an events file's explicit offsets share the `local:<topic>` space) so that they are
/// dropped as replays, or grow an entity's applied-offset list without bound.
#[test]
fn http_push_needs_the_token_and_cannot_choose_positions() {
    let data = std::env::temp_dir().join(format!("fh-push-auth-{}", std::process::id()));
    let (mut child, addr) = run_host(&data, &[]);
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
    let (mut child, addr) = run_host(&data, &[]);

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

/// A spec names files and resources; on a shared host it may name only its own. The plugin
/// is a relative path inside the plugin directory, golden events a relative path inside the
/// spec directory; a pinned `sha256` must match the plugin's bytes; tables and topics must
/// carry one of the operator's prefixes when the operator configures them.
#[test]
fn validate_refuses_plugins_files_and_names_outside_the_operators_scope() {
    use sha2::Digest as _;
    let tmp = std::env::temp_dir().join(format!("fh-names-{}", std::process::id()));
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(tmp.join("golden.jsonl"), "").unwrap();
    let dist = repo().join("plugins/dist");
    let digest = hex::encode(sha2::Sha256::digest(
        std::fs::read(dist.join("user_activity.wasm")).unwrap(),
    ));
    let group = |name: &str, plugin: &str, table: &str, topic: &str| {
        format!(
            "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: {name}}}\nspec:\n  entity: user\n  features: [{{name: n, type: int}}]\n  plugin: {plugin}\n  sources: [{{topic: {topic}}}]\n  store: {{table: {table}}}\n"
        )
    };
    let absolute = dist.join("user_activity.wasm");
    let docs = [
        group(
            "team-a-pinned",
            &format!("{{wasm: user_activity.wasm, sha256: {digest}}}"),
            "team-a-features",
            "team-a.events",
        ),
        group(
            "team-a-up",
            "{wasm: ../dist/user_activity.wasm}",
            "team-a-features",
            "team-a.events",
        ),
        group(
            "team-a-absolute",
            &format!("{{wasm: \"{}\"}}", absolute.display()),
            "team-a-features",
            "team-a.events",
        ),
        group(
            "team-a-golden",
            "{wasm: user_activity.wasm, golden: ../golden.jsonl}",
            "team-a-features",
            "team-a.events",
        ),
        group(
            "team-a-mispinned",
            &format!("{{wasm: user_activity.wasm, sha256: {}}}", "0".repeat(64)),
            "team-a-features",
            "team-a.events",
        ),
        group(
            "team-a-theirs",
            "{wasm: user_activity.wasm}",
            "team-b-features",
            "team-b.events",
        ),
    ];
    std::fs::write(specs.join("groups.yaml"), docs.join("---\n")).unwrap();
    let env = [
        ("FH_TABLE_PREFIXES", "team-a-"),
        ("FH_TOPIC_PREFIXES", "team-a"),
    ];
    let out = host_with(&["validate", specs.to_str().unwrap()], None, &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).collect();
    let expected = [
        ("groups.yaml#2: spec.plugin.wasm: ", "`..`"),
        (
            "groups.yaml#3: spec.plugin.wasm: ",
            "relative to the plugin directory",
        ),
        ("groups.yaml#4: spec.plugin.golden: ", "`..`"),
        (
            "groups.yaml#5: spec.plugin.sha256: ",
            &format!(
                "the spec pins {}, the plugin file's SHA-256 is {digest}",
                "0".repeat(64)
            ),
        ),
        (
            "groups.yaml#6: spec.store.table: ",
            "\"team-b-features\" does not start with one of the table prefixes this host allows (team-a-); the operator sets them with FH_TABLE_PREFIXES",
        ),
        (
            "groups.yaml#6: spec.sources[0].topic: ",
            "\"team-b.events\" does not start with one of the topic prefixes this host allows (team-a); the operator sets them with FH_TOPIC_PREFIXES",
        ),
    ];
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, (at, what)) in lines.iter().zip(expected) {
        assert!(
            line.contains(at) && line.contains(what),
            "{line:?} should say {at}…{what}\n{stderr}"
        );
    }
    // The retry and dead-letter topics a group hands off through are topics too.
    std::fs::write(
        specs.join("groups.yaml"),
        group(
            "team-a-ok",
            "{wasm: user_activity.wasm}",
            "team-a-features",
            "team-a.events",
        ) + "  retry: {deadLetterTopic: shared.dlq}\n",
    )
    .unwrap();
    let out = host_with(&["validate", specs.to_str().unwrap()], None, &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("spec.retry.deadLetterTopic: \"shared.dlq\" does not start with one of the topic prefixes"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The pooling allocator reserves address space for every instance slot up front. Where it
/// cannot (a low `ulimit -v`), falling back to on-demand allocation would silently change the
/// sandbox the operator configured: the host stops and says what to set instead.
#[test]
fn a_host_that_cannot_reserve_its_instance_pool_stops() {
    let data = std::env::temp_dir().join(format!("fh-pool-{}", std::process::id()));
    let out = Command::new("sh")
        .current_dir(repo())
        .arg("-c")
        // 16 GiB of address space: far below 1000 slots of 4 GiB.
        .arg(format!(
            "ulimit -v 16777216 && exec {} run --once --events specs/examples/events.jsonl",
            env!("CARGO_BIN_EXE_feature-host")
        ))
        .env("FH_PLUGIN_DIR", repo().join("plugins/dist"))
        .env("FH_DATA_DIR", &data)
        .env("FH_ADMIN_ADDR", "127.0.0.1:0")
        .env_remove("FH_KAFKA_BROKERS")
        .env_remove("FH_DYNAMODB_ENDPOINT")
        .env_remove("FH_REDIS_URL")
        .env_remove("FH_PLUGIN_MAX_INSTANCES")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("cannot reserve the plugin instance pool")
            && stderr.contains("FH_PLUGIN_MAX_INSTANCES"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&data);
}

/// Settings that carry secrets (a Redis password, Kafka SASL properties, a webhook whose path
/// is its credential) appear neither in `--help` (which shows environment values) nor in
/// the errors a failed start prints.
#[test]
fn help_and_errors_do_not_show_secrets() {
    let secrets = [
        ("FH_REDIS_URL", "redis://:hunter2-redis@127.0.0.1:1/0"),
        ("FH_KAFKA_PROPERTIES", "sasl.password=hunter2-kafka"),
        ("FH_ALERT_WEBHOOK", "http://hooks.example/T000/hunter2-hook"),
    ];
    let help = host_with(&["run", "--help"], None, &secrets);
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.status.success() && text.contains("FH_REDIS_URL"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");

    let data = std::env::temp_dir().join(format!("fh-secrets-{}", std::process::id()));
    let out = host_with(
        &["run", "--once", "--events", "specs/examples/events.jsonl"],
        Some(&data),
        &[("FH_REDIS_URL", "redis://:hunter2-redis@127.0.0.1:1/0")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("127.0.0.1:1"), "says which Redis: {stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    let _ = std::fs::remove_dir_all(&data);
}

/// The local dead-letter file has a size limit: past it, a push is refused with the reason
/// (the caller keeps its events and retries later) rather than filling the disk.
#[test]
fn the_local_dead_letter_file_is_bounded() {
    let data = std::env::temp_dir().join(format!("fh-dlq-bound-{}", std::process::id()));
    let (mut child, addr) = run_host(&data, &[("FH_DEAD_LETTER_MAX_MB", "1")]);
    let garbage: String = (0..600)
        .map(|i| format!("not json {i} {}\n", "x".repeat(1000)))
        .collect();
    let (status, body) = http_as(&addr, "POST", "/v1/events", &garbage, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let (status, body) = http_as(&addr, "POST", "/v1/events", &garbage, Some(TOKEN));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("dead-letter file") && body.contains("FH_DEAD_LETTER_MAX_MB"),
        "{body}"
    );
    let size = std::fs::metadata(data.join("dead-letters.jsonl"))
        .unwrap()
        .len();
    assert!(size <= 1 << 20, "{size} bytes");
    assert!(child.terminate());
    let _ = std::fs::remove_dir_all(&data);
}

#[test]
fn golden_files_must_be_regular_files_inside_the_spec_directory() {
    let tmp = std::env::temp_dir().join(format!("fh-golden-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    // Links a spec author can commit to a synced spec directory.
    std::os::unix::fs::symlink("/dev/zero", specs.join("zero.jsonl")).unwrap();
    std::fs::write(tmp.join("outside.jsonl"), "{\"event\": {}}\n").unwrap();
    std::os::unix::fs::symlink(tmp.join("outside.jsonl"), specs.join("outside.jsonl")).unwrap();
    let group = |name: &str, golden: &str| {
        format!(
            "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: {name}}}\nspec:\n  entity: user\n  features: [{{name: n, type: int}}]\n  plugin: {{wasm: user_activity.wasm, golden: {golden}}}\n  sources: [{{topic: events}}]\n"
        )
    };
    let docs = [
        group("zero", "zero.jsonl"),
        group("outside", "outside.jsonl"),
    ];
    std::fs::write(specs.join("groups.yaml"), docs.join("---\n")).unwrap();
    // Under a 2 GiB address space: reading /dev/zero to its end would otherwise take the
    // machine's memory.
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152; exec \"$0\" validate \"$1\"")
        .arg(env!("CARGO_BIN_EXE_feature-host"))
        .arg(&specs)
        .current_dir(repo())
        .env("FH_PLUGIN_DIR", repo().join("plugins/dist"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    for (doc, problem) in [
        ("groups.yaml#1: spec.plugin.golden: ", "not a regular file"),
        ("groups.yaml#2: spec.plugin.golden: ", "outside"),
    ] {
        assert!(
            stderr
                .lines()
                .any(|l| l.contains(doc) && l.contains(problem)),
            "no `{doc}… {problem}` in:\n{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
