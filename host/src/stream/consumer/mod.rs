//! The Kafka consumer: parallel processing inside each partition, low-watermark commits,
//! retry and dead-letter hand-off, and rebalance fencing.
//!
//! **Threads.** One dedicated thread polls librdkafka, so rebalance callbacks — which must
//! block while a revoked partition drains — never stall a tokio worker. It turns messages
//! into units of work ([`Unit`]: one event for one group) and spawns their processing on the
//! tokio runtime; plugin calls run on the blocking pool.
//!
//! **Per partition** ([`PartitionState`]): every assigned partition has its own client queue.
//! It is read only while fewer than `max_in_flight` delivered events (and `max_buffered_bytes`
//! of payload) are unfinished; at the bound it is left alone, and the client stops fetching
//! once its prefetch for the partition is full. (Pausing instead would discard the prefetched
//! messages and resume from the fetch position, not the last delivered one.) Units run in
//! lanes ([`super::lanes`]) by the group's ordering mode; units ready together for one group
//! run as one batch (one plugin call, one coalesced store write per entity).
//!
//! **Where offsets are committed:** [`Shared::commit`] — periodically, on revoke and on
//! shutdown — commits each partition's low watermark: one past the highest offset below
//! which every delivered event is finished. An event is finished when each of its groups
//! wrote it, or handed it to the retry or dead-letter topic *and the broker acknowledged
//! that*. With it goes the map of offsets finished above the watermark
//! ([`super::offset_map`]), which the partition's next owner reads at its first delivery and
//! skips.
//! The commit is the offset part of a Kafka transaction whose records are the hand-offs
//! ([`super::transaction`]): both become visible together, or neither does. A crash
//! re-delivers from the committed offset (less its map); writes carry their source
//! position, so re-delivered events are no-ops in the stores, and the crashed host's
//! hand-offs since that commit are aborted with its transaction.
//!
//! **Failures never block the partition.** A failed unit goes to its group's retry topic
//! (this same consumer reads it back after a growing backoff and processes it for that
//! group only), or to the dead-letter topic when invalid or out of attempts.
//!
//! **Rebalance** (cooperative-sticky): on revoke the partition stops taking new work, its
//! running dispatches get `drain_timeout` to finish, the low watermark and its map are
//! committed, and the partition is fenced: late results are dropped (never committed), so the new owner
//! re-processes from the commit and never skips. SIGTERM revokes everything the same way.
//!
//! **Files.** The poll thread is [`poll`], the rebalance callbacks [`rebalance`], the commit
//! and the rewind after an aborted transaction [`commit`], running a batch of units and
//! handing off its failures [`dispatch`]; this file holds the state they share.

mod commit;
mod dispatch;
mod poll;
mod rebalance;

use super::envelope::{self, Envelope};
use super::handoff::Destination;
use super::handoff::HandOff;
use super::kafka::{KafkaClient, to_event};
use super::lanes::{LaneKey, split_batches};
use super::offset_map::FinishedMap;
use super::offsets::OffsetError;
use super::partition::{Delivered, Limits, Origin, PartitionState, RetryMeta, Unit};
use super::topic_ids::{self, TopicIdError};
use super::transaction::{Committed, Exclusive, Transactions, TxnError};
use crate::config::RunSettings;
use crate::dispatch::{GroupId, Route};
use crate::event::Event;
use crate::metrics::{Metrics, PartitionLabels};
use crate::pipeline::Pipeline;
use crate::retry::{Cause, Failure, FailureKind, InPlace, NextStep, RetryPolicy};
use crate::spec::Ordering;
use anyhow::Context as _;
use commit::{committed_metadata, read_map};
use dispatch::spawn_ready;
use poll::poll_loop;
use rdkafka::client::ClientContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Tuning of the consumer (flags / `FH_*` variables in [`RunSettings`]).
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Messages taken from the client per poll round before dispatching them.
    pub fetch_size: usize,
    pub limits: Limits,
    pub commit_interval: Duration,
    /// How long a revoked partition's running work may take to finish before it is fenced.
    pub drain_timeout: Duration,
    /// In-place attempts of a failed store write before the event goes to the retry topic.
    pub store_attempts: u32,
    /// The hand-off producer's transactional id (default: the group id and a random suffix).
    pub transactional_id: Option<String>,
    /// How long the broker lets a hand-off transaction stay open.
    pub transaction_timeout: Duration,
}

impl StreamSettings {
    /// From the process settings; refuses an offset span whose finished-offset map would not
    /// fit Kafka's commit metadata ([`super::offset_map::MAX_SPAN`]).
    pub fn from_run(run: &RunSettings) -> anyhow::Result<StreamSettings> {
        if run.max_offset_span > super::offset_map::MAX_SPAN {
            anyhow::bail!(
                "FH_MAX_OFFSET_SPAN={} is above {}: the offsets finished above a partition's low watermark are committed in Kafka's offset metadata (offset.metadata.max.bytes, 4096 by default), which holds a window of at most {} offsets; lower it",
                run.max_offset_span,
                super::offset_map::MAX_SPAN,
                super::offset_map::MAX_SPAN
            );
        }
        if run.commit_interval * 2 > run.kafka_transaction_timeout {
            anyhow::bail!(
                "FH_COMMIT_INTERVAL={:?} is more than half of FH_KAFKA_TRANSACTION_TIMEOUT={:?}: each commit ends the open hand-off transaction, and one the broker times out first cannot be committed; lower the interval or raise the timeout",
                run.commit_interval,
                run.kafka_transaction_timeout
            );
        }
        Ok(StreamSettings {
            fetch_size: run.fetch_size.max(1),
            limits: Limits {
                max_in_flight: run.max_in_flight.max(1),
                max_buffered_bytes: run.max_buffered_bytes.max(1),
                max_offset_span: run.max_offset_span.max(1),
            },
            commit_interval: run.commit_interval,
            drain_timeout: run.drain_timeout,
            store_attempts: run.store_attempts.max(1),
            transactional_id: run.kafka_transactional_id.clone(),
            transaction_timeout: run.kafka_transaction_timeout,
        })
    }
}

use crate::sink::unix_now_ms as now_ms;

type TopicPartition = (String, i32);

/// One assigned partition.
struct Slot {
    labels: PartitionLabels,
    /// The source name of its positions: the topic and its incarnation
    /// ([`super::topic_ids`]).
    source: String,
    state: Mutex<PartitionState>,
    activity: Mutex<Activity>,
    /// Signalled (with `activity`) whenever a dispatch of this partition finishes.
    changed: Condvar,
    /// Handed off in the open transaction: rewound if it aborts.
    in_txn: AtomicBool,
    /// The previous owner's finished map was read (or there is none to read).
    resumed: AtomicBool,
}

/// Dispatches of a partition that are running (spawned and not finished; retried units
/// waiting for their due time are not counted): what a revoke waits for.
#[derive(Default)]
struct Activity {
    active: usize,
    /// Fenced: no dispatch may start any more.
    closed: bool,
}

impl Slot {
    fn new(topic: &str, partition: i32, source: String) -> Slot {
        Slot {
            labels: PartitionLabels::new(topic, partition),
            source,
            state: Mutex::new(PartitionState::default()),
            activity: Mutex::new(Activity::default()),
            changed: Condvar::new(),
            in_txn: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PartitionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn activity(&self) -> MutexGuard<'_, Activity> {
        self.activity.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a dispatch as running, unless the partition is fenced (then the work is left
    /// to the next owner: not finished, so not committed). While a revoke drains, units
    /// released behind finishing ones still start, so the commit gets as far as it can.
    fn begin(&self) -> bool {
        let mut a = self.activity();
        if a.closed {
            return false;
        }
        a.active += 1;
        true
    }

    fn end(&self) {
        self.activity().active -= 1;
        self.changed.notify_all();
    }

    /// Whether the partition is at its bound, so its queue is not read now (recorded in
    /// the `fh_consumer_paused` gauge).
    fn hold(&self, shared: &Shared) -> bool {
        let mut st = self.lock();
        let over = st.over(&shared.settings.limits);
        if over != st.paused {
            st.paused = over;
            shared
                .metrics
                .paused
                .get_or_create(&self.labels)
                .set(i64::from(over));
            tracing::trace!(topic = %self.labels.topic, partition = self.labels.partition, held = over, "fetch hold");
        }
        over
    }
}

/// No dispatch of `slot` starts any more, and results that arrive are dropped.
fn fence(slot: &Slot) {
    slot.activity().closed = true;
    slot.lock().fenced = true;
}

/// Wakes the poll thread: a queue became non-empty, or a dispatch finished (a partition
/// held at its bound may be readable again).
#[derive(Default)]
struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
}

impl Wake {
    fn notify(&self) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.cv.notify_one();
    }

    /// Wait for a notification (or `timeout`), consuming it.
    fn wait(&self, timeout: Duration) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !*pending {
            pending = self
                .cv
                .wait_timeout(pending, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *pending = false;
    }
}

/// State shared by the poll thread, the rebalance callbacks and the processing tasks.
pub struct Shared {
    pipeline: Arc<Pipeline>,
    settings: StreamSettings,
    /// The hand-off producer and its open transaction.
    txn: Transactions,
    /// Why the consumer must stop (the transactional producer failed for good).
    failed: Mutex<Option<String>>,
    runtime: tokio::runtime::Handle,
    slots: Mutex<HashMap<TopicPartition, Arc<Slot>>>,
    consumer: OnceLock<Weak<BaseConsumer<Ctx>>>,
    /// Each assigned partition's own message queue, polled only while the partition is
    /// below its bound.
    queues: Mutex<HashMap<TopicPartition, PartitionQueue<Ctx>>>,
    wake: Arc<Wake>,
    /// Retry topic → the groups that retry through it.
    retry_topics: HashMap<String, Vec<GroupId>>,
    metrics: Arc<Metrics>,
    /// The brokers refused a commit's finished-offset maps as too large: commit without.
    maps_refused: AtomicBool,
}

/// The librdkafka context: rebalance and statistics callbacks.
pub struct Ctx {
    shared: Arc<Shared>,
    tokens: Option<Arc<super::kafka::Tokens>>,
}

impl ClientContext for Ctx {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<rdkafka::client::OAuthToken, Box<dyn std::error::Error>> {
        super::kafka::oauth_token(self.tokens.as_deref())
    }

    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.shared
                        .metrics
                        .consumer_lag
                        .get_or_create(&PartitionLabels::new(topic, *partition))
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Ctx>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.shared.assign(consumer, tpl),
            Rebalance::Revoke(tpl) => self
                .shared
                .revoke(consumer, tpl, consumer.assignment_lost()),
            Rebalance::Error(e) => tracing::error!(error = %e, "rebalance error"),
        }
    }
}

impl Shared {
    fn slots(&self) -> MutexGuard<'_, HashMap<TopicPartition, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turn a consumed message into its units of work.
    fn units(&self, event: &Arc<Event>) -> Vec<Unit> {
        if let Some(groups) = self.retry_topics.get(&event.topic) {
            return vec![self.retry_unit(event, groups)];
        }
        let event = &envelope::from_source(event);
        self.pipeline
            .router()
            .route(event)
            .into_iter()
            .map(|g| {
                let lane = match self.pipeline.runtime(g).def.spec.ordering {
                    Ordering::Key => Some(LaneKey::for_key(g, event.key.as_deref())),
                    Ordering::Partition => Some(LaneKey::Partition { group: g }),
                    Ordering::Unordered => None,
                };
                Unit {
                    offset: event.offset,
                    event: event.clone(),
                    group: g,
                    origin: Origin::Source { lane },
                }
            })
            .collect()
    }

    /// A message of a retry topic: the original event, for the group it failed for only,
    /// with the retry topic's position (so replays of the retry topic are no-ops too), or
    /// for a replayed dead letter, the dead letter's.
    fn retry_unit(&self, message: &Arc<Event>, groups: &[GroupId]) -> Unit {
        let poison = |reason: String| Unit {
            offset: message.offset,
            event: message.clone(),
            group: groups[0],
            origin: Origin::Poison(reason),
        };
        let (mut original, env) = match envelope::unwrap(message) {
            Ok(x) => x,
            Err(e) => return poison(format!("unreadable retry message: {e}")),
        };
        let Some(&group) = groups
            .iter()
            .find(|&&g| self.pipeline.router().name(g) == env.group)
        else {
            return poison(format!(
                "retry message for group {:?}, which does not retry through {}",
                env.group, message.topic
            ));
        };
        // A replayed dead letter keeps one identity however often it is replayed or retried.
        original.position = original
            .header(envelope::headers::REPLAY_OF)
            .and_then(super::replay::replay_position)
            .or_else(|| message.position.clone());
        let policy = RetryPolicy::of(&self.pipeline.runtime(group).def);
        Unit {
            offset: message.offset,
            event: Arc::new(original),
            group,
            origin: Origin::Retry(RetryMeta {
                attempts: env.attempts,
                first_failure_ms: env.first_failure_ms,
                due_ms: env.due_ms.map_or(0, |due| policy.clamp_due(due, now_ms())),
            }),
        }
    }
}

/// Consume with the process settings until `shutdown` turns true.
pub async fn run(
    run: &RunSettings,
    brokers: &str,
    pipeline: Arc<Pipeline>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let metrics = pipeline.metrics();
    let counters = super::oauth::TokenCounters {
        issued: metrics.kafka_oauth_tokens.clone(),
        failed: metrics.kafka_oauth_token_failures.clone(),
    };
    let client = KafkaClient::from_settings(run, brokers, counters).await?;
    consume(
        &client,
        &run.kafka_group_id,
        StreamSettings::from_run(run)?,
        pipeline,
        shutdown,
    )
    .await
}

/// Consume the pipeline's topics (and its groups' retry topics) as consumer group
/// `group_id` until `shutdown` turns true; then drain, commit and leave the group.
pub async fn consume(
    client: &KafkaClient,
    group_id: &str,
    settings: StreamSettings,
    pipeline: Arc<Pipeline>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut retry_topics: HashMap<String, Vec<GroupId>> = HashMap::new();
    for g in pipeline.router().ids() {
        retry_topics
            .entry(pipeline.runtime(g).def.retry_topic.clone())
            .or_default()
            .push(g);
    }
    super::topics::provision(client, pipeline.runtimes().iter().map(|g| &g.def)).await?;
    let metrics = pipeline.metrics().clone();
    let max_buffered_bytes = settings.limits.max_buffered_bytes;
    let transactional_id = settings
        .transactional_id
        .clone()
        .unwrap_or_else(|| format!("feature-host-{group_id}-{:016x}", rand::random::<u64>()));
    let txn = Transactions::new(
        client,
        &transactional_id,
        settings.transaction_timeout,
        metrics.clone(),
    )?;
    let txn = tokio::task::spawn_blocking(move || txn.start().map(|()| txn)).await??;
    tracing::info!(%transactional_id, "hand-off transactions ready");
    let shared = Arc::new(Shared {
        txn,
        failed: Mutex::new(None),
        pipeline: pipeline.clone(),
        settings,
        runtime: tokio::runtime::Handle::current(),
        slots: Mutex::new(HashMap::new()),
        consumer: OnceLock::new(),
        queues: Mutex::new(HashMap::new()),
        wake: Arc::new(Wake::default()),
        retry_topics,
        metrics,
        maps_refused: AtomicBool::new(false),
    });
    let mut consumer_cfg = client.cfg.clone();
    consumer_cfg
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        // Retry topics: only hand-offs whose transaction committed (with the offsets that
        // finished their source events) are read.
        .set("isolation.level", "read_committed");
    if consumer_cfg.get("statistics.interval.ms").is_none() {
        consumer_cfg.set("statistics.interval.ms", "5000");
    }
    // The client's prefetch per partition is the other half of the memory bound: it stops
    // fetching a partition whose local queue holds this much.
    if consumer_cfg.get("queued.max.messages.kbytes").is_none() {
        let kb = (max_buffered_bytes / 1024).clamp(1, 2_097_151);
        consumer_cfg.set("queued.max.messages.kbytes", kb.to_string());
    }
    let mut consumer: BaseConsumer<Ctx> = consumer_cfg
        .create_with_context(Ctx {
            shared: shared.clone(),
            tokens: client.tokens.clone(),
        })
        .context("cannot create Kafka consumer")?;
    let wake = shared.wake.clone();
    consumer.set_nonempty_callback(move || wake.notify());
    let consumer = Arc::new(consumer);
    let _ = shared.consumer.set(Arc::downgrade(&consumer));
    let mut topics: Vec<String> = pipeline.router().topics().map(str::to_owned).collect();
    topics.extend(shared.retry_topics.keys().cloned());
    topics.sort();
    topics.dedup();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&refs)
        .with_context(|| format!("cannot subscribe to {topics:?}"))?;
    tracing::info!(?topics, group_id, settings = ?shared.settings, "consuming");

    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || poll_loop(shared, consumer, stop))
            .context("cannot start the Kafka poll thread")?
    };
    // Until shutdown, or until the poll thread stops on its own (the consumer failed).
    let mut poller = tokio::task::spawn_blocking(move || poller.join());
    let requested = async move {
        let _ = shutdown.wait_for(|s| *s).await;
    };
    let joined = tokio::select! {
        () = requested => {
            stop.store(true, AtomicOrdering::SeqCst);
            poller.await
        }
        joined = &mut poller => joined,
    };
    joined?.map_err(|_| anyhow::anyhow!("the Kafka poll thread panicked"))?;
    if let Some(reason) = shared
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        anyhow::bail!("the Kafka consumer stopped: {reason}");
    }
    tracing::info!("consumer stopped");
    Ok(())
}
