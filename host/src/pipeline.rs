//! Processing a batch of events: route each event to its feature groups, run each group's
//! plugin over its share of the batch (one call per group), check the writes against the
//! group's spec, and apply them through the [`FeatureWriter`]. Sources (Kafka, files, HTTP,
//! backfills) all go through here, so stream and batch share one transform.

use crate::dispatch::Router;
use crate::event::Event;
use crate::feature::{Mutation, Write, check_write};
use crate::plugin::{EventFailure, Plugin};
use crate::sink::writer::{FeatureWriter, GroupSink, WriteReport};
use crate::spec::GroupDef;
use futures::future::join_all;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

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
    /// group's `retry.maxAttempts`. Returns the failures that remain (invalid ones at once).
    pub async fn process_with_retries(
        &self,
        events: &Arc<Vec<Event>>,
        pairs: &[(usize, usize)],
    ) -> (Vec<Failure>, BatchStats) {
        let (mut failures, mut stats) = self.process(events, pairs).await;
        let mut attempt = 1;
        loop {
            let (retry, done): (Vec<Failure>, Vec<Failure>) = failures.into_iter().partition(|f| {
                f.kind == FailureKind::Retryable
                    && attempt < self.groups[f.group].def.spec.retry.max_attempts
            });
            if retry.is_empty() {
                return (done, stats);
            }
            let backoff = retry
                .iter()
                .map(|f| self.groups[f.group].def.retry_backoff)
                .min()
                .unwrap_or(Duration::from_secs(1))
                .saturating_mul(1 << (attempt - 1).min(6));
            tracing::warn!(failed = retry.len(), attempt, backoff = ?backoff, first_reason = %retry[0].reason, "retrying failed events");
            tokio::time::sleep(backoff).await;
            let pairs: Vec<(usize, usize)> = retry.iter().map(|f| (f.event, f.group)).collect();
            let (again, more) = self.process(events, &pairs).await;
            stats.writes += more.writes;
            stats.replayed += more.replayed;
            stats.stale_skips += more.stale_skips;
            failures = done.into_iter().chain(again).collect();
            attempt += 1;
        }
    }

    async fn process_group(
        &self,
        events: &Arc<Vec<Event>>,
        g: usize,
        idx: Vec<usize>,
    ) -> (Vec<Failure>, Option<WriteReport>) {
        let group = &self.groups[g];
        let fail_all = |idx: &[usize], kind, reason: String| -> Vec<Failure> {
            idx.iter()
                .map(|&event| Failure {
                    event,
                    group: g,
                    kind,
                    reason: reason.clone(),
                })
                .collect()
        };
        let input: Arc<Vec<Event>> = if idx.len() == events.len() {
            events.clone()
        } else {
            Arc::new(idx.iter().map(|&i| events[i].clone()).collect())
        };
        let results = match group.plugin.process(input).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(group = %group.def.name, error = %e, "plugin call failed");
                return (fail_all(&idx, FailureKind::Retryable, e.to_string()), None);
            }
        };
        let mut failures = Vec::new();
        let mut mutations = Vec::new();
        let mut written_events = Vec::new();
        for (&i, result) in idx.iter().zip(results) {
            match result.map_err(|f| match f {
                EventFailure::Invalid(m) => (
                    FailureKind::Invalid,
                    format!("plugin rejected the event: {m}"),
                ),
                EventFailure::Retryable(m) => (
                    FailureKind::Retryable,
                    format!("plugin asked to retry: {m}"),
                ),
            }) {
                Ok(writes) => match to_mutations(&group.def, &events[i], writes) {
                    Ok(ms) if ms.is_empty() => {}
                    Ok(ms) => {
                        mutations.extend(ms);
                        written_events.push(i);
                    }
                    Err(reason) => failures.push(Failure {
                        event: i,
                        group: g,
                        kind: FailureKind::Invalid,
                        reason,
                    }),
                },
                Err((kind, reason)) => failures.push(Failure {
                    event: i,
                    group: g,
                    kind,
                    reason,
                }),
            }
        }
        if mutations.is_empty() {
            return (failures, None);
        }
        match self.writer.apply(&group.sink, mutations).await {
            Ok(report) => {
                if let Some(e) = &report.cache_error {
                    tracing::warn!(group = %group.def.name, error = %e, "cache update failed after the store write");
                }
                (failures, Some(report))
            }
            Err(e) => {
                tracing::warn!(group = %group.def.name, error = %e, "store write failed");
                failures.extend(fail_all(
                    &written_events,
                    FailureKind::Retryable,
                    format!("store write failed: {e}"),
                ));
                (failures, None)
            }
        }
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
