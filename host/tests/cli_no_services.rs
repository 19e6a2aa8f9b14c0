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
    ] {
        cmd.env_remove(k);
    }
    if let Some(d) = data_dir {
        cmd.env("FH_DATA_DIR", d);
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
