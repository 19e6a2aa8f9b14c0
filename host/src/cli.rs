//! The `feature-host` command line.

use crate::app;
use crate::config::{BatchSettings, LogFormat, RunSettings, StoreKind, StoreSettings};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(name = "feature-host", version, about = "Ingestion host for ML feature platforms", after_help = EXAMPLES)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, env = "FH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Export traces (spans of plugin batches and backfill shards) to this OpenTelemetry
    /// collector, OTLP over HTTP/protobuf (e.g. `http://otel-collector:4318`); unset = off.
    #[arg(long, env = "FH_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

const EXAMPLES: &str = "Examples:
  feature-host run --events specs/examples/events.jsonl --once      # no services needed
  feature-host get --group user-activity --entity u1
  feature-host validate specs/
  FH_KAFKA_BROKERS=127.0.0.1:9092 FH_DYNAMODB_ENDPOINT=http://127.0.0.1:8000 \\
    FH_REDIS_URL=redis://127.0.0.1:6379 feature-host run
  feature-host plugin test plugins/dist/user_activity.wasm --spec specs/user-activity.yaml \\
    --events specs/examples/events.jsonl
  feature-host backfill user-activity-history --from 2026-11-01 --to 2026-11-24
  feature-host jobs
  feature-host jobs user-activity-history-20261125T101500Z-3fa2c1";

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Ingest: Kafka when FH_KAFKA_BROKERS is set, else a local events file / HTTP push.
    Run {
        #[command(flatten)]
        stores: StoreSettings,
        #[command(flatten)]
        run: Box<RunSettings>,
        #[command(flatten)]
        batch: BatchSettings,
    },
    /// Run an Ingestion now (in this process, with a progress line), or continue one.
    ///
    /// Example: `feature-host backfill user-activity-history --from 2026-11-01 --to 2026-11-07`
    Backfill(crate::batch::commands::BackfillArgs),
    /// List batch runs, or show one (shards, checkpoints, status history, alerts).
    ///
    /// Example: `feature-host jobs` / `feature-host jobs <run>`
    Jobs(crate::batch::commands::JobsArgs),
    /// Run one shard of a run: the entrypoint of AWS Batch jobs (the shard is the array
    /// index, AWS_BATCH_JOB_ARRAY_INDEX).
    RunShard(crate::batch::commands::RunShardArgs),
    /// Compile a component from stdin to stdout under the given caps: the child a serving
    /// host compiles plugins in (see `plugin::compiler`).
    #[command(name = crate::plugin::compiler::SUBCOMMAND, hide = true)]
    CompilePlugin {
        #[arg(long)]
        memory_bytes: u64,
        #[arg(long)]
        cpu_seconds: u64,
        #[arg(long)]
        parallel: bool,
    },
    /// Validate a spec directory: every problem, with file and field. Exit 1 on any.
    Validate {
        /// The spec directory.
        #[arg(default_value = "specs")]
        dir: PathBuf,
        /// Directory that `plugin.wasm` paths are relative to.
        #[arg(long, env = "FH_PLUGIN_DIR", default_value = "plugins/dist")]
        plugin_dir: PathBuf,
        #[command(flatten)]
        sources: crate::config::ScopeSettings,
    },
    /// Print an entity's features as JSON (cache first, then the store).
    Get {
        #[arg(long)]
        group: String,
        #[arg(long)]
        entity: String,
        /// Only these features (comma separated).
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        #[command(flatten)]
        stores: StoreSettings,
    },
    /// Print the JSON Schema of spec documents (or, with --markdown, the spec reference).
    Schema {
        /// The Markdown reference (docs/spec-reference.md) instead of the JSON Schema.
        #[arg(long)]
        markdown: bool,
    },
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Benchmarks; each ends with `name=value` lines (see README "Measurements").
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Dead letters.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Re-inject a group's dead letters (after a fix) into its retry topic, so that only that
    /// group processes them again; each dead letter applies at most once however often it is
    /// replayed.
    ///
    /// Example: `feature-host dlq replay user-activity --reason-contains "unknown field" --dry-run`
    Replay(Box<DlqReplayArgs>),
}

#[derive(Debug, clap::Args)]
pub struct DlqReplayArgs {
    /// The feature group.
    pub group: String,
    /// Only dead letters whose reason contains this text.
    #[arg(long)]
    pub reason_contains: Option<String>,
    /// Only dead letters from this original topic.
    #[arg(long)]
    pub source_topic: Option<String>,
    /// At most this many.
    #[arg(long)]
    pub limit: Option<usize>,
    /// List what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    pub stores: StoreSettings,
    #[command(flatten)]
    pub run: RunSettings,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Kafka consumer throughput: sequential baselines vs parallel in-partition processing.
    ///
    /// Example: `eval "$(scripts/stack env)"; feature-host bench stream`
    Stream(crate::bench::stream::StreamBenchArgs),
    /// WASM vs native per-event cost, hot-reload latency, memory per plugin instance. No
    /// services needed.
    ///
    /// Example: `feature-host bench plugin`
    Plugin(crate::bench::plugin::PluginBenchArgs),
    /// Feature writes/s per cache strategy against DynamoDB + Redis, next to a plain-client
    /// loop sending the same requests (the raw ceiling); round trips per batch.
    ///
    /// Example: `eval "$(scripts/stack env)"; feature-host bench sinks --entities 256 --features 8`
    Sinks(crate::bench::sinks::SinksBenchArgs),
    /// Backfill rows/s (local engine, generated Parquet source, 1/2/4 shards) next to the
    /// sink ceiling: the same entity writes sent by plain clients (or, on the embedded
    /// store, by the writer alone).
    ///
    /// Example: `eval "$(scripts/stack env)"; feature-host bench backfill`
    Backfill(Box<crate::bench::backfill::BackfillBenchArgs>),
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin over sample events and print each event's writes (nothing is stored).
    Test {
        /// The component (.wasm).
        wasm: PathBuf,
        /// The FeatureGroup spec whose config, limits and features apply.
        #[arg(long)]
        spec: PathBuf,
        /// JSON-lines events (the local events format).
        #[arg(long)]
        events: PathBuf,
        /// Print golden cases (`{"event": …, "writes": […]}`) to use as `plugin.golden`
        /// once reviewed.
        #[arg(long)]
        golden: bool,
    },
    /// Show each group's serving plugin version and its reload history, from a running host.
    ///
    /// Example: `feature-host plugin status --admin 127.0.0.1:8080`
    Status {
        /// The host's admin address.
        #[arg(long, env = "FH_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
        admin: String,
        /// The host's FH_ADMIN_TOKEN (needed unless it listens on loopback).
        #[arg(long, env = "FH_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<crate::text::Secret>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve a group with the plugin version it had before its last reload (running host).
    ///
    /// Example: `FH_ADMIN_TOKEN=… feature-host plugin rollback user-activity`
    Rollback {
        group: String,
        /// The host's admin address.
        #[arg(long, env = "FH_ADMIN_ADDR", default_value = "127.0.0.1:8080")]
        admin: String,
        /// The host's FH_ADMIN_TOKEN.
        #[arg(long, env = "FH_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<crate::text::Secret>,
    },
}

/// Logs go to stderr (stdout carries command output). `RUST_LOG` overrides the level: the
/// default is `info` for `run` and `warn` for one-shot commands. With `otlp_endpoint`, spans
/// are also exported; the returned provider must be shut down (outside the async runtime:
/// its HTTP client is a blocking one) to flush them.
pub fn init_logging(
    format: LogFormat,
    command: &Command,
    otlp_endpoint: Option<&str>,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let level = if matches!(command, Command::Run { .. } | Command::RunShard(_)) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!(
            "{level},aws_config=warn,aws_smithy_runtime=warn"
        ))
    });
    let provider = otlp_endpoint
        .map(|endpoint| -> anyhow::Result<_> {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
                .build()
                .with_context(|| {
                    format!("FH_OTLP_ENDPOINT={endpoint}: cannot build the exporter")
                })?;
            Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("feature-host")
                        .build(),
                )
                .build())
        })
        .transpose()?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("feature-host")));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    Ok(provider)
}

pub async fn main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { stores, run, batch } => run_host(stores, *run, batch)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Backfill(args) => crate::batch::commands::backfill(args).await,
        Command::Dlq(DlqCommand::Replay(args)) => dlq_replay(*args).await,
        Command::Jobs(args) => crate::batch::commands::jobs(args).await,
        Command::RunShard(args) => crate::batch::commands::run_shard(args).await,
        // The binary's `main` dispatches it before a runtime starts; this arm serves callers
        // of the library's `main`.
        Command::CompilePlugin {
            memory_bytes,
            cpu_seconds,
            parallel,
        } => Ok(crate::plugin::compiler::child_main(
            memory_bytes,
            cpu_seconds,
            parallel,
        )),
        Command::Validate {
            dir,
            plugin_dir,
            sources,
        } => Ok(validate(&dir, &plugin_dir, &sources.scope(&dir)?)),
        Command::Get {
            group,
            entity,
            features,
            stores,
        } => get(&stores, &group, &entity, &features).await,
        Command::Bench(BenchCommand::Stream(args)) => {
            let report = crate::bench::stream::run(args).await?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Plugin(args)) => {
            let report = crate::bench::plugin::run(args).await?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Backfill(args)) => {
            let report = crate::bench::backfill::run(*args).await?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Sinks(args)) => {
            let report = crate::bench::sinks::run(args).await?;
            print!("{}", report.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema { markdown } => {
            let schema = crate::spec::json_schema();
            if markdown {
                print!("{}", crate::spec::reference::markdown(&schema));
            } else {
                println!("{}", serde_json::to_string_pretty(&schema)?);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugin(PluginCommand::Test {
            wasm,
            spec,
            events,
            golden,
        }) => crate::plugin::test_cmd::run(&wasm, &spec, &events, golden).await,
        Command::Plugin(PluginCommand::Status { admin, token, json }) => {
            plugin_status(&admin, token.as_ref().map(|t| t.expose()), json).await
        }
        Command::Plugin(PluginCommand::Rollback {
            group,
            admin,
            token,
        }) => {
            let (status, body) = crate::admin_client::request(
                &admin,
                "POST",
                &format!("/v1/plugins/{group}/rollback"),
                token.as_ref().map(|t| t.expose()),
            )
            .await?;
            println!("{body}");
            Ok(if status == 200 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

async fn dlq_replay(args: DlqReplayArgs) -> anyhow::Result<ExitCode> {
    let specs = app::load_specs(&args.stores)?;
    let def = specs.groups.get(&args.group).with_context(|| {
        format!(
            "unknown feature group {:?}; known: {}",
            args.group,
            specs.groups.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let brokers = args.run.kafka_brokers.as_deref().context(
        "dlq replay reads the group's dead-letter topic: set FH_KAFKA_BROKERS \
         (without Kafka, dead letters are in <FH_DATA_DIR>/dead-letters.jsonl: fix, then \
         ingest the lines again with `feature-host run --events`)",
    )?;
    let client =
        crate::stream::kafka::KafkaClient::from_settings(&args.run, brokers, Default::default())
            .await?;
    let filter = crate::stream::replay::ReplayFilter {
        reason_contains: args.reason_contains,
        source_topic: args.source_topic,
        limit: args.limit,
    };
    let summary = crate::stream::replay::replay(
        &client,
        &def.name,
        &def.dead_letter_topic,
        &def.retry_topic,
        &filter,
        args.dry_run,
    )
    .await?;
    for d in &summary.dead_letters {
        eprintln!(
            "{}/{}@{}  from {}  {} after {} attempt(s): {}",
            summary.dead_letter_topic,
            d.partition,
            d.offset,
            d.source,
            d.kind,
            d.attempts,
            d.reason
        );
    }
    println!("{}", serde_json::to_string(&summary)?);
    Ok(ExitCode::SUCCESS)
}

async fn plugin_status(admin: &str, token: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let (status, body) = crate::admin_client::request(admin, "GET", "/v1/plugins", token).await?;
    if status != 200 || json {
        println!("{body}");
        return Ok(if status == 200 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let v: serde_json::Value = serde_json::from_str(&body)
        .with_context(|| format!("unexpected answer from {admin}/v1/plugins: {body}"))?;
    println!(
        "{:<24} {:<17} {:<17} {:<12} LAST RELOAD",
        "GROUP", "VERSION", "PREVIOUS", "RESULT"
    );
    for g in v["groups"].as_array().into_iter().flatten() {
        let s = |k: &str| g[k].as_str().unwrap_or("-").to_owned();
        let last = &g["last_reload"];
        println!(
            "{:<24} {:<17} {:<17} {:<12} {}",
            s("group"),
            s("version"),
            s("previous_version"),
            last["result"].as_str().unwrap_or("-"),
            last["error"].as_str().unwrap_or("")
        );
    }
    for n in v["notes"].as_array().into_iter().flatten() {
        println!("note: {}", n.as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(
    dir: &std::path::Path,
    plugin_dir: &std::path::Path,
    scope: &crate::spec::SpecScope,
) -> ExitCode {
    match crate::spec::load_dir_in(dir, plugin_dir, scope) {
        Ok(set) => {
            println!(
                "{}: {} feature group(s), {} ingestion(s): ok",
                dir.display(),
                set.groups.len(),
                set.ingestions.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{errors}");
            ExitCode::FAILURE
        }
    }
}

async fn get(
    stores: &StoreSettings,
    group: &str,
    entity: &str,
    only: &[String],
) -> anyhow::Result<ExitCode> {
    let specs = app::load_specs(stores)?;
    let sink = app::group_sink(&specs, group)?;
    let writer = app::connect_writer(stores).await?;
    match writer.get(&sink, entity).await? {
        Some(found) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&app::entity_json(&sink, entity, &found, only))?
            );
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no features for entity {entity:?} in group {group:?}");
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn run_host(
    stores: StoreSettings,
    run: RunSettings,
    batch: BatchSettings,
) -> anyhow::Result<()> {
    if let Some(token) = &run.admin_token {
        crate::admin::check_token(token.expose())?;
    }
    let admin_limits = run.admin_limits.limits()?;
    let specs = app::load_specs(&stores)?;
    let (writer, jobs) = app::connect(&stores, Some(&batch.jobs_table)).await?;
    if stores.create_tables && stores.store_kind() == StoreKind::Dynamodb {
        app::ensure_tables(&writer, &specs).await?;
    }
    let engine =
        crate::plugin::PluginEngine::with_settings(&run.plugins.engine(&stores.data_dir)?)?;
    let pipeline = Arc::new(app::build_pipeline_with(&engine, &specs, writer).await?);
    engine.serving();
    let reloader = crate::plugin::reload::Reloader::new(
        pipeline.clone(),
        engine,
        &stores.spec_dir,
        &stores.plugin_dir,
        specs.sources.clone(),
    );
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing in-flight work");
        let _ = shutdown_tx.send(true);
    });

    let dead_letters = stores.dead_letters();
    let push = run.kafka_brokers.is_none().then(|| dead_letters.clone());
    let batch_ctx = crate::batch::BatchContext::new(
        pipeline.clone(),
        Arc::new(specs.clone()),
        jobs.expect("asked for job state"),
        batch.clone(),
        dead_letters.clone(),
        shutdown_rx.clone(),
        &run.admin_addr,
        crate::batch::owner_id(),
    );
    // Watching before the API answers: a change made once it answers is seen.
    if run.plugins.reload && !run.once {
        let p = &run.plugins;
        match reloader
            .clone()
            .watch(p.reload_debounce, p.reload_poll, shutdown_rx.clone())
        {
            Ok(reloads) => {
                tokio::spawn(reloads);
            }
            Err(e) => {
                tracing::error!(error = %e, "hot reload is off: cannot watch the spec and plugin directories")
            }
        }
    }
    let listener = tokio::net::TcpListener::bind(&run.admin_addr)
        .await
        .with_context(|| {
            format!(
                "cannot bind admin address {} (set FH_ADMIN_ADDR)",
                run.admin_addr
            )
        })?;
    let local = listener.local_addr()?;
    let guard = crate::admin::Guard::new(run.admin_token.clone(), local);
    if !guard.open_reads() && run.admin_token.is_none() {
        tracing::warn!(addr = %local, "the admin API listens beyond loopback without FH_ADMIN_TOKEN: only probes and metrics are served");
    }
    let admin = crate::admin::router(
        crate::admin::AdminState {
            pipeline: pipeline.clone(),
            push,
            reloader: Some(reloader.clone()),
            batch: Some(batch_ctx.clone()),
            kafka: match &run.kafka_brokers {
                Some(brokers) if !run.once => Some(
                    crate::stream::kafka::KafkaClient::from_settings(
                        &run,
                        brokers,
                        Default::default(),
                    )
                    .await?,
                ),
                _ => None,
            },
        },
        guard,
    );
    tracing::info!(addr = %local, "admin API listening");
    let server = tokio::spawn(crate::admin::serve(
        listener,
        admin,
        admin_limits,
        pipeline.metrics().clone(),
        shutdown_rx.clone(),
    ));

    let batch_service = (batch.scheduler && !run.once).then(|| {
        tokio::spawn(crate::batch::service::serve(
            batch_ctx,
            Arc::new(crate::batch::scheduler::SystemClock),
        ))
    });

    if let Some(file) = &run.events {
        let summary =
            crate::stream::local::ingest_file(&pipeline, file, run.batch_size, &dead_letters)
                .await?;
        println!("{}", serde_json::to_string(&summary)?);
        if summary.dead_lettered > 0 {
            tracing::warn!(count = summary.dead_lettered, file = %dead_letters.path().display(), "events dead-lettered");
        }
    }
    if run.once {
        server.abort();
        return Ok(());
    }
    match &run.kafka_brokers {
        Some(brokers) => {
            crate::stream::consumer::run(&run, brokers, pipeline, shutdown_rx.clone()).await?
        }
        None => {
            let mut rx = shutdown_rx.clone();
            let _ = rx.wait_for(|s| *s).await;
        }
    }
    if let Some(b) = batch_service {
        b.await?;
    }
    server.await?;
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
