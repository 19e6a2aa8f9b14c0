//! The operator commands of batch ingestion: `backfill`, `run-shard`, `jobs`.

use super::executor::{Request, claim, execute, reopen, rerun, submit_backfill};
use super::run::{RunRecord, ShardRecord, Status, list_runs, list_shards, load_run};
use super::{BatchContext, owner_id};
use crate::app;
use crate::config::{BatchSettings, StoreKind, StoreSettings};
use crate::spec::Engine;
use anyhow::Context as _;
use chrono::NaiveDate;
use clap::Args;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// The Ingestion to run (ignored with --resume).
    #[arg(required_unless_present_any = ["resume", "rerun"])]
    pub ingestion: Option<String>,
    /// First day filled into the source's `{date}` (YYYY-MM-DD).
    #[arg(long)]
    pub from: Option<NaiveDate>,
    /// Last day (inclusive; default: --from).
    #[arg(long)]
    pub to: Option<NaiveDate>,
    /// Let backfilled values replace newer ones (else the spec's `overwrite`).
    #[arg(long)]
    pub overwrite: bool,
    /// Override the spec's engine.
    #[arg(long, value_parser = parse_engine)]
    pub engine: Option<Engine>,
    /// Continue an unfinished (or failed) run from its checkpoints instead of starting a new
    /// one.
    #[arg(long, value_name = "RUN", conflicts_with = "rerun")]
    pub resume: Option<String>,
    /// Run a finished run again from its first row with the same positions: rows it applied
    /// are skipped, so the result does not change (idempotent re-run).
    #[arg(long, value_name = "RUN")]
    pub rerun: Option<String>,
    /// Submit to a running host's admin API instead of running here (needs its token).
    #[arg(long)]
    pub admin: Option<String>,
    /// The host's FH_ADMIN_TOKEN (with --admin).
    #[arg(long, env = "FH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<crate::text::Secret>,
    #[command(flatten)]
    pub stores: StoreSettings,
    #[command(flatten)]
    pub batch: BatchSettings,
}

fn parse_engine(s: &str) -> Result<Engine, String> {
    match s {
        "local" => Ok(Engine::Local),
        "aws-batch" => Ok(Engine::AwsBatch),
        _ => Err(format!("unknown engine {s:?}: expected local or aws-batch")),
    }
}

#[derive(Debug, Clone, Args)]
pub struct RunShardArgs {
    /// The run (its record and shard plan are in job state).
    #[arg(long, env = "FH_RUN_ID")]
    pub run: String,
    /// The shard; default: AWS_BATCH_JOB_ARRAY_INDEX, or 0.
    #[arg(long)]
    pub shard: Option<u32>,
    #[command(flatten)]
    pub stores: StoreSettings,
    #[command(flatten)]
    pub batch: BatchSettings,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    /// Show one run in detail (shards, checkpoints, history).
    pub run: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Read from a running host's admin API instead of the job state table.
    #[arg(long)]
    pub admin: Option<String>,
    /// The host's FH_ADMIN_TOKEN (with --admin, unless it listens on loopback).
    #[arg(long, env = "FH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<crate::text::Secret>,
    #[command(flatten)]
    pub stores: StoreSettings,
    #[command(flatten)]
    pub batch: BatchSettings,
}

/// Pipeline, job state and context for a one-shot command in this process.
async fn context(
    stores: &StoreSettings,
    batch: &BatchSettings,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<BatchContext> {
    let specs = app::load_specs(stores)?;
    let (writer, jobs) = app::connect(stores, Some(&batch.jobs_table)).await?;
    if stores.create_tables && stores.store_kind() == StoreKind::Dynamodb {
        app::ensure_tables(&writer, &specs).await?;
    }
    let pipeline = Arc::new(app::build_pipeline(&specs, writer).await?);
    Ok(BatchContext::new(
        pipeline,
        Arc::new(specs),
        jobs.expect("asked for job state"),
        batch.clone(),
        stores.dead_letters(),
        stop,
        "127.0.0.1:8080",
        owner_id(),
    ))
}

fn stop_on_signal() -> tokio::sync::watch::Receiver<bool> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        crate::cli::wait_for_signal().await;
        eprintln!("\nstopping: shards save their checkpoints");
        let _ = tx.send(true);
    });
    rx
}

pub async fn backfill(args: BackfillArgs) -> anyhow::Result<ExitCode> {
    if let Some(admin) = &args.admin {
        let body = serde_json::json!({
            "ingestion": args.ingestion,
            "from": args.from,
            "to": args.to,
            "overwrite": args.overwrite,
            "engine": args.engine,
            "resume": args.resume,
            "rerun": args.rerun,
        });
        let (status, answer) = crate::admin_client::send(
            admin,
            "POST",
            "/v1/backfills",
            args.token.as_ref().map(|t| t.expose()),
            Some(&body.to_string()),
        )
        .await?;
        println!("{answer}");
        return Ok(if status == 200 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let ctx = context(&args.stores, &args.batch, stop_on_signal()).await?;
    let retention = args.stores.batch_position_retention;
    let id = match args.resume.as_ref().or(args.rerun.as_ref()) {
        Some(id) if args.rerun.is_some() => {
            rerun(&ctx.jobs, id, Some(&ctx.owner), retention).await?;
            id.clone()
        }
        Some(id) => {
            load_run(&ctx.jobs, id)
                .await?
                .with_context(|| format!("no run {id:?} (see `feature-host jobs`)"))?;
            reopen(&ctx.jobs, id, Some(&ctx.owner), retention).await?;
            id.clone()
        }
        None => {
            let req = Request {
                ingestion: args.ingestion.clone().expect("required without --resume"),
                from: args.from,
                to: args.to,
                overwrite: args.overwrite,
                engine: args.engine,
            };
            submit_backfill(&ctx.jobs, &ctx.specs, &req, Some(&ctx.owner))
                .await?
                .id
        }
    };
    if !claim(&ctx, &id).await? {
        let run = load_run(&ctx.jobs, &id).await?.map(|s| s.value);
        anyhow::bail!(
            "run {id} is {} and owned by {} (heartbeat within FH_BATCH_RUN_LEASE); \
             wait for it or let it go quiet",
            run.as_ref().map_or("gone", |r| r.status.as_str()),
            run.and_then(|r| r.owner).unwrap_or_default()
        );
    }
    eprintln!("run {id}: started (resume later with `feature-host backfill --resume {id}`)");
    let printer = tokio::spawn(print_progress(ctx.clone(), id.clone()));
    let run = execute(&ctx, &id).await;
    printer.abort();
    let run = run?;
    let shards = list_shards(&ctx.jobs, &id).await?;
    eprintln!("{}", progress_line(&run, &shards, 0.0));
    println!("{}", serde_json::to_string(&summary(&run, &shards))?);
    Ok(match run.status {
        Status::Succeeded => ExitCode::SUCCESS,
        s if s.is_terminal() => {
            eprintln!("run {id} {s}: {}", run.reason.as_deref().unwrap_or(""));
            ExitCode::FAILURE
        }
        _ => {
            eprintln!("run {id} stopped; resume with `feature-host backfill --resume {id}`");
            ExitCode::from(3)
        }
    })
}

fn rows_done(shards: &[crate::batch::jobs::Stored<ShardRecord>]) -> (u64, u64) {
    shards.iter().fold((0, 0), |(d, f), s| {
        (d + s.value.checkpoint.rows_done, f + s.value.rows_failed)
    })
}

fn progress_line(
    run: &RunRecord,
    shards: &[crate::batch::jobs::Stored<ShardRecord>],
    rate: f64,
) -> String {
    let (done, failed) = rows_done(shards);
    format!(
        "{} [{}]",
        super::progress::line(&run.id, done, run.rows_total, rate, failed),
        run.status
    )
}

async fn print_progress(ctx: BatchContext, id: String) {
    let tty = std::io::stderr().is_terminal();
    let mut rate = super::progress::Rate::new(Duration::from_secs(10));
    let every = if tty {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    loop {
        tokio::time::sleep(every).await;
        let (Ok(Some(run)), Ok(shards)) = (
            load_run(&ctx.jobs, &id).await,
            list_shards(&ctx.jobs, &id).await,
        ) else {
            continue;
        };
        let r = rate.sample(ctx.progress.totals().0);
        let line = progress_line(&run.value, &shards, r);
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// A run with its shards, for `jobs --json`, the admin API and the backfill's last line.
pub fn summary(
    run: &RunRecord,
    shards: &[crate::batch::jobs::Stored<ShardRecord>],
) -> serde_json::Value {
    let (done, failed) = rows_done(shards);
    serde_json::json!({
        "run": run,
        "rows_done": done,
        "rows_failed": failed,
        "shards": shards.iter().map(|s| {
            let s = &s.value;
            serde_json::json!({
                "index": s.index,
                "status": s.status,
                "units": s.units.len(),
                "rows_done": s.checkpoint.rows_done,
                "rows_failed": s.rows_failed,
                "starts": s.starts,
                "attempts": s.attempts,
                "errors": s.errors,
                "reason": s.reason,
            })
        }).collect::<Vec<_>>(),
    })
}

pub async fn run_shard(args: RunShardArgs) -> anyhow::Result<ExitCode> {
    let index = match args.shard {
        Some(i) => i,
        None => super::aws_batch::shard_index_from_env()?,
    };
    let ctx = context(&args.stores, &args.batch, stop_on_signal()).await?;
    let run = load_run(&ctx.jobs, &args.run)
        .await?
        .with_context(|| {
            format!(
                "no run {:?} in job state {}",
                args.run, args.batch.jobs_table
            )
        })?
        .value;
    match super::shard::run_shard(&ctx, &run, index).await {
        Ok(shard) => {
            println!(
                "{}",
                serde_json::json!({"run": run.id, "shard": index, "rows": shard.checkpoint.rows_done, "rows_failed": shard.rows_failed})
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("run {} shard {index}: {e:#}", run.id);
            Ok(ExitCode::FAILURE)
        }
    }
}

pub async fn jobs(args: JobsArgs) -> anyhow::Result<ExitCode> {
    let value = match &args.admin {
        Some(admin) => {
            let path = match &args.run {
                Some(r) => format!("/v1/jobs/{r}"),
                None => "/v1/jobs".into(),
            };
            let (status, body) = crate::admin_client::request(
                admin,
                "GET",
                &path,
                args.token.as_ref().map(|t| t.expose()),
            )
            .await?;
            if status != 200 {
                eprintln!("{body}");
                return Ok(ExitCode::FAILURE);
            }
            serde_json::from_str(&body)
                .with_context(|| format!("unexpected answer from {admin}{path}: {body}"))?
        }
        None => {
            let (_, jobs) = app::connect(&args.stores, Some(&args.batch.jobs_table)).await?;
            let jobs = jobs.expect("asked for job state");
            match &args.run {
                Some(id) => run_detail(&jobs, id)
                    .await?
                    .with_context(|| format!("no run {id:?} (see `feature-host jobs`)"))?,
                None => runs_json(&jobs).await?,
            }
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else if args.run.is_some() {
        print_run(&value);
    } else {
        print_runs(&value);
    }
    Ok(ExitCode::SUCCESS)
}

/// `{"runs": [...]}`, newest first.
pub async fn runs_json(jobs: &super::jobs::Jobs) -> anyhow::Result<serde_json::Value> {
    let runs = list_runs(jobs).await?;
    Ok(serde_json::json!({ "runs": runs }))
}

/// One run with its shards and alerts (`None`: no such run).
pub async fn run_detail(
    jobs: &super::jobs::Jobs,
    id: &str,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(run) = load_run(jobs, id).await? else {
        return Ok(None);
    };
    let run = run.value;
    let shards = list_shards(jobs, id).await?;
    let alerts: Vec<_> = super::monitor::Monitor::alerts(jobs)
        .await?
        .into_iter()
        .filter(|a| a.run == id)
        .collect();
    let mut v = summary(&run, &shards);
    v["alerts"] = serde_json::to_value(alerts)?;
    Ok(Some(v))
}

fn print_runs(v: &serde_json::Value) {
    println!(
        "{:<48} {:<10} {:<10} {:>6} {:>11}  REASON",
        "RUN", "ENGINE", "STATUS", "SHARDS", "ROWS"
    );
    for r in v["runs"].as_array().into_iter().flatten() {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<48} {:<10} {:<10} {:>6} {:>11}  {}",
            s("id"),
            s("engine"),
            s("status"),
            r["shards"],
            r["rows_total"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
            r["reason"].as_str().unwrap_or("")
        );
    }
}

fn print_run(v: &serde_json::Value) {
    let run = &v["run"];
    println!("run        {}", run["id"].as_str().unwrap_or("-"));
    println!(
        "ingestion  {} → group {}",
        run["ingestion"].as_str().unwrap_or("-"),
        run["group"].as_str().unwrap_or("-")
    );
    println!(
        "status     {} {}",
        run["status"].as_str().unwrap_or("-"),
        run["reason"].as_str().unwrap_or("")
    );
    println!(
        "engine     {} {}",
        run["engine"].as_str().unwrap_or("-"),
        run["aws_job_id"].as_str().unwrap_or("")
    );
    println!(
        "rows       {} done, {} dead-lettered, {} total",
        v["rows_done"], v["rows_failed"], run["rows_total"]
    );
    println!("history");
    for t in run["history"].as_array().into_iter().flatten() {
        let at = chrono::DateTime::from_timestamp_millis(t["at_ms"].as_i64().unwrap_or(0))
            .unwrap_or_default();
        println!(
            "  {}  {:<10} {}",
            at.format("%Y-%m-%d %H:%M:%S"),
            t["status"].as_str().unwrap_or("-"),
            t["note"].as_str().unwrap_or("")
        );
    }
    println!("shards");
    for s in v["shards"].as_array().into_iter().flatten() {
        println!(
            "  {:>5} {:<10} rows {:>10}  failed {:>6}  starts {}  {}",
            s["index"],
            s["status"].as_str().unwrap_or("-"),
            s["rows_done"],
            s["rows_failed"],
            s["starts"],
            s["reason"].as_str().unwrap_or("")
        );
    }
    for a in v["alerts"].as_array().into_iter().flatten() {
        println!("alert      {}", a["text"].as_str().unwrap_or("-"));
    }
}
