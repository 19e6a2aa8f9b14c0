//! Operating a host on the real stack: readiness, the admin API's token, and dead-letter
//! replay after a fix — counted once however often it is replayed.

use feature_host_e2e::*;
use std::time::Duration;

const TOKEN: &str = "operations-test-token-0123456789abcdef";

fn group_yaml(name: &str, topic: &str, table: &str, with_list: bool) -> String {
    let list = if with_list {
        "    - {name: last_viewed, type: string-list}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata:\n  name: {name}\nspec:\n  entity: user\n  features:\n    - {{name: clicks, type: int}}\n    - {{name: views, type: int}}\n{list}  plugin:\n    wasm: user_activity.wasm\n    config: {{entity_field: user_id, list_field: item_id, list_feature: last_viewed, last_k: 5}}\n  sources:\n    - topic: {topic}\n  store: {{table: {table}, ttl: 1d}}\n  cache: {{strategy: write-through, ttl: 10m}}\n  retry: {{maxAttempts: 1, backoff: 100ms}}\n"
    )
}

/// Views write `last_viewed`, which the first spec does not declare: every view is
/// dead-lettered ("bad write"), clicks land. The spec is fixed (hot reload), the dead letters
/// are replayed through the admin API, and views land; a second replay (CLI) changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replayed_after_a_fix_count_once() {
    let stack = Stack::from_env();
    let u = unique();
    let tmp = std::env::temp_dir().join(format!("fh-ops-{u}"));
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    let (group, topic, table) = (format!("ops{u}"), format!("ops-{u}"), format!("f-{u}"));
    std::fs::write(
        specs.join("group.yaml"),
        group_yaml(&group, &topic, &table, false),
    )
    .unwrap();
    stack.create_topics(&[&topic], 1).await;
    let (mut env, port) = stack.host_env_on_port(&tmp, &specs, &format!("ops-{u}"));
    env.push(("FH_ADMIN_TOKEN", TOKEN.into()));
    env.push(("FH_JOBS_TABLE", format!("jobs-{u}")));
    let mut host = Host::spawn(&["run"], &env);

    // Ready once the stores answer and the consumer has joined its group.
    let ready = eventually(Duration::from_secs(60), "readiness", || async {
        let (code, body) = http(port, "GET", "/readyz", &[]).await?;
        (code == 200).then_some(body)
    })
    .await;
    assert!(ready.contains(&group), "{ready}");

    let producer = stack.producer();
    let users = 5;
    let (mut clicks, mut views) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    for i in 0..30 {
        let user = format!("u{}", i % users);
        let kind = if i % 3 == 0 { "view" } else { "click" };
        let m = if kind == "view" {
            &mut views
        } else {
            &mut clicks
        };
        *m.entry(user.clone()).or_insert(0i64) += 1;
        let payload = format!(r#"{{"type":"{kind}","user_id":"{user}","item_id":"i{i}"}}"#);
        produce(&producer, &topic, &user, ts(i), &payload, &[]).await;
    }
    eventually(Duration::from_secs(60), "30 events committed", || async {
        (stack.committed(&format!("ops-{u}"), &topic, 1) == vec![30]).then_some(())
    })
    .await;
    let dlq = format!("{group}.dlq");
    let dead = eventually(Duration::from_secs(30), "10 dead letters", || async {
        let all = stack.read_all(&dlq);
        (all.len() == 10).then_some(all)
    })
    .await;
    assert!(
        dead[0]
            .1
            .iter()
            .any(|(k, v)| k == "fh-error" && v.contains("last_viewed")),
        "{:?}",
        dead[0].1
    );
    let client = stack.dynamodb().await;
    assert_eq!(counts(&client, &table, &group, "clicks").await, clicks);
    assert!(counts(&client, &table, &group, "views").await.is_empty());

    // A dry run lists them and changes nothing.
    let cli =
        |args: &[&str]| serde_json::from_slice::<serde_json::Value>(&host_cli(&env, args)).unwrap();
    let dry = cli(&[
        "dlq",
        "replay",
        &group,
        "--dry-run",
        "--reason-contains",
        "last_viewed",
    ]);
    assert_eq!(
        (dry["matched"].as_u64(), dry["replayed"].as_u64()),
        (Some(10), Some(0))
    );

    // The fix: declare the feature; hot reload applies it.
    std::fs::write(
        specs.join("group.yaml.tmp"),
        group_yaml(&group, &topic, &table, true),
    )
    .unwrap();
    std::fs::rename(specs.join("group.yaml.tmp"), specs.join("group.yaml")).unwrap();
    eventually(
        Duration::from_secs(60),
        "the fixed spec to be applied",
        || async {
            let text = http_get(port, "/metrics").await?;
            (metric(
                &text,
                &format!("fh_plugin_reloads_total{{group=\"{group}\",result=\"applied\"}}"),
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;

    // Mutations need the token.
    let path = format!("/v1/dlq/{group}/replay");
    let (code, _) = http(port, "POST", &path, &[]).await.unwrap();
    assert_eq!(code, 401, "replay without a token must be refused");
    let (code, _) = http(port, "POST", &path, &[("Authorization", "Bearer wrong")])
        .await
        .unwrap();
    assert_eq!(code, 401);
    let bearer = format!("Bearer {TOKEN}");
    let (code, body) = http(port, "POST", &path, &[("Authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let replayed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(replayed["replayed"], 10, "{body}");
    let retry = format!("{group}.retry");
    eventually(Duration::from_secs(60), "the views to land", || async {
        (counts(&client, &table, &group, "views").await == views).then_some(())
    })
    .await;

    // A second replay of the same dead letters applies nothing.
    let again = cli(&["dlq", "replay", &group]);
    assert_eq!(again["replayed"], 10);
    eventually(
        Duration::from_secs(60),
        "the second replay to be consumed",
        || async { (stack.committed(&format!("ops-{u}"), &retry, 1) == vec![20]).then_some(()) },
    )
    .await;
    assert_eq!(
        counts(&client, &table, &group, "views").await,
        views,
        "a replay counted twice"
    );
    assert_eq!(counts(&client, &table, &group, "clicks").await, clicks);
    assert_eq!(stack.read_all(&dlq).len(), 10, "nothing failed again");

    let text = http_get(port, "/metrics").await.unwrap();
    for series in [
        format!("fh_feature_freshness_seconds{{group=\"{group}\"}}"),
        "fh_consumer_commit_seconds_count".to_owned(),
        format!("fh_store_write_seconds_count{{group=\"{group}\"}}"),
    ] {
        assert!(
            metric(&text, &series) > 0.0,
            "{series} missing or zero:\n{text}"
        );
    }
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A partial replay (`--source-topic`), repeated, then the rest: every dead letter of one
/// entity is applied exactly once. A replayed dead letter's position lives in the dead-letter
/// topic's offset space; the retry partition's low watermark (another offset space) must not
/// become its floor, or the entity's lower dead letters read as already applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_replays_then_the_rest_apply_every_dead_letter_once() {
    let stack = Stack::from_env();
    let u = unique();
    let tmp = std::env::temp_dir().join(format!("fh-replay-{u}"));
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    let (group, table) = (format!("rp{u}"), format!("f-{u}"));
    let (web, app) = (format!("web-{u}"), format!("app-{u}"));
    let yaml = |with_list: bool| {
        group_yaml(&group, &web, &table, with_list)
            .replace("  sources:\n", &format!("  sources:\n    - topic: {app}\n"))
    };
    std::fs::write(specs.join("group.yaml"), yaml(false)).unwrap();
    stack.create_topics(&[&web, &app], 1).await;
    let group_id = format!("rp-{u}");
    let (mut env, port) = stack.host_env_on_port(&tmp, &specs, &group_id);
    env.push(("FH_JOBS_TABLE", format!("jobs-{u}")));
    let mut host = Host::spawn(&["run"], &env);

    // Views are dead-lettered (`last_viewed` is not declared yet): u1 from web twice, u2
    // from app, u1 from app — dead-letter offsets 0, 1, 2, 3.
    let p = stack.producer();
    let view =
        |user: &str, i: usize| format!(r#"{{"type":"view","user_id":"{user}","item_id":"i{i}"}}"#);
    produce(&p, &web, "u1", ts(1), &view("u1", 1), &[]).await;
    produce(&p, &web, "u1", ts(2), &view("u1", 2), &[]).await;
    produce(&p, &app, "u2", ts(3), &view("u2", 3), &[]).await;
    produce(&p, &app, "u1", ts(4), &view("u1", 4), &[]).await;
    let dlq = format!("{group}.dlq");
    eventually(Duration::from_secs(60), "four dead letters", || async {
        (stack.read_all(&dlq).len() == 4).then_some(())
    })
    .await;

    std::fs::write(specs.join("group.yaml.tmp"), yaml(true)).unwrap();
    std::fs::rename(specs.join("group.yaml.tmp"), specs.join("group.yaml")).unwrap();
    eventually(Duration::from_secs(60), "the fixed spec", || async {
        let text = http_get(port, "/metrics").await?;
        (metric(
            &text,
            &format!("fh_plugin_reloads_total{{group=\"{group}\",result=\"applied\"}}"),
        ) >= 1.0)
            .then_some(())
    })
    .await;

    let cli = |args: &[&str]| {
        host_cli(&env, args);
    };
    let client = stack.dynamodb().await;
    let retry = format!("{group}.retry");
    let consumed = |n: i64| {
        let (stack, group_id, retry) = (stack.clone(), group_id.clone(), retry.clone());
        async move {
            eventually(Duration::from_secs(60), "the replay consumed", || async {
                (stack.committed(&group_id, &retry, 1) == vec![n]).then_some(())
            })
            .await
        }
    };
    // The first app dead letter alone, then every app one, then everything: what an operator
    // trying the fix on a sample, then widening it, does.
    cli(&[
        "dlq",
        "replay",
        &group,
        "--source-topic",
        &app,
        "--limit",
        "1",
    ]);
    consumed(1).await;
    cli(&["dlq", "replay", &group, "--source-topic", &app]);
    consumed(3).await;
    cli(&["dlq", "replay", &group]);
    consumed(7).await;
    let views = counts(&client, &table, &group, "views").await;
    assert_eq!(
        (views.get("u1"), views.get("u2")),
        (Some(&3), Some(&1)),
        "every dead letter applied exactly once"
    );
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&tmp);
}
