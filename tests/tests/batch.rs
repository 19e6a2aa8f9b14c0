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
        if i.is_multiple_of(3) { "view" } else { "click" },
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
            let m = if r.2 == "click" {
                &mut clicks
            } else {
                &mut views
            };
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

/// A test's names and directories: a user-activity group `<tag><u>` writing table `f-<u>`,
/// its spec in `<tmp>/specs`, job state in table `jobs-<u>`.
struct Fixture {
    u: String,
    tmp: std::path::PathBuf,
    group: String,
    table: String,
    jobs_table: String,
    specs: std::path::PathBuf,
}

fn fixture(tag: &str) -> Fixture {
    let u = unique();
    let tmp = tmpdir(tag);
    let (group, table, jobs_table) = (format!("{tag}{u}"), format!("f-{u}"), format!("jobs-{u}"));
    let specs = tmp.join("specs");
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("group.yaml"), group_yaml(&group, &table)).unwrap();
    Fixture {
        u,
        tmp,
        group,
        table,
        jobs_table,
        specs,
    }
}

impl Fixture {
    /// One Parquet file of `rows` rows over `users` users, in row groups of 100, and the
    /// ingestion `name` of it (one shard). The expected clicks per user.
    fn parquet_ingestion(&self, name: &str, rows: usize, users: usize) -> BTreeMap<String, i64> {
        let (clicks, _) = write_export(&self.tmp.join("export"), 1, rows, 100, users);
        let glob = format!("{}/export/*.parquet", self.tmp.display());
        let spec = ingestion_yaml(name, &self.group, &glob, "");
        std::fs::write(self.specs.join(format!("{name}.yaml")), spec).unwrap();
        clicks
    }
}

async fn jobs(stack: &Stack, table: &str) -> Jobs {
    let j = DynamoJobs::new(stack.dynamodb().await, table);
    j.ensure_table().await.unwrap();
    Jobs::new(Arc::new(j))
}

/// The environment of a host or CLI process on DynamoDB Local + Redis (no Kafka).
fn env(
    stack: &Stack,
    tmp: &Path,
    spec_dir: &Path,
    jobs_table: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("FH_SPEC_DIR", spec_dir.display().to_string()),
        ("FH_PLUGIN_DIR", plugin_dir().display().to_string()),
        // The exports lie beside the specs, not under them.
        ("FH_SOURCE_ROOTS", tmp.display().to_string()),
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
    let Fixture {
        tmp,
        group,
        table,
        jobs_table,
        specs,
        ..
    } = fixture("hist");
    let ingestion = format!("{group}-load");
    // Many rows per user and batch: the writer merges an entity's rows of a batch into one
    // conditional write, as it would for a real export.
    let users = 100;
    let (clicks, views) = write_export(&tmp.join("export"), 6, 20_000, 5_000, users);
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
    let run = eventually(
        Duration::from_secs(120),
        "the backfill to get under way",
        || async {
            let run = only_run(&jobs, &ingestion).await?;
            (rows_done(&jobs, &run.id).await >= 30_000).then_some(run)
        },
    )
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
    let finished = eventually(
        Duration::from_secs(180),
        "the resumed run to succeed",
        || async {
            let r = load_run(&jobs, &run.id).await.unwrap()?.value;
            assert!(
                !matches!(r.status, Status::Failed | Status::Blocked),
                "run failed: {:?}",
                r.reason
            );
            (r.status == Status::Succeeded).then_some(r)
        },
    )
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
    let shown: serde_json::Value =
        serde_json::from_slice(&host_cli(&env, &["jobs", &run.id, "--json"])).unwrap();
    assert_eq!(shown["run"]["status"], "SUCCEEDED");
    assert_eq!(shown["rows_done"], 120_000);

    // A finished run is not resumed; re-running it from row 0 changes nothing.
    let again = std::process::Command::new(host_binary())
        .args(["backfill", "--resume", &run.id])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already succeeded"));
    let rerun = std::process::Command::new(host_binary())
        .args(["backfill", "--rerun", &run.id])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let rerun_summary: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(rerun_summary["rows_done"], 120_000);
    assert_eq!(
        counts(&client, &table, &group, "clicks").await,
        clicks,
        "re-run counted rows twice"
    );
    assert_eq!(counts(&client, &table, &group, "views").await, views);
    assert!(host.terminate().success());
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Batch settings as the CLI would parse them (flags here, nothing from FH_* env).
fn settings(args: &[&str]) -> feature_host::config::BatchSettings {
    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        batch: feature_host::config::BatchSettings,
    }
    <Wrapper as clap::Parser>::parse_from(std::iter::once("test").chain(args.iter().copied())).batch
}

/// A batch context in this process on DynamoDB Local + Redis.
async fn context(
    stack: &Stack,
    tmp: &Path,
    spec_dir: &Path,
    jobs_table: &str,
    args: &[&str],
) -> feature_host::batch::BatchContext {
    use feature_host::config::{CacheKind, StoreKind, StoreSettings};
    let store = StoreSettings {
        spec_dir: spec_dir.into(),
        plugin_dir: plugin_dir(),
        data_dir: tmp.join("data"),
        dead_letter_max_mb: feature_host::stream::dead_letter::DEFAULT_LIMIT_MB,
        store: StoreKind::Dynamodb,
        dynamodb_endpoint: Some(stack.dynamodb.clone()),
        create_tables: true,
        cache: CacheKind::Redis,
        redis_url: Some(stack.redis.as_str().into()),
        batch_position_retention: feature_host::sink::writer::DEFAULT_BATCH_POSITION_RETENTION,
        sources: feature_host::config::ScopeSettings {
            source_roots: vec![tmp.to_path_buf()],
            ..Default::default()
        },
    };
    let scope = store.source_scope().unwrap();
    let specs =
        feature_host::spec::load_dir_in(spec_dir, &plugin_dir(), &scope).expect("valid specs");
    let (writer, _) = feature_host::app::connect(&store, None).await.unwrap();
    feature_host::app::ensure_tables(&writer, &specs)
        .await
        .unwrap();
    let pipeline = Arc::new(
        feature_host::app::build_pipeline(&specs, writer)
            .await
            .unwrap(),
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    std::mem::forget(stop_tx); // never stops
    feature_host::batch::BatchContext::new(
        pipeline,
        Arc::new(specs),
        jobs(stack, jobs_table).await,
        settings(args),
        feature_host::stream::dead_letter::DeadLetterFile::new(tmp.join("dead-letters.jsonl")),
        stop,
        "127.0.0.1:9",
        format!("test-{}", unique()),
    )
}

/// Claim and execute `ids` concurrently in this process, as the scheduling replica would;
/// their final records, in order.
async fn execute_all(ctx: &feature_host::batch::BatchContext, ids: &[String]) -> Vec<RunRecord> {
    let mut tasks = Vec::new();
    for id in ids {
        assert!(
            feature_host::batch::executor::claim(ctx, id).await.unwrap(),
            "claim {id}"
        );
        let (ctx, id) = (ctx.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            feature_host::batch::executor::execute(&ctx, &id)
                .await
                .unwrap()
        }));
    }
    let mut runs = Vec::new();
    for t in tasks {
        runs.push(
            tokio::time::timeout(Duration::from_secs(120), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    runs
}

/// A moto call by its query API (IAM has no client in this workspace).
async fn moto_query(endpoint: &str, service: &str, body: &str) -> String {
    moto_post(
        endpoint,
        "/",
        "application/x-www-form-urlencoded",
        &format!("Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/{service}/aws4_request, SignedHeaders=host, Signature=0\r\n"),
        body,
    )
    .await
}

async fn moto_post(endpoint: &str, path: &str, kind: &str, extra: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = endpoint.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {kind}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(
        out.starts_with("HTTP/1.1 20") || out.starts_with("HTTP/1.0 20"),
        "moto {path}: {out}"
    );
    out
}

/// The aws-batch engine against moto: a scheduled tick of a 3-node DAG (a ← b ← c) becomes
/// three submitted jobs — `a` an array job of one child per shard running
/// `run-shard --run <id>`, `b` and `c` depending on their parent's job — whose status is
/// polled to SUCCEEDED. The source is read from moto's S3, and running the array job's
/// children as AWS Batch would (`run-shard` with `AWS_BATCH_JOB_ARRAY_INDEX`) loads it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_batch_engine_submits_a_dag_of_array_jobs_and_follows_them() {
    let stack = Stack::from_env();
    let moto = std::env::var("FH_MOTO_ENDPOINT").expect("FH_MOTO_ENDPOINT (scripts/stack env)");
    let Fixture {
        u,
        tmp,
        group,
        table,
        jobs_table,
        specs,
    } = fixture("aws");
    // moto cannot start containers here: let its jobs succeed at once (moto's batch_simple).
    moto_post(
        &moto,
        "/moto-api/config",
        "application/json",
        "",
        r#"{"batch":{"use_docker":false}}"#,
    )
    .await;
    let role = moto_query(
        &moto,
        "iam",
        &format!("Action=CreateRole&Version=2010-05-08&RoleName=fh-batch-{u}&AssumeRolePolicyDocument=%7B%7D"),
    )
    .await;
    let role_arn = role
        .split("<Arn>")
        .nth(1)
        .and_then(|r| r.split("</Arn>").next())
        .expect("role ARN")
        .to_owned();
    let batch = feature_host::batch::aws_batch::client(Some(&moto)).await;
    use aws_sdk_batch::types::*;
    let ce = batch
        .create_compute_environment()
        .compute_environment_name(format!("ce-{u}"))
        .r#type(CeType::Unmanaged)
        .state(CeState::Enabled)
        .service_role(&role_arn)
        .send()
        .await
        .unwrap();
    let queue = format!("q-{u}");
    batch
        .create_job_queue()
        .job_queue_name(&queue)
        .state(JqState::Enabled)
        .priority(1)
        .compute_environment_order(
            ComputeEnvironmentOrder::builder()
                .order(1)
                .compute_environment(ce.compute_environment_arn().unwrap())
                .build(),
        )
        .send()
        .await
        .unwrap();
    let definition = format!("jd-{u}");
    batch
        .register_job_definition()
        .job_definition_name(&definition)
        .r#type(JobDefinitionType::Container)
        .container_properties(
            ContainerProperties::builder()
                .image("feature-host:test")
                .resource_requirements(
                    ResourceRequirement::builder()
                        .r#type(ResourceType::Vcpu)
                        .value("1")
                        .build(),
                )
                .resource_requirements(
                    ResourceRequirement::builder()
                        .r#type(ResourceType::Memory)
                        .value("512")
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap();

    // The source: 3 Parquet files in moto's S3.
    let bucket = format!("exports-{u}");
    let s3 = {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .load()
            .await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&shared)
                .endpoint_url(&moto)
                .force_path_style(true)
                .build(),
        )
    };
    s3.create_bucket().bucket(&bucket).send().await.unwrap();
    let local = tmp.join("export");
    let (clicks, _) = write_export(&local, 3, 2_000, 1_000, 50);
    for f in std::fs::read_dir(&local).unwrap() {
        let f = f.unwrap().path();
        s3.put_object()
            .bucket(&bucket)
            .key(format!(
                "clicks/dt=2026-01-01/{}",
                f.file_name().unwrap().to_string_lossy()
            ))
            .body(std::fs::read(&f).unwrap().into())
            .send()
            .await
            .unwrap();
    }

    let uri = format!("s3://{bucket}/clicks/dt=*/*.parquet");
    let node = |name: &str, parent: Option<&str>| {
        let deps = parent.map_or(String::new(), |p| format!("  dependsOn: [{p}{u}]\n"));
        ingestion_yaml(
            &format!("{name}{u}"),
            &group,
            &uri,
            &format!("  engine: aws-batch\n  parallelism: 3\n  schedule: \"0 * * * *\"\n{deps}"),
        )
    };
    std::fs::write(specs.join("a.yaml"), node("a", None)).unwrap();
    std::fs::write(specs.join("b.yaml"), node("b", Some("a"))).unwrap();
    std::fs::write(specs.join("c.yaml"), node("c", Some("b"))).unwrap();
    let ctx = context(
        &stack,
        &tmp,
        &specs,
        &jobs_table,
        &[
            "--aws-batch-endpoint",
            &moto,
            "--aws-batch-job-queue",
            &queue,
            "--aws-batch-job-definition",
            &definition,
            "--s3-endpoint",
            &moto,
            "--aws-batch-poll",
            "200ms",
        ],
    )
    .await;

    // One cron tick creates the DAG's three runs.
    let clock = Arc::new(feature_host::batch::scheduler::ManualClock::new(
        BASE_TS + 1_000,
    ));
    let scheduler = feature_host::batch::service::scheduler(&ctx, clock.clone());
    assert!(
        scheduler.tick().await.unwrap().is_empty(),
        "first start: no history"
    );
    clock.set(BASE_TS + 3_600_000);
    let mut created = scheduler.tick().await.unwrap();
    created.sort();
    assert_eq!(created.len(), 3, "{created:?}");
    let mut runs = BTreeMap::new();
    for run in execute_all(&ctx, &created).await {
        assert_eq!(
            run.status,
            Status::Succeeded,
            "{}: {:?}",
            run.id,
            run.reason
        );
        runs.insert(run.ingestion.trim_end_matches(&u).to_owned(), run);
    }
    let job = |n: &str| runs[n].aws_job_id.clone().expect("submitted");
    let described = batch
        .describe_jobs()
        .jobs(job("a"))
        .jobs(job("b"))
        .jobs(job("c"))
        .send()
        .await
        .unwrap();
    let by_id: BTreeMap<String, &JobDetail> = described
        .jobs()
        .iter()
        .map(|j| (j.job_id().unwrap().to_owned(), j))
        .collect();
    for (name, parent) in [("a", None), ("b", Some("a")), ("c", Some("b"))] {
        let j = by_id[&job(name)];
        let run = &runs[name];
        assert_eq!(run.shards, 3);
        assert_eq!(
            j.array_properties().and_then(|a| a.size()),
            Some(3),
            "{name}: one child per shard"
        );
        assert_eq!(
            j.container().map(|c| c.command().to_vec()),
            Some(vec!["run-shard".to_owned(), "--run".into(), run.id.clone()]),
        );
        assert_eq!(
            j.job_queue(),
            Some(batch_queue_arn(&batch, &queue).await.as_str())
        );
        let deps: Vec<String> = j
            .depends_on()
            .iter()
            .filter_map(|d| d.job_id().map(str::to_owned))
            .collect();
        assert_eq!(
            deps,
            parent.map(job).into_iter().collect::<Vec<_>>(),
            "{name}"
        );
        // Job state over time, polled from DescribeJobs.
        let states: Vec<Status> = run.history.iter().map(|t| t.status).collect();
        assert_eq!(states.first(), Some(&Status::Submitted));
        assert_eq!(states.last(), Some(&Status::Succeeded));
    }

    // AWS Batch would now start `a`'s children; run them as it would.
    let a = &runs["a"];
    for index in 0..3 {
        let out = std::process::Command::new(host_binary())
            .args(["run-shard", "--run", &a.id])
            .env("AWS_BATCH_JOB_ARRAY_INDEX", index.to_string())
            .envs(
                env(&stack, &tmp, &specs, &jobs_table)
                    .iter()
                    .map(|(k, v)| (*k, v.as_str())),
            )
            .env("FH_S3_ENDPOINT", &moto)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "run-shard {index}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let shards = list_shards(&ctx.jobs, &a.id).await.unwrap();
    assert!(shards.iter().all(|s| s.value.status == Status::Succeeded));
    assert_eq!(rows_done(&ctx.jobs, &a.id).await, 6_000);
    let client = stack.dynamodb().await;
    assert_eq!(counts(&client, &table, &group, "clicks").await, clicks);
    let _ = std::fs::remove_dir_all(&tmp);
}

async fn batch_queue_arn(batch: &aws_sdk_batch::Client, queue: &str) -> String {
    batch
        .describe_job_queues()
        .job_queues(queue)
        .send()
        .await
        .unwrap()
        .job_queues()[0]
        .job_queue_arn()
        .unwrap()
        .to_owned()
}

/// Two schedulers on one job-state table and one (injected) clock: every cron tick becomes
/// exactly one run per ingestion, the lease moves when its holder goes quiet, missed ticks
/// collapse into the latest, and a failed parent blocks its child with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_ticks_run_once_between_racing_schedulers() {
    use feature_host::batch::scheduler::{ManualClock, Scheduler};
    let stack = Stack::from_env();
    let Fixture {
        u,
        tmp,
        group,
        table,
        jobs_table,
        specs,
    } = fixture("cron");
    let missing = format!("{}/none/*.parquet", tmp.display());
    let (p, q) = (format!("p{u}"), format!("q{u}"));
    std::fs::write(
        specs.join("p.yaml"),
        ingestion_yaml(&p, &group, &missing, "  schedule: \"* * * * *\"\n"),
    )
    .unwrap();
    std::fs::write(
        specs.join("q.yaml"),
        ingestion_yaml(
            &q,
            &group,
            &missing,
            &format!("  schedule: \"* * * * *\"\n  dependsOn: [{p}]\n"),
        ),
    )
    .unwrap();
    let scope = feature_host::spec::SpecScope::new(std::slice::from_ref(&tmp), None).unwrap();
    let set = Arc::new(feature_host::spec::load_dir_in(&specs, &plugin_dir(), &scope).unwrap());
    let jobs = jobs(&stack, &jobs_table).await;
    let clock = Arc::new(ManualClock::new(BASE_TS + 30_000));
    let scheduler = |owner: &str| Scheduler {
        jobs: jobs.clone(),
        specs: set.clone(),
        owner: owner.into(),
        clock: clock.clone(),
        lease: Duration::from_secs(30),
        metrics: None,
    };
    let (s1, s2) = (scheduler("one"), scheduler("two"));
    let (a, b) = tokio::join!(s1.tick(), s2.tick());
    assert!(a.unwrap().is_empty() && b.unwrap().is_empty());
    let mut all = Vec::new();
    let mut leader = None;
    for _ in 0..5 {
        clock.advance(Duration::from_secs(60));
        let (a, b) = tokio::join!(s1.tick(), s2.tick());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(
            a.is_empty() || b.is_empty(),
            "both schedulers ran a tick: {a:?} {b:?}"
        );
        let created: Vec<String> = a.iter().chain(&b).cloned().collect();
        assert_eq!(
            created.len(),
            2,
            "one run per ingestion per tick: {created:?}"
        );
        leader.get_or_insert(if a.is_empty() { 2 } else { 1 });
        all.extend(created);
    }
    // The leader goes quiet; the other takes the lease once it expires.
    let follower = if leader == Some(1) { &s2 } else { &s1 };
    clock.advance(Duration::from_secs(60));
    let created = follower.tick().await.unwrap();
    assert_eq!(created.len(), 2, "{created:?}");
    all.extend(created);
    // Five minutes of downtime: only the latest missed tick runs.
    clock.advance(Duration::from_secs(300));
    let created = follower.tick().await.unwrap();
    assert_eq!(created.len(), 2, "{created:?}");
    let latest = feature_host::batch::run::run_id(&p, (clock.now_ms() / 60_000) * 60_000, None);
    assert!(created.contains(&latest), "{created:?} lacks {latest}");
    all.extend(created);
    let stored: Vec<RunRecord> = list_runs(&jobs).await.unwrap();
    let mut ids: Vec<&str> = stored.iter().map(|r| r.id.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 14);
    assert_eq!(stored.len(), all.len());
    use feature_host::batch::scheduler::Clock as _;

    // The latest tick's DAG: p finds no files and fails; q is blocked and says why.
    let ctx = context(&stack, &tmp, &specs, &jobs_table, &[]).await;
    let child = feature_host::batch::run::run_id(&q, (clock.now_ms() / 60_000) * 60_000, None);
    let [parent_run, child_run]: [RunRecord; 2] =
        execute_all(&ctx, &[latest.clone(), child.clone()])
            .await
            .try_into()
            .unwrap();
    assert_eq!(parent_run.status, Status::Failed);
    assert!(
        parent_run
            .reason
            .as_deref()
            .unwrap()
            .contains("no files match"),
        "{:?}",
        parent_run.reason
    );
    assert_eq!(child_run.status, Status::Blocked);
    let why = child_run.reason.unwrap();
    assert!(why.contains(&latest) && why.contains("FAILED"), "{why}");

    // The operator fixes the source and resumes both: the parent runs, then the child.
    let (clicks, _) = write_export(&tmp.join("none"), 1, 500, 250, 20);
    for id in [&latest, &child] {
        let retention = ctx.pipeline.writer().batch_position_retention();
        feature_host::batch::executor::reopen(&ctx.jobs, id, None, retention)
            .await
            .unwrap();
    }
    for run in execute_all(&ctx, &[latest.clone(), child.clone()]).await {
        assert_eq!(
            run.status,
            Status::Succeeded,
            "{}: {:?}",
            run.id,
            run.reason
        );
    }
    // Both loaded the same rows into the group (two runs: two sets of positions).
    let client = stack.dynamodb().await;
    let doubled: BTreeMap<String, i64> = clicks.iter().map(|(k, v)| (k.clone(), v * 2)).collect();
    assert_eq!(counts(&client, &table, &group, "clicks").await, doubled);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A run held in RUNNABLE (every worker busy) past the threshold raises exactly one alert,
/// however often the monitor looks, with a link to the run; the webhook gets it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_run_raises_exactly_one_alert_with_its_link() {
    let stack = Stack::from_env();
    let fx = fixture("stuck");
    let ingestion = format!("s{}", fx.u);
    let clicks = fx.parquet_ingestion(&ingestion, 300, 10);
    let Fixture {
        tmp,
        group,
        table,
        jobs_table,
        specs,
        ..
    } = fx;

    // A webhook that counts what it receives.
    let hook = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/alerts", hook.local_addr().unwrap());
    let received = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let got = received.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let (mut s, _) = hook.accept().await.unwrap();
            let mut buf = vec![0; 65536];
            let mut n = 0;
            // Read until the body (Content-Length) is complete.
            loop {
                let m = s.read(&mut buf[n..]).await.unwrap();
                n += m;
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        got.lock().unwrap().push(body.to_owned());
                        break;
                    }
                }
                if m == 0 {
                    break;
                }
            }
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .await;
        }
    });

    let ctx = context(
        &stack,
        &tmp,
        &specs,
        &jobs_table,
        &[
            "--workers",
            "1",
            "--stuck-after",
            "1s",
            "--alert-webhook",
            &hook_url,
            "--admin-url",
            "http://admin.example:8080",
        ],
    )
    .await;
    let busy = ctx.workers.clone().acquire_owned().await.unwrap(); // every worker is taken
    let req = feature_host::batch::executor::Request {
        ingestion: ingestion.clone(),
        ..Default::default()
    };
    let run = feature_host::batch::executor::submit_backfill(&ctx.jobs, &ctx.specs, &req, None)
        .await
        .unwrap();
    assert!(
        feature_host::batch::executor::claim(&ctx, &run.id)
            .await
            .unwrap()
    );
    let exec = {
        let (ctx, id) = (ctx.clone(), run.id.clone());
        tokio::spawn(async move {
            feature_host::batch::executor::execute(&ctx, &id)
                .await
                .unwrap()
        })
    };
    eventually(
        Duration::from_secs(30),
        "the run to wait for a worker",
        || async {
            let r = load_run(&ctx.jobs, &run.id).await.unwrap()?.value;
            (r.status == Status::Runnable).then_some(())
        },
    )
    .await;
    let monitor = feature_host::batch::service::monitor(&ctx);
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        monitor
            .check(feature_host::batch::run::now_ms())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alerts: Vec<_> = feature_host::batch::monitor::Monitor::alerts(&ctx.jobs)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.run == run.id)
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let link = format!("http://admin.example:8080/v1/jobs/{}", run.id);
    assert_eq!(alerts[0].kind, "stuck");
    assert_eq!(alerts[0].link, link);
    assert!(
        alerts[0].text.contains("RUNNABLE") && alerts[0].text.contains(&link),
        "{}",
        alerts[0].text
    );
    let hooks = received.lock().unwrap().clone();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    assert!(hooks[0].contains(&link), "{}", hooks[0]);
    let metrics = ctx.pipeline.metrics().render();
    assert_eq!(
        metric(
            &metrics,
            &format!("fh_batch_alerts_total{{ingestion=\"{ingestion}\",kind=\"stuck\"}}")
        ),
        1.0,
        "{metrics}"
    );

    // A worker frees up: the run completes, and no further alert is raised.
    drop(busy);
    let done = tokio::time::timeout(Duration::from_secs(60), exec)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.status, Status::Succeeded, "{:?}", done.reason);
    monitor
        .check(feature_host::batch::run::now_ms())
        .await
        .unwrap();
    assert_eq!(
        feature_host::batch::monitor::Monitor::alerts(&ctx.jobs)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(received.lock().unwrap().len(), 1);
    let client = stack.dynamodb().await;
    assert_eq!(counts(&client, &table, &group, "clicks").await, clicks);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A daily ingestion must not grow its entities' items without bound: every run × shard
/// leaves a position entry in each entity it writes (its exactly-once record), and an item
/// over DynamoDB's 400 KB limit refuses every later write, the stream's included. Entries of
/// a run expire `FH_BATCH_POSITION_RETENTION` after its last write; a run can be re-run (or
/// resumed) with exactly-once effect only within half of that after it first started, and is
/// refused after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_positions_expire_and_old_runs_are_not_rerun() {
    let stack = Stack::from_env();
    let fx = fixture("expire");
    let ingestion = format!("e{}", fx.u);
    let clicks = fx.parquet_ingestion(&ingestion, 200, 4);
    let Fixture {
        tmp,
        group,
        table,
        jobs_table,
        specs,
        ..
    } = fx;
    let mut env = env(&stack, &tmp, &specs, &jobs_table);
    env.push(("FH_BATCH_POSITION_RETENTION", "4s".into()));
    let backfill = |args: &[&str]| -> String {
        let out: serde_json::Value = serde_json::from_slice(&host_cli(&env, args)).unwrap();
        out["run"]["id"].as_str().unwrap().to_owned()
    };
    let batch_entries = |item: &std::collections::HashMap<String, _>| -> Vec<String> {
        item.keys()
            .filter(|k: &&String| k.starts_with("p:batch:"))
            .cloned()
            .collect()
    };

    let first = backfill(&["backfill", &ingestion]);
    // Past the retention: the next write of each entity drops the first run's entry.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let second = backfill(&["backfill", &ingestion]);
    let client = stack.dynamodb().await;
    let twice: BTreeMap<String, i64> = clicks.iter().map(|(k, v)| (k.clone(), 2 * v)).collect();
    assert_eq!(counts(&client, &table, &group, "clicks").await, twice);
    let items = items(&client, &table, &group).await;
    assert_eq!(items.len(), 4);
    for (entity, item) in &items {
        assert_eq!(
            batch_entries(item),
            vec![format!("p:batch:{second}#0")],
            "{entity}: only the second run's position is kept"
        );
    }

    // Past half the retention a re-run is refused: its positions may be gone, and it would
    // count every row again. (Within it a re-run is exactly-once: the Parquet test above.)
    let refused = std::process::Command::new(host_binary())
        .args(["backfill", "--rerun", &first])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("FH_BATCH_POSITION_RETENTION"),
        "a re-run past the retention is refused, saying why: {stderr}"
    );
    assert_eq!(counts(&client, &table, &group, "clicks").await, twice);
    let _ = std::fs::remove_dir_all(&tmp);
}
