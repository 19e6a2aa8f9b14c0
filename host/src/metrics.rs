//! Prometheus metrics of the host, served as text on the admin API's `/metrics`.
//!
//! One registry per process; components get the [`Metrics`] handle and update their series.
//! Names follow Prometheus conventions (`fh_` prefix, `_total` for counters, base units).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

/// Labels of per-partition series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

impl PartitionLabels {
    pub fn new(topic: &str, partition: i32) -> PartitionLabels {
        PartitionLabels {
            topic: topic.to_owned(),
            partition,
        }
    }
}

/// Labels of per-group series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

impl IngestionLabels {
    pub fn new(ingestion: &str) -> IngestionLabels {
        IngestionLabels {
            ingestion: ingestion.to_owned(),
        }
    }
}

impl GroupLabels {
    pub fn new(group: &str) -> GroupLabels {
        GroupLabels {
            group: group.to_owned(),
        }
    }
}

/// Labels of a group's plugin version.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub group: String,
    pub version: String,
}

/// Labels of reload outcomes.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub group: String,
    /// `applied`, `rejected` or `rolled_back`.
    pub result: String,
}

/// Labels of admin API refusals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `connections` (over the cap), `peer` (over the per-address cap), `timeout` (request
    /// deadline), `host` (not a loopback name), `token` (missing, wrong, or none configured).
    pub reason: String,
}

impl RefusalLabels {
    pub fn new(reason: &str) -> RefusalLabels {
        RefusalLabels {
            reason: reason.to_owned(),
        }
    }
}

/// Labels of batch series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IngestionLabels {
    pub ingestion: String,
}

/// Labels of batch alerts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub ingestion: String,
    /// `stuck` or `failed`.
    pub kind: String,
}

/// Labels of batch run states.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunStateLabels {
    pub ingestion: String,
    pub status: String,
}

/// Register `m` under `name`, remembering the sample names it exports (for
/// [`Metrics::series_names`]), and return it.
fn register_metric<M: Metric + Clone>(
    registry: &mut Registry,
    series: &mut Vec<String>,
    name: &str,
    help: &str,
    m: M,
) -> M {
    use prometheus_client::metrics::MetricType;
    let full = format!("fh_{name}");
    match m.metric_type() {
        MetricType::Counter => series.push(format!("{full}_total")),
        MetricType::Histogram => {
            for suffix in ["_bucket", "_count", "_sum"] {
                series.push(format!("{full}{suffix}"));
            }
        }
        _ => series.push(full),
    }
    registry.register(name, help, m.clone());
    m
}

fn latency_histogram() -> Histogram {
    // 1 ms .. ~16 s: a store batch or an offset commit, up to a throttled or failing one.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.001, 2.0, 15,
    ))
}

fn call_histogram() -> Histogram {
    // 50 µs .. ~3.3 s: a one-event call up to a large batch near its deadline.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.00005, 2.0, 17,
    ))
}

/// Every series the host exports.
pub struct Metrics {
    registry: Registry,
    /// Messages behind the partition's end (from librdkafka statistics).
    pub consumer_lag: Family<PartitionLabels, Gauge>,
    /// Messages delivered to the host and not finished.
    pub in_flight: Family<PartitionLabels, Gauge>,
    /// Last committed offset (the next message to read after a restart).
    pub committed_offset: Family<PartitionLabels, Gauge>,
    /// Messages consumed; `rate()` of it is events/s.
    pub events: Family<PartitionLabels, Counter>,
    /// Messages finished (written, or handed to the retry / dead-letter topic).
    pub finished: Family<PartitionLabels, Counter>,
    /// Messages the partition's previous owner had finished above its committed offset (its
    /// commit's finished-offset map), skipped instead of processed again.
    pub skipped: Family<PartitionLabels, Counter>,
    /// Whether fetching of the partition is paused by backpressure (1) or not (0).
    pub paused: Family<PartitionLabels, Gauge>,
    /// Events handed to the group's retry topic.
    pub retries: Family<GroupLabels, Counter>,
    /// Events sent to the group's dead-letter topic.
    pub dead_letters: Family<GroupLabels, Counter>,
    /// Feature operations applied.
    pub writes: Family<GroupLabels, Counter>,
    /// `set`/`delete` operations skipped because a newer value was stored.
    pub stale_write_skips: Family<GroupLabels, Counter>,
    /// Mutations skipped because their source position was already applied.
    pub replays: Family<GroupLabels, Counter>,
    /// Late results of a revoked partition that were dropped (fenced), not committed.
    pub fenced: Family<PartitionLabels, Counter>,
    /// Duration of plugin batch calls.
    pub plugin_call_seconds: Family<GroupLabels, Histogram, fn() -> Histogram>,
    /// Plugin calls that failed (trap, timeout, memory cap). A failed batch is bisected, so
    /// one bad event costs a few failed calls and fails alone.
    pub plugin_call_failures: Family<GroupLabels, Counter>,
    /// Plugin instances replaced after a failure or past their memory high-water mark.
    pub plugin_instance_recycles: Family<GroupLabels, Counter>,
    /// Hot reload outcomes per group.
    pub plugin_reloads: Family<ReloadLabels, Counter>,
    /// 1 for the plugin version serving each group.
    pub plugin_version: Family<VersionLabels, Gauge>,
    /// Cache updates (keys) that failed after their store write, or were queued behind
    /// earlier failures, and went to the cache repair queue.
    pub cache_repairs_queued: Family<GroupLabels, Counter>,
    /// Keys whose cache entry may be stale, waiting for their repair (invalidation).
    pub cache_repairs_pending: Gauge,
    /// Repairs that landed.
    pub cache_repairs: Counter,
    /// Batch rows finished (written or dead-lettered) by this process.
    pub batch_rows: Family<IngestionLabels, Counter>,
    /// Batch rows dead-lettered.
    pub batch_dead_letters: Family<IngestionLabels, Counter>,
    /// Runs per ingestion and status, as of the monitor's last look.
    pub batch_runs: Family<RunStateLabels, Gauge>,
    /// Alerts raised (each run and kind once).
    pub batch_alerts: Family<AlertLabels, Counter>,
    /// Scheduled ticks skipped by the missed-run policy (only the latest missed tick runs).
    pub batch_missed_ticks: Family<IngestionLabels, Counter>,
    /// Time from issuing an offset commit to the broker's answer.
    pub commit_seconds: Histogram,
    /// Hand-off transactions aborted (a delivery or the commit failed, or a partition was
    /// lost with hand-offs in it); their partitions were rewound.
    pub transaction_aborts: Counter,
    /// Transactional producers replaced because a call of theirs did not return.
    pub kafka_producer_replacements: Counter,
    /// Times a partition was rewound to its last commit after an aborted transaction.
    pub rewinds: Family<PartitionLabels, Counter>,
    /// Times a partition's offsets went back (its topic deleted and created again while
    /// assigned) and its state started over.
    pub log_resets: Family<PartitionLabels, Counter>,
    /// Hand-offs acknowledged in the open transaction, not committed yet.
    pub transaction_pending_records: Gauge,
    /// Hand-offs a retry or dead-letter topic refused for good (too large, not authorized):
    /// the event went to the dead-letter topic, as a stub, or waits.
    pub handoff_refusals: Family<GroupLabels, Counter>,
    /// The longest applied-offset list of an entity written in a group's last batch: offsets
    /// above the floor, kept until the ones below them finish. Long lists grow items toward
    /// DynamoDB's 400 KB limit.
    pub applied_offsets_max: Family<GroupLabels, Gauge>,
    pub positions_expired: Family<GroupLabels, Counter>,
    /// OAUTHBEARER tokens handed to the Kafka clients (first ones and refreshes).
    pub kafka_oauth_tokens: Counter,
    /// OAUTHBEARER tokens that could not be made (credentials missing or expired).
    pub kafka_oauth_token_failures: Counter,
    /// 1 once the consumer has joined its group (received its first assignment, possibly
    /// empty); readiness waits for it.
    pub consumer_joined: Gauge,
    /// Admin API requests and connections refused, by reason.
    pub admin_refusals: Family<RefusalLabels, Counter>,
    /// Duration of a batch's store (and cache) write per group: load, merge, conditional
    /// writes, cache update.
    pub store_write_seconds: Family<GroupLabels, Histogram, fn() -> Histogram>,
    /// Entities whose store write failed (unavailable, throttled, rejected).
    pub store_write_errors: Family<GroupLabels, Counter>,
    /// Batches whose cache update failed after the store write (then repaired).
    pub cache_errors: Family<GroupLabels, Counter>,
    /// Now minus the newest event time written, per group (updated on every scrape).
    pub freshness_seconds: Family<GroupLabels, Gauge<f64, AtomicU64>>,
    newest_event_ms: Mutex<HashMap<String, i64>>,
    /// Every sample name exported (`fh_x_total`, `fh_y_bucket`, …), series or not.
    series: Vec<String>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("fh");
        let mut series = Vec::new();
        macro_rules! reg {
            // Any metric type with a default (families, gauges, counters): the field decides.
            ($name:literal, $help:literal) => {
                register_metric(&mut registry, &mut series, $name, $help, Default::default())
            };
            // A metric built by the caller (histograms with their buckets).
            ($name:literal, $help:literal, $m:expr) => {
                register_metric(&mut registry, &mut series, $name, $help, $m)
            };
        }
        Arc::new(Metrics {
            consumer_lag: reg!("consumer_lag", "Messages behind the end of the partition"),
            in_flight: reg!("consumer_in_flight", "Messages delivered and not finished"),
            committed_offset: reg!("consumer_committed_offset", "Last committed offset"),
            events: reg!("consumer_events", "Messages consumed"),
            finished: reg!(
                "consumer_finished_events",
                "Messages finished: written, or handed to the retry or dead-letter topic"
            ),
            skipped: reg!(
                "consumer_skipped_events",
                "Messages the previous owner finished above its commit, skipped"
            ),
            paused: reg!(
                "consumer_paused",
                "1 while fetching is paused by backpressure"
            ),
            retries: reg!("retries", "Events handed to the retry topic"),
            dead_letters: reg!("dead_letters", "Events sent to the dead-letter topic"),
            writes: reg!("feature_writes", "Feature operations applied"),
            stale_write_skips: reg!(
                "stale_write_skips",
                "Operations skipped because a newer value was stored"
            ),
            replays: reg!(
                "replayed_writes",
                "Mutations skipped because their source position was already applied"
            ),
            fenced: reg!(
                "consumer_fenced_results",
                "Late results dropped, not committed: of revoked partitions, or of aborted transactions"
            ),
            plugin_call_seconds: reg!(
                "plugin_call_seconds",
                "Duration of plugin batch calls",
                Family::new_with_constructor(call_histogram as fn() -> Histogram)
            ),
            plugin_call_failures: reg!(
                "plugin_call_failures",
                "Plugin batch calls that trapped, timed out or hit the memory cap"
            ),
            plugin_instance_recycles: reg!(
                "plugin_instance_recycles",
                "Plugin instances replaced after a failure or past their memory high-water mark"
            ),
            plugin_reloads: reg!(
                "plugin_reloads",
                "Plugin and spec reloads by result (applied, rejected, rolled_back)"
            ),
            plugin_version: reg!(
                "plugin_version_info",
                "1 for the plugin version serving the group"
            ),
            cache_repairs_queued: reg!(
                "cache_repairs_queued",
                "Cache updates that failed after the store write (or queued behind such a failure)"
            ),
            cache_repairs_pending: reg!(
                "cache_repairs_pending",
                "Keys whose cache entry may be stale, waiting for their invalidation"
            ),
            cache_repairs: reg!("cache_repairs", "Cache repairs (invalidations) that landed"),
            batch_rows: reg!(
                "batch_rows",
                "Batch rows finished (written or dead-lettered)"
            ),
            batch_dead_letters: reg!("batch_dead_letters", "Batch rows dead-lettered"),
            batch_runs: reg!("batch_runs", "Batch runs per ingestion and status"),
            batch_alerts: reg!("batch_alerts", "Batch alerts raised (stuck or failed runs)"),
            batch_missed_ticks: reg!(
                "batch_missed_ticks",
                "Scheduled ticks skipped after downtime (only the latest missed tick runs)"
            ),
            transaction_aborts: reg!(
                "kafka_transaction_aborts",
                "Hand-off transactions aborted; their partitions were rewound to their last commit"
            ),
            kafka_producer_replacements: reg!(
                "kafka_producer_replacements",
                "Transactional producers replaced because a call did not return in time (their transaction ended, their partitions rewound)"
            ),
            log_resets: reg!(
                "consumer_log_resets",
                "Times a partition's offsets went back (its topic deleted and created again while assigned) and its state started over"
            ),
            rewinds: reg!(
                "consumer_rewinds",
                "Times a partition was rewound to its last commit after an aborted transaction"
            ),
            transaction_pending_records: reg!(
                "kafka_transaction_pending_records",
                "Hand-offs acknowledged in the open transaction, not committed yet"
            ),
            commit_seconds: reg!(
                "consumer_commit_seconds",
                "Time from issuing an offset commit to the broker's answer",
                latency_histogram()
            ),
            handoff_refusals: reg!(
                "handoff_refusals",
                "Hand-offs a retry or dead-letter topic refused for good (too large, not authorized)"
            ),
            applied_offsets_max: reg!(
                "store_applied_offsets_max",
                "Longest applied-offset list of an entity written in the group's last batch"
            ),
            positions_expired: reg!(
                "store_positions_expired",
                "Batch runs' position entries dropped from entities past FH_BATCH_POSITION_RETENTION"
            ),
            kafka_oauth_tokens: reg!(
                "kafka_oauth_tokens",
                "OAUTHBEARER tokens handed to the Kafka clients (first ones and refreshes)"
            ),
            kafka_oauth_token_failures: reg!(
                "kafka_oauth_token_failures",
                "OAUTHBEARER tokens that could not be made"
            ),
            consumer_joined: reg!(
                "consumer_joined",
                "1 once the consumer has joined its group and received an assignment"
            ),
            admin_refusals: reg!(
                "admin_refusals",
                "Admin API requests and connections refused (over the connection cap, past the request deadline, a foreign Host, no or a wrong token)"
            ),
            store_write_seconds: reg!(
                "store_write_seconds",
                "Duration of a batch's store and cache write per group",
                Family::new_with_constructor(latency_histogram as fn() -> Histogram)
            ),
            store_write_errors: reg!(
                "store_write_errors",
                "Entity writes that failed in the store (unavailable, throttled, rejected)"
            ),
            cache_errors: reg!(
                "cache_errors",
                "Cache updates that failed after the store write (queued for repair)"
            ),
            freshness_seconds: reg!(
                "feature_freshness_seconds",
                "Now minus the newest event time written, per group"
            ),
            newest_event_ms: Mutex::default(),
            series,
            registry,
        })
    }

    /// Every sample name this host exports, whether or not it has series yet (dashboards
    /// and alert rules are checked against it).
    pub fn series_names(&self) -> &[String] {
        &self.series
    }

    /// Note that `group` wrote an event with event time `ms` (freshness).
    pub fn wrote_event_time(&self, group: &str, ms: i64) {
        let mut newest = self.newest_event_ms.lock().expect("not poisoned");
        let slot = newest.entry(group.to_owned()).or_insert(ms);
        *slot = (*slot).max(ms);
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let now = crate::sink::unix_now_ms();
        for (group, ms) in self.newest_event_ms.lock().expect("not poisoned").iter() {
            self.freshness_seconds
                .get_or_create(&GroupLabels::new(group))
                .set((now - ms) as f64 / 1000.0);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Forget a partition's gauges once it is no longer assigned here.
    pub fn drop_partition(&self, labels: &PartitionLabels) {
        self.in_flight.remove(labels);
        self.consumer_lag.remove(labels);
        self.paused.remove(labels);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric_value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(f64::NAN)
    }

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.events
            .get_or_create(&PartitionLabels::new("web", 3))
            .inc();
        m.retries
            .get_or_create(&GroupLabels::new("users"))
            .inc_by(2);
        let text = m.render();
        assert!(
            text.contains(r#"fh_consumer_events_total{topic="web",partition="3"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fh_retries_total{group="users"} 2"#),
            "{text}"
        );
        m.wrote_event_time("users", crate::sink::unix_now_ms() - 5_000);
        m.wrote_event_time("users", 0); // older: does not move freshness back
        let fresh = metric_value(
            &m.render(),
            r#"fh_feature_freshness_seconds{group="users"}"#,
        );
        assert!((5.0..60.0).contains(&fresh), "freshness {fresh}");
    }
}
