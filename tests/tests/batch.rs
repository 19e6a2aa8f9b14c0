//! Batch ingestion against the real stack: a Parquet backfill killed mid-run and resumed by
//! a restarted host; the aws-batch engine against moto (array job, DAG edges, status polling,
//! S3 source, `run-shard` entrypoint); the cron scheduler racing for its lease; a stuck run
//! alerting once.

use feature_host::batch::jobs::{DynamoJobs, Jobs};
use feature_host::batch::run::{RunRecord, Status, list_runs, list_shards, load_run};
use feature_host_e2e::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const BASE_TS: i64 = 1_764_000_000_000;

/// Row `i` of a click-stream export over `users` users: every third row is a view.
fn row(i: usize, users: usize) -> (String, String, &'static str, i64) {
    (
        format!("u{}", i % users),
        format!("i{i}"),
        if i % 3 == 0 { "view" } else { "click" },
        BASE_TS + i as i64,
    )
}

/// Write `files` Parquet files of `per_file` rows (row groups of `group_rows`) into `dir`;
/// return the expected (clicks, views) per user.
fn write_export(
    dir: &Path,
    files: usize,
    per_file: usize,
    group_rows: usize,
    users: usize,
) -> (BTreeMap<String, i64>, BTreeMap<String, i64>) {
    std::fs::create_dir_all(dir).unwrap();
    let (mut clicks, mut views) = (BTreeMap::new(), BTreeMap::new());
    for f in 0..files {
        let rows: Vec<_> = (f * per_file..(f + 1) * per_file)
            .map(|i| row(i, users))
            .collect();
        for r in &rows {
            let m = if r.2 == "click" { &mut clicks } else { &mut views };
            *m.entry(r.0.clone()).or_insert(0) += 1;
        }
        feature_host::batch::format::write_click_parquet(
            &dir.join(format!("part-{f:03}.parquet")),
            &rows,
            group_rows,
        )
        .unwrap();
    }
    (clicks, views)
}

fn group_yaml(name: &str, table: &str) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata:\n  name: {name}\nspec:\n  entity: user\n  features:\n    - {{name: clicks, type: int}}\n    - {{name: views, type: int}}\n    - {{name: last_viewed, type: string-list}}\n  plugin:\n    wasm: user_activity.wasm\n    config: {{entity_field: user_id, list_field: item_id, list_feature: last_viewed, last_k: 5}}\n  store: {{table: {table}, ttl: 1d}}\n  cache: {{strategy: write-through, ttl: 10m}}\n"
    )
}

fn ingestion_yaml(name: &str, group: &str, uri: &str, extra: &str) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: Ingestion\nmetadata:\n  name: {name}\nspec:\n  featureGroup: {group}\n  source: {{uri: \"{uri}\", format: parquet}}\n{extra}"
    )
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fh-batch-{tag}-{}", unique()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn jobs(stack: &Stack, table: &str) -> Jobs {
    let j = DynamoJobs::new(stack.dynamodb().await, table);
    j.ensure_table().await.unwrap();
    Jobs::new(Arc::new(j))
}

/// The environment of a host or CLI process on DynamoDB Local + Redis (no Kafka).
fn env(stack: &Stack, tmp: &Path, spec_dir: &Path, jobs_table: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FH_SPEC_DIR", spec_dir.display().to_string()),
        ("FH_PLUGIN_DIR", plugin_dir().display().to_string()),
        ("FH_DATA_DIR", tmp.join("data").display().to_string()),
        ("FH_DYNAMODB_ENDPOINT", stack.dynamodb.clone()),
        ("FH_REDIS_URL", stack.redis.clone()),
        ("FH_ADMIN_ADDR", "127.0.0.1:0".into()),
        ("FH_JOBS_TABLE", jobs_table.into()),
        ("FH_BATCH_RUN_LEASE", "2s".into()),
        ("FH_SCHEDULER_LEASE", "2s".into()),
    ]
}

async fn rows_done(jobs: &Jobs, run: &str) -> u64 {
    list_shards(jobs, run)
        .await
        .unwrap()
        .iter()
        .map(|s| s.value.checkpoint.rows_done)
        .sum()
}

async fn only_run(jobs: &Jobs, ingestion: &str) -> Option<RunRecord> {
    list_runs(jobs)
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.ingestion == ingestion)
}

/// 120k rows in 6 Parquet files (24 row groups), 4 shards, through the user-activity plugin
/// into DynamoDB Local + Redis. The backfill process is SIGKILLed mid-run; a host started
/// afterwards takes the abandoned run over and finishes it from the shards' checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_backfill_survives_a_kill_and_resumes_from_checkpoints() {
    let stack = Stack::from_env();
    let u = unique();
    let tmp = tmpdir("resume");
    let (group, ingestion, table, jobs_table) = (
        format!("hist{u}"),
        format!("hist{u}-load"),
        format!("f-{u}"),
        format!("jobs-{u}"),
    );
    // Many rows per user and batch: the writer merges an entity's rows of a batch into one
    // conditional write, as it would for a real export.
    let users = 100;
    let (clicks, views) = write_export(&tmp.join("export"), 6, 20_000, 5_000, users);
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("group.yaml"), group_yaml(&group, &table)).unwrap();
    std::fs::write(
        specs.join("ingestion.yaml"),
        ingestion_yaml(
            &ingestion,
            &group,
            &format!("{}/export/*.parquet", tmp.display()),
            "  parallelism: 4\n",
        ),
    )
    .unwrap();
    let jobs = jobs(&stack, &jobs_table).await;
    let env = env(&stack, &tmp, &specs, &jobs_table);

    // A slow backfill (rate-limited), killed once it is well under way.
    let mut limited = env.clone();
    limited.push(("FH_BATCH_MAX_ROWS_PER_SEC", "12000".into()));
    let mut cli = Host::spawn(&["backfill", &ingestion], &limited);
    let run = eventually(Duration::from_secs(120), "the backfill to get under way", || async {
        let run = only_run(&jobs, &ingestion).await?;
        (rows_done(&jobs, &run.id).await >= 30_000).then_some(run)
    })
    .await;
    cli.kill();
    let at_kill: Vec<u64> = list_shards(&jobs, &run.id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.value.checkpoint.rows_done)
        .collect();
    let done_at_kill: u64 = at_kill.iter().sum();
    assert!(
        done_at_kill < 120_000,
        "killed too late to test a resume: {at_kill:?}"
    );
    let killed = load_run(&jobs, &run.id).await.unwrap().unwrap().value;
    assert_eq!(killed.status, Status::Running);
    assert_eq!(killed.shards, 4);
    assert_eq!(killed.rows_total, Some(120_000));

    // A host (scheduler on) finds the run's owner quiet and takes it over.
    let mut host = Host::spawn(&["run"], &env);
    let finished = eventually(Duration::from_secs(180), "the resumed run to succeed", || async {
        let r = load_run(&jobs, &run.id).await.unwrap()?.value;
        assert!(
            !matches!(r.status, Status::Failed | Status::Blocked),
            "run failed: {:?}",
            r.reason
        );
        (r.status == Status::Succeeded).then_some(r)
    })
    .await;
    assert!(finished.owner.is_some());
    let shards = list_shards(&jobs, &run.id).await.unwrap();
    for (s, before) in shards.iter().zip(&at_kill) {
        let s = &s.value;
        assert_eq!(s.status, Status::Succeeded);
        assert_eq!(s.rows_failed, 0, "shard {}: {:?}", s.index, s.errors);
        if *before > 0 {
            let resumed_at = *s.starts.last().unwrap();
            assert!(
                s.starts.len() >= 2 && resumed_at > 0 && resumed_at <= *before,
                "shard {} restarted from zero or skipped rows: starts {:?}, checkpoint at kill {before}",
                s.index,
                s.starts
            );
        }
    }
    assert_eq!(rows_done(&jobs, &run.id).await, 120_000);

    // Exact: every row counted once, none twice.
    let client = stack.dynamodb().await;
    assert_eq!(counts(&client, &table, &group, "clicks").await, clicks);
    assert_eq!(counts(&client, &table, &group, "views").await, views);
    assert_eq!(clicks.len(), users);

    // The admin API and the CLI show the run.
    let out = std::process::Command::new(host_binary())
        .args(["jobs", &run.id, "--json"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["run"]["status"], "SUCCEEDED");
    assert_eq!(shown["rows_done"], 120_000);

    // A finished run is not run again.
    let again = std::process::Command::new(host_binary())
        .args(["backfill", "--resume", &run.id])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already succeeded"));
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&tmp);
}
