//! Runs and shards: the records a batch job leaves in job state, and their status machine.
//! Status names follow AWS Batch so both engines read the same way.

use super::jobs::{Jobs, Stored};
use super::plan::Unit;
use crate::spec::Engine;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    /// Created, not yet picked up by an executor.
    Submitted,
    /// Waiting for parent runs (`dependsOn`) to succeed.
    Pending,
    /// Ready, waiting for a worker (local) or compute (AWS Batch).
    Runnable,
    Starting,
    Running,
    Succeeded,
    Failed,
    /// A parent run failed: this run will not start.
    Blocked,
}

impl Status {
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Blocked)
    }

    /// Waiting states that count toward the stuck-job alert.
    pub fn is_waiting(self) -> bool {
        matches!(self, Status::Submitted | Status::Pending | Status::Runnable)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Submitted => "SUBMITTED",
            Status::Pending => "PENDING",
            Status::Runnable => "RUNNABLE",
            Status::Starting => "STARTING",
            Status::Running => "RUNNING",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::Blocked => "BLOCKED",
        }
    }

    /// An AWS Batch job status.
    pub fn from_aws(s: &str) -> Option<Status> {
        Some(match s {
            "SUBMITTED" => Status::Submitted,
            "PENDING" => Status::Pending,
            "RUNNABLE" => Status::Runnable,
            "STARTING" => Status::Starting,
            "RUNNING" => Status::Running,
            "SUCCEEDED" => Status::Succeeded,
            "FAILED" => Status::Failed,
            _ => return None,
        })
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One status change, kept on the run for "job state over time".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transition {
    pub status: Status,
    pub at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Trigger {
    /// A cron tick (ms since the epoch).
    Schedule { tick_ms: i64 },
    /// On demand (CLI or admin API).
    Backfill,
}

/// One run of an ingestion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub ingestion: String,
    pub group: String,
    pub trigger: Trigger,
    /// The source URI with `{date}` filled in per day of `[from, to]` (or the tick's day).
    pub uris: Vec<String>,
    pub format: crate::spec::BatchFormat,
    pub overwrite: bool,
    pub engine: Engine,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Shard count, fixed when the run is planned (0 before).
    pub shards: u32,
    /// Rows in the source when known up front (Parquet metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_total: Option<u64>,
    pub bytes_total: u64,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub history: Vec<Transition>,
    /// Runs of this run's parents (same tick); this run waits for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parents: Vec<String>,
    /// The AWS Batch job (array job when more than one shard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws_job_id: Option<String>,
    /// The process executing (local) or supervising (aws-batch) the run, and when it last
    /// said so: a run whose heartbeat is older than the run lease is taken over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default)]
    pub heartbeat_ms: i64,
}

impl RunRecord {
    /// Move to `status` (recorded in the history when it changes).
    pub fn set_status(&mut self, status: Status, now_ms: i64, note: Option<String>) {
        if self.status != status || self.history.is_empty() {
            self.history.push(Transition {
                status,
                at_ms: now_ms,
                note: note.clone(),
            });
        }
        if note.is_some() || status.is_terminal() {
            self.reason = note;
        }
        self.status = status;
        self.updated_ms = now_ms;
    }

    /// Since when the run has been in its current status.
    pub fn status_since_ms(&self) -> i64 {
        self.history
            .iter()
            .rev()
            .find(|t| t.status == self.status)
            .map_or(self.created_ms, |t| t.at_ms)
    }

    /// The position source of this run's rows: replaying the run (resume, re-run) finds its
    /// rows already applied; another run's rows are new.
    pub fn position_source(&self) -> String {
        format!("batch:{}", self.id)
    }
}

/// Where a shard has got to: every row before `(unit, row)` is finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Index into the shard's units.
    pub unit: u32,
    /// Rows of that unit already finished.
    pub row: u64,
    /// Rows of the shard finished (the row offset of the next row).
    pub rows_done: u64,
}

/// One shard of a run: its units and checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub run: String,
    pub index: u32,
    pub units: Vec<Unit>,
    pub status: Status,
    pub checkpoint: Checkpoint,
    /// Rows dead-lettered (invalid); their reasons are in the dead-letter file / log.
    pub rows_failed: u64,
    /// The first few dead-letter reasons, for `feature-host jobs`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// `rows_done` at every start: a resumed shard shows where it picked up.
    pub starts: Vec<u64>,
    pub attempts: u32,
    pub updated_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

pub const RUN_PK: &str = "run";

pub fn shard_pk(run: &str) -> String {
    format!("shard#{run}")
}

pub fn shard_sk(index: u32) -> String {
    format!("{index:05}")
}

/// Read a run.
pub async fn load_run(jobs: &Jobs, id: &str) -> anyhow::Result<Option<Stored<RunRecord>>> {
    jobs.get(RUN_PK, id).await
}

/// Every run, newest first.
pub async fn list_runs(jobs: &Jobs) -> anyhow::Result<Vec<RunRecord>> {
    let mut runs: Vec<RunRecord> = jobs
        .list(RUN_PK)
        .await?
        .into_iter()
        .map(|s: Stored<RunRecord>| s.value)
        .collect();
    runs.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(a.id.cmp(&b.id)));
    Ok(runs)
}

pub async fn list_shards(jobs: &Jobs, run: &str) -> anyhow::Result<Vec<Stored<ShardRecord>>> {
    jobs.list(&shard_pk(run)).await
}

/// Read-modify-write a run with compare-and-swap, retrying lost races.
pub async fn update_run(
    jobs: &Jobs,
    id: &str,
    mut change: impl FnMut(&mut RunRecord),
) -> anyhow::Result<RunRecord> {
    loop {
        let Some(mut stored) = load_run(jobs, id).await? else {
            anyhow::bail!("run {id} does not exist");
        };
        change(&mut stored.value);
        if jobs
            .put(RUN_PK, id, &stored.value, stored.version)
            .await?
            .is_some()
        {
            return Ok(stored.value);
        }
    }
}

/// A run id: readable, sortable by time, unique per ingestion and tick.
pub fn run_id(ingestion: &str, at_ms: i64, suffix: Option<&str>) -> String {
    let t = chrono::DateTime::from_timestamp_millis(at_ms)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%SZ");
    match suffix {
        Some(s) => format!("{ingestion}-{t}-{s}"),
        None => format!("{ingestion}-{t}"),
    }
}

pub use crate::sink::unix_now_ms as now_ms;

/// A run record for unit tests.
#[cfg(test)]
pub(crate) fn sample() -> RunRecord {
    RunRecord {
        id: "r".into(),
        ingestion: "i".into(),
        group: "g".into(),
        trigger: Trigger::Backfill,
        uris: vec![],
        format: crate::spec::BatchFormat::Jsonl,
        overwrite: false,
        engine: Engine::Local,
        status: Status::Submitted,
        reason: None,
        shards: 0,
        rows_total: None,
        bytes_total: 0,
        created_ms: 0,
        updated_ms: 0,
        history: vec![],
        parents: vec![],
        aws_job_id: None,
        owner: None,
        heartbeat_ms: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_sort_by_time() {
        let a = run_id("daily", 1_764_000_000_000, None);
        let b = run_id("daily", 1_764_086_400_000, None);
        assert_eq!(a, "daily-20251124T160000Z");
        assert!(a < b);
        assert_eq!(
            run_id("daily", 0, Some("bf1a2b")),
            "daily-19700101T000000Z-bf1a2b"
        );
    }

    #[test]
    fn status_history_records_changes_only() {
        let mut r = sample();
        r.set_status(Status::Submitted, 5, None);
        r.set_status(Status::Runnable, 10, None);
        r.set_status(Status::Runnable, 20, None);
        assert_eq!(r.history.len(), 2);
        assert_eq!(r.status_since_ms(), 10);
        r.set_status(Status::Failed, 30, Some("boom".into()));
        assert_eq!(r.reason.as_deref(), Some("boom"));
        assert!(r.status.is_terminal());
    }
}
