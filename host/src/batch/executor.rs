//! A run from creation to its end: submit (create the record), claim, wait for parents,
//! plan shards, hand to the engine, record the outcome.

use super::BatchContext;
use super::format::units;
use super::plan::{assign, shard_count};
use super::run::{
    Checkpoint, RUN_PK, RunRecord, ShardRecord, Status, Trigger, load_run, now_ms, run_id,
    shard_pk, shard_sk, update_run,
};
use super::source::expand_dates;
use crate::spec::{Engine, SpecSet};
use anyhow::Context as _;
use chrono::NaiveDate;
use std::time::Duration;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct Request {
    pub ingestion: String,
    /// `{date}` range (inclusive).
    pub from: Option<NaiveDate>,
    pub to: Option<NaiveDate>,
    /// Force overwrite (else the spec's `overwrite`).
    pub overwrite: bool,
    /// Override the spec's engine.
    pub engine: Option<Engine>,
}

/// Create a backfill run (SUBMITTED). It runs where it is executed: the CLI runs it itself;
/// through the admin API the scheduling replica picks it up.
///
/// `owner`: created already claimed by this process (the CLI runs it itself, and no scheduler
/// may pick it up meanwhile).
pub async fn submit_backfill(
    jobs: &super::jobs::Jobs,
    specs: &SpecSet,
    req: &Request,
    owner: Option<&str>,
) -> anyhow::Result<RunRecord> {
    let now = now_ms();
    let suffix = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let mut run = new_run(
        specs,
        req,
        Trigger::Backfill,
        run_id(&req.ingestion, now, Some(&suffix)),
        now,
        Vec::new(),
    )?;
    if let Some(owner) = owner {
        run.owner = Some(owner.to_owned());
        run.heartbeat_ms = now;
    }
    anyhow::ensure!(
        jobs.put(RUN_PK, &run.id, &run, 0).await?.is_some(),
        "run {} already exists",
        run.id
    );
    Ok(run)
}

/// The record of a new run (not stored).
pub fn new_run(
    specs: &SpecSet,
    req: &Request,
    trigger: Trigger,
    id: String,
    now: i64,
    parents: Vec<String>,
) -> anyhow::Result<RunRecord> {
    let def = specs.ingestions.get(&req.ingestion).with_context(|| {
        format!(
            "unknown ingestion {:?}; known: {}",
            req.ingestion,
            specs
                .ingestions
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    // A relative local path is relative to the spec file, like the plugin's golden file.
    let uri = match super::source::Location::parse(&def.spec.source.uri)? {
        super::source::Location::Local(p) if p.is_relative() => def
            .file
            .parent()
            .map_or(p.clone(), |d| d.join(&p))
            .to_string_lossy()
            .into_owned(),
        _ => def.spec.source.uri.clone(),
    };
    let uris = expand_dates(&uri, req.from, req.to)
        .with_context(|| format!("ingestion {} ({})", def.name, def.file.display()))?;
    let mut run = RunRecord {
        id,
        ingestion: def.name.clone(),
        group: def.spec.feature_group.clone(),
        trigger,
        uris,
        format: def.spec.source.format,
        overwrite: req.overwrite || def.spec.overwrite,
        engine: req.engine.unwrap_or(def.spec.engine),
        status: Status::Submitted,
        reason: None,
        shards: 0,
        rows_total: None,
        bytes_total: 0,
        created_ms: now,
        updated_ms: now,
        history: Vec::new(),
        parents,
        aws_job_id: None,
        owner: None,
        heartbeat_ms: 0,
    };
    run.set_status(Status::Submitted, now, None);
    Ok(run)
}

/// Make a run that ended without succeeding (FAILED, BLOCKED) runnable again, for an explicit
/// resume: its shards continue from their checkpoints, with the same positions, so what the
/// failed attempt applied is not applied twice. A run that is still going is left alone.
///
/// `owner`: reopened already claimed by this process (the CLI runs it itself); `None` leaves
/// it to the scheduling replica.
pub async fn reopen(
    jobs: &super::jobs::Jobs,
    id: &str,
    owner: Option<&str>,
    retention: Duration,
) -> anyhow::Result<RunRecord> {
    if let Some(run) = super::run::load_run(jobs, id).await? {
        positions_kept(&run.value, "resumed", retention, now_ms())?;
    }
    let run = update_run(jobs, id, |r| {
        if matches!(r.status, Status::Failed | Status::Blocked) {
            r.owner = owner.map(str::to_owned);
            r.heartbeat_ms = now_ms();
            r.set_status(
                Status::Runnable,
                now_ms(),
                Some("resumed by the operator".into()),
            );
        }
    })
    .await?;
    anyhow::ensure!(
        run.status != Status::Succeeded,
        "run {id} already succeeded; nothing to resume"
    );
    Ok(run)
}

/// Run a run again from its first row, with the same positions: every row it already
/// applied is recognised and skipped, so a finished run re-runs idempotently (for checking,
/// or after restoring a table from a backup taken before the run).
pub async fn rerun(
    jobs: &super::jobs::Jobs,
    id: &str,
    owner: Option<&str>,
    retention: Duration,
) -> anyhow::Result<RunRecord> {
    let run = super::run::load_run(jobs, id)
        .await?
        .with_context(|| format!("no run {id:?}"))?
        .value;
    anyhow::ensure!(
        run.status.is_terminal(),
        "run {id} is {}; resume it instead of re-running it",
        run.status
    );
    positions_kept(&run, "re-run", retention, now_ms())?;
    for shard in super::run::list_shards(jobs, id).await? {
        let mut s = shard.value;
        s.status = Status::Runnable;
        s.checkpoint = Checkpoint::default();
        s.rows_failed = 0;
        s.errors.clear();
        s.reason = None;
        anyhow::ensure!(
            jobs.put(&shard_pk(id), &shard_sk(s.index), &s, shard.version)
                .await?
                .is_some(),
            "shard {} of run {id} changed meanwhile; try again",
            s.index
        );
    }
    update_run(jobs, id, |r| {
        r.owner = owner.map(str::to_owned);
        r.heartbeat_ms = now_ms();
        r.aws_job_id = None;
        r.set_status(
            Status::Runnable,
            now_ms(),
            Some("re-run by the operator".into()),
        );
    })
    .await
}

/// A run replays its rows with exactly-once effect only while the entities it wrote still
/// hold its positions: each entry is dropped `retention` after the run's last write to that
/// entity (see [`crate::feature::EXPIRING_SOURCE_PREFIX`]), and every write of the run came
/// after it first started — a replay (which writes nothing new) does not refresh them. So a
/// run is replayed (resumed, re-run, taken over) only within half the retention of its first
/// start, leaving the replay the other half to reach its rows. A run that never started
/// wrote nothing.
fn positions_kept(
    run: &RunRecord,
    what: &str,
    retention: Duration,
    now: i64,
) -> anyhow::Result<()> {
    let Some(started) = first_start(run) else {
        return Ok(());
    };
    let age = Duration::from_millis((now - started).max(0) as u64);
    anyhow::ensure!(
        age <= retention / 2,
        "run {} first started {} ago, more than half of FH_BATCH_POSITION_RETENTION ({}): the \
         entities it wrote may have dropped its positions, so if {what} it would count its \
         rows again. Start a new run instead (and raise FH_BATCH_POSITION_RETENTION, on every \
         host, if runs must be replayable for longer)",
        run.id,
        humantime::format_duration(Duration::from_secs(age.as_secs())),
        humantime::format_duration(retention),
    );
    Ok(())
}

/// When the run first started executing (its first write can be no earlier).
fn first_start(run: &RunRecord) -> Option<i64> {
    run.history
        .iter()
        .find(|t| matches!(t.status, Status::Starting | Status::Running))
        .map(|t| t.at_ms)
}

/// Whether `run` may be claimed by an executor now: not finished, and nobody (alive) owns it.
pub fn claimable(run: &RunRecord, now: i64, lease: Duration) -> bool {
    !run.status.is_terminal()
        && (run.owner.is_none() || now - run.heartbeat_ms > lease.as_millis() as i64)
}

/// Claim a run for this process. `Ok(false)` if it is finished or owned by a live process.
pub async fn claim(ctx: &BatchContext, id: &str) -> anyhow::Result<bool> {
    let Some(stored) = load_run(&ctx.jobs, id).await? else {
        anyhow::bail!("run {id} does not exist");
    };
    let now = now_ms();
    let mut run = stored.value;
    if !claimable(&run, now, ctx.settings.run_lease) && run.owner.as_deref() != Some(&ctx.owner) {
        return Ok(false);
    }
    // A run that has started may have written rows: replaying them is safe only while the
    // entities keep its positions.
    let retention = ctx.pipeline.writer().batch_position_retention();
    if let Err(e) = positions_kept(&run, "taken over", retention, now) {
        tracing::error!(run = id, error = %e, "not executing the run");
        let version = stored.version;
        run.set_status(Status::Failed, now_ms(), Some(format!("{e:#}")));
        // Conditional on the version read: a run that moved meanwhile is left alone.
        ctx.jobs.put(RUN_PK, id, &run, version).await?;
        return Ok(false);
    }
    if let Some(previous) = run.owner.replace(ctx.owner.clone())
        && previous != ctx.owner
    {
        tracing::warn!(
            run = id,
            previous,
            "taking over a run whose owner went quiet; shards resume from their checkpoints"
        );
    }
    run.heartbeat_ms = now;
    Ok(ctx
        .jobs
        .put(RUN_PK, id, &run, stored.version)
        .await?
        .is_some())
}

/// Execute a claimed run to its end (or to shutdown). Returns the final record.
pub async fn execute(ctx: &BatchContext, id: &str) -> anyhow::Result<RunRecord> {
    // This run stops on shutdown and when another process took it over (our heartbeat
    // found a different owner): its shards save their checkpoints and stop.
    let (cancel, stop) = tokio::sync::watch::channel(false);
    let cancel = std::sync::Arc::new(cancel);
    let mut global = ctx.stop.clone();
    let forward = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let _ = global.wait_for(|s| *s).await;
            let _ = cancel.send(true);
        })
    };
    let run_ctx = BatchContext {
        stop,
        ..ctx.clone()
    };
    let heartbeat = tokio::spawn(heartbeat(run_ctx.clone(), id.to_owned(), cancel));
    let result = execute_inner(&run_ctx, id).await;
    heartbeat.abort();
    forward.abort();
    let (status, reason) = match &result {
        Ok(Outcome::Done) => (Some(Status::Succeeded), None),
        Ok(Outcome::Failed(reason)) => (Some(Status::Failed), Some(reason.clone())),
        Ok(Outcome::Blocked(reason)) => (Some(Status::Blocked), Some(reason.clone())),
        // Shutdown: release the run so the next process resumes it at once.
        Ok(Outcome::Interrupted) => (None, None),
        Err(e) => (Some(Status::Failed), Some(format!("{e:#}"))),
    };
    let owner = ctx.owner.clone();
    let run = update_run(&ctx.jobs, id, |r| {
        if r.owner.as_deref() != Some(&owner) {
            return;
        }
        match status {
            Some(s) => r.set_status(s, now_ms(), reason.clone()),
            None => {
                r.owner = None;
                r.set_status(
                    Status::Runnable,
                    now_ms(),
                    Some("interrupted by shutdown".into()),
                );
            }
        }
    })
    .await?;
    match run.status {
        Status::Succeeded => tracing::info!(run = id, "run succeeded"),
        s if s.is_terminal() => {
            tracing::error!(run = id, status = %s, reason = run.reason.as_deref().unwrap_or(""), "run did not succeed")
        }
        _ => tracing::info!(run = id, "run released at shutdown"),
    }
    Ok(run)
}

/// How an engine's work ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    Failed(String),
    Blocked(String),
    Interrupted,
}

async fn execute_inner(ctx: &BatchContext, id: &str) -> anyhow::Result<Outcome> {
    let run = load_run(&ctx.jobs, id)
        .await?
        .with_context(|| format!("run {id} does not exist"))?
        .value;
    if let Some(blocked) = wait_for_parents(ctx, &run).await? {
        return Ok(blocked);
    }
    let run = if run.shards == 0 {
        plan(ctx, &run).await?
    } else {
        run
    };
    match run.engine {
        Engine::Local => super::local::run(ctx, &run).await,
        Engine::AwsBatch => super::aws_batch::supervise(ctx, &run).await,
    }
}

/// Wait (PENDING) until every parent run succeeded. `Some(outcome)` if one failed or the
/// process is stopping.
async fn wait_for_parents(ctx: &BatchContext, run: &RunRecord) -> anyhow::Result<Option<Outcome>> {
    if run.parents.is_empty() {
        return Ok(None);
    }
    let mut stop = ctx.stop.clone();
    let mut marked = false;
    loop {
        let mut waiting = Vec::new();
        for p in &run.parents {
            let parent = load_run(&ctx.jobs, p)
                .await?
                .with_context(|| format!("parent run {p} does not exist"))?
                .value;
            // On AWS Batch a submitted parent is enough: its job is a `dependsOn` edge of
            // this run's job, and AWS Batch holds the child until the parent succeeds.
            let edge = run.engine == Engine::AwsBatch
                && parent.engine == Engine::AwsBatch
                && parent.aws_job_id.is_some();
            match parent.status {
                Status::Succeeded => {}
                _ if edge && !parent.status.is_terminal() => {}
                Status::Failed | Status::Blocked => {
                    return Ok(Some(Outcome::Blocked(format!(
                        "parent run {p} {}: {}",
                        parent.status,
                        parent.reason.as_deref().unwrap_or("no reason recorded")
                    ))));
                }
                _ => waiting.push(p.clone()),
            }
        }
        if waiting.is_empty() {
            return Ok(None);
        }
        if !marked {
            let note = format!("waiting for {}", waiting.join(", "));
            update_run(&ctx.jobs, &run.id, |r| {
                r.set_status(Status::Pending, now_ms(), Some(note.clone()))
            })
            .await?;
            marked = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.wait_for(|s| *s) => return Ok(Some(Outcome::Interrupted)),
        }
    }
}

/// List the source, cut it into shards, and store the shard records.
pub async fn plan(ctx: &BatchContext, run: &RunRecord) -> anyhow::Result<RunRecord> {
    let files = ctx.sources.list(&run.uris).await?;
    let mut all = Vec::new();
    for f in &files {
        all.extend(units(&ctx.sources, f, run.format).await?);
    }
    let def = ctx
        .specs
        .ingestions
        .get(&run.ingestion)
        .with_context(|| format!("ingestion {} is no longer in the specs", run.ingestion))?;
    let n = shard_count(&all, def.spec.parallelism, ctx.settings.shard_target());
    let rows_total = all.iter().map(|u| u.rows).sum::<Option<u64>>();
    let bytes_total = all.iter().map(|u| u.bytes).sum();
    let now = now_ms();
    for (i, units) in assign(all, n).into_iter().enumerate() {
        let shard = ShardRecord {
            run: run.id.clone(),
            index: i as u32,
            units,
            status: Status::Runnable,
            checkpoint: Checkpoint::default(),
            rows_failed: 0,
            errors: Vec::new(),
            starts: Vec::new(),
            attempts: 0,
            updated_ms: now,
            reason: None,
        };
        // Already there: planned by an earlier attempt of this run that stopped before
        // recording it. It must be the same plan, or rows would be read twice or never.
        if ctx
            .jobs
            .put(&shard_pk(&run.id), &shard_sk(i as u32), &shard, 0)
            .await?
            .is_none()
        {
            let existing = ctx
                .jobs
                .get::<ShardRecord>(&shard_pk(&run.id), &shard_sk(i as u32))
                .await?
                .context("shard record vanished")?;
            anyhow::ensure!(
                existing.value.units == shard.units,
                "run {}: the source changed since shard {i} was planned; start a new run",
                run.id
            );
        }
    }
    let planned = super::run::list_shards(&ctx.jobs, &run.id).await?.len();
    anyhow::ensure!(
        planned == n as usize,
        "run {}: an earlier attempt planned {planned} shards, now {n}: the source or the spec changed; start a new run",
        run.id
    );
    tracing::info!(run = %run.id, files = files.len(), shards = n, rows = ?rows_total, bytes = bytes_total, "run planned");
    update_run(&ctx.jobs, &run.id, |r| {
        r.shards = n;
        r.rows_total = rows_total;
        r.bytes_total = bytes_total;
    })
    .await
}

/// Keep the run's heartbeat fresh while this process owns it; cancel the execution when
/// another process has taken the run over.
async fn heartbeat(
    ctx: BatchContext,
    id: String,
    cancel: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
) {
    let every = (ctx.settings.run_lease / 3).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        let owner = ctx.owner.clone();
        let mut lost = false;
        match update_run(&ctx.jobs, &id, |r| {
            if r.owner.as_deref() == Some(&owner) {
                r.heartbeat_ms = now_ms();
            } else {
                lost = true;
            }
        })
        .await
        {
            Ok(_) if lost => {
                tracing::warn!(run = %id, "another process took this run over; stopping here");
                let _ = cancel.send(true);
                return;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(run = %id, error = %e, "cannot write the run heartbeat"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_is_claimable_when_unowned_or_its_owner_went_quiet() {
        let specs = SpecSet::default();
        assert!(
            new_run(
                &specs,
                &Request {
                    ingestion: "x".into(),
                    ..Default::default()
                },
                Trigger::Backfill,
                "r".into(),
                0,
                vec![]
            )
            .is_err()
        );
        let mut run = super::super::run::sample();
        let lease = Duration::from_secs(30);
        assert!(claimable(&run, 1_000, lease), "nobody owns it");
        run.owner = Some("a".into());
        run.heartbeat_ms = 1_000;
        assert!(!claimable(&run, 20_000, lease), "its owner is alive");
        assert!(claimable(&run, 40_000, lease), "its owner went quiet");
        run.status = Status::Succeeded;
        assert!(!claimable(&run, 40_000, lease), "finished");
    }
}
