//! Fault suite, scripted on the real stack with stores of the test's own: Redis paused
//! (SIGSTOP) and resumed, then killed (SIGKILL) and restarted with its old data; DynamoDB Local
//! paused and resumed; garbage on the topic. After each fault: exact totals (nothing lost,
//! nothing counted twice), no stale value served by the read path, and the recovery time
//! printed. (SIGKILL of the host during ingestion is in `stream_delivery`, during a backfill in
//! `batch`; a rolling restart of two replicas in `stream_delivery`; broken specs and plugins
//! dropped into the watched directories in
//! `plugin_lifecycle`; admin calls without the token in `operations` and `plugin_lifecycle`.)

use feature_host_e2e::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const USERS: usize = 20;

async fn produce_clicks(stack: &Stack, topic: &str, range: std::ops::Range<usize>) {
    let p = stack.producer();
    for i in range {
        let (user, payload) = click(i, USERS);
        produce(&p, topic, &user, ts(1_000 + i as i64), &payload, &[]).await;
    }
}

/// Wait until DynamoDB holds exactly the clicks of events `0..n` (never more on the way).
async fn exact(ddb: &aws_sdk_dynamodb::Client, table: &str, group: &str, n: usize) {
    let want = expected_clicks(n, USERS);
    eventually(
        Duration::from_secs(120),
        &format!("{n} clicks in DynamoDB"),
        || async {
            let got = counts(ddb, table, group, "clicks").await;
            let (sum, total): (i64, i64) = (got.values().sum(), want.values().sum());
            assert!(sum <= total, "over-counted: {sum} > {total}");
            (got == want).then_some(())
        },
    )
    .await;
}

/// Every user as the admin API reads it (cache first, then the store) equals DynamoDB, and no
/// cache repair is pending: nothing stale is served.
async fn reads_match_store(
    port: u16,
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
) -> bool {
    let store = counts(ddb, table, group, "clicks").await;
    for (user, clicks) in &store {
        let Some(body) = http_get(port, &format!("/v1/features/{group}/{user}")).await else {
            return false;
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        assert!(
            v["features"]["clicks"]
                .as_i64()
                .is_none_or(|c| c <= *clicks),
            "read path served more than the store holds for {user}: {body}"
        );
        if v["features"]["clicks"].as_i64() != Some(*clicks) {
            return false;
        }
    }
    let text = http_get(port, "/metrics").await.unwrap_or_default();
    metric(&text, "fh_cache_repairs_pending") == 0.0
}

/// How long until [`reads_match_store`] holds.
async fn until_reads_match(
    port: u16,
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
) -> Duration {
    let t = Instant::now();
    eventually(
        Duration::from_secs(60),
        "reads to match the store",
        || async {
            reads_match_store(port, ddb, table, group)
                .await
                .then_some(())
        },
    )
    .await;
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_faults_and_garbage_lose_nothing_and_serve_nothing_stale() {
    let shared = Stack::from_env();
    let u = unique();
    let tmp = std::env::temp_dir().join(format!("fh-faults-{u}"));
    let mut redis = OwnRedis::start(&tmp.join("redis"));
    let dynamo = OwnDynamo::start();
    let stack = Stack {
        kafka: shared.kafka.clone(),
        dynamodb: dynamo.url(),
        redis: redis.url(),
    };
    let (group, topic, table) = (
        format!("faults{u}"),
        format!("faults-{u}"),
        format!("f-{u}"),
    );
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(
        specs.join("group.yaml"),
        group_spec(
            &group,
            &[&topic],
            "user_activity.wasm",
            &[
                ("clicks", "int"),
                ("views", "int"),
                ("last_viewed", "string-list"),
            ],
            "{entity_field: user_id, list_field: item_id, last_k: 3}",
            &table,
            "  retry: {maxAttempts: 2, backoff: 200ms}\n",
        ),
    )
    .unwrap();
    stack.create_topics(&[&topic], 1).await;
    let (mut env, port) = stack.host_env_on_port(&tmp, &specs, &format!("faults-{u}"));
    env.push(("FH_JOBS_TABLE", format!("jobs-{u}")));
    let mut host = Host::spawn(&["run"], &env);
    eventually(Duration::from_secs(60), "readiness", || async {
        let (code, _) = http(port, "GET", "/readyz", &[]).await?;
        (code == 200).then_some(())
    })
    .await;
    let ddb = stack.dynamodb().await;
    let dlq = format!("{group}.dlq");
    let mut report = BTreeMap::new();

    produce_clicks(&stack, &topic, 0..200).await;
    exact(&ddb, &table, &group, 200).await;

    // Redis paused: store writes go on; cache updates time out into the repair queue.
    redis.pause();
    produce_clicks(&stack, &topic, 200..400).await;
    exact(&ddb, &table, &group, 400).await;
    redis.resume();
    report.insert(
        "redis paused 400 events: reads consistent after resume",
        until_reads_match(port, &ddb, &table, &group).await,
    );

    // Redis killed and restarted with its (now stale) data.
    redis.kill();
    produce_clicks(&stack, &topic, 400..500).await;
    exact(&ddb, &table, &group, 500).await;
    redis.restart();
    report.insert(
        "redis killed and restarted: reads consistent after restart",
        until_reads_match(port, &ddb, &table, &group).await,
    );

    // DynamoDB paused: writes time out and cycle through the retry topic; nothing is
    // dead-lettered; all land once it answers again.
    dynamo.pause();
    produce_clicks(&stack, &topic, 500..700).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    dynamo.resume();
    let t = Instant::now();
    exact(&ddb, &table, &group, 700).await;
    report.insert(
        "dynamodb paused 8 s: all 700 exact after resume",
        t.elapsed(),
    );
    assert!(
        shared.read_all(&dlq).is_empty(),
        "an outage dead-lettered events"
    );

    // Garbage between good events: dead letters with reasons, the rest unaffected.
    let p = stack.producer();
    let huge = "x".repeat(600_000);
    let garbage = [
        ("not-json", "this is not json"),
        ("empty", ""),
        ("huge", huge.as_str()),
        ("no-user", r#"{"type":"click","item_id":"i1"}"#),
    ];
    produce_clicks(&stack, &topic, 700..725).await;
    for (key, payload) in garbage {
        produce(&p, &topic, key, ts(5_000), payload, &[]).await;
    }
    produce_clicks(&stack, &topic, 725..750).await;
    exact(&ddb, &table, &group, 750).await;
    let dead = eventually(Duration::from_secs(60), "4 dead letters", || async {
        let d = shared.read_all(&dlq);
        (d.len() == 4).then_some(d)
    })
    .await;
    for (_, headers) in &dead {
        let reason = headers
            .iter()
            .find(|(k, _)| k == "fh-error")
            .map(|(_, v)| v.clone());
        assert!(
            reason.is_some_and(|r| !r.is_empty()),
            "a dead letter without a reason: {headers:?}"
        );
    }
    eventually(Duration::from_secs(60), "every event committed", || async {
        (shared.committed(&format!("faults-{u}"), &topic, 1) == vec![754]).then_some(())
    })
    .await;
    assert!(reads_match_store(port, &ddb, &table, &group).await);
    assert!(host.terminate().success());
    for (what, took) in &report {
        println!("recovery: {what}: {took:.1?}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
