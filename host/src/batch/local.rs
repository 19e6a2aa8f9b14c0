//! The `local` engine: a run's shards on this process's bounded worker pool. A shard that
//! fails is started again from its checkpoint, up to `FH_BATCH_SHARD_ATTEMPTS` times.

use super::BatchContext;
use super::executor::Outcome;
use super::run::{RunRecord, Status, now_ms, update_run};
use super::shard::{ShardError, run_shard};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub async fn run(ctx: &BatchContext, run: &RunRecord) -> anyhow::Result<Outcome> {
    update_run(&ctx.jobs, &run.id, |r| {
        if r.status != Status::Running {
            r.set_status(
                Status::Runnable,
                now_ms(),
                Some("waiting for a worker".into()),
            );
        }
    })
    .await?;
    let started = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..run.shards {
        let (ctx, run, started) = (ctx.clone(), run.clone(), started.clone());
        tasks.spawn(async move {
            let result = shard_with_retries(&ctx, &run, index, &started).await;
            (index, result)
        });
    }
    let mut failed = Vec::new();
    let mut interrupted = false;
    while let Some(joined) = tasks.join_next().await {
        let (index, result) = joined?;
        match result {
            Ok(()) => {}
            Err(ShardError::Interrupted(_)) => interrupted = true,
            Err(ShardError::Fenced(_)) => {
                // Another process took the run over; it reports the outcome.
                tasks.abort_all();
                return Ok(Outcome::Interrupted);
            }
            Err(ShardError::Failed(e)) => failed.push(format!("shard {index}: {e:#}")),
        }
    }
    Ok(if !failed.is_empty() {
        Outcome::Failed(failed.join("; "))
    } else if interrupted {
        Outcome::Interrupted
    } else {
        Outcome::Done
    })
}

async fn shard_with_retries(
    ctx: &BatchContext,
    run: &RunRecord,
    index: u32,
    started: &AtomicBool,
) -> Result<(), ShardError> {
    let mut stop = ctx.stop.clone();
    let _permit = tokio::select! {
        p = ctx.workers.clone().acquire_owned() => p.expect("the worker pool is never closed"),
        _ = stop.wait_for(|s| *s) => return Err(ShardError::Interrupted(index)),
    };
    if !started.swap(true, Ordering::SeqCst) {
        update_run(&ctx.jobs, &run.id, |r| {
            r.set_status(Status::Running, now_ms(), None)
        })
        .await?;
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let span = tracing::info_span!("backfill_shard", run = %run.id, shard = index, attempt);
        match tracing::Instrument::instrument(run_shard(ctx, run, index), span).await {
            Ok(_) => return Ok(()),
            Err(ShardError::Failed(e)) if attempt < ctx.settings.shard_attempts => {
                let wait = Duration::from_millis(500 * (1 << attempt.min(6)));
                tracing::warn!(run = %run.id, shard = index, attempt, error = %format!("{e:#}"), retry_in = ?wait, "shard failed; restarting from its checkpoint");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return Err(ShardError::Interrupted(index)),
                }
            }
            Err(e) => return Err(e),
        }
    }
}
