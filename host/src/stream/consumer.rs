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
//! that*. A crash re-delivers from the committed offset; writes carry their source position,
//! so re-delivered events are no-ops in the stores.
//!
//! **Failures never block the partition.** A failed unit goes to its group's retry topic
//! (this same consumer reads it back after a growing backoff and processes it for that
//! group only), or to the dead-letter topic when invalid or out of attempts.
//!
//! **Rebalance** (cooperative-sticky): on revoke the partition stops taking new work, its
//! running dispatches get `drain_timeout` to finish, the low watermark is committed, and the
//! partition is fenced: late results are dropped (never committed), so the new owner
//! re-processes from the commit and never skips. SIGTERM revokes everything the same way.

use super::envelope::{self, Envelope, NextStep};
use super::handoff::Destination;
use super::kafka::{KafkaClient, Republisher, to_event};
use super::lanes::{LaneKey, split_batches};
use super::partition::{Limits, PartitionState, RetryMeta, Unit};
use crate::config::RunSettings;
use crate::event::Event;
use crate::metrics::{Metrics, PartitionLabels};
use crate::pipeline::{Failure, FailureKind, InPlace, Pipeline};
use crate::spec::Ordering;
use anyhow::Context as _;
use rdkafka::client::ClientContext;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

/// Tuning of the consumer (flags / `FH_*` variables in [`RunSettings`]).
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Messages taken from the client per poll round before dispatching them.
    pub fetch_size: usize,
    pub limits: Limits,
    pub commit_interval: Duration,
    /// How long a revoked partition's running work may take to finish before it is fenced.
    pub drain_timeout: Duration,
    /// In-place attempts of a failed store write before the event goes to the retry topic.
    pub store_attempts: u32,
}

impl StreamSettings {
    pub fn from_run(run: &RunSettings) -> StreamSettings {
        StreamSettings {
            fetch_size: run.fetch_size.max(1),
            limits: Limits {
                max_in_flight: run.max_in_flight.max(1),
                max_buffered_bytes: run.max_buffered_bytes.max(1),
                max_offset_span: run.max_offset_span.max(1),
            },
            commit_interval: run.commit_interval,
            drain_timeout: run.drain_timeout,
            store_attempts: run.store_attempts.max(1),
        }
    }
}

use crate::sink::unix_now_ms as now_ms;

type TopicPartition = (String, i32);

/// One assigned partition.
struct Slot {
    labels: PartitionLabels,
    state: Mutex<PartitionState>,
    activity: Mutex<Activity>,
    /// Signalled (with `activity`) whenever a dispatch of this partition finishes.
    changed: Condvar,
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
    fn new(topic: &str, partition: i32) -> Slot {
        Slot {
            labels: PartitionLabels::new(topic, partition),
            state: Mutex::new(PartitionState::default()),
            activity: Mutex::new(Activity::default()),
            changed: Condvar::new(),
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
    republisher: Republisher,
    runtime: tokio::runtime::Handle,
    slots: Mutex<HashMap<TopicPartition, Arc<Slot>>>,
    consumer: OnceLock<Weak<BaseConsumer<Ctx>>>,
    /// Each assigned partition's own message queue, polled only while the partition is
    /// below its bound.
    queues: Mutex<HashMap<TopicPartition, PartitionQueue<Ctx>>>,
    wake: Arc<Wake>,
    /// Retry topic → the groups that retry through it.
    retry_topics: HashMap<String, Vec<usize>>,
    metrics: Arc<Metrics>,
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
            Rebalance::Assign(tpl) => self.shared.assign(tpl),
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

    /// New partitions get their state and their own queue, split off before librdkafka
    /// starts fetching them (so no message of theirs reaches the main queue).
    fn assign(&self, tpl: &TopicPartitionList) {
        self.metrics.consumer_joined.set(1);
        let consumer = self.consumer.get().and_then(Weak::upgrade);
        let mut slots = self.slots();
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for el in tpl.elements() {
            let tp = (el.topic().to_owned(), el.partition());
            tracing::info!(topic = %tp.0, partition = tp.1, "partition assigned");
            if let Some(mut q) = consumer
                .as_ref()
                .and_then(|c| c.split_partition_queue(&tp.0, tp.1))
            {
                let wake = self.wake.clone();
                q.set_nonempty_callback(move || wake.notify());
                queues.insert(tp.clone(), q);
            }
            slots.insert(tp.clone(), Arc::new(Slot::new(&tp.0, tp.1)));
        }
    }

    /// Drain (bounded by `drain_timeout`), commit, fence, forget. Runs on the poll thread
    /// inside librdkafka's rebalance callback, before the partitions are released.
    fn revoke(&self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList, lost: bool) {
        let revoked: Vec<Arc<Slot>> = {
            let mut slots = self.slots();
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            tpl.elements()
                .iter()
                .filter_map(|el| {
                    let tp = (el.topic().to_owned(), el.partition());
                    queues.remove(&tp);
                    slots.remove(&tp)
                })
                .collect()
        };
        let deadline = Instant::now() + self.settings.drain_timeout;
        for slot in &revoked {
            let mut a = slot.activity();
            if lost {
                a.closed = true;
                continue; // Another member may own it already: do not wait, do not commit.
            }
            while a.active > 0 {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    tracing::warn!(topic = %slot.labels.topic, partition = slot.labels.partition,
                        running = a.active, "drain timed out: fencing the partition's late results");
                    break;
                }
                a = slot
                    .changed
                    .wait_timeout(a, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        if !lost {
            // The last chance to commit what this owner finished: a failed commit is retried
            // until the drain deadline, or the next owner redoes it all (deduplicated, but
            // its side effects on the retry topics are not).
            let mut pause = Duration::from_millis(50);
            while let Err(e) = self.commit(consumer, &revoked)
                && retriable_commit_error(&e)
                && Instant::now() + pause < deadline
            {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
        for slot in &revoked {
            slot.activity().closed = true;
            let mut st = slot.lock();
            st.fenced = true;
            tracing::info!(topic = %slot.labels.topic, partition = slot.labels.partition, lost,
                committed = ?st.committed, unfinished = st.in_flight(), "partition revoked");
            self.metrics.drop_partition(&slot.labels);
        }
    }

    /// Commit the low watermark of each given partition that moved. On an error the next
    /// commit retries it.
    fn commit(&self, consumer: &BaseConsumer<Ctx>, slots: &[Arc<Slot>]) -> KafkaResult<()> {
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::new();
        for slot in slots {
            let mut st = slot.lock();
            if st.fenced {
                continue;
            }
            if let Some(next) = st.to_commit() {
                if let Err(e) = tpl.add_partition_offset(
                    &slot.labels.topic,
                    slot.labels.partition,
                    Offset::Offset(next),
                ) {
                    tracing::error!(error = %e, "cannot build commit");
                    continue;
                }
                st.committed = Some(next);
                moved.push((slot.clone(), next));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        let issued = Instant::now();
        match consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => {
                self.metrics
                    .commit_seconds
                    .observe(issued.elapsed().as_secs_f64());
                for (slot, next) in moved {
                    self.metrics
                        .committed_offset
                        .get_or_create(&slot.labels)
                        .set(next);
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; the next commit retries it");
                for (slot, _) in moved {
                    slot.lock().committed = None;
                }
                Err(e)
            }
        }
    }

    /// Turn a consumed message into its units of work.
    fn units(&self, event: &Arc<Event>) -> Vec<Unit> {
        if let Some(groups) = self.retry_topics.get(&event.topic) {
            return vec![self.retry_unit(event, groups)];
        }
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
                    lane,
                    retry: None,
                    poison: None,
                }
            })
            .collect()
    }

    /// A message of a retry topic: the original event, for the group it failed for only,
    /// with the retry topic's position (so replays of the retry topic are no-ops too), or
    /// for a replayed dead letter, the dead letter's.
    fn retry_unit(&self, message: &Arc<Event>, groups: &[usize]) -> Unit {
        let poison = |reason: String| Unit {
            offset: message.offset,
            event: message.clone(),
            group: groups[0],
            lane: None,
            retry: None,
            poison: Some(reason),
        };
        let (mut original, env) = match envelope::unwrap(message) {
            Ok(x) => x,
            Err(e) => return poison(format!("unreadable retry message: {e}")),
        };
        let Some(&group) = groups
            .iter()
            .find(|&&g| self.pipeline.router().groups()[g] == env.group)
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
        Unit {
            offset: message.offset,
            event: Arc::new(original),
            group,
            lane: None,
            retry: Some(RetryMeta {
                attempts: env.attempts,
                first_failure_ms: env.first_failure_ms,
                due_ms: env.due_ms.unwrap_or(0),
            }),
            poison: None,
        }
    }
}

/// Whether a failed commit may succeed if sent again by this member: not when the group has
/// moved on without it (its generation or membership is gone).
fn retriable_commit_error(e: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    !matches!(
        e.rdkafka_error_code(),
        Some(
            C::IllegalGeneration
                | C::UnknownMemberId
                | C::RebalanceInProgress
                | C::FencedInstanceId
                | C::StaleMemberEpoch
        )
    )
}

/// Spawn the processing of ready units: one batch per group, retried units one by one
/// (each waits for its due time).
fn spawn_ready(shared: &Arc<Shared>, slot: &Arc<Slot>, ready: Vec<Unit>) {
    if ready.is_empty() {
        return;
    }
    let mut batches: BTreeMap<usize, Vec<(Option<LaneKey>, Unit)>> = BTreeMap::new();
    for u in ready {
        if u.retry.is_some() || u.poison.is_some() {
            let (shared, slot) = (shared.clone(), slot.clone());
            shared.runtime.clone().spawn(async move {
                if let Some(r) = u.retry {
                    let wait = r.due_ms - now_ms();
                    if wait > 0 {
                        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                    }
                }
                if slot.begin() {
                    run_batch(shared, slot, u.group, vec![u]).await;
                }
            });
        } else {
            batches.entry(u.group).or_default().push((u.lane, u));
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
async fn run_batch(shared: Arc<Shared>, slot: Arc<Slot>, group: usize, units: Vec<Unit>) {
    let floor = slot.lock().low_watermark();
    let mut events = Vec::with_capacity(units.len());
    let mut failures: Vec<Failure> = Vec::new();
    let mut pairs = Vec::with_capacity(units.len());
    for (i, u) in units.iter().enumerate() {
        let mut e = (*u.event).clone();
        if let (Some(p), Some(floor)) = (e.position.as_mut(), floor) {
            p.set_floor(&slot.labels.topic, slot.labels.partition, floor);
        }
        events.push(e);
        match &u.poison {
            Some(reason) => failures.push(Failure {
                event: i,
                group,
                kind: FailureKind::Invalid,
                reason: reason.clone(),
                store: false,
            }),
            None => pairs.push((i, group)),
        }
    }
    let events = Arc::new(events);
    if !pairs.is_empty() {
        let (f, stats) = shared
            .pipeline
            .process_with_retries(
                &events,
                &pairs,
                InPlace::StoreOnly(shared.settings.store_attempts),
                false,
            )
            .await;
        failures.extend(f);
        tracing::trace!(
            group,
            units = units.len(),
            writes = stats.writes,
            "batch done"
        );
    }
    let fenced = || slot.lock().fenced;
    let mut handed_off = true;
    for f in &failures {
        handed_off &= hand_off(&shared, &units[f.event], &events[f.event], f, &fenced).await;
    }

    let (ready, finished) = {
        let mut st = slot.lock();
        if st.fenced || !handed_off {
            drop(st);
            shared
                .metrics
                .fenced
                .get_or_create(&slot.labels)
                .inc_by(units.len() as u64);
            slot.end();
            return;
        }
        let finished = st.complete(&units);
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
    spawn_ready(&shared, &slot, ready);
    slot.end();
    shared.wake.notify();
}

/// Send a failed unit to its group's retry topic, or dead-letter it. Returns false if the
/// partition was fenced before the broker acknowledged (the unit must not finish).
async fn hand_off(
    shared: &Shared,
    unit: &Unit,
    event: &Event,
    failure: &Failure,
    fenced: &impl Fn() -> bool,
) -> bool {
    if fenced() {
        return false; // The next owner re-reads it; a hand-off now would be a duplicate.
    }
    let runtime = shared.pipeline.runtime(unit.group);
    let def = &runtime.def;
    let now = now_ms();
    let (before, first_failure_ms) = unit
        .retry
        .map_or((0, now), |r| (r.attempts, r.first_failure_ms));
    let attempts = before + 1;
    let max_attempts =
        envelope::attempt_limit(failure.kind, failure.store, def.spec.retry.max_attempts);
    let step = envelope::next_step(failure.kind, attempts, max_attempts, def.retry_backoff, now);
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
    super::handoff::hand_off(
        &shared.republisher,
        &shared.metrics,
        def,
        event,
        env,
        first,
        fenced,
    )
    .await
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
        StreamSettings::from_run(run),
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
    let mut retry_topics: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, g) in pipeline.runtimes().iter().enumerate() {
        retry_topics
            .entry(g.def.retry_topic.clone())
            .or_default()
            .push(i);
    }
    super::topics::provision(client, pipeline.runtimes().iter().map(|g| &g.def)).await?;
    let metrics = pipeline.metrics().clone();
    let shared = Arc::new(Shared {
        republisher: Republisher::new(client)?,
        pipeline: pipeline.clone(),
        settings,
        runtime: tokio::runtime::Handle::current(),
        slots: Mutex::new(HashMap::new()),
        consumer: OnceLock::new(),
        queues: Mutex::new(HashMap::new()),
        wake: Arc::new(Wake::default()),
        retry_topics,
        metrics,
    });
    let mut consumer_cfg = client.cfg.clone();
    consumer_cfg
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky");
    if consumer_cfg.get("statistics.interval.ms").is_none() {
        consumer_cfg.set("statistics.interval.ms", "5000");
    }
    // The client's prefetch per partition is the other half of the memory bound: it stops
    // fetching a partition whose local queue holds this much.
    if consumer_cfg.get("queued.max.messages.kbytes").is_none() {
        let kb = (settings.limits.max_buffered_bytes / 1024).clamp(1, 2_097_151);
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
    tracing::info!(?topics, group_id, ?settings, "consuming");

    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn(move || poll_loop(shared, consumer, stop))
            .context("cannot start the Kafka poll thread")?
    };
    let _ = shutdown.wait_for(|s| *s).await;
    stop.store(true, AtomicOrdering::SeqCst);
    tokio::task::spawn_blocking(move || poller.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the Kafka poll thread panicked"))?;
    tracing::info!("consumer stopped");
    Ok(())
}

/// The poll thread. Each round serves the main queue (rebalances, statistics, errors) and
/// takes messages from every partition queue whose partition is below its bound — a
/// partition at its bound is simply not read (its fetching stops once the client's
/// prefetch queue is full), so nothing is discarded and refetched. Then it spawns what
/// became ready and commits periodically. On stop it revokes everything (drain, commit,
/// fence) and closes the consumer.
fn poll_loop(shared: Arc<Shared>, consumer: Arc<BaseConsumer<Ctx>>, stop: Arc<AtomicBool>) {
    let mut last_commit = Instant::now();
    while !stop.load(AtomicOrdering::SeqCst) {
        let mut touched: Vec<Arc<Slot>> = Vec::new();
        let mut delivered = 0;
        // Rebalances, statistics and errors (and messages of a partition whose queue could
        // not be split).
        for _ in 0..shared.settings.fetch_size {
            match consumer.poll(Duration::ZERO) {
                Some(Ok(m)) => {
                    let event = to_event(&m);
                    drop(m);
                    deliver(&shared, event, &mut touched);
                    delivered += 1;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "Kafka consume error"),
                None => break,
            }
        }
        {
            let queues = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            for (tp, queue) in queues.iter() {
                let Some(slot) = shared.slots().get(tp).cloned() else {
                    continue;
                };
                for _ in 0..shared.settings.fetch_size {
                    if slot.hold(&shared) {
                        break;
                    }
                    match queue.poll(Duration::ZERO) {
                        Some(Ok(m)) => {
                            let event = to_event(&m);
                            drop(m);
                            deliver_to(&shared, &slot, event, &mut touched);
                            delivered += 1;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, topic = %tp.0, partition = tp.1, "Kafka consume error");
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        for slot in touched {
            let ready = {
                let st = &mut slot.lock();
                shared
                    .metrics
                    .in_flight
                    .get_or_create(&slot.labels)
                    .set(st.in_flight() as i64);
                st.take_ready()
            };
            spawn_ready(&shared, &slot, ready);
        }
        // Nothing read: sleep until a queue fills or a dispatch finishes (the timeout bounds
        // how late rebalance callbacks and commits can be).
        if delivered == 0 {
            shared.wake.wait(Duration::from_millis(20));
        }
        if last_commit.elapsed() >= shared.settings.commit_interval {
            let slots: Vec<_> = shared.slots().values().cloned().collect();
            // Synchronous: one broker round trip per interval on this thread (fetching goes on
            // in librdkafka's threads meanwhile), and a failed commit is known here and
            // retried by the next one. (Async commit results never reach this consumer: its
            // partition queues are split off the main queue.)
            let _ = shared.commit(&consumer, &slots);
            last_commit = Instant::now();
        }
    }
    tracing::info!("shutting down: draining in-flight work");
    // Everything this host tracks, assigned or not, is drained, committed and fenced.
    let mut all = TopicPartitionList::new();
    for (topic, partition) in shared.slots().keys() {
        all.add_partition(topic, *partition);
    }
    shared.revoke(&consumer, &all, false);
    // Partition queues hold the consumer: drop them all before it can close.
    shared
        .queues
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    // Leave the group; a task may hold the consumer for an instant (resolving a weak
    // reference), so wait for the last reference, but never forever.
    let mut consumer = consumer;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Arc::try_unwrap(consumer) {
            Ok(c) => {
                drop(c);
                break;
            }
            Err(c) if Instant::now() < deadline => {
                consumer = c;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => {
                tracing::error!(
                    "consumer still referenced at shutdown; exiting without closing it (the group rebalances after the session timeout)"
                );
                break;
            }
        }
    }
}

/// Register a message from the main queue with its partition.
fn deliver(shared: &Shared, event: Event, touched: &mut Vec<Arc<Slot>>) {
    let tp = (event.topic.clone(), event.partition);
    let Some(slot) = shared.slots().get(&tp).cloned() else {
        tracing::error!(topic = %tp.0, partition = tp.1, "message of an unassigned partition ignored");
        return;
    };
    deliver_to(shared, &slot, event, touched);
}

/// Register one consumed message with its (known) partition.
fn deliver_to(shared: &Shared, slot: &Arc<Slot>, event: Event, touched: &mut Vec<Arc<Slot>>) {
    let tp = (&slot.labels.topic, slot.labels.partition);
    let event = Arc::new(event);
    let units = shared.units(&event);
    shared.metrics.events.get_or_create(&slot.labels).inc();
    let mut st = slot.lock();
    if let Err(e) = st.deliver(event.offset, event.payload.len(), units) {
        // Only a client bug could cause this; nothing past this offset is committed without
        // the tracker's say, so it is not lost.
        tracing::error!(error = %e, topic = %tp.0, partition = tp.1, "message out of order; ignored");
        return;
    }
    drop(st);
    if !touched.iter().any(|s| Arc::ptr_eq(s, slot)) {
        touched.push(slot.clone());
    }
}
