//! Running one shard: read its units from the checkpoint on, turn records into events, run
//! them through the group's pipeline (the stream's plugin and writer), and move the
//! checkpoint forward.
//!
//! Exactly-once effect: row `n` of shard `s` carries the position `(batch:<run>, s, n)` with
//! the batch's first row as floor, and a shard runs its batches in order, so a resumed shard's
//! rows between the checkpoint and the crash are recognised as applied by each entity's
//! watermark and skipped, and a row retried within its batch is not. A re-run of the
//! same run id changes nothing; a new run of the same source is new data.

use super::BatchContext;
use super::format::{Record, decode_unit};
use super::run::{Checkpoint, RunRecord, ShardRecord, Status, Trigger, now_ms, shard_pk, shard_sk};
use crate::dispatch::Route;
use crate::event::{Event, EventIdx};
use crate::feature::Position;
use crate::retry::{Cause, Failure, FailureKind, InPlace};
use crate::stream::dead_letter::to_json_line;
use crate::stream::envelope::truncate;
use anyhow::Context as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a running shard saves its checkpoint (and at its end).
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Dead-letter reasons kept on the shard record.
const KEEP_ERRORS: usize = 10;
/// The longest reason kept there: `GET /v1/jobs/{run}` shows them to any admin caller, and a
/// plugin's reason may quote its record.
const KEEP_ERROR_BYTES: usize = 256;

/// Why a shard stopped without finishing.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Another process wrote the shard record: it owns the shard now; stop quietly.
    #[error("shard {0} was taken over by another process")]
    Fenced(u32),
    /// Shutdown: the checkpoint is saved; a later start resumes from it.
    #[error("shard {0} stopped for shutdown at its checkpoint")]
    Interrupted(u32),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

enum Piece {
    Rows {
        unit: u32,
        /// Row of the unit the first record is.
        first: u64,
        records: Vec<Record>,
    },
    UnitDone(u32),
}

/// Run shard `index` of `run` to its end. Returns the final record.
pub async fn run_shard(
    ctx: &BatchContext,
    run: &RunRecord,
    index: u32,
) -> Result<ShardRecord, ShardError> {
    let (pk, sk) = (shard_pk(&run.id), shard_sk(index));
    let stored = ctx
        .jobs
        .get::<ShardRecord>(&pk, &sk)
        .await?
        .with_context(|| format!("run {} has no shard {index}", run.id))?;
    let (mut version, mut shard) = (stored.version, stored.value);
    if shard.status == Status::Succeeded {
        return Ok(shard);
    }
    let g = ctx.pipeline.group_id(&run.group).with_context(|| {
        format!(
            "feature group {:?} of ingestion {:?} is not loaded",
            run.group, run.ingestion
        )
    })?;
    shard.status = Status::Running;
    shard.attempts += 1;
    shard.starts.push(shard.checkpoint.rows_done);
    shard.reason = None;
    shard.updated_ms = now_ms();
    version = save(ctx, &pk, &sk, &shard, version, index).await?;
    tracing::info!(run = %run.id, shard = index, from_row = shard.checkpoint.rows_done, "shard started");

    let (tx, mut rx) = tokio::sync::mpsc::channel::<anyhow::Result<Piece>>(4);
    let reader = tokio::spawn(read_units(
        ctx.sources.clone(),
        run.format,
        shard.units.clone(),
        shard.checkpoint,
        ctx.settings.rows_per_batch.max(1),
        tx,
    ));
    let group_name = run.group.clone();
    let source = run.position_source();
    let topic = format!("batch/{}", run.ingestion);
    let timestamp_ms = match run.trigger {
        Trigger::Schedule { tick_ms } => tick_ms,
        Trigger::Backfill => run.created_ms,
    };
    let labels = crate::metrics::IngestionLabels::new(&run.ingestion);
    let mut saved_at = Instant::now();
    let result: Result<(), ShardError> = async {
        while let Some(piece) = rx.recv().await {
            if *ctx.stop.borrow() {
                return Err(ShardError::Interrupted(index));
            }
            let (unit, first, records) = match piece? {
                Piece::UnitDone(unit) => {
                    shard.checkpoint.unit = unit + 1;
                    shard.checkpoint.row = 0;
                    continue;
                }
                Piece::Rows {
                    unit,
                    first,
                    records,
                } => (unit, first, records),
            };
            let n = records.len() as u64;
            ctx.limit.acquire(n).await;
            let base = shard.checkpoint.rows_done;
            let uri = &shard.units[unit as usize].uri;
            let mut undecodable = Vec::new();
            let mut routes = Vec::with_capacity(records.len());
            let events: Vec<Event> = records
                .into_iter()
                .enumerate()
                .map(|(i, r)| {
                    let offset = (base + i as u64) as i64;
                    let payload = match r {
                        Ok(p) => {
                            routes.push(Route {
                                event: EventIdx::new(i),
                                group: g,
                            });
                            p
                        }
                        Err(reason) => {
                            undecodable.push((i, reason));
                            Vec::new()
                        }
                    };
                    Event {
                        topic: topic.clone(),
                        partition: index as i32,
                        offset,
                        key: None,
                        timestamp_ms,
                        headers: vec![("fh-source".into(), uri.as_bytes().to_vec())],
                        payload,
                        position: Some(row_position(&source, index, base, offset)),
                    }
                })
                .collect();
            let events = Arc::new(events);
            let mut failures = process(ctx, &events, &routes, run.overwrite).await?;
            failures.extend(undecodable.into_iter().map(|(i, reason)| Failure {
                event: EventIdx::new(i),
                group: g,
                kind: FailureKind::Invalid,
                cause: Cause::Check,
                reason: format!("undecodable record: {reason}"),
            }));
            if let Some(f) = failures.iter().find(|f| f.kind == FailureKind::Retryable) {
                return Err(ShardError::Failed(anyhow::anyhow!(
                    "row {} ({}): {}",
                    base + f.event.index() as u64,
                    uri,
                    f.reason
                )));
            }
            if !failures.is_empty() {
                let lines: Vec<String> = failures
                    .iter()
                    .map(|f| to_json_line(&events[f.event.index()], &group_name, f))
                    .collect();
                ctx.dead_letters.append(lines).await?;
                shard.rows_failed += failures.len() as u64;
                for f in failures
                    .iter()
                    .take(KEEP_ERRORS.saturating_sub(shard.errors.len()))
                {
                    shard.errors.push(format!(
                        "row {}: {}",
                        base + f.event.index() as u64,
                        truncate(&f.reason, KEEP_ERROR_BYTES)
                    ));
                }
                ctx.progress.failed(failures.len() as u64);
                ctx.pipeline
                    .metrics()
                    .batch_dead_letters
                    .get_or_create(&labels)
                    .inc_by(failures.len() as u64);
            }
            shard.checkpoint = Checkpoint {
                unit,
                row: first + n,
                rows_done: base + n,
            };
            ctx.progress.rows(n);
            ctx.pipeline
                .metrics()
                .batch_rows
                .get_or_create(&labels)
                .inc_by(n);
            if saved_at.elapsed() >= CHECKPOINT_EVERY {
                shard.updated_ms = now_ms();
                version = save(ctx, &pk, &sk, &shard, version, index).await?;
                saved_at = Instant::now();
            }
        }
        Ok(())
    }
    .await;
    reader.abort();
    shard.updated_ms = now_ms();
    match result {
        Ok(()) => {
            shard.status = Status::Succeeded;
            save(ctx, &pk, &sk, &shard, version, index).await?;
            tracing::info!(run = %run.id, shard = index, rows = shard.checkpoint.rows_done, failed = shard.rows_failed, "shard finished");
            Ok(shard)
        }
        Err(ShardError::Fenced(i)) => Err(ShardError::Fenced(i)),
        Err(e) => {
            // Keep the progress made: the next start resumes here.
            shard.status = match e {
                ShardError::Interrupted(_) => Status::Runnable,
                _ => Status::Failed,
            };
            shard.reason = Some(format!("{e:#}"));
            save(ctx, &pk, &sk, &shard, version, index).await?;
            Err(e)
        }
    }
}

/// The position of row `offset` of a shard in the batch starting at row `base`. The floor is
/// the batch's first row: everything before it is finished, while rows of this batch may
/// still be retried after later ones succeeded (in-place retries), so no floor may cover them.
fn row_position(source: &str, shard: u32, base: u64, offset: i64) -> Position {
    Position {
        floor: base as i64,
        ..Position::sequential(source, shard as i32, offset)
    }
}

async fn save(
    ctx: &BatchContext,
    pk: &str,
    sk: &str,
    shard: &ShardRecord,
    version: u64,
    index: u32,
) -> Result<u64, ShardError> {
    // Job state unreachable: wait for it (the checkpoint must land before more rows count
    // as done); a lost compare-and-swap means another process owns the shard.
    let mut wait = Duration::from_millis(200);
    loop {
        match ctx.jobs.put(pk, sk, shard, version).await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => return Err(ShardError::Fenced(index)),
            Err(e) if wait < Duration::from_secs(60) && !*ctx.stop.borrow() => {
                tracing::warn!(shard = index, error = %format!("{e:#}"), retry_in = ?wait, "cannot save the shard checkpoint; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            Err(e) => return Err(ShardError::Failed(e)),
        }
    }
}

/// Process a batch. Store failures are retried until the store answers (an outage pauses
/// the shard; it never drops or dead-letters rows); other failures are returned.
async fn process(
    ctx: &BatchContext,
    events: &Arc<Vec<Event>>,
    routes: &[Route],
    overwrite: bool,
) -> Result<Vec<Failure>, ShardError> {
    if routes.is_empty() {
        return Ok(Vec::new());
    }
    let (mut failures, _) = ctx
        .pipeline
        .process_with_retries(events, routes, InPlace::All, overwrite)
        .await;
    let mut wait = Duration::from_secs(1);
    loop {
        let (outage, rest): (Vec<Failure>, Vec<Failure>) =
            failures.into_iter().partition(Failure::is_outage);
        if outage.is_empty() {
            return Ok(rest);
        }
        if *ctx.stop.borrow() {
            return Err(ShardError::Interrupted(events[0].partition as u32));
        }
        tracing::warn!(rows = outage.len(), reason = %outage[0].reason, retry_in = ?wait, "store unavailable: backfill shard waiting");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
        let routes: Vec<Route> = outage.iter().map(Failure::route).collect();
        let (again, _) = ctx
            .pipeline
            .process_with_retries(events, &routes, InPlace::All, overwrite)
            .await;
        failures = rest.into_iter().chain(again).collect();
    }
}

/// Read units from `from` on and pass their records along; a unit's file is fetched once
/// even when several of its row groups are in the shard.
async fn read_units(
    sources: super::source::Sources,
    format: crate::spec::BatchFormat,
    units: Vec<super::plan::Unit>,
    from: Checkpoint,
    batch: usize,
    tx: tokio::sync::mpsc::Sender<anyhow::Result<Piece>>,
) {
    let mut cached: Option<(String, bytes::Bytes)> = None;
    for (i, unit) in units.into_iter().enumerate().skip(from.unit as usize) {
        let i = i as u32;
        let skip = if i == from.unit { from.row } else { 0 };
        if unit.rows.is_some_and(|r| skip >= r) {
            if tx.send(Ok(Piece::UnitDone(i))).await.is_err() {
                return;
            }
            continue;
        }
        let bytes = match &cached {
            Some((uri, b)) if *uri == unit.uri => b.clone(),
            _ => match sources.read(&unit.uri).await {
                Ok(b) => {
                    cached = Some((unit.uri.clone(), b.clone()));
                    b
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            },
        };
        let txb = tx.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let mut first = skip;
            decode_unit(bytes, &unit, format, skip, batch, |records| {
                let n = records.len() as u64;
                let sent = txb
                    .blocking_send(Ok(Piece::Rows {
                        unit: i,
                        first,
                        records,
                    }))
                    .is_ok();
                first += n;
                sent
            })
        })
        .await;
        let failed = match decoded {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(e) => Some(anyhow::anyhow!("reader task failed: {e}")),
        };
        if let Some(e) = failed {
            let _ = tx.send(Err(e)).await;
            return;
        }
        if tx.send(Ok(Piece::UnitDone(i))).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::{EntityState, Mutation, Op, Value};

    fn incr(pos: Position) -> Mutation {
        Mutation {
            position: Some(pos),
            ops: vec![("n".into(), Op::Incr(Value::Int(1)), 1)],
            overwrite: false,
        }
    }

    #[test]
    fn a_row_retried_after_a_later_row_of_its_batch_still_applies() {
        let mut e = EntityState::default();
        // Batch from row 100: row 107 lands first, row 105 comes back from an in-place retry.
        assert!(
            !e.apply(&incr(row_position("batch:r", 0, 100, 107)))
                .replayed
        );
        assert!(
            !e.apply(&incr(row_position("batch:r", 0, 100, 105)))
                .replayed
        );
        // A resume from the checkpoint (row 100) replays both: no-ops.
        assert!(
            e.apply(&incr(row_position("batch:r", 0, 100, 105)))
                .replayed
        );
        assert!(
            e.apply(&incr(row_position("batch:r", 0, 100, 107)))
                .replayed
        );
        // The next batch raises the floor and trims the list.
        assert!(
            !e.apply(&incr(row_position("batch:r", 0, 200, 201)))
                .replayed
        );
        assert!(
            e.apply(&incr(row_position("batch:r", 0, 200, 150)))
                .replayed
        );
        let wm = &e.positions["batch:r#0"];
        assert_eq!((wm.floor, wm.applied.clone()), (200, vec![201]));
        assert_eq!(
            e.values().find(|(n, _)| *n == "n").map(|(_, v)| v.clone()),
            Some(Value::Int(3))
        );
    }
}
