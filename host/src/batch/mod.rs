//! Batch ingestion: bulk sources through the same plugins and writer as the stream.
//!
//! - [`source`] lists and reads local / S3 files; [`format`] decodes JSON lines, CSV and
//!   Parquet into records; [`plan`] deals a run's files and row groups into shards;
//! - [`jobs`] is the job-state table (DynamoDB or embedded) and [`run`] the run and shard
//!   records kept in it;
//! - [`shard`] runs one shard from its checkpoint; [`executor`] takes a run from SUBMITTED to
//!   its end on an engine ([`local`] worker pool or [`aws_batch`] array job);
//! - [`scheduler`] turns cron ticks into runs under a lease and hands runs to executors;
//!   [`service`] runs both inside the host; [`monitor`] raises alerts for stuck and failed
//!   runs; [`rate`] keeps backfills from
//!   starving the stream's writes; [`progress`] is the CLI's progress line.

pub mod aws_batch;
pub mod commands;
pub mod executor;
pub mod format;
pub mod jobs;
pub mod local;
pub mod monitor;
pub mod plan;
pub mod progress;
pub mod rate;
pub mod run;
pub mod scheduler;
pub mod service;
pub mod shard;
pub mod source;

use crate::config::BatchSettings;
use crate::pipeline::Pipeline;
use crate::stream::dead_letter::DeadLetterFile;
use jobs::Jobs;
use std::sync::Arc;

/// Everything a process needs to run batch work.
#[derive(Clone)]
pub struct BatchContext {
    pub pipeline: Arc<Pipeline>,
    pub specs: Arc<crate::spec::SpecSet>,
    pub jobs: Jobs,
    pub sources: source::Sources,
    pub limit: Arc<rate::RateLimit>,
    pub settings: BatchSettings,
    pub dead_letters: DeadLetterFile,
    pub progress: Arc<progress::Progress>,
    /// Bounds the shards running at once in this process (local engine).
    pub workers: Arc<tokio::sync::Semaphore>,
    /// This process, as written into the runs it owns.
    pub owner: String,
    /// Set on shutdown: shards save their checkpoint and stop.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// For links in alerts about local runs.
    pub admin_url: String,
}

impl BatchContext {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pipeline: Arc<Pipeline>,
        specs: Arc<crate::spec::SpecSet>,
        jobs: Jobs,
        settings: BatchSettings,
        dead_letters: DeadLetterFile,
        stop: tokio::sync::watch::Receiver<bool>,
        admin_addr: &str,
        owner: String,
    ) -> BatchContext {
        BatchContext {
            pipeline,
            sources: source::Sources::new(settings.s3_endpoint.clone(), specs.sources.clone()),
            specs,
            jobs,
            limit: Arc::new(rate::RateLimit::new(settings.max_rows_per_sec)),
            workers: Arc::new(tokio::sync::Semaphore::new(settings.workers.max(1))),
            admin_url: settings
                .admin_url
                .clone()
                .unwrap_or_else(|| format!("http://{admin_addr}")),
            settings,
            dead_letters,
            progress: Default::default(),
            owner,
            stop,
        }
    }
}

/// A name for this process in job state: host and pid.
pub fn owner_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
