//! One event end to end on the real stack: tansu → host (routing M:N, WASM plugin) →
//! DynamoDB Local + Redis (write-through), read back with the real clients and the CLI.

use aws_sdk_dynamodb::types::AttributeValue;
use feature_host_e2e::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use redis::AsyncCommands;
use std::time::Duration;

fn specs(dir: &std::path::Path, web: &str, app: &str, table: &str, id: &str) {
    let group = |name: &str, sources: &str, entity_field: &str, list_field: &str, list: &str| {
        format!(
            r#"apiVersion: feature-host/v1
kind: FeatureGroup
metadata:
  name: {name}
spec:
  entity: x
  features:
    - {{name: clicks, type: int}}
    - {{name: views, type: int}}
    - {{name: {list}, type: string-list}}
  plugin:
    wasm: user_activity.wasm
    config: {{entity_field: {entity_field}, list_field: {list_field}, list_feature: {list}, last_k: 3}}
  sources:
{sources}
  store: {{table: {table}, ttl: 1d}}
  cache: {{strategy: write-through, ttl: 10m}}
  retry: {{topic: {name}-{id}.retry, deadLetterTopic: {name}-{id}.dlq}}
"#
        )
    };
    let users = group(
        "user-activity",
        &format!("    - topic: {web}\n    - topic: {app}"),
        "user_id",
        "item_id",
        "last_viewed",
    );
    let items = group(
        "item-activity",
        &format!("    - topic: {web}\n      filter: {{field: /type, in: [click, view]}}"),
        "item_id",
        "user_id",
        "last_viewers",
    );
    std::fs::write(dir.join("users.yaml"), users).unwrap();
    std::fs::write(dir.join("items.yaml"), items).unwrap();
}

async fn item(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    pk: &str,
) -> Option<std::collections::HashMap<String, AttributeValue>> {
    client
        .get_item()
        .table_name(table)
        .key("pk", AttributeValue::S(pk.into()))
        .consistent_read(true)
        .send()
        .await
        .ok()?
        .item
}

fn n(item: &std::collections::HashMap<String, AttributeValue>, attr: &str) -> Option<i64> {
    item.get(attr)?.as_n().ok()?.parse().ok()
}

fn strings(item: &std::collections::HashMap<String, AttributeValue>, attr: &str) -> Vec<String> {
    item.get(attr)
        .and_then(|a| a.as_l().ok())
        .map(|l| l.iter().filter_map(|x| x.as_s().ok().cloned()).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_dynamodb_and_redis_for_every_group() {
    let stack = Stack::from_env();
    let id = unique();
    let (web, app, table) = (
        format!("web-{id}"),
        format!("app-{id}"),
        format!("features-{id}"),
    );
    let tmp = std::env::temp_dir().join(format!("fh-e2e-{id}"));
    let spec_dir = tmp.join("specs");
    std::fs::create_dir_all(&spec_dir).unwrap();
    specs(&spec_dir, &web, &app, &table, &id);
    stack.create_topics(&[&web, &app], 2).await;

    let env = vec![
        ("FH_SPEC_DIR", spec_dir.display().to_string()),
        ("FH_PLUGIN_DIR", plugin_dir().display().to_string()),
        ("FH_DATA_DIR", tmp.join("data").display().to_string()),
        ("FH_KAFKA_BROKERS", stack.kafka.clone()),
        ("FH_KAFKA_GROUP_ID", format!("e2e-{id}")),
        ("FH_DYNAMODB_ENDPOINT", stack.dynamodb.clone()),
        ("FH_REDIS_URL", stack.redis.clone()),
        ("FH_ADMIN_ADDR", "127.0.0.1:0".into()),
    ];
    let mut host = Host::spawn(&["run"], &env);

    let p = stack.producer();
    let ev =
        |t: &str, u: &str, i: &str| format!(r#"{{"type":"{t}","user_id":"{u}","item_id":"{i}"}}"#);
    produce(&p, &web, "u1", ts(1_000), &ev("view", "u1", "item-1"), &[]).await;
    produce(&p, &app, "u1", ts(2_000), &ev("click", "u1", "item-2"), &[]).await;
    produce(&p, &web, "u2", ts(3_000), &ev("view", "u2", "item-1"), &[]).await;
    produce(&p, &web, "u1", ts(4_000), &ev("view", "u1", "item-3"), &[]).await;
    produce(&p, &web, "u3", ts(5_000), "{definitely not json", &[]).await;

    let ddb = stack.dynamodb().await;
    // Group on two topics: u1's view (web) and click (app) both land.
    let u1 = eventually(
        Duration::from_secs(60),
        "user-activity#u1 in DynamoDB",
        || async {
            item(&ddb, &table, "user-activity#u1")
                .await
                .filter(|i| n(i, "f:views") == Some(2) && n(i, "f:clicks") == Some(1))
        },
    )
    .await;
    assert_eq!(
        strings(&u1, "f:last_viewed"),
        vec!["item-3", "item-1"],
        "last-k, newest first"
    );
    assert_eq!(
        n(&u1, "t:views"),
        Some(ts(4_000)),
        "event time of the newest view"
    );
    assert!(n(&u1, "ttl").is_some(), "TTL attribute set");
    // Two groups on one topic: item-activity sees the web views but not the app click.
    let i1 = eventually(Duration::from_secs(30), "item-activity#item-1", || async {
        item(&ddb, &table, "item-activity#item-1")
            .await
            .filter(|i| n(i, "f:views") == Some(2))
    })
    .await;
    assert_eq!(strings(&i1, "f:last_viewers"), vec!["u2", "u1"]);
    assert!(
        item(&ddb, &table, "item-activity#item-2").await.is_none(),
        "app-events are not routed to item-activity"
    );

    // Write-through: Redis holds the store's resulting values.
    let mut r = stack.redis().await;
    let views: Option<String> = r.hget("fh:user-activity#u1", "views").await.unwrap();
    assert_eq!(views.as_deref(), Some("2"));
    let viewers: Option<String> = r
        .hget("fh:item-activity#item-1", "last_viewers")
        .await
        .unwrap();
    assert_eq!(viewers.as_deref(), Some(r#"["u2","u1"]"#));
    let ttl: i64 = r.ttl("fh:user-activity#u1").await.unwrap();
    assert!(ttl > 0 && ttl <= 600, "cache TTL set, got {ttl}");

    // The malformed event went to the group's dead-letter topic with its reason.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &stack.kafka)
        .set("group.id", format!("dlq-reader-{id}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer
        .subscribe(&[&format!("user-activity-{id}.dlq")])
        .unwrap();
    let reason = eventually(Duration::from_secs(30), "dead letter", || async {
        let m = tokio::time::timeout(Duration::from_secs(2), consumer.recv())
            .await
            .ok()?
            .ok()?;
        (m.payload() == Some(b"{definitely not json".as_slice())).then(|| {
            m.headers()
                .and_then(|h| {
                    h.iter()
                        .find(|h| h.key == "fh-error")
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
                .unwrap_or_default()
        })
    })
    .await;
    assert!(reason.contains("not the expected JSON"), "reason: {reason}");

    // SIGTERM drains and exits 0.
    assert!(host.terminate().success(), "host exits 0 on SIGTERM");

    // The CLI read path: Redis first, DynamoDB on a miss.
    let get = |entity: &str| {
        let out = std::process::Command::new(host_binary())
            .args(["get", "--group", "item-activity", "--entity", entity])
            .envs(env.iter().map(|(k, v)| (*k, v.clone())))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "get failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let cached = get("item-1");
    assert_eq!(cached["features"]["views"], 2);
    let _: () = r.del("fh:item-activity#item-1").await.unwrap();
    let from_store = get("item-1");
    assert_eq!(
        from_store["features"]["last_viewers"],
        serde_json::json!(["u2", "u1"])
    );
    let refilled: Option<String> = r.hget("fh:item-activity#item-1", "views").await.unwrap();
    assert_eq!(
        refilled.as_deref(),
        Some("2"),
        "a store read refills the cache"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
