//! Store and cache outages on the real stack: Redis stopped mid-run and restarted with its
//! old (now stale) data; DynamoDB cut off for a while. Writes are never lost, a stale cache
//! entry is never served, and events held up by the store land once it is back.

use aws_sdk_dynamodb::types::AttributeValue;
use feature_host_e2e::*;
use std::collections::BTreeMap;
use std::time::Duration;

const USERS: usize = 20;

/// One host at a time: both tests run a host and a consumer group on two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn produce_clicks(stack: &Stack, topic: &str, range: std::ops::Range<usize>) {
    let p = stack.producer();
    for i in range {
        let (user, payload) = click(i, USERS);
        produce(&p, topic, &user, ts(1_000 + i as i64), &payload, &[]).await;
    }
}

fn expected(n: usize) -> BTreeMap<String, i64> {
    expected_clicks(n, USERS)
}

/// A group counting clicks with the user-activity plugin, with the given cache strategy.
fn spec(group: &str, topic: &str, table: &str, strategy: &str, retry: &str) -> String {
    group_spec(
        group,
        &[topic],
        "user_activity.wasm",
        &[
            ("clicks", "int"),
            ("views", "int"),
            ("last_viewed", "string-list"),
        ],
        "{entity_field: user_id, list_field: item_id, last_k: 3}",
        table,
        retry,
    )
    .replace("strategy: write-through", &format!("strategy: {strategy}"))
}

/// Wait until DynamoDB holds exactly `want` for `group` (never more on the way).
async fn exact(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
    want: &BTreeMap<String, i64>,
) {
    let total: i64 = want.values().sum();
    eventually(
        Duration::from_secs(120),
        "every click in DynamoDB",
        || async {
            let got = counts(ddb, table, group, "clicks").await;
            let sum: i64 = got.values().sum();
            assert!(sum <= total, "over-counted: {sum} > {total}: {got:?}");
            (sum == total).then_some(())
        },
    )
    .await;
    assert_eq!(&counts(ddb, table, group, "clicks").await, want);
}

/// `clicks` of `entity` as the host's read path (admin API) serves it.
async fn served(port: u16, group: &str, entity: &str) -> Option<i64> {
    let body = http_get(port, &format!("/v1/features/{group}/{entity}")).await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["features"]["clicks"].as_i64()
}

async fn metrics(port: u16) -> String {
    http_get(port, "/metrics").await.unwrap_or_default()
}

/// The DynamoDB item version `v` of every entity of `group`.
async fn versions(
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for user in (0..USERS).map(|u| format!("u{u}")) {
        let item = ddb
            .get_item()
            .table_name(table)
            .key("pk", AttributeValue::S(format!("{group}#{user}")))
            .consistent_read(true)
            .send()
            .await
            .unwrap()
            .item
            .unwrap_or_default();
        if let Some(v) = item.get("v").and_then(|a| a.as_n().ok()) {
            out.insert(user, v.parse().unwrap());
        }
    }
    out
}

/// The stack, a unique id, and a fresh temporary directory with an empty spec directory.
fn start() -> (Stack, String, std::path::PathBuf, std::path::PathBuf) {
    let id = unique();
    let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
    let spec_dir = tmp.join("specs");
    std::fs::create_dir_all(&spec_dir).unwrap();
    (Stack::from_env(), id, tmp, spec_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_no_store_write_and_serves_no_stale_value() {
    let _serial = SERIAL.lock().await;
    let (stack, id, tmp, spec_dir) = start();
    let (topic, table) = (format!("outage-{id}"), format!("features-{id}"));
    let (through, around) = (format!("through-{id}"), format!("around-{id}"));
    for (group, strategy) in [(&through, "write-through"), (&around, "write-around")] {
        std::fs::write(
            spec_dir.join(format!("{strategy}.yaml")),
            spec(group, &topic, &table, strategy, ""),
        )
        .unwrap();
    }
    stack.create_topics(&[&topic], 2).await;
    let mut redis = OwnRedis::start(&tmp.join("redis"));
    let port = free_port();
    let mut env = stack.host_env(&tmp, &spec_dir, &format!("outage-{id}"));
    env.retain(|(k, _)| *k != "FH_ADMIN_ADDR" && *k != "FH_REDIS_URL");
    env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    env.push(("FH_REDIS_URL", redis.url()));
    let mut host = Host::spawn(&["run"], &env);
    let ddb = stack.dynamodb().await;

    // Phase 1: everything up; every entity cached (write-through by the writes, write-around
    // by a read through the host).
    produce_clicks(&stack, &topic, 0..200).await;
    exact(&ddb, &table, &through, &expected(200)).await;
    exact(&ddb, &table, &around, &expected(200)).await;
    for u in 0..USERS {
        let user = format!("u{u}");
        let want = expected(200)[&user];
        for group in [&through, &around] {
            let got = eventually(Duration::from_secs(30), "host serving", || {
                served(port, group, &user)
            })
            .await;
            assert_eq!(got, want, "{group}/{user} before the outage");
        }
    }
    let cached_before = {
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let n: usize = redis::cmd("DBSIZE").query(&mut c).unwrap();
        n
    };
    assert_eq!(cached_before, 2 * USERS, "both groups cached every entity");

    // Phase 2: Redis stops (its data, now about to go stale, is kept on disk). Writes go on.
    redis.stop();
    produce_clicks(&stack, &topic, 200..500).await;
    exact(&ddb, &table, &through, &expected(500)).await;
    exact(&ddb, &table, &around, &expected(500)).await;
    let text = metrics(port).await;
    assert!(
        metric(&text, "fh_cache_repairs_pending") > 0.0,
        "failed cache updates are queued:\n{text}"
    );
    for group in [&through, &around] {
        assert_eq!(
            served(port, group, "u1").await,
            Some(expected(500)["u1"]),
            "{group}: the read path serves the store while Redis is down"
        );
    }

    // Phase 3: Redis comes back with its old entries. Not one read serves them, before or
    // after the repairs land.
    redis.restart();
    for u in 0..USERS {
        let user = format!("u{u}");
        for group in [&through, &around] {
            assert_eq!(
                served(port, group, &user).await,
                Some(expected(500)[&user]),
                "{group}/{user}: a stale cache entry was served after Redis came back"
            );
        }
    }
    eventually(Duration::from_secs(60), "cache repairs to land", || async {
        (metric(&metrics(port).await, "fh_cache_repairs_pending") == 0.0).then_some(())
    })
    .await;
    // Every cache entry is now an invalidation marker at the store's version, or a fill of
    // exactly the store's value.
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    for group in [&through, &around] {
        let stored = versions(&ddb, &table, group).await;
        for (user, v) in &stored {
            let (cv, inv, clicks): (Option<u64>, Option<String>, Option<i64>) = redis::cmd("HMGET")
                .arg(format!("fh:{group}#{user}"))
                .arg("__v")
                .arg("__inv")
                .arg("clicks")
                .query(&mut c)
                .unwrap();
            assert_eq!(
                cv,
                Some(*v),
                "{group}/{user}: cache version = store version"
            );
            if inv.is_none() {
                assert_eq!(clicks, Some(expected(500)[user]), "{group}/{user}");
            }
        }
        // Reads fill the cache again with the store's value.
        assert_eq!(served(port, group, "u3").await, Some(expected(500)["u3"]));
    }
    let filled: (Option<u64>, Option<i64>) = redis::cmd("HMGET")
        .arg(format!("fh:{around}#u3"))
        .arg("__v")
        .arg("clicks")
        .query(&mut c)
        .unwrap();
    assert_eq!(
        filled.1,
        Some(expected(500)["u3"]),
        "read-through refilled the cache"
    );

    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    assert_eq!(
        stack
            .committed(&format!("outage-{id}"), &topic, 2)
            .iter()
            .sum::<i64>(),
        500,
        "every event committed"
    );
    drop(redis);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_outage_sends_events_to_retry_and_they_land_once_it_is_back() {
    let _serial = SERIAL.lock().await;
    let (stack, id, tmp, spec_dir) = start();
    let (topic, table, group) = (
        format!("ddb-outage-{id}"),
        format!("features-{id}"),
        format!("clicks-{id}"),
    );
    // Two attempts only: were a store outage counted against them, the events would be
    // dead-lettered within a second.
    std::fs::write(
        spec_dir.join("group.yaml"),
        spec(
            &group,
            &topic,
            &table,
            "write-through",
            "  retry: {maxAttempts: 2, backoff: 200ms}\n",
        ),
    )
    .unwrap();
    stack.create_topics(&[&topic], 1).await;
    let proxy = Proxy::start(&stack.dynamodb).await;
    let port = free_port();
    let mut env = stack.host_env(&tmp, &spec_dir, &format!("ddb-{id}"));
    env.retain(|(k, _)| *k != "FH_ADMIN_ADDR" && *k != "FH_DYNAMODB_ENDPOINT");
    env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
    env.push(("FH_DYNAMODB_ENDPOINT", proxy.url()));
    let mut host = Host::spawn(&["run"], &env);
    let ddb = stack.dynamodb().await; // direct, not through the proxy

    produce_clicks(&stack, &topic, 0..100).await;
    exact(&ddb, &table, &group, &expected(100)).await;

    proxy.set_down(true);
    produce_clicks(&stack, &topic, 100..300).await;
    let retries = format!("fh_retries_total{{group=\"{group}\"}}");
    eventually(
        Duration::from_secs(60),
        "events handed to the retry topic",
        || async { (metric(&metrics(port).await, &retries) > 0.0).then_some(()) },
    )
    .await;
    // Keep the store away for longer than the whole attempt budget.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        counts(&ddb, &table, &group, "clicks")
            .await
            .values()
            .sum::<i64>(),
        100,
        "nothing written while DynamoDB is unreachable"
    );
    proxy.set_down(false);

    exact(&ddb, &table, &group, &expected(300)).await;
    let text = metrics(port).await;
    assert_eq!(
        metric(
            &text,
            &format!("fh_dead_letters_total{{group=\"{group}\"}}")
        ),
        0.0,
        "no event dead-lettered for a store outage:\n{text}"
    );
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");
    assert_eq!(stack.committed(&format!("ddb-{id}"), &topic, 1), vec![300]);
    assert!(
        stack.read_all(&format!("{group}.dlq")).is_empty(),
        "the dead-letter topic is empty"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
