//! Delivery guarantees of the Kafka consumer on the real stack (Apache Kafka, DynamoDB Local,
//! Redis): crashes and rebalances lose nothing and apply nothing twice; poison events go to
//! the dead-letter topic while the partition moves on; transient failures succeed on retry.
//! Broker failures (one broker of one, one of three) are in `broker_failover`.

use feature_host_e2e::delivery::*;
use feature_host_e2e::*;
use std::time::Duration;

/// These tests each run several host processes; run them one at a time so that on a 2-core
/// machine no host starves long enough to miss its group session.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One group on the hostile fixture, one partition, three attempts `backoff` apart.
async fn hostile_setup(backoff: &str) -> Setup {
    Setup::new(
        Stack::from_env(),
        "hostile",
        1,
        "hostile.wasm",
        &[("n", "int")],
        "null",
        &format!("  retry: {{maxAttempts: 3, backoff: {backoff}}}\n"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_loses_nothing_and_counts_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    let s = Setup::clicks(Stack::from_env(), 3).await;
    let group_id = format!("crash-{}", s.id);
    let env = s.env(&group_id, "data");
    produce_clicks(&s.stack, &s.topic, 0..N / 2, Duration::ZERO).await;
    // The rest arrives while hosts come and go.
    let late = produce_clicks_in_background(&s.stack, &s.topic, N / 2..N, Duration::from_millis(5));
    let ddb = s.stack.dynamodb().await;
    for cycle in 0..4 {
        let mut host = Host::spawn(&["run"], &env);
        // Plugin compilation takes ~2 s in a debug build; kill anywhere from before the
        // first message to deep into the stream.
        let delay = Duration::from_millis(1_500 + rand::random::<u64>() % 3_500);
        tokio::time::sleep(delay).await;
        host.kill();
        let seen = s.stored(&ddb).await;
        eprintln!("cycle {cycle}: SIGKILL after {delay:?}; {seen} of {N} clicks stored");
    }
    late.await.unwrap();
    let host = Host::spawn(&["run"], &env);
    s.exact_and_committed(host, &group_id, 3, N).await;
}

/// A rolling restart of two replicas under load, as a Deployment rollout does it: one host at
/// a time gets SIGTERM (drain, commit, leave the group), and a new one starts in its place.
/// Nothing is lost and nothing is applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_replicas_loses_nothing_and_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1_500;
    let s = Setup::clicks(Stack::from_env(), 4).await;
    let group_id = format!("roll-{}", s.id);
    let producing =
        produce_clicks_in_background(&s.stack, &s.topic, 0..N, Duration::from_millis(8));
    let ddb = s.stack.dynamodb().await;
    let mut a = Host::spawn(&["run"], &s.env(&group_id, "a1"));
    let mut b = Host::spawn(&["run"], &s.env(&group_id, "b1"));
    // Replace A, then B, each once the stream has moved on.
    for (step, name) in [(N / 5, "a2"), (N / 2, "b2")] {
        eventually(
            Duration::from_secs(90),
            "progress before the next restart",
            || async { (s.stored(&ddb).await >= step as i64).then_some(()) },
        )
        .await;
        let old = if name.starts_with('a') {
            &mut a
        } else {
            &mut b
        };
        let status = old.terminate();
        assert!(status.success(), "SIGTERM: host exits 0 after its drain");
        eprintln!(
            "{name}: replaced after {} stored clicks",
            s.stored(&ddb).await
        );
        *old = Host::spawn(&["run"], &s.env(&group_id, name));
    }
    producing.await.unwrap();
    s.assert_exact_counts(&expected(N)).await;
    assert!(a.terminate().success());
    s.exact_and_committed(b, &group_id, 4, N).await;
}

/// A replica told to stop in the middle of a rebalance: the new replica has just received
/// its first assignment, so the old one is between the cooperative protocol's two rounds and
/// the second round's assignment can reach it while it closes. Closing is still a clean
/// stop — exit 0, everything it finished committed — and the stream stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_mid_rebalance_exits_cleanly() {
    let _serial = SERIAL.lock().await;
    const N: usize = 600;
    const ROUNDS: usize = 4;
    let s = Setup::clicks(Stack::from_env(), 4).await;
    let group_id = format!("midreb-{}", s.id);
    let producing =
        produce_clicks_in_background(&s.stack, &s.topic, 0..N, Duration::from_millis(10));
    let spawn = |name: &str| {
        let port = free_port();
        let mut env = s.env(&group_id, name);
        env.retain(|(k, _)| *k != "FH_ADMIN_ADDR");
        env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
        (Host::spawn(&["run"], &env), port)
    };
    let joined = |port: u16| async move {
        let text = http_get(port, "/metrics").await?;
        (metric(&text, "fh_consumer_joined") >= 1.0).then_some(())
    };
    let (mut old, port) = spawn("r0");
    eventually(Duration::from_secs(60), "the first replica to join", || {
        joined(port)
    })
    .await;
    for round in 1..=ROUNDS {
        let (new, port) = spawn(&format!("r{round}"));
        // Polled closely: the window between the new member's first assignment and the
        // old member's second round is short.
        let start = std::time::Instant::now();
        while joined(port).await.is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "replica r{round} never joined"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let status = old.terminate();
        assert!(
            status.success(),
            "round {round}: a replica stopped mid-rebalance exits 0, got {status}"
        );
        old = new;
    }
    producing.await.unwrap();
    s.exact_and_committed(old, &group_id, 4, N).await;
}

/// Two hosts share the partitions; one is SIGKILLed mid-stream. The broker expires it after
/// the session timeout and gives its partitions to the survivor, which re-processes from the
/// last commit: nothing lost, nothing applied twice, every partition committed to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_hosts_partitions_move_to_the_other_host() {
    let _serial = SERIAL.lock().await;
    const N: usize = 1_500;
    let s = Setup::clicks(Stack::from_env(), 4).await;
    let group_id = format!("pair-{}", s.id);
    // Let the broker notice the killed member quickly.
    let env = |name: &str| {
        let mut e = s.env(&group_id, name);
        e.push((
            "FH_KAFKA_PROPERTIES",
            "session.timeout.ms=10000,heartbeat.interval.ms=1000".into(),
        ));
        e
    };
    let mut a = Host::spawn(&["run"], &env("a"));
    let b = Host::spawn(&["run"], &env("b"));
    let producing =
        produce_clicks_in_background(&s.stack, &s.topic, 0..N, Duration::from_millis(6));
    let ddb = s.stack.dynamodb().await;
    eventually(Duration::from_secs(60), "both hosts consuming", || async {
        (s.stored(&ddb).await >= (N / 5) as i64).then_some(())
    })
    .await;
    a.kill();
    eprintln!("host A killed after {} stored clicks", s.stored(&ddb).await);
    producing.await.unwrap();
    // B alone must now count A's partitions too and commit them to their ends.
    s.exact_and_committed(b, &group_id, 4, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_goes_to_dead_letter_and_flaky_succeeds_on_retry() {
    let _serial = SERIAL.lock().await;
    let s = hostile_setup("300ms").await;
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
        produce(&p, topic, "k1", ts(1_000 + i as i64), payload, &[]).await;
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
    // The host counts hand-offs and commits once the broker has answered the commit that
    // the checks above saw.
    let wants = [
        format!(r#"fh_dead_letters_total{{group="{group}"}} 2"#),
        format!(r#"fh_retries_total{{group="{group}"}} 4"#),
        format!(r#"fh_consumer_committed_offset{{topic="{topic}",partition="0"}} 23"#),
        format!(r#"fh_consumer_events_total{{topic="{topic}",partition="0"}} 23"#),
    ];
    let metrics = eventually(Duration::from_secs(10), "the counts", || async {
        let m = http_get(port, "/metrics").await?;
        wants.iter().all(|w| m.contains(w)).then_some(m)
    })
    .await;
    for want in &wants {
        assert!(metrics.contains(want), "{want} missing from\n{metrics}");
    }
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    let _ = std::fs::remove_dir_all(tmp);
}

/// A hand-off the broker refuses for good does not hold the partition: a retry too large for
/// the retry topic is dead-lettered, and a payload too large for the dead-letter topic is
/// dead-lettered as a stub (key, headers, source position, no payload). The partition is
/// committed to its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_hand_offs_fall_back_to_the_dead_letter_topic_and_a_stub() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let _serial = SERIAL.lock().await;
    let s = Setup::new(
        Stack::from_env(),
        "refused",
        1,
        "hostile.wasm",
        &[("n", "int")],
        "null",
        "  retry: {maxAttempts: 3, backoff: 200ms}\n",
    )
    .await;
    // Operators' limits: small records only.
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.stack.kafka)
        .create()
        .unwrap();
    let retry = format!("{}.retry", s.group);
    let dlq = format!("{}.dlq", s.group);
    let topics = [
        NewTopic::new(&retry, 1, TopicReplication::Fixed(-1)).set("max.message.bytes", "1500"),
        NewTopic::new(&dlq, 1, TopicReplication::Fixed(-1)).set("max.message.bytes", "4000"),
    ];
    for r in admin
        .create_topics(&topics, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let (env, port) = s
        .stack
        .host_env_on_port(&s.tmp, &s.spec_dir, &format!("refused-{}", s.id));
    let mut host = Host::spawn(&["run"], &env);
    let p = s.stack.producer();
    // `flaky:` + padding fails once (retryable), then would succeed.
    let mid = format!("flaky:{}", "m".repeat(2_000));
    let big = format!("flaky:{}", "b".repeat(6_000));
    let payloads = ["ok", mid.as_str(), "ok", big.as_str(), "ok"];
    for (i, payload) in payloads.iter().enumerate() {
        produce(&p, &s.topic, "k1", ts(i as i64), payload, &[]).await;
    }
    eventually(
        Duration::from_secs(60),
        "the source committed to its end",
        || async {
            (s.stack.committed(&format!("refused-{}", s.id), &s.topic, 1) == vec![5]).then_some(())
        },
    )
    .await;
    let dead = s.stack.read_all(&dlq);
    assert_eq!(dead.len(), 2, "both dead-lettered");
    let header = |m: &Record, k: &str| {
        m.1.iter()
            .find(|(hk, _)| hk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let whole = dead
        .iter()
        .find(|m| header(m, "fh-source-offset") == "1")
        .unwrap();
    assert_eq!(whole.0, mid.as_bytes(), "the payload is kept when it fits");
    assert!(
        header(whole, "fh-error").contains("retry topic")
            && header(whole, "fh-error").contains("refused"),
        "{:?}",
        whole.1
    );
    let stub = dead
        .iter()
        .find(|m| header(m, "fh-source-offset") == "3")
        .unwrap();
    assert!(stub.0.is_empty(), "a stub: no payload");
    assert_eq!(
        header(stub, "fh-payload-dropped-bytes"),
        big.len().to_string()
    );
    assert_eq!(header(stub, "fh-source-topic"), s.topic);
    let metrics = http_get(port, "/metrics").await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            &format!("fh_handoff_refusals_total{{group=\"{}\"}}", s.group)
        ),
        3.0,
        "retry refused twice, the dead-letter topic once"
    );
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&s.tmp);
}

/// A retried event waiting for its due time pins its retry partition's low watermark while
/// the records behind it are processed and handed off again. When the partition moves to
/// another host, that host must not hand those records off a second time (each copy would
/// later apply under its own position: counted twice). The retry records are produced by
/// the test, so which one waits is certain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_does_not_hand_off_again_what_the_previous_one_handed_off() {
    let _serial = SERIAL.lock().await;
    let s = Setup::new(
        Stack::from_env(),
        "handoff",
        1,
        "hostile.wasm",
        &[("n", "int")],
        "null",
        "  retry: {maxAttempts: 10, backoff: 10m}\n",
    )
    .await;
    let retry = format!("{}.retry", s.group);
    s.stack.create_topics(&[&retry], 1).await;
    // r0 is due in an hour; r1..r5 are due now and fail again (flaky:9 needs 9 failures),
    // so the host hands each to the retry topic (due in 20 minutes): r6..r10.
    let p = s.stack.producer();
    let now = feature_host::sink::unix_now_ms();
    for i in 0..6i64 {
        let due = if i == 0 { now + 3_600_000 } else { 0 };
        let (offset, due, now) = (i.to_string(), due.to_string(), now.to_string());
        let headers = [
            ("fh-group", s.group.as_str()),
            ("fh-error", "flaky"),
            ("fh-error-kind", "retryable"),
            ("fh-attempts", "1"),
            ("fh-first-failure-ms", now.as_str()),
            ("fh-due-ms", due.as_str()),
            ("fh-source-topic", s.topic.as_str()),
            ("fh-source-partition", "0"),
            ("fh-source-offset", offset.as_str()),
        ];
        produce(&p, &retry, "k", ts(i), "flaky:9", &headers).await;
    }
    let group_id = format!("handoff-{}", s.id);
    let (env_a, port_a) = s.stack.host_env_on_port(&s.tmp, &s.spec_dir, &group_id);
    let mut a = Host::spawn(&["run"], &env_a);
    eventually(
        Duration::from_secs(60),
        "host A handing r1..r5 off again",
        || async { (s.stack.read_all(&retry).len() >= 11).then_some(()) },
    )
    .await;
    // Counted when their transaction commits, with the offsets that finish them.
    let retries = format!(r#"fh_retries_total{{group="{}"}}"#, s.group);
    eventually(
        Duration::from_secs(30),
        "A counting its hand-offs",
        || async {
            let m = http_get(port_a, "/metrics").await?;
            (metric(&m, &retries) >= 5.0).then_some(())
        },
    )
    .await;
    let counted = metric(&http_get(port_a, "/metrics").await.unwrap(), &retries);
    assert_eq!(counted, 5.0, "hand-offs of A");
    // A leaves (revoke: drain, commit); r0 still waits, so the watermark is at 0.
    assert!(a.terminate().success());

    let (env_b, port_b) = s.stack.host_env_on_port(&s.tmp, &s.spec_dir, &group_id);
    let mut b = Host::spawn(&["run"], &env_b);
    let partition = format!(r#"{{topic="{retry}",partition="0"}}"#);
    let settled = eventually(
        Duration::from_secs(60),
        "host B past r1..r5 (skipped or handed off)",
        || async {
            let m = http_get(port_b, "/metrics").await?;
            let skipped = metric(&m, &format!("fh_consumer_skipped_events_total{partition}"));
            let retried = metric(&m, &format!(r#"fh_retries_total{{group="{}"}}"#, s.group));
            (skipped + retried >= 5.0).then_some(m)
        },
    )
    .await;
    let records = s.stack.read_all(&retry);
    assert_eq!(
        records.len(),
        11,
        "r1..r5 were handed off once by A; B handed them off again:\n{settled}"
    );
    assert_eq!(
        metric(
            &settled,
            &format!("fh_consumer_skipped_events_total{partition}")
        ),
        5.0
    );
    assert!(b.terminate().success());
    let _ = std::fs::remove_dir_all(&s.tmp);
}

/// A host that dies after the broker acknowledged its hand-offs, before it committed the
/// source offsets they finish, must not leave those hand-offs behind: the next owner
/// processes the events again and hands them off again, and each copy in the retry topic
/// would count once. `flaky:1` fails once, then counts: five events must count five.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_hand_off_and_commit_applies_nothing_twice() {
    let _serial = SERIAL.lock().await;
    const N: usize = 5;
    let s = Setup::new(
        Stack::from_env(),
        "crashoff",
        1,
        "hostile.wasm",
        &[("n", "int")],
        "null",
        "  retry: {maxAttempts: 5, backoff: 200ms}\n",
    )
    .await;
    let group_id = format!("crashoff-{}", s.id);
    // A's first commit is due 30 s after it starts: it is killed long before, with its
    // hand-offs acknowledged in its open transaction. B takes over A's transactional id, as
    // a restarted replica of a StatefulSet would, which aborts A's transaction at once.
    let txn_id = [
        ("FH_KAFKA_TRANSACTIONAL_ID", format!("crashoff-{}", s.id)),
        ("FH_KAFKA_TRANSACTION_TIMEOUT", "120s".into()),
    ];
    let (mut env_a, port_a) = s.stack.host_env_on_port(&s.tmp, &s.spec_dir, &group_id);
    env_a.push(("FH_COMMIT_INTERVAL", "30s".into()));
    env_a.extend(txn_id.clone());
    let mut a = Host::spawn(&["run"], &env_a);
    let p = s.stack.producer();
    for i in 0..N {
        produce(&p, &s.topic, "k", ts(i as i64), "flaky:1", &[]).await;
    }
    eventually(
        Duration::from_secs(25),
        "host A handing every event off (acknowledged, not committed)",
        || async {
            let m = http_get(port_a, "/metrics").await?;
            (metric(&m, "fh_kafka_transaction_pending_records") >= N as f64).then_some(())
        },
    )
    .await;
    a.kill();

    let (mut env_b, port_b) = s.stack.host_env_on_port(&s.tmp, &s.spec_dir, &group_id);
    env_b.extend(txn_id);
    let mut b = Host::spawn(&["run"], &env_b);
    eventually(
        Duration::from_secs(90),
        "host B committing the source to its end",
        || async { (s.stack.committed(&group_id, &s.topic, 1) == vec![N as i64]).then_some(()) },
    )
    .await;
    let ddb = s.stack.dynamodb().await;
    eventually(Duration::from_secs(60), "every event counted", || async {
        let n = counts(&ddb, &s.table, &s.group, "n")
            .await
            .get("k")
            .copied();
        (n >= Some(N as i64)).then_some(())
    })
    .await;
    // Then every retry record that can be read (read_committed) is read and finished by B.
    let retry = format!("{}.retry", s.group);
    let partition = format!(r#"{{topic="{retry}",partition="0"}}"#);
    let records = eventually(
        Duration::from_secs(60),
        "host B finishing every retry record",
        || async {
            let m = http_get(port_b, "/metrics").await?;
            let records = s.stack.read_all(&retry).len();
            let read = metric(&m, &format!("fh_consumer_events_total{partition}"));
            let open = metric(&m, &format!("fh_consumer_in_flight{partition}"));
            (read >= records as f64 && open == 0.0).then_some(records)
        },
    )
    .await;
    let n = counts(&ddb, &s.table, &s.group, "n")
        .await
        .get("k")
        .copied();
    assert_eq!(
        (n, records),
        (Some(N as i64), N),
        "(count, retry records): each hand-off made once, each event counted once"
    );
    assert!(b.terminate().success());
    let _ = std::fs::remove_dir_all(&s.tmp);
}

/// A topic deleted and created again under its name (a common way to purge a backlog)
/// restarts its offsets at 0, while the entities it wrote keep the old incarnation's
/// watermarks, far above 0. Positions name the incarnation (the topic id), so the new
/// topic's events are applied, each once — with the host running through the purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_again_under_its_name_is_counted_as_new() {
    let _serial = SERIAL.lock().await;
    let (before, after) = (300, 120);
    let s = Setup::clicks(Stack::from_env(), 1).await;
    let group_id = format!("recreate-{}", s.id);
    let host = Host::spawn(&["run"], &s.env(&group_id, "data"));
    produce_clicks(&s.stack, &s.topic, 0..before, Duration::ZERO).await;
    s.assert_exact_counts(&expected(before)).await;
    recreate_topic(&s.stack.kafka, &s.topic, 1).await;
    // Offsets 0..120 of the new incarnation: every one below the old watermark of 300.
    produce_clicks(&s.stack, &s.topic, before..before + after, Duration::ZERO).await;
    s.assert_exact_counts(&expected(before + after)).await;
    s.stop_committed(host, &group_id, 1, after);
}

/// A producer cannot forge the host's headers. A source event carrying `fh-replay-of` (the
/// identity `dlq replay` gives a dead letter) kept it through its retry, so every event
/// forged with one value — and the real replay of that dead letter — was one "replay", and
/// all but the first were dropped as already applied. A retry record due in the far future
/// (someone who can write the retry topic) held its partition until then; it waits no longer
/// than the group's longest backoff now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_host_headers_neither_drop_events_nor_stall_a_partition() {
    let _serial = SERIAL.lock().await;
    let s = hostile_setup("100ms").await;
    let (stack, id, topic, table, group, tmp) =
        (&s.stack, &s.id, &s.topic, &s.table, &s.group, &s.tmp);
    let mut env = stack.host_env(tmp, &s.spec_dir, &format!("forged-{id}"));
    env.push(("FH_COMMIT_INTERVAL", "200ms".into()));
    let mut host = Host::spawn(&["run"], &env);

    let p = stack.producer();
    let ddb = stack.dynamodb().await;
    produce(&p, topic, "k0", ts(1_000), "ok", &[]).await;
    eventually(Duration::from_secs(60), "the host consuming", || async {
        let n = counts(&ddb, table, group, "n").await.get("k0").copied();
        (n == Some(1)).then_some(())
    })
    .await;

    // Two events that fail once (so they pass through the retry topic), both forged as the
    // replay of one dead letter.
    let forged = format!("{group}.dlq/0/5");
    for i in 0..2 {
        let headers = [("fh-replay-of", forged.as_str())];
        produce(&p, topic, "k1", ts(2_000 + i), "flaky:1", &headers).await;
    }
    // A well-formed retry record, due at the end of time.
    let never = i64::MAX.to_string();
    let retry_headers = [
        ("fh-group", group.as_str()),
        ("fh-error", "forged"),
        ("fh-error-kind", "retryable"),
        ("fh-attempts", "1"),
        ("fh-first-failure-ms", "0"),
        ("fh-due-ms", never.as_str()),
        ("fh-source-topic", topic.as_str()),
        ("fh-source-partition", "0"),
        ("fh-source-offset", "999"),
    ];
    produce(
        &p,
        &format!("{group}.retry"),
        "k2",
        ts(3_000),
        "ok",
        &retry_headers,
    )
    .await;

    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let got = loop {
        let c = counts(&ddb, table, group, "n").await;
        if c.get("k1") == Some(&2) && c.get("k2") == Some(&1) {
            break c;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after 60 s: {c:?}; want k1 = 2 (both forged events) and k2 = 1 (the far-future retry)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(got.get("k0"), Some(&1), "{got:?}");
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    let _ = std::fs::remove_dir_all(tmp);
}
