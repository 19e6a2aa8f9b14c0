//! Broker failures under load, each on an Apache Kafka cluster of the test's own (so killing a
//! broker disturbs no other test): the host rides them out with exact totals — nothing lost,
//! nothing applied twice — and every partition committed to its end.
//!
//! - one broker of one SIGKILLed and restarted on its port and log dir: the host stalls while
//!   it is gone and resumes by itself; the time to recover is printed;
//! - one broker of three SIGKILLed — the one coordinating the host's group — topics at
//!   replication factor 3 / `min.insync.replicas` 2: ingestion (hand-offs to the dead-letter
//!   topic included) goes on while it is down;
//! - and what the broker's time-based retention does to hand-offs of old events: nothing.

use feature_host_e2e::delivery::*;
use feature_host_e2e::*;
use std::time::{Duration, Instant};

/// Each test runs a Kafka cluster and a host on 2 cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The shared stack's stores with a Kafka cluster of the test's own.
fn on(kafka: &OwnKafka) -> Stack {
    Stack {
        kafka: kafka.brokers.clone(),
        ..Stack::from_env()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_broker_killed_under_load_and_restarted_loses_nothing() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    let dir = std::env::temp_dir().join(format!("fh-kafka1-{}", unique()));
    let kafka = OwnKafka::start(&dir, 1, &[]);
    let s = Setup::clicks(on(&kafka), 3).await;
    let group_id = format!("brokerkill-{}", s.id);
    let host = Host::spawn(&["run"], &s.env(&group_id, "data"));
    let producing =
        produce_clicks_in_background(&s.stack, &s.topic, 0..N, Duration::from_millis(4));
    let ddb = s.stack.dynamodb().await;
    eventually(Duration::from_secs(90), "a quarter stored", || async {
        (s.stored(&ddb).await >= (N / 4) as i64).then_some(())
    })
    .await;

    kafka.kill(1);
    let killed = Instant::now();
    let at_kill = s.stored(&ddb).await;
    // Long enough for every client to notice: fetches, commits and produce requests fail.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before_restart = s.stored(&ddb).await;
    kafka.restart(1);
    let back = Instant::now();
    eventually(
        Duration::from_secs(120),
        "progress after the restart",
        || async { (s.stored(&ddb).await > before_restart).then_some(()) },
    )
    .await;
    let resumed = back.elapsed();
    eprintln!(
        "recovery: broker down {:.1?} (restart included); {at_kill} clicks stored at the kill, {before_restart} when it came back; host resumed {resumed:.1?} after the broker served again",
        back - killed
    );
    producing.await.unwrap();
    s.exact_and_committed(host, &group_id, 3, N).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_three_brokers_killed_under_load_ingestion_goes_on() {
    let _serial = SERIAL.lock().await;
    const N: usize = 2_000;
    // Every 100th event is not JSON: it is dead-lettered (acks=all to a topic of RF 3, min
    // ISR 2) while a broker is down too.
    let poison = |i: usize| i % 100 == 50;
    let dir = std::env::temp_dir().join(format!("fh-kafka3-{}", unique()));
    let kafka = OwnKafka::start(&dir, 3, &[]);
    let s = Setup::clicks(on(&kafka), 3).await;
    let group_id = format!("rf3-{}", s.id);
    let host = Host::spawn(&["run"], &s.env(&group_id, "data"));
    let producing = {
        let stack = s.stack.clone();
        let topic = s.topic.clone();
        tokio::spawn(async move {
            let p = stack.producer();
            for i in 0..N {
                let (user, payload) = click_event(i);
                let payload = if poison(i) {
                    "not json".into()
                } else {
                    payload
                };
                produce(&p, &topic, &user, click_time(i), &payload, &[]).await;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };
    let ddb = s.stack.dynamodb().await;
    eventually(Duration::from_secs(90), "a quarter stored", || async {
        (s.stored(&ddb).await >= (N / 4) as i64).then_some(())
    })
    .await;

    // The hand-off topics were created at the cluster's replication factor.
    let dlq = format!("{}.dlq", s.group);
    assert_eq!(replication_factor(&kafka.brokers, &dlq), 3, "{dlq}");
    assert_eq!(
        replication_factor(&kafka.brokers, &format!("{}.retry", s.group)),
        3
    );

    // The worst broker to lose: the one coordinating the host's group, to which each
    // commit's offsets go inside the hand-off transaction.
    let coordinator =
        group_coordinator(&kafka.brokers, &group_id).expect("the group has a coordinator");
    eprintln!("killing broker {coordinator}, the group's coordinator");
    kafka.kill(coordinator as usize);
    let at_kill = s.stored(&ddb).await;
    let t = Instant::now();
    eventually(
        Duration::from_secs(90),
        "progress with one broker of three down",
        || async { (s.stored(&ddb).await >= at_kill + 200).then_some(()) },
    )
    .await;
    eprintln!(
        "one of three brokers down: 200 more clicks stored {:.1?} after the kill",
        t.elapsed()
    );
    producing.await.unwrap();
    let mut want = expected(N);
    for i in (0..N).filter(|&i| poison(i)) {
        *want.get_mut(&click_event(i).0).unwrap() -= 1;
    }
    want.retain(|_, n| *n > 0);
    s.assert_exact_counts(&want).await;
    // A poison event's offset finishes once its dead letter is acknowledged: with every
    // partition committed to its end, every dead letter is in.
    eventually(
        Duration::from_secs(120),
        "every partition committed to its end, a broker still down",
        || async {
            let c = s.stack.committed(&group_id, &s.topic, 3);
            (c.iter().sum::<i64>() == N as i64).then_some(())
        },
    )
    .await;
    let dead = s.stack.read_all(&dlq);
    assert_eq!(
        dead.len(),
        (0..N).filter(|&i| poison(i)).count(),
        "every poison event dead-lettered exactly once"
    );
    kafka.restart(coordinator as usize);
    s.assert_exact_counts(&want).await;
    s.stop_committed(host, &group_id, 3, N);
}

/// The smallest replica count over `topic`'s partitions.
fn replication_factor(brokers: &str, topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let m = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    m.topics()[0]
        .partitions()
        .iter()
        .map(|p| p.replicas().len())
        .min()
        .unwrap_or(0)
}

/// Dead letters and retries of *old* events (a replay of history, a CDC snapshot, a lagging
/// producer) outlive the hand-off topic's time-based retention: a hand-off is stamped with the
/// time it was made, and the event time travels in a header. (Stamped with the event time, as
/// before, a dead letter of an event older than `retention.ms` was deleted as soon as its
/// segment rolled — with `acks=all`, after the source offset was committed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_offs_of_old_events_survive_the_topics_retention() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let _serial = SERIAL.lock().await;
    // A broker of its own that applies retention within a second (production checks every
    // 5 min; the rules are the same).
    let dir = std::env::temp_dir().join(format!("fh-kafka-retention-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("retention.properties");
    std::fs::write(
        &config,
        "log.retention.check.interval.ms=1000\nlog.initial.task.delay.ms=0\n",
    )
    .unwrap();
    let kafka = OwnKafka::start(
        &dir.join("kafka"),
        1,
        &["--config", config.to_str().unwrap()],
    );
    let s = Setup::new(
        on(&kafka),
        "old",
        1,
        "user_activity.wasm",
        &[("clicks", "int")],
        "{entity_field: user_id}",
        "",
    )
    .await;
    // The dead-letter topic as an operator would: a week of retention, segments rolled often
    // (here every 100 ms, so the roll happens within the test).
    let dlq = format!("{}.dlq", s.group);
    let admin: AdminClient<_> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &s.stack.kafka)
        .create()
        .unwrap();
    let topic = NewTopic::new(&dlq, 1, TopicReplication::Fixed(-1))
        .set("retention.ms", "604800000")
        .set("segment.ms", "100");
    for r in admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    // The source keeps history forever, as a topic one replays history from does.
    let mut source =
        rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&s.topic));
    source = source.set("retention.ms", "-1");
    for r in admin
        .alter_configs([&source], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap();
    }
    let group_id = format!("old-{}", s.id);
    let mut host = Host::spawn(&["run"], &s.env(&group_id, "data"));
    let p = s.stack.producer();
    let produced_at = feature_host::sink::unix_now_ms();
    let month_ago = produced_at - 30 * 86_400_000;
    for (i, payload) in ["not json", "still not json", "nor this"]
        .iter()
        .enumerate()
    {
        produce(&p, &s.topic, "u1", month_ago + i as i64, payload, &[]).await;
        // A new segment for the next one: the first ones' segments are closed and eligible.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eventually(Duration::from_secs(60), "3 dead letters", || async {
        (s.stack.read_all(&dlq).len() >= 3).then_some(())
    })
    .await;
    // Retention goes by record timestamps: the hand-offs carry the time they were made.
    let dead = read_messages(&s.stack.kafka, &dlq);
    assert_eq!(dead.len(), 3);
    for m in &dead {
        assert!(
            m.timestamp_ms >= produced_at,
            "dead letter stamped {} (before the hand-off at {produced_at}): retention would delete it",
            m.timestamp_ms
        );
    }
    let event_time: Vec<String> = dead
        .iter()
        .filter_map(|m| m.headers.iter().find(|(k, _)| k == "fh-event-time-ms"))
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        event_time,
        (0..3)
            .map(|i| (month_ago + i).to_string())
            .collect::<Vec<_>>(),
        "the event time travels in a header"
    );
    // And the broker keeps them: it checks retention every second.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        s.stack.read_all(&dlq).len(),
        3,
        "dead letters deleted by retention"
    );
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&s.tmp);
}
