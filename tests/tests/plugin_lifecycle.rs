//! Plugins on the real stack (tansu, DynamoDB Local, Redis): a plugin replaced many times
//! under live traffic — some versions valid, some broken — loses and fails no event, every
//! event is applied once by one version, and broken versions never serve; a hostile group
//! fails only its own events while the other groups keep ingesting.

use feature_host_e2e::*;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

/// Both tests run a host and keep it busy; on a 2-core machine run them one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN: &str = "plugin-lifecycle-test-token-0123456789";

/// A golden event every valid build passes and a `bad` build (which counts 2) fails.
const GOLDEN: &str = r#"{"event": {"topic": "t", "key": "g", "payload": "fine"}, "writes": [{"entity": "g", "feature": "n", "op": {"incr": {"t": "int", "v": 1}}, "event_time_ms": 0}]}"#;

struct Live {
    stack: Stack,
    topic: String,
    table: String,
    group: String,
    plugin: std::path::PathBuf,
    port: u16,
    host: Host,
}

async fn start_live(prefix: &str) -> Live {
    let stack = Stack::from_env();
    let id = unique();
    let (topic, table, group) = (
        format!("{prefix}-{id}"),
        format!("features-{id}"),
        format!("{prefix}-{id}"),
    );
    let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
    let (spec_dir, plugin_dir) = (tmp.join("specs"), tmp.join("plugins"));
    std::fs::create_dir_all(&spec_dir).unwrap();
    std::fs::create_dir_all(&plugin_dir).unwrap();
    let plugin = plugin_dir.join("live.wasm");
    std::fs::write(&plugin, relabeled_hostile("v00")).unwrap();
    std::fs::write(spec_dir.join("golden.jsonl"), format!("{GOLDEN}\n")).unwrap();
    std::fs::write(
        spec_dir.join("group.yaml"),
        group_spec(
            &group,
            &[&topic],
            "live.wasm",
            &[("n", "int"), ("label", "string")],
            "null",
            &table,
            "",
        )
        .replace(
            "    config: null\n",
            "    config: null\n    golden: golden.jsonl\n",
        ),
    )
    .unwrap();
    stack.create_topics(&[&topic], 2).await;
    let port = free_port();
    let mut env = stack.host_env(&tmp, &spec_dir, &format!("{prefix}-{id}"));
    env.retain(|(k, _)| *k != "FH_ADMIN_ADDR" && *k != "FH_PLUGIN_DIR");
    env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    env.push(("FH_PLUGIN_DIR", plugin_dir.display().to_string()));
    env.push(("FH_ADMIN_TOKEN", TOKEN.into()));
    env.push(("FH_COMMIT_INTERVAL", "200ms".into()));
    let host = Host::spawn(&["run"], &env);
    Live {
        stack,
        topic,
        table,
        group,
        plugin,
        port,
        host,
    }
}

async fn status(port: u16) -> Option<serde_json::Value> {
    serde_json::from_str(&http_get(port, "/v1/plugins").await?).ok()
}

/// The group's entry of `/v1/plugins`.
fn group_status<'a>(s: &'a serde_json::Value, group: &str) -> &'a serde_json::Value {
    s["groups"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["group"] == group))
        .expect("group in /v1/plugins")
}

/// Value of the metric series `line_prefix` in `/metrics` (0 when absent).
async fn metric(port: u16, series: &str) -> f64 {
    let text = http_get(port, "/metrics").await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

enum Candidate {
    Valid(&'static str),
    Broken(&'static str, Vec<u8>),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_replaced_under_live_traffic_loses_nothing_and_broken_versions_never_serve() {
    let _serial = SERIAL.lock().await;
    let live = start_live("reload").await;
    let (port, group) = (live.port, live.group.clone());
    eventually(Duration::from_secs(60), "the host's admin API", || async {
        status(port).await
    })
    .await;

    // Events flow the whole time: one entity per event, so each must end with n = 1 and the
    // label of the one version that processed it.
    let done = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicUsize::new(0));
    let producing = {
        let (p, topic) = (live.stack.producer(), live.topic.clone());
        let (done, produced) = (done.clone(), produced.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !done.load(Ordering::Relaxed) || !i.is_multiple_of(20) {
                produce(
                    &p,
                    &topic,
                    &format!("ev-{i}"),
                    ts(1_000 + i as i64),
                    "label",
                    &[],
                )
                .await;
                i += 1;
                produced.store(i, Ordering::Relaxed);
                if i.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };

    let hostile = relabeled_hostile("v00");
    let wrong = std::fs::read(plugin_dir().join("wrong_interface.wasm")).unwrap();
    let sequence = vec![
        Candidate::Valid("v01"),
        Candidate::Broken("golden mismatch", relabeled_hostile("bad-1")),
        Candidate::Valid("v02"),
        Candidate::Broken("init failure", relabeled_hostile("initfail-1")),
        Candidate::Valid("v03"),
        Candidate::Broken("garbage", b"not a component at all".to_vec()),
        Candidate::Valid("v04"),
        Candidate::Broken("wrong interface", wrong),
        Candidate::Valid("v05"),
        Candidate::Broken("golden mismatch", relabeled_hostile("bad-2")),
        Candidate::Valid("v06"),
        Candidate::Broken("truncated", hostile[..hostile.len() / 2].to_vec()),
        Candidate::Valid("v07"),
        Candidate::Valid("v08"),
    ];
    let (mut valid, mut broken) = (BTreeSet::from(["v00".to_string()]), 0);
    for c in &sequence {
        let bytes = match c {
            Candidate::Valid(label) => relabeled_hostile(label),
            Candidate::Broken(_, b) => b.clone(),
        };
        let version = plugin_version(&bytes);
        install_file(&live.plugin, &bytes);
        let what = match c {
            Candidate::Valid(label) => format!("{label} ({version}) to serve"),
            Candidate::Broken(why, _) => format!("the {why} build ({version}) to be rejected"),
        };
        let g = group.clone();
        let record = eventually(Duration::from_secs(60), &what, || {
            let (g, version) = (g.clone(), version.clone());
            async move {
                let s = status(port).await?;
                let last = group_status(&s, &g)["last_reload"].clone();
                (last["version"] == version.as_str()).then_some(last)
            }
        })
        .await;
        match c {
            Candidate::Valid(label) => {
                assert_eq!(record["result"], "applied", "{record}");
                valid.insert(label.to_string());
            }
            Candidate::Broken(why, _) => {
                assert_eq!(record["result"], "rejected", "{why}: {record}");
                eprintln!("{why}: {}", record["error"]);
                broken += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    done.store(true, Ordering::Relaxed);
    producing.await.unwrap();
    let n = produced.load(Ordering::Relaxed);
    eprintln!("{n} events produced across {} reloads", sequence.len());

    let ddb = live.stack.dynamodb().await;
    let counts = eventually(Duration::from_secs(120), "every event applied", || async {
        let c = counts(&ddb, &live.table, &group, "n").await;
        (c.len() >= n).then_some(c)
    })
    .await;
    assert_eq!(counts.len(), n, "one entity per event");
    let twice: Vec<_> = counts.iter().filter(|(_, v)| **v != 1).collect();
    assert!(
        twice.is_empty(),
        "events applied other than once: {twice:?}"
    );
    let labels = strings(&ddb, &live.table, &group, "label").await;
    assert_eq!(labels.len(), n);
    let served: BTreeSet<&str> = labels.values().map(String::as_str).collect();
    let foreign: Vec<&&str> = served.iter().filter(|l| !valid.contains(**l)).collect();
    assert!(
        foreign.is_empty(),
        "writes from versions that must never serve: {foreign:?}"
    );
    assert!(
        served.len() >= 3,
        "traffic should have been served by several versions, saw {served:?}"
    );

    // Nothing failed or retried, nothing dead-lettered; every reload accounted for.
    let labels_of =
        |result: &str| format!(r#"fh_plugin_reloads_total{{group="{group}",result="{result}"}}"#);
    assert_eq!(metric(port, &labels_of("applied")).await, 8.0);
    assert_eq!(metric(port, &labels_of("rejected")).await, broken as f64);
    assert_eq!(
        metric(
            port,
            &format!(r#"fh_plugin_call_failures_total{{group="{group}"}}"#)
        )
        .await,
        0.0
    );
    assert_eq!(
        metric(port, &format!(r#"fh_retries_total{{group="{group}"}}"#)).await,
        0.0
    );
    assert!(live.stack.read_all(&format!("{group}.dlq")).is_empty());

    // Rollback: refused without the token, then back to v07, which serves new events.
    let path = format!("/v1/plugins/{group}/rollback");
    let (code, _) = http(port, "POST", &path, &[]).await.unwrap();
    assert_eq!(code, 401);
    let bearer = format!("Bearer {TOKEN}");
    let (code, body) = http(port, "POST", &path, &[("Authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v07 = plugin_version(&relabeled_hostile("v07"));
    assert!(body.contains(&v07), "{body}");
    let p = live.stack.producer();
    for i in 0..20 {
        produce(&p, &live.topic, &format!("rb-{i}"), ts(1), "label", &[]).await;
    }
    let after = eventually(
        Duration::from_secs(60),
        "events after the rollback",
        || async {
            let l = strings(&ddb, &live.table, &group, "label").await;
            let rb: Vec<String> = l
                .iter()
                .filter(|(k, _)| k.starts_with("rb-"))
                .map(|(_, v)| v.clone())
                .collect();
            (rb.len() == 20).then_some(rb)
        },
    )
    .await;
    assert!(after.iter().all(|l| l == "v07"), "{after:?}");

    // The operator CLI shows the same.
    let out = std::process::Command::new(host_binary())
        .args(["plugin", "status", "--admin", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&group) && text.contains(&v07) && text.contains("rolled_back"),
        "{text}"
    );
    let mut host = live.host;
    assert!(host.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_group_fails_only_its_own_events() {
    let _serial = SERIAL.lock().await;
    let stack = Stack::from_env();
    let id = unique();
    let (topic, table) = (format!("mixed-{id}"), format!("features-{id}"));
    let (victim, bystander) = (format!("victim-{id}"), format!("bystander-{id}"));
    let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
    let spec_dir = tmp.join("specs");
    std::fs::create_dir_all(&spec_dir).unwrap();
    let limits = "    limits: {timeoutMs: 300, memoryMb: 32}\n";
    std::fs::write(
        spec_dir.join("victim.yaml"),
        group_spec(
            &victim,
            &[&topic],
            "hostile.wasm",
            &[("n", "int")],
            "null",
            &table,
            "  retry: {maxAttempts: 2, backoff: 100ms}\n  ordering: unordered\n",
        )
        .replace("    config: null\n", &format!("    config: null\n{limits}")),
    )
    .unwrap();
    // The bystander sees only the ordinary events (a header filter) with the same plugin.
    std::fs::write(
        spec_dir.join("bystander.yaml"),
        group_spec(
            &bystander,
            &[&topic],
            "hostile.wasm",
            &[("n", "int")],
            "null",
            &table,
            "",
        )
        .replace(
            &format!("    - topic: {topic}\n"),
            &format!("    - topic: {topic}\n      filter: {{header: kind, in: [plain]}}\n"),
        ),
    )
    .unwrap();
    stack.create_topics(&[&topic], 1).await;
    let (env, port) = stack.host_env_on_port(&tmp, &spec_dir, &format!("mixed-{id}"));
    let mut host = Host::spawn(&["run"], &env);

    let p = stack.producer();
    let attacks = ["panic", "loop", "balloon"];
    const PLAIN: usize = 300;
    for i in 0..PLAIN {
        produce(
            &p,
            &topic,
            &format!("k{}", i % 10),
            i as i64,
            "x",
            &[("kind", "plain")],
        )
        .await;
        if i % 100 == 50 {
            for a in attacks {
                produce(&p, &topic, "attack", ts(i as i64), a, &[("kind", "attack")]).await;
            }
        }
    }
    let ddb = stack.dynamodb().await;
    for g in [&bystander, &victim] {
        let c = eventually(Duration::from_secs(120), "plain events counted", || async {
            let c = counts(&ddb, &table, g, "n").await;
            (c.values().sum::<i64>() >= PLAIN as i64).then_some(c)
        })
        .await;
        assert_eq!(c.values().sum::<i64>(), PLAIN as i64, "{g}: {c:?}");
        assert!(!c.contains_key("attack"));
    }
    // Each attack fails its batch, is retried once alone, then dead-lettered with its reason.
    let dead = eventually(
        Duration::from_secs(120),
        "attacks dead-lettered",
        || async {
            let d = stack.read_all(&format!("{victim}.dlq"));
            (d.len() >= 9).then_some(d)
        },
    )
    .await;
    assert_eq!(dead.len(), 9);
    let reason = |payload: &[u8]| {
        dead.iter()
            .find(|r| r.0 == payload)
            .and_then(|r| {
                r.1.iter()
                    .find(|(k, _)| k == "fh-error")
                    .map(|(_, v)| v.clone())
            })
            .unwrap_or_default()
    };
    assert!(
        reason(b"panic").contains("told to panic"),
        "{}",
        reason(b"panic")
    );
    assert!(
        reason(b"loop").contains("CPU deadline"),
        "{}",
        reason(b"loop")
    );
    assert!(
        reason(b"balloon").contains("trapped"),
        "{}",
        reason(b"balloon")
    );
    assert!(stack.read_all(&format!("{bystander}.dlq")).is_empty());
    assert!(
        metric(
            port,
            &format!(r#"fh_plugin_call_failures_total{{group="{victim}"}}"#)
        )
        .await
            >= 6.0
    );
    assert!(host.terminate().success());
}
