//! Processing a batch of events: route each event to its feature groups, run each group's
//! plugin over its share of the batch (one call per group), check the writes against the
//! group's spec, and apply them through the [`FeatureWriter`]. Sources (Kafka, files, HTTP,
//! backfills) all go through here, so stream and batch share one transform.
//!
//! **Steps.** Per group: the plugin call ([`Plugin::process_isolating`]: a trap fails only
//! its own event), the check ([`check`]: results to mutations or failures), the write
//! ([`FeatureWriter::apply`]), and the blame ([`blame`]: failed entities back to the events
//! that wrote them). The check and the blame are pure and unit-tested on their own; the
//! call and the write are tested against the real plugins and stores.

mod blame;
mod check;

use crate::dispatch::{GroupId, Route, Router};
use crate::event::{Event, EventIdx};
use crate::metrics::{GroupLabels, Metrics, VersionLabels};
use crate::plugin::Plugin;
use crate::retry::{Failure, InPlace, RetryPolicy};
use crate::sink::writer::{FeatureWriter, GroupSink, WriteReport};
use crate::spec::GroupDef;
use arc_swap::ArcSwap;
use blame::blame;
use check::check_event;
use futures::future::join_all;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

pub use check::MAX_WRITES_PER_EVENT;

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

    /// Number of groups (ids `0..n` as the router returns them).
    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The runtime serving group `g` now.
    pub fn runtime(&self, g: GroupId) -> Arc<GroupRuntime> {
        self.groups[g.index()].load_full()
    }

    /// A snapshot of every group's runtime.
    pub fn runtimes(&self) -> Vec<Arc<GroupRuntime>> {
        self.groups.iter().map(|g| g.load_full()).collect()
    }

    pub fn group_id(&self, name: &str) -> Option<GroupId> {
        self.router.id(name)
    }

    pub fn group(&self, name: &str) -> Option<Arc<GroupRuntime>> {
        self.group_id(name).map(|g| self.runtime(g))
    }

    /// Serve group `g` with `new` from its next batch on; batches already running finish
    /// on the old runtime, which is returned. Only the hot reloader calls this, after
    /// checking that `new` keeps the group's name, sources and ordering.
    pub fn replace(&self, g: GroupId, new: Arc<GroupRuntime>) -> Arc<GroupRuntime> {
        let old = self.groups[g.index()].swap(new.clone());
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

    /// The routes (event, group) of a batch.
    pub fn route(&self, events: &[Event]) -> Vec<Route> {
        events
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                self.router.route(e).into_iter().map(move |group| Route {
                    event: EventIdx::new(i),
                    group,
                })
            })
            .collect()
    }

    /// Process the given routes; return the failures.
    /// `overwrite` lets the writes replace newer values (a backfill's explicit override).
    pub async fn process(
        &self,
        events: &Arc<Vec<Event>>,
        routes: &[Route],
        overwrite: bool,
    ) -> (Vec<Failure>, BatchStats) {
        let mut per_group: BTreeMap<GroupId, Vec<EventIdx>> = BTreeMap::new();
        for r in routes {
            per_group.entry(r.group).or_default().push(r.event);
        }
        let runs = per_group.into_iter().map(|(g, idx)| {
            let span = tracing::info_span!(
                "process_group",
                group = %self.router.name(g),
                events = idx.len()
            );
            tracing::Instrument::instrument(self.process_group(events, g, idx, overwrite), span)
        });
        let mut failures = Vec::new();
        let mut stats = BatchStats {
            routed: routes.len(),
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
        routes: &[Route],
        in_place: InPlace,
        overwrite: bool,
    ) -> (Vec<Failure>, BatchStats) {
        let (mut failures, mut stats) = self.process(events, routes, overwrite).await;
        let mut attempts: HashMap<Route, u32> = HashMap::new();
        loop {
            let mut retry = Vec::new();
            let mut done = Vec::new();
            let mut wait: Option<std::time::Duration> = None;
            for f in failures {
                let n = attempts.entry(f.route()).or_insert(0);
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
            let routes: Vec<Route> = retry.iter().map(Failure::route).collect();
            let (again, more) = self.process(events, &routes, overwrite).await;
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
        g: GroupId,
        mut idx: Vec<EventIdx>,
        overwrite: bool,
    ) -> (Vec<Failure>, Option<WriteReport>) {
        idx.sort_unstable();
        idx.dedup();
        // Loaded once: the whole batch runs on one version of the group.
        let group = self.runtime(g);
        let labels = GroupLabels::new(&group.def.name);
        let input: Arc<Vec<Event>> = if idx.len() == events.len() {
            events.clone() // idx is exactly 0..n
        } else {
            Arc::new(idx.iter().map(|i| events[i.index()].clone()).collect())
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
        let mut writers: HashMap<String, Vec<EventIdx>> = HashMap::new();
        for (&i, called) in idx.iter().zip(called.results) {
            let event = &events[i.index()];
            if let Err(e) = &called {
                tracing::error!(group = %group.def.name, topic = %event.topic, partition = event.partition,
                    offset = event.offset, error = %e, "plugin call failed on this event");
            }
            match check_event(&group.def.spec, event, called, overwrite) {
                Ok(ms) => {
                    for (entity, m) in ms {
                        writers
                            .entry(group.sink.target.key(&entity))
                            .or_default()
                            .push(i);
                        mutations.push((entity, m));
                    }
                }
                Err(r) => failures.push(Failure {
                    event: i,
                    group: g,
                    kind: r.kind,
                    cause: r.cause,
                    reason: r.reason,
                }),
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
        for (key, e) in &report.failed {
            tracing::warn!(group = %group.def.name, entity = %key, error = %e, "store write failed");
        }
        failures.extend(blame(g, &report.failed, &writers));
        (failures, Some(report))
    }
}
