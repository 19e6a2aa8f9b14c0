//! Delivery guarantees of the Kafka consumer on the real stack (tansu, DynamoDB Local,
//! Redis): crashes and rebalances lose nothing and apply nothing twice; poison events go to
//! the dead-letter topic while the partition moves on; transient failures succeed on retry.

use feature_host_e2e::*;
use std::collections::BTreeMap;
use std::time::Duration;

const USERS: usize = 40;

/// These tests each run several host processes; run them one at a time so that on a 2-core
/// machine no host starves long enough to miss its group session.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn click(i: usize) -> (String, String) {
    feature_host_e2e::click(i, USERS)
}

fn expected_clicks(n: usize) -> BTreeMap<String, i64> {
    feature_host_e2e::expected_clicks(n, USERS)
}

struct Setup {
    stack: Stack,
    id: String,
    topic: String,
    table: String,
    group: String,
    tmp: std::path::PathBuf,
    spec_dir: std::path::PathBuf,
}

/// A topic of `partitions`, a table, and one group `<prefix>-<id>` on them.
async fn setup(
    prefix: &str,
    partitions: i32,
    wasm: &str,
    features: &[(&str, &str)],
    config: &str,
    extra: &str,
) -> Setup {
    let stack = Stack::from_env();
    let id = unique();
    let topic = format!("{prefix}-{id}");
    let table = format!("features-{id}");
    let group = format!("{prefix}-{id}");
    let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
    let spec_dir = tmp.join("specs");
    std::fs::create_dir_all(&spec_dir).unwrap();
    std::fs::write(
        spec_dir.join("group.yaml"),
        group_spec(&group, &[&topic], wasm, features, config, &table, extra),
    )
    .unwrap();
    stack.create_topics(&[&topic], partitions).await;
    Setup {
        stack,
        id,
        topic,
        table,
        group,
        tmp,
        spec_dir,
    }
}

async fn clicks_setup(partitions: i32) -> Setup {
    setup(
        "clicks",
        partitions,
        "user_activity.wasm",
        &[
            ("clicks", "int"),
            ("views", "int"),
            ("last_viewed", "string-list"),
        ],
        "{entity_field: user_id, list_field: item_id, last_k: 3}",
        "",
    )
    .await
}

async fn produce_clicks(
    stack: &Stack,
    topic: &str,
    range: std::ops::Range<usize>,
    pause: Duration,
) {
    let p = stack.producer();
    for i in range {
        let (user, payload) = click(i);
        produce(&p, topic, &user, 1_000 + i as i64, &payload, &[]).await;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Wait until the stored counts reach `want` in total, then check they stay exactly `want`.
async fn assert_exact_counts(s: &Setup, want: &BTreeMap<String, i64>) {
    let ddb = s.stack.dynamodb().await;
    let total: i64 = want.values().sum();
    eventually(Duration::from_secs(180), "all clicks counted", || async {
        let got = counts(&ddb, &s.table, &s.group, "clicks").await;
        let sum: i64 = got.values().sum();
        assert!(sum <= total, "over-counted: {sum} > {total}: {got:?}");
        (sum == total).then_some(())
    })
    .await;
    // Anything still in flight (a duplicate) would land now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let got = counts(&ddb, &s.table, &s.group, "clicks").await;
    assert_eq!(&got, want, "every counter exact");
}

/// Every counter exact after the first `n` clicks; then `host` stops with SIGTERM (exit 0)
/// having committed every partition of the topic to its end.
async fn exact_and_committed(s: &Setup, mut host: Host, group_id: &str, partitions: i32, n: usize) {
    assert_exact_counts(s, &expected_clicks(n)).await;
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    let committed = s.stack.committed(group_id, &s.topic, partitions);
    assert_eq!(
        committed.iter().sum::<i64>(),
        n as i64,
        "every partition committed to its end: {committed:?}"
    );
    let _ = std::fs::remove_dir_all(&s.tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing_and_counts_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    let s = clicks_setup(3).await;
    let env = s
        .stack
        .host_env(&s.tmp, &s.spec_dir, &format!("crash-{}", s.id));
    produce_clicks(&s.stack, &s.topic, 0..N / 2, Duration::ZERO).await;
    // The rest arrives while hosts come and go.
    let late = {
        let (stack, topic) = (s.stack.clone(), s.topic.clone());
        tokio::spawn(async move {
            produce_clicks(&stack, &topic, N / 2..N, Duration::from_millis(5)).await
        })
    };
    let ddb = s.stack.dynamodb().await;
    for cycle in 0..4 {
        let mut host = Host::spawn(&["run"], &env);
        // Plugin compilation takes ~2 s in a debug build; kill anywhere from before the
        // first message to deep into the stream.
        let delay = Duration::from_millis(1_500 + rand::random::<u64>() % 3_500);
        tokio::time::sleep(delay).await;
        host.kill();
        let seen: i64 = counts(&ddb, &s.table, &s.group, "clicks")
            .await
            .values()
            .sum();
        eprintln!("cycle {cycle}: SIGKILL after {delay:?}; {seen} of {N} clicks stored");
    }
    late.await.unwrap();
    let host = Host::spawn(&["run"], &env);
    exact_and_committed(&s, host, &format!("crash-{}", s.id), 3, N).await;
}

/// A rolling restart of two replicas under load, as a Deployment rollout does it: one host at
/// a time gets SIGTERM (drain, commit, leave the group), and a new one starts in its place.
/// Nothing is lost and nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_replicas_loses_nothing_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1_500;
    let s = clicks_setup(4).await;
    let group_id = format!("roll-{}", s.id);
    let env = s.stack.host_env(&s.tmp, &s.spec_dir, &group_id);
    let data = |name: &str| {
        let mut e = env.clone();
        e.retain(|(k, _)| *k != "FH_DATA_DIR");
        e.push(("FH_DATA_DIR", s.tmp.join(name).display().to_string()));
        e
    };
    let producing = {
        let (stack, topic) = (s.stack.clone(), s.topic.clone());
        tokio::spawn(
            async move { produce_clicks(&stack, &topic, 0..N, Duration::from_millis(8)).await },
        )
    };
    let ddb = s.stack.dynamodb().await;
    let stored = || async {
        counts(&ddb, &s.table, &s.group, "clicks")
            .await
            .values()
            .sum::<i64>()
    };
    let mut a = Host::spawn(&["run"], &data("a1"));
    let mut b = Host::spawn(&["run"], &data("b1"));
    // Replace A, then B, each once the stream has moved on.
    for (step, name) in [(N / 5, "a2"), (N / 2, "b2")] {
        eventually(
            Duration::from_secs(90),
            "progress before the next restart",
            || async { (stored().await >= step as i64).then_some(()) },
        )
        .await;
        let old = if name.starts_with('a') {
            &mut a
        } else {
            &mut b
        };
        let status = old.terminate();
        assert!(status.success(), "SIGTERM: host exits 0 after its drain");
        eprintln!("{name}: replaced after {} stored clicks", stored().await);
        *old = Host::spawn(&["run"], &data(name));
    }
    producing.await.unwrap();
    assert_exact_counts(&s, &expected_clicks(N)).await;
    assert!(a.terminate().success());
    exact_and_committed(&s, b, &group_id, 4, N).await;
}

// Passes against tansu in most runs, but in about 3 of 8 CI runs tansu 0.6, after expiring
// the killed member, declared the survivor's assignment lost and never assigned it again
// (not even to a fresh subscription). Run it on purpose:
// `cargo test -p feature-host-e2e --test stream_delivery -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "tansu 0.6 sometimes never reassigns partitions after a member dies"]
async fn a_killed_hosts_partitions_move_to_the_other_host() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1_500;
    let s = clicks_setup(4).await;
    let group_id = format!("pair-{}", s.id);
    let mut env = s.stack.host_env(&s.tmp, &s.spec_dir, &group_id);
    // Let the broker notice the killed member quickly.
    env.push((
        "FH_KAFKA_PROPERTIES",
        "session.timeout.ms=10000,heartbeat.interval.ms=1000".into(),
    ));
    let data = |name: &str| {
        let mut e = env.clone();
        e.retain(|(k, _)| *k != "FH_DATA_DIR");
        e.push(("FH_DATA_DIR", s.tmp.join(name).display().to_string()));
        e
    };
    let mut a = Host::spawn(&["run"], &data("a"));
    let b = Host::spawn(&["run"], &data("b"));
    let producing = {
        let (stack, topic) = (s.stack.clone(), s.topic.clone());
        tokio::spawn(
            async move { produce_clicks(&stack, &topic, 0..N, Duration::from_millis(6)).await },
        )
    };
    let ddb = s.stack.dynamodb().await;
    eventually(Duration::from_secs(60), "both hosts consuming", || async {
        let sum: i64 = counts(&ddb, &s.table, &s.group, "clicks")
            .await
            .values()
            .sum();
        (sum >= (N / 5) as i64).then_some(())
    })
    .await;
    a.kill();
    eprintln!("host A killed");
    producing.await.unwrap();
    // B alone must now count A's partitions too and commit them to their ends.
    exact_and_committed(&s, b, &group_id, 4, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_dead_letter_and_flaky_succeeds_on_retry() {
    let _serial = SERIAL.lock().await;
    let s = setup(
        "hostile",
        1,
        "hostile.wasm",
        &[("n", "int")],
        "null",
        "  retry: {maxAttempts: 3, backoff: 300ms}\n",
    )
    .await;
    let (stack, id, topic, table, group, tmp) =
        (&s.stack, &s.id, &s.topic, &s.table, &s.group, &s.tmp);
    let port = free_port();
    let mut env = stack.host_env(tmp, &s.spec_dir, &format!("poison-{id}"));
    env.retain(|(k, _)| *k != "FH_ADMIN_ADDR");
    env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    env.push(("FH_COMMIT_INTERVAL", "200ms".into()));
    let mut host = Host::spawn(&["run"], &env);

    // One key, so `key` ordering puts every event in one lane: the poison and the flaky
    // event must not hold up the ones behind them.
    let p = stack.producer();
    let mut payloads: Vec<&str> = vec!["ok"; 10];
    payloads.extend(["invalid", "flaky:2", "flaky:9"]);
    payloads.extend(["ok"; 10]);
    for (i, payload) in payloads.iter().enumerate() {
        produce(&p, topic, "k1", 1_000 + i as i64, payload, &[]).await;
    }

    // The good events after the poison are written without waiting for the retries
    // (backoff 300 ms, then 600 ms).
    let ddb = stack.dynamodb().await;
    eventually(Duration::from_secs(60), "the 20 good events", || async {
        let n = counts(&ddb, table, group, "n").await.get("k1").copied();
        (n >= Some(20)).then_some(())
    })
    .await;
    // flaky:2 fails twice, then counts.
    eventually(
        Duration::from_secs(60),
        "the flaky event after its retries",
        || async {
            let n = counts(&ddb, table, group, "n").await.get("k1").copied();
            (n == Some(21)).then_some(())
        },
    )
    .await;

    // Dead letters: the invalid one at once, flaky:9 after maxAttempts (3).
    let dead = eventually(Duration::from_secs(60), "two dead letters", || async {
        let all = stack.read_all(&format!("{group}.dlq"));
        (all.len() >= 2).then_some(all)
    })
    .await;
    assert_eq!(dead.len(), 2, "exactly two dead letters");
    let header = |m: &Record, k: &str| {
        m.1.iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let invalid = dead
        .iter()
        .find(|m| m.0 == b"invalid")
        .expect("invalid dead-lettered");
    assert_eq!(header(invalid, "fh-error-kind"), "invalid");
    assert!(header(invalid, "fh-error").contains("told to reject"));
    assert_eq!(&header(invalid, "fh-source-topic"), topic);
    assert_eq!(header(invalid, "fh-source-offset"), "10");
    assert_eq!(header(invalid, "fh-attempts"), "1");
    let gave_up = dead
        .iter()
        .find(|m| m.0 == b"flaky:9")
        .expect("flaky:9 dead-lettered");
    assert!(
        header(gave_up, "fh-error").contains("gave up after 3 attempts"),
        "{:?}",
        gave_up.1
    );
    assert_eq!(header(gave_up, "fh-source-offset"), "12");

    // The retry topic saw flaky:2 twice and flaky:9 twice.
    let retried = eventually(Duration::from_secs(30), "four retry messages", || async {
        let all = stack.read_all(&format!("{group}.retry"));
        (all.len() >= 4).then_some(all)
    })
    .await;
    let summary: Vec<(String, String)> = retried
        .iter()
        .map(|m| {
            (
                String::from_utf8_lossy(&m.0).into_owned(),
                header(m, "fh-attempts"),
            )
        })
        .collect();
    assert_eq!(retried.len(), 4, "retry messages: {summary:?}");

    // The source partition committed past everything: the poison did not block it.
    eventually(
        Duration::from_secs(30),
        "source committed to its end",
        || async {
            let c = stack.committed(&format!("poison-{id}"), topic, 1);
            (c == vec![23]).then_some(())
        },
    )
    .await;
    let metrics = http_get(port, "/metrics").await.expect("metrics served");
    for want in [
        format!(r#"fh_dead_letters_total{{group="{group}"}} 2"#),
        format!(r#"fh_retries_total{{group="{group}"}} 4"#),
        format!(r#"fh_consumer_committed_offset{{topic="{topic}",partition="0"}} 23"#),
        format!(r#"fh_consumer_events_total{{topic="{topic}",partition="0"}} 23"#),
    ] {
        assert!(metrics.contains(&want), "{want} missing from\n{metrics}");
    }
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    let _ = std::fs::remove_dir_all(tmp);
}
