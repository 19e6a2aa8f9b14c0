//! Processing a batch of events: route each event to its feature groups, run each group's
//! plugin over its share of the batch (one call per group), check the writes against the
//! group's spec, and apply them through the [`FeatureWriter`]. Sources (Kafka, files, HTTP,
//! backfills) all go through here, so stream and batch share one transform.

use crate::dispatch::Router;
use crate::event::Event;
use crate::feature::{Mutation, Write, check_write};
use crate::metrics::{GroupLabels, Metrics, VersionLabels};
use crate::plugin::{EventFailure, Plugin};
use crate::retry::{Cause, Failure, FailureKind, InPlace, RetryPolicy};
use crate::sink::SinkError;
use crate::sink::writer::{FeatureWriter, GroupSink, WriteReport};
use crate::spec::GroupDef;
use arc_swap::ArcSwap;
use futures::future::join_all;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Writes one event may produce: each becomes a store operation, and an event is applied
/// entirely or not at all, so one event must stay one bounded store transaction.
pub const MAX_WRITES_PER_EVENT: usize = 10_000;

/// A feature group ready to process: its spec, plugin and sink settings. Hot reload
/// replaces a group's runtime as a whole; a batch uses the runtime it started with.
#[derive(Clone)]
pub struct GroupRuntime {
    pub def: GroupDef,
    pub plugin: Plugin,
    pub sink: GroupSink,
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
    /// Indexed like the router's groups. Swapped atomically by hot reload: a batch loads
    /// its group's runtime once, so it runs entirely on one version, and a swap takes
    /// effect at the next batch.
    groups: Vec<ArcSwap<GroupRuntime>>,
    router: Router,
    writer: FeatureWriter,
    metrics: Arc<Metrics>,
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
        let metrics = Metrics::new();
        writer.repairs().attach_metrics(metrics.clone());
        for g in &groups {
            metrics
                .plugin_version
                .get_or_create(&VersionLabels {
                    group: g.def.name.clone(),
                    version: g.plugin.version().into(),
                })
                .set(1);
        }
        Pipeline {
            groups: groups.into_iter().map(ArcSwap::from_pointee).collect(),
            router,
            writer,
            metrics,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Number of groups (indices `0..n` as the router returns them).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The runtime serving group `g` now.
    pub fn runtime(&self, g: usize) -> Arc<GroupRuntime> {
        self.groups[g].load_full()
    }

    /// A snapshot of every group's runtime.
    pub fn runtimes(&self) -> Vec<Arc<GroupRuntime>> {
        self.groups.iter().map(|g| g.load_full()).collect()
    }

    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.router.groups().iter().position(|n| n == name)
    }

    pub fn group(&self, name: &str) -> Option<Arc<GroupRuntime>> {
        self.group_index(name).map(|g| self.runtime(g))
    }

    /// Serve group `g` with `new` from its next batch on; batches already running finish
    /// on the old runtime, which is returned. Only the hot reloader calls this, after
    /// checking that `new` keeps the group's name, sources and ordering.
    pub fn replace(&self, g: usize, new: Arc<GroupRuntime>) -> Arc<GroupRuntime> {
        let old = self.groups[g].swap(new.clone());
        if old.plugin.version() != new.plugin.version() {
            self.metrics.plugin_version.remove(&VersionLabels {
                group: old.def.name.clone(),
                version: old.plugin.version().into(),
            });
        }
        self.metrics
            .plugin_version
            .get_or_create(&VersionLabels {
                group: new.def.name.clone(),
                version: new.plugin.version().into(),
            })
            .set(1);
        old
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
    /// `overwrite` lets the writes replace newer values (a backfill's explicit override).
    pub async fn process(
        &self,
        events: &Arc<Vec<Event>>,
        pairs: &[(usize, usize)],
        overwrite: bool,
    ) -> (Vec<Failure>, BatchStats) {
        let mut per_group: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &(e, g) in pairs {
            per_group.entry(g).or_default().push(e);
        }
        let runs = per_group.into_iter().map(|(g, idx)| {
            let span = tracing::info_span!(
                "process_group",
                group = %self.router.groups()[g],
                events = idx.len()
            );
            tracing::Instrument::instrument(self.process_group(events, g, idx, overwrite), span)
        });
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

    /// Process, retrying retryable failures in place (see [`InPlace`]) with a growing
    /// backoff. Returns the failures that remain (invalid ones at once).
    pub async fn process_with_retries(
        &self,
        events: &Arc<Vec<Event>>,
        pairs: &[(usize, usize)],
        in_place: InPlace,
        overwrite: bool,
    ) -> (Vec<Failure>, BatchStats) {
        let (mut failures, mut stats) = self.process(events, pairs, overwrite).await;
        let mut attempts: HashMap<(usize, usize), u32> = HashMap::new();
        loop {
            let mut retry = Vec::new();
            let mut done = Vec::new();
            let mut wait: Option<std::time::Duration> = None;
            for f in failures {
                let n = attempts.entry((f.event, f.group)).or_insert(0);
                *n += 1;
                let policy = RetryPolicy::of(&self.runtime(f.group).def);
                match policy.in_place(&f, *n, in_place) {
                    Some(w) => {
                        wait = Some(wait.map_or(w, |x| x.min(w)));
                        retry.push(f);
                    }
                    None => done.push(f),
                }
            }
            let Some(wait) = wait else {
                return (done, stats);
            };
            // Jitter: batches that failed together (a throttled table) retry apart.
            let backoff = wait.mul_f64(rand::random_range(0.5..1.0));
            tracing::warn!(failed = retry.len(), backoff = ?backoff, first_reason = %retry[0].reason, "retrying failed events in place");
            tokio::time::sleep(backoff).await;
            let pairs: Vec<(usize, usize)> = retry.iter().map(|f| (f.event, f.group)).collect();
            let (again, more) = self.process(events, &pairs, overwrite).await;
            stats.writes += more.writes;
            stats.replayed += more.replayed;
            stats.stale_skips += more.stale_skips;
            failures = done.into_iter().chain(again).collect();
        }
    }

    /// One group's share of a batch. `idx` is sorted so that the writer merges each entity's
    /// mutations in offset order.
    async fn process_group(
        &self,
        events: &Arc<Vec<Event>>,
        g: usize,
        mut idx: Vec<usize>,
        overwrite: bool,
    ) -> (Vec<Failure>, Option<WriteReport>) {
        idx.sort_unstable();
        idx.dedup();
        // Loaded once: the whole batch runs on one version of the group.
        let group = self.runtime(g);
        let labels = GroupLabels::new(&group.def.name);
        let failure = |event, kind, cause, reason: String| Failure {
            event,
            group: g,
            kind,
            cause,
            reason,
        };
        let input: Arc<Vec<Event>> = if idx.len() == events.len() {
            events.clone() // idx is exactly 0..n
        } else {
            Arc::new(idx.iter().map(|&i| events[i].clone()).collect())
        };
        let started = std::time::Instant::now();
        // A trap or timeout fails only the events that cause it (the batch is bisected).
        let called = group.plugin.process_isolating(input).await;
        let m = &self.metrics;
        m.plugin_call_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        let recycled = group.plugin.take_recycled();
        if recycled > 0 {
            m.plugin_instance_recycles
                .get_or_create(&labels)
                .inc_by(recycled);
        }
        if called.failed_calls > 0 {
            m.plugin_call_failures
                .get_or_create(&labels)
                .inc_by(called.failed_calls);
        }
        let mut failures = Vec::new();
        let mut mutations = Vec::new();
        // Which events wrote each entity (store key), to map entity failures back to events.
        let mut writers: HashMap<String, Vec<usize>> = HashMap::new();
        for (&i, result) in idx.iter().zip(called.results) {
            let event = &events[i];
            let result = match result {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(group = %group.def.name, topic = %event.topic, partition = event.partition,
                        offset = event.offset, error = %e, "plugin call failed on this event");
                    let kind = if e.is_deterministic() {
                        FailureKind::Invalid
                    } else {
                        FailureKind::Retryable
                    };
                    failures.push(failure(i, kind, Cause::Plugin, e.to_string()));
                    continue;
                }
            };
            match result {
                Ok(writes) => match to_mutations(&group.def, event, writes, overwrite) {
                    Ok(ms) => {
                        for (entity, m) in ms {
                            writers
                                .entry(group.sink.target.key(&entity))
                                .or_default()
                                .push(i);
                            mutations.push((entity, m));
                        }
                    }
                    Err(reason) => {
                        failures.push(failure(i, FailureKind::Invalid, Cause::Check, reason))
                    }
                },
                Err(EventFailure::Invalid(m)) => failures.push(failure(
                    i,
                    FailureKind::Invalid,
                    Cause::Plugin,
                    format!("plugin rejected the event: {m}"),
                )),
                Err(EventFailure::Retryable(m)) => failures.push(failure(
                    i,
                    FailureKind::Retryable,
                    Cause::Plugin,
                    format!("plugin asked to retry: {m}"),
                )),
            }
        }
        if mutations.is_empty() {
            return (failures, None);
        }
        let newest = mutations
            .iter()
            .flat_map(|(_, m)| m.ops.iter().map(|(_, _, t)| *t))
            .max();
        let started = std::time::Instant::now();
        let report = self.writer.apply(&group.sink, mutations).await;
        m.store_write_seconds
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if !report.failed.is_empty() {
            m.store_write_errors
                .get_or_create(&labels)
                .inc_by(report.failed.len() as u64);
        }
        if report.cache_error.is_some() {
            m.cache_errors.get_or_create(&labels).inc();
        }
        if let Some(t) = newest.filter(|_| report.outcome.applied_ops > 0) {
            m.wrote_event_time(&group.def.name, t);
        }
        m.writes
            .get_or_create(&labels)
            .inc_by(report.outcome.applied_ops.into());
        if report.written > 0 {
            m.applied_offsets_max
                .get_or_create(&labels)
                .set(report.max_applied as i64);
        }
        m.positions_expired
            .get_or_create(&labels)
            .inc_by(report.positions_expired as u64);
        m.stale_write_skips
            .get_or_create(&labels)
            .inc_by(report.outcome.stale_skips.into());
        m.replays
            .get_or_create(&labels)
            .inc_by(report.replayed as u64);
        if let Some(e) = &report.cache_error {
            tracing::warn!(group = %group.def.name, error = %e, queued = report.cache_queued,
                "cache update failed after the store write; queued for repair");
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
                .map(|(i, (kind, reason))| failure(i, kind, Cause::Store, reason)),
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
    overwrite: bool,
) -> Result<Vec<(String, Mutation)>, String> {
    if writes.len() > MAX_WRITES_PER_EVENT {
        return Err(format!(
            "plugin produced {} writes for one event; at most {MAX_WRITES_PER_EVENT} are taken",
            writes.len()
        ));
    }
    let mut by_entity: BTreeMap<String, Mutation> = BTreeMap::new();
    for w in writes {
        let w =
            check_write(&def.spec, w).map_err(|e| format!("plugin produced a bad write: {e}"))?;
        by_entity
            .entry(w.entity)
            .or_insert_with(|| Mutation {
                position: event.position.clone(),
                ops: Vec::new(),
                overwrite,
            })
            .ops
            .push((w.feature, w.op, w.event_time_ms));
    }
    Ok(by_entity.into_iter().collect())
}
