//! Running ready units: one batch per group through the pipeline, its failures handed off
//! under the transaction's gate, then its units finished.

use super::*;
use crate::event::EventIdx;

/// Spawn the processing of ready units: one batch per group, retried units one by one
/// (each waits for its due time).
pub(super) fn spawn_ready(shared: &Arc<Shared>, slot: &Arc<Slot>, ready: Vec<Unit>) {
    if ready.is_empty() {
        return;
    }
    let mut batches: BTreeMap<GroupId, Vec<(Option<LaneKey>, Unit)>> = BTreeMap::new();
    for u in ready {
        if !matches!(u.origin, Origin::Source { .. }) {
            let (shared, slot) = (shared.clone(), slot.clone());
            shared.runtime.clone().spawn(async move {
                if let Origin::Retry(r) = &u.origin {
                    let wait = r.due_ms.saturating_sub(now_ms());
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                    }
                }
                if slot.begin() {
                    run_batch(shared, slot, u.group, vec![u]).await;
                }
            });
        } else {
            batches.entry(u.group).or_default().push((u.lane(), u));
        }
    }
    // Several smaller batches instead of one: the partition keeps reading and processing
    // while a batch waits on the store.
    let cap = (shared.settings.limits.max_in_flight / 4).max(1);
    for (group, units) in batches {
        for batch in split_batches(units, cap) {
            if slot.begin() {
                shared
                    .runtime
                    .spawn(run_batch(shared.clone(), slot.clone(), group, batch));
            }
        }
    }
}

/// Process one group's batch of units of one partition, hand off its failures, then finish
/// the units and dispatch what became ready.
pub(super) async fn run_batch(
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    group: GroupId,
    units: Vec<Unit>,
) {
    let floor = {
        let st = slot.lock();
        if st.fenced {
            // Left to the next owner (or to this one after the rewind): writing now would
            // only race it.
            drop(st);
            return unfinished(&shared, &slot, units.len());
        }
        st.floor()
    };
    let mut events = Vec::with_capacity(units.len());
    let mut failures: Vec<Failure> = Vec::new();
    let mut routes = Vec::with_capacity(units.len());
    for (i, u) in units.iter().enumerate() {
        let i = EventIdx::new(i);
        let mut e = (*u.event).clone();
        if let (Some(p), Some(floor)) = (e.position.as_mut(), floor) {
            p.set_floor(&slot.source, slot.labels.partition, floor);
        }
        events.push(e);
        match &u.origin {
            Origin::Poison(reason) => failures.push(Failure {
                event: i,
                group,
                kind: FailureKind::Invalid,
                cause: Cause::Check,
                reason: reason.clone(),
            }),
            Origin::Source { .. } | Origin::Retry(_) => routes.push(Route { event: i, group }),
        }
    }
    let events = Arc::new(events);
    if !routes.is_empty() {
        let (f, stats) = shared
            .pipeline
            .process_with_retries(
                &events,
                &routes,
                InPlace::StoreOnly(shared.settings.store_attempts),
                false,
            )
            .await;
        failures.extend(f);
        tracing::trace!(
            group = %shared.pipeline.router().name(group),
            units = units.len(),
            writes = stats.writes,
            "batch done"
        );
    }
    if failures.is_empty() {
        finish(&shared, &slot, &units);
        slot.end();
        shared.wake.notify();
        return;
    }
    // Hand the failures off in the open transaction, and finish the batch's units before
    // a commit can come in between (the gate): every record committed belongs to a unit
    // whose offset the same commit finishes.
    let fenced = || slot.lock().fenced;
    let mut waiting: Vec<&Failure> = failures.iter().collect();
    let mut pending: Vec<Unit> = units.clone();
    loop {
        if fenced() {
            break; // Rewound or revoked: the units are redone from the last commit.
        }
        let Some(gate) = shared.txn.enter().await else {
            // Between transactions (one is being committed or aborted): wait for the next.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // Fencing happens under the exclusive gate: checked here, it holds until the units
        // are finished.
        if fenced() {
            break;
        }
        let mut wait = Duration::ZERO;
        let mut still = Vec::new();
        // Set before the gate opens again whenever a record may be in the transaction: an
        // abort must rewind this partition (its units are redone from the last commit).
        let in_txn = || slot.in_txn.store(true, AtomicOrdering::SeqCst);
        for f in waiting {
            let (unit, event) = (&units[f.event.index()], &events[f.event.index()]);
            match hand_off(&shared, unit, event, f, &fenced).await {
                HandOff::Done => {
                    in_txn();
                    slot.lock().handed_off(unit.offset, group);
                }
                HandOff::Wait(d) => {
                    wait = wait.max(d);
                    still.push(f);
                }
                outcome @ (HandOff::GaveUp | HandOff::Abort(_)) => {
                    // The gate is only open while the transaction is: this dooms it, and
                    // the abort rewinds this partition.
                    let reason = match outcome {
                        HandOff::Abort(reason) => reason,
                        _ => "a hand-off gave up".into(),
                    };
                    shared.txn.poison(reason);
                    in_txn();
                    return unfinished(&shared, &slot, units.len());
                }
            }
        }
        // Finish all but the units still waiting for the dead-letter topic.
        let (ready, rest): (Vec<Unit>, Vec<Unit>) = pending.into_iter().partition(|u| {
            !still
                .iter()
                .any(|f| units[f.event.index()].offset == u.offset)
        });
        if !finish(&shared, &slot, &ready) {
            drop(gate);
            return unfinished(&shared, &slot, rest.len());
        }
        drop(gate);
        if still.is_empty() {
            slot.end();
            shared.wake.notify();
            return;
        }
        (waiting, pending) = (still, rest);
        tokio::time::sleep(wait).await;
    }
    unfinished(&shared, &slot, pending.len());
}

/// Finish `units` (written or handed off) and dispatch what became ready; false (nothing
/// finished) if the partition was fenced.
pub(super) fn finish(shared: &Arc<Shared>, slot: &Arc<Slot>, units: &[Unit]) -> bool {
    let (ready, finished) = {
        let mut st = slot.lock();
        if st.fenced {
            return false;
        }
        let finished = st.complete(units);
        let ready = st.take_ready();
        shared
            .metrics
            .in_flight
            .get_or_create(&slot.labels)
            .set(st.in_flight() as i64);
        (ready, finished.len())
    };
    shared
        .metrics
        .finished
        .get_or_create(&slot.labels)
        .inc_by(finished as u64);
    // Dispatch what became ready before this batch stops counting as running: a revoke
    // draining the partition must not see it idle in between.
    spawn_ready(shared, slot, ready);
    true
}

/// A batch whose units do not finish here (fenced, or its transaction aborted): the next
/// owner, or this one after the rewind, redoes them.
pub(super) fn unfinished(shared: &Shared, slot: &Slot, units: usize) {
    shared
        .metrics
        .fenced
        .get_or_create(&slot.labels)
        .inc_by(units as u64);
    slot.end();
    shared.wake.notify();
}

/// Send a failed unit to its group's retry topic, or dead-letter it.
pub(super) async fn hand_off(
    shared: &Shared,
    unit: &Unit,
    event: &Event,
    failure: &Failure,
    fenced: &impl Fn() -> bool,
) -> HandOff {
    let runtime = shared.pipeline.runtime(unit.group);
    let def = &runtime.def;
    let now = now_ms();
    let (before, first_failure_ms) = match &unit.origin {
        Origin::Retry(r) => (r.attempts, r.first_failure_ms),
        _ => (0, now),
    };
    let attempts = before.saturating_add(1);
    let step = RetryPolicy::of(def).next_step(failure.kind, failure.cause, attempts, now);
    let mut env = Envelope {
        group: def.name.clone(),
        kind: failure.kind,
        error: failure.reason.clone(),
        attempts,
        first_failure_ms,
        due_ms: None,
    };
    let first = match step {
        NextStep::Retry { due_ms } => {
            env.due_ms = Some(due_ms);
            tracing::info!(group = %def.name, topic = %event.topic, partition = event.partition, offset = event.offset,
                attempts, reason = %failure.reason, "event handed to the retry topic");
            Destination::Retry
        }
        NextStep::DeadLetter => {
            if failure.kind == FailureKind::Retryable {
                env.error = format!("gave up after {attempts} attempts: {}", failure.reason);
            }
            tracing::warn!(group = %def.name, topic = %event.topic, partition = event.partition, offset = event.offset,
                kind = failure.kind.as_str(), reason = %env.error, "event dead-lettered");
            Destination::DeadLetter
        }
    };
    super::super::handoff::hand_off(
        &shared.txn.republisher(),
        &shared.txn.refusals,
        &shared.metrics,
        def,
        event,
        env,
        first,
        fenced,
    )
    .await
}
