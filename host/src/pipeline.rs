//! Processing a batch of events: route each event to its feature groups, run each group's
//! plugin over its share of the batch (one call per group), check the writes against the
//! group's spec, and apply them through the [`FeatureWriter`]. Sources (Kafka, files, HTTP,
//! backfills) all go through here, so stream and batch share one transform.

use crate::dispatch::Router;
use crate::event::Event;
use crate::feature::{Mutation, Write, check_write};
use crate::plugin::{EventFailure, Plugin};
use crate::sink::SinkError;
use crate::sink::writer::{FeatureWriter, GroupSink, WriteReport};
use crate::spec::GroupDef;
use futures::future::join_all;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

/// A feature group ready to process: its spec, plugin and sink settings.
#[derive(Clone)]
pub struct GroupRuntime {
    pub def: GroupDef,
    pub plugin: Plugin,
    pub sink: GroupSink,
}

/// Why an event failed for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Cannot succeed: dead-letter at once.
    Invalid,
    /// Transient: retry.
    Retryable,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Invalid => "invalid",
            FailureKind::Retryable => "retryable",
        }
    }
}

/// One event that failed for one group.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub event: usize,
    pub group: usize,
    pub kind: FailureKind,
    pub reason: String,
    /// Not tried: an earlier event of its partition failed and will be retried first.
    pub held_back: bool,
}

/// Totals of one batch.
#[derive(Debug, Clone, Default)]
pub struct BatchStats {
    /// (event, group) pairs processed.
    pub routed: usize,
    pub writes: usize,
    pub replayed: usize,
    pub stale_skips: u32,
}

pub struct Pipeline {
    groups: Vec<GroupRuntime>,
    router: Router,
    writer: FeatureWriter,
}

impl Pipeline {
    /// `groups` must be in the router's group order (both come from one `SpecSet`).
    pub fn new(groups: Vec<GroupRuntime>, router: Router, writer: FeatureWriter) -> Pipeline {
        debug_assert!(
            groups
                .iter()
                .map(|g| &g.def.name)
                .eq(router.groups().iter())
        );
        Pipeline {
            groups,
            router,
            writer,
        }
    }

    pub fn groups(&self) -> &[GroupRuntime] {
        &self.groups
    }

    pub fn group(&self, name: &str) -> Option<&GroupRuntime> {
        self.groups.iter().find(|g| g.def.name == name)
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn writer(&self) -> &FeatureWriter {
        &self.writer
    }

    /// The (event, group) pairs of a batch.
    pub fn route(&self, events: &[Event]) -> Vec<(usize, usize)> {
        events
            .iter()
            .enumerate()
            .flat_map(|(i, e)| self.router.route(e).into_iter().map(move |g| (i, g)))
            .collect()
    }

    /// Process the given (event, group) pairs; return the failures.
    pub async fn process(
        &self,
        events: &Arc<Vec<Event>>,
        pairs: &[(usize, usize)],
    ) -> (Vec<Failure>, BatchStats) {
        let mut per_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(e, g) in pairs {
            per_group.entry(g).or_default().push(e);
        }
        let runs = per_group
            .into_iter()
            .map(|(g, idx)| self.process_group(events, g, idx));
        let mut failures = Vec::new();
        let mut stats = BatchStats {
            routed: pairs.len(),
            ..Default::default()
        };
        for (f, report) in join_all(runs).await {
            failures.extend(f);
            if let Some(r) = report {
                stats.writes += r.outcome.applied_ops as usize;
                stats.replayed += r.replayed;
                stats.stale_skips += r.outcome.stale_skips;
            }
        }
        (failures, stats)
    }

    /// Process, retrying retryable failures in place with a growing backoff, up to each
    /// group's `retry.maxAttempts` per event. Returns the failures that remain (invalid ones
    /// at once). Events held back behind a failed one do not use up attempts.
    pub async fn process_with_retries(
        &self,
        events: &Arc<Vec<Event>>,
        pairs: &[(usize, usize)],
    ) -> (Vec<Failure>, BatchStats) {
        let (mut failures, mut stats) = self.process(events, pairs).await;
        let mut attempts: HashMap<(usize, usize), u32> = HashMap::new();
        loop {
            for f in failures.iter().filter(|f| !f.held_back) {
                *attempts.entry((f.event, f.group)).or_insert(0) += 1;
            }
            let max = |f: &Failure| self.groups[f.group].def.spec.retry.max_attempts;
            let (retry, done): (Vec<Failure>, Vec<Failure>) = failures.into_iter().partition(|f| {
                f.held_back
                    || (f.kind == FailureKind::Retryable && attempts[&(f.event, f.group)] < max(f))
            });
            if retry.is_empty() {
                return (done, stats);
            }
            let backoff = retry
                .iter()
                .filter(|f| !f.held_back)
                .map(|f| {
                    let n = attempts[&(f.event, f.group)];
                    self.groups[f.group]
                        .def
                        .retry_backoff
                        .saturating_mul(1 << (n - 1).min(6))
                })
                .min();
            if let Some(backoff) = backoff {
                tracing::warn!(failed = retry.len(), backoff = ?backoff, first_reason = %retry[0].reason, "retrying failed events");
                tokio::time::sleep(backoff).await;
            }
            let pairs: Vec<(usize, usize)> = retry.iter().map(|f| (f.event, f.group)).collect();
            let (again, more) = self.process(events, &pairs).await;
            stats.writes += more.writes;
            stats.replayed += more.replayed;
            stats.stale_skips += more.stale_skips;
            failures = done.into_iter().chain(again).collect();
        }
    }

    /// One group's share of a batch. `idx` is sorted, so each partition's events are in
    /// offset order — the per-entity high-water positions rely on it.
    async fn process_group(
        &self,
        events: &Arc<Vec<Event>>,
        g: usize,
        mut idx: Vec<usize>,
    ) -> (Vec<Failure>, Option<WriteReport>) {
        idx.sort_unstable();
        idx.dedup();
        let group = &self.groups[g];
        let failure = |event, kind, reason: String| Failure {
            event,
            group: g,
            kind,
            reason,
            held_back: false,
        };
        let input: Arc<Vec<Event>> = if idx.len() == events.len() {
            events.clone() // idx is exactly 0..n
        } else {
            Arc::new(idx.iter().map(|&i| events[i].clone()).collect())
        };
        let results = match group.plugin.process(input).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(group = %group.def.name, error = %e, "plugin call failed");
                return (
                    idx.iter()
                        .map(|&i| failure(i, FailureKind::Retryable, e.to_string()))
                        .collect(),
                    None,
                );
            }
        };
        let mut failures = Vec::new();
        let mut mutations = Vec::new();
        // Which events wrote each entity (store key), to map entity failures back to events.
        let mut writers: HashMap<String, Vec<usize>> = HashMap::new();
        // A later event of a partition must not be applied before an earlier one that will be
        // retried: the entity's high-water offset would then turn the retry into a "replay".
        // Which entities a failed event would touch is unknown, so hold back the partition.
        let mut blocked: HashSet<(String, i32)> = HashSet::new();
        for (&i, result) in idx.iter().zip(results) {
            let event = &events[i];
            let partition = (
                event
                    .position()
                    .map_or_else(|| event.topic.clone(), |p| p.source),
                event.partition,
            );
            if blocked.contains(&partition) {
                failures.push(Failure {
                    held_back: true,
                    ..failure(
                        i,
                        FailureKind::Retryable,
                        "held back behind an earlier failed event of its partition".into(),
                    )
                });
                continue;
            }
            match result {
                Ok(writes) => match to_mutations(&group.def, event, writes) {
                    Ok(ms) => {
                        for (entity, m) in ms {
                            writers
                                .entry(group.sink.target.key(&entity))
                                .or_default()
                                .push(i);
                            mutations.push((entity, m));
                        }
                    }
                    Err(reason) => failures.push(failure(i, FailureKind::Invalid, reason)),
                },
                Err(EventFailure::Invalid(m)) => failures.push(failure(
                    i,
                    FailureKind::Invalid,
                    format!("plugin rejected the event: {m}"),
                )),
                Err(EventFailure::Retryable(m)) => {
                    blocked.insert(partition);
                    failures.push(failure(
                        i,
                        FailureKind::Retryable,
                        format!("plugin asked to retry: {m}"),
                    ));
                }
            }
        }
        if mutations.is_empty() {
            return (failures, None);
        }
        let report = self.writer.apply(&group.sink, mutations).await;
        if let Some(e) = &report.cache_error {
            tracing::warn!(group = %group.def.name, error = %e, "cache update failed after the store write");
        }
        // An event fails if any entity it wrote failed; its other entities did apply, and a
        // retry finds them already applied (their positions), so nothing counts twice.
        let mut failed_events: BTreeMap<usize, (FailureKind, String)> = BTreeMap::new();
        for (key, e) in &report.failed {
            tracing::warn!(group = %group.def.name, entity = %key, error = %e, "store write failed");
            let kind = match e {
                SinkError::Rejected { .. } => FailureKind::Invalid,
                _ => FailureKind::Retryable,
            };
            for &i in writers.get(key).into_iter().flatten() {
                let slot = failed_events
                    .entry(i)
                    .or_insert((kind, format!("store write failed: {e}")));
                if kind == FailureKind::Invalid {
                    *slot = (kind, format!("store write failed: {e}"));
                }
            }
        }
        failures.extend(
            failed_events
                .into_iter()
                .map(|(i, (kind, reason))| failure(i, kind, reason)),
        );
        (failures, Some(report))
    }
}

/// Check an event's writes and turn them into one mutation per entity. Any bad write
/// rejects the whole event, so an event is applied entirely or not at all.
fn to_mutations(
    def: &GroupDef,
    event: &Event,
    writes: Vec<Write>,
) -> Result<Vec<(String, Mutation)>, String> {
    let mut by_entity: BTreeMap<String, Mutation> = BTreeMap::new();
    for w in writes {
        let w =
            check_write(&def.spec, w).map_err(|e| format!("plugin produced a bad write: {e}"))?;
        by_entity
            .entry(w.entity)
            .or_insert_with(|| Mutation {
                position: event.position(),
                ops: Vec::new(),
                overwrite: false,
            })
            .ops
            .push((w.feature, w.op, w.event_time_ms));
    }
    Ok(by_entity.into_iter().collect())
}
