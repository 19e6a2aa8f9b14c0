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
//! ([`super::offset_map`]), which the partition's next owner reads on assignment and skips.
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

use super::envelope::{self, Envelope, NextStep};
use super::handoff::Destination;
use super::handoff::HandOff;
use super::kafka::{KafkaClient, to_event};
use super::lanes::{LaneKey, split_batches};
use super::offset_map::FinishedMap;
use super::partition::{Delivered, Limits, PartitionState, RetryMeta, Unit};
use super::transaction::{Committed, Exclusive, Transactions, TxnError};
use crate::config::RunSettings;
use crate::event::Event;
use crate::metrics::{Metrics, PartitionLabels};
use crate::pipeline::{Failure, FailureKind, InPlace, Pipeline};
use crate::spec::Ordering;
use anyhow::Context as _;
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
    fn new(topic: &str, partition: i32) -> Slot {
        Slot {
            labels: PartitionLabels::new(topic, partition),
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
    retry_topics: HashMap<String, Vec<usize>>,
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
    /// starts fetching them (so no message of theirs reaches the main queue). What the
    /// previous owner finished above its commit is read at the first delivery
    /// ([`Shared::resume`]).
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

    /// Before a partition's first delivery: read the finished-offset map committed with its
    /// offset. Not at assignment: a `read_committed` consumer reads only stable offsets, and
    /// while a crashed owner's transaction is still open they are not; by the first
    /// delivery librdkafka has read them itself.
    fn resume(&self, consumer: &BaseConsumer<Ctx>, slot: &Slot) {
        if slot.resumed.swap(true, AtomicOrdering::SeqCst) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&slot.labels.topic, slot.labels.partition);
        let mut maps = self.finished_maps(consumer, &tpl);
        if let Some(map) = maps.remove(&(slot.labels.topic.clone(), slot.labels.partition)) {
            slot.lock().resume(map);
        }
    }

    /// The finished-offset maps committed with the partitions' offsets
    /// ([`super::offset_map`]). A map that cannot be read is left out: its events are
    /// processed again, deduplicated by the stores, as before maps existed.
    fn finished_maps(
        &self,
        consumer: &BaseConsumer<Ctx>,
        tpl: &TopicPartitionList,
    ) -> HashMap<TopicPartition, FinishedMap> {
        let mut maps = HashMap::new();
        if tpl.count() == 0 {
            return maps;
        }
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the committed offsets' finished maps; their events are processed again");
                return maps;
            }
        };
        for (topic, partition, offset, metadata) in committed_metadata(&committed) {
            match FinishedMap::decode(&metadata, offset) {
                Ok(map) if map.is_empty() => {}
                Ok(map) => {
                    tracing::info!(%topic, partition, offset, finished = map.len(),
                        "resuming: offsets finished above the commit are skipped");
                    maps.insert((topic, partition), map);
                }
                Err(e) => {
                    tracing::warn!(%topic, partition, offset, error = %e,
                        "finished map ignored; its events are processed again");
                }
            }
        }
        maps
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
        if lost {
            // Another member may own them already: do not wait, do not commit — and their
            // hand-offs in the open transaction must not become visible either.
            {
                let _no_hand_offs = self.txn.exclusive();
                for slot in &revoked {
                    fence(slot);
                    if slot.in_txn.load(AtomicOrdering::SeqCst) {
                        self.txn.poison(format!(
                            "partition {}/{} was lost with hand-offs in the transaction",
                            slot.labels.topic, slot.labels.partition
                        ));
                    }
                }
            }
            if let Err(e) = self.commit(consumer, &[]) {
                tracing::warn!(error = %e, "commit after a lost assignment failed");
            }
        }
        let deadline = Instant::now() + self.settings.drain_timeout;
        for slot in &revoked {
            let mut a = slot.activity();
            if lost {
                continue;
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
        // The last chance to commit what this owner finished (with every other partition's
        // progress: one transaction holds them all). The commit fences them before any
        // hand-off can follow; if it fails, the next owner redoes their work since the last.
        if !lost && let Err(e) = self.commit(consumer, &revoked) {
            tracing::warn!(error = %e, "commit on revoke failed; the next owner redoes what this one finished since its last commit");
            // Undecided, with their offsets unsent: the revoked partitions' hand-offs must
            // not commit later without them (a commit already under way carries both).
            if matches!(e, TxnError::Pending(_))
                && revoked
                    .iter()
                    .any(|s| s.in_txn.load(AtomicOrdering::SeqCst))
            {
                self.txn
                    .poison("partitions revoked with hand-offs in the transaction".into());
            }
        }
        for slot in &revoked {
            fence(slot);
            let st = slot.lock();
            tracing::info!(topic = %slot.labels.topic, partition = slot.labels.partition, lost,
                committed = ?st.committed.as_ref().map(|c| c.offset), unfinished = st.in_flight(), "partition revoked");
            self.metrics.drop_partition(&slot.labels);
        }
    }

    /// Commit, in the open transaction with its hand-offs, the low watermark and finished
    /// map of every assigned partition (and of `revoking`, which are no longer in the
    /// assignment, and are fenced before the gate opens again) that changed; then open the
    /// next transaction. An aborted transaction rewinds the partitions that handed off in it
    /// to their last commit.
    fn commit(&self, consumer: &BaseConsumer<Ctx>, revoking: &[Arc<Slot>]) -> Result<(), TxnError> {
        // Under the gate: no hand-off runs, so every record in the transaction belongs to a
        // finished unit, which the offsets read now cover.
        let txn = self.txn.exclusive();
        let result = self.commit_exclusive(&txn, consumer, revoking);
        for slot in revoking {
            fence(slot);
        }
        result
    }

    fn commit_exclusive(
        &self,
        txn: &Exclusive<'_>,
        consumer: &BaseConsumer<Ctx>,
        revoking: &[Arc<Slot>],
    ) -> Result<(), TxnError> {
        let mut slots: Vec<Arc<Slot>> = self.slots().values().cloned().collect();
        slots.extend(revoking.iter().cloned());
        let mut tpl = TopicPartitionList::new();
        let mut moved = Vec::new();
        let mut records = false;
        for slot in &slots {
            records |= slot.in_txn.load(AtomicOrdering::SeqCst);
            let mut st = slot.lock();
            if st.fenced {
                continue;
            }
            if let Some(next) = st.to_commit() {
                let (topic, partition) = (&slot.labels.topic, slot.labels.partition);
                if let Err(e) =
                    tpl.add_partition_offset(topic, partition, Offset::Offset(next.offset))
                {
                    tracing::error!(error = %e, "cannot build commit");
                    continue;
                }
                if !next.metadata.is_empty()
                    && !self.maps_refused.load(AtomicOrdering::Relaxed)
                    && let Some(mut el) = tpl.find_partition(topic, partition)
                {
                    el.set_metadata(&next.metadata);
                }
                moved.push((slot.clone(), next.offset));
                st.committed = Some(next);
            }
        }
        if moved.is_empty() && !records && !txn.unsettled() {
            return Ok(());
        }
        let issued = Instant::now();
        let result = txn.commit(&tpl, consumer.group_metadata().as_ref());
        if !matches!(result, Ok(Committed::Now)) {
            // Not sent (or not committed): the next commit sends them again.
            for (slot, _) in &moved {
                slot.lock().committed = None;
            }
        }
        if let Err(TxnError::Pending(reason)) = &result {
            // Undecided: the records stay in the transaction, and so do their flags.
            tracing::warn!(%reason, "offset commit not finished; the next commit retries it");
            return result.map(|_| ());
        }
        // Decided: the next transaction is open, and nothing has handed off in it yet.
        let in_txn: Vec<Arc<Slot>> = slots
            .iter()
            .filter(|s| s.in_txn.swap(false, AtomicOrdering::SeqCst))
            .cloned()
            .collect();
        for slot in &slots {
            let mut st = slot.lock();
            match result {
                Ok(_) => st.transaction_committed(),
                Err(_) => st.transaction_aborted(),
            }
        }
        match &result {
            Ok(Committed::Earlier) => {}
            Ok(Committed::Now) => {
                self.metrics
                    .commit_seconds
                    .observe(issued.elapsed().as_secs_f64());
                for (slot, next) in moved {
                    self.metrics
                        .committed_offset
                        .get_or_create(&slot.labels)
                        .set(next);
                }
            }
            Err(TxnError::Aborted {
                metadata_too_large, ..
            }) => {
                self.metrics.transaction_aborts.inc();
                if *metadata_too_large && !self.maps_refused.swap(true, AtomicOrdering::Relaxed) {
                    tracing::error!(
                        "the brokers refuse the finished-offset maps (offset.metadata.max.bytes is below 4096): committing offsets without them, so a new owner redoes the work finished behind a waiting event, hand-offs included; raise offset.metadata.max.bytes or lower FH_MAX_OFFSET_SPAN"
                    );
                }
                let assigned: Vec<Arc<Slot>> = in_txn
                    .into_iter()
                    .filter(|s| !revoking.iter().any(|r| Arc::ptr_eq(r, s)))
                    .collect();
                self.rewind(consumer, &assigned);
            }
            Err(TxnError::Fatal(reason)) => self.fail(reason.clone()),
            Err(TxnError::Pending(_)) => {} // Returned above.
        }
        result.map(|_| ())
    }

    /// Start `slots` over from what the broker has committed for them, as a new owner would:
    /// their hand-offs since were aborted with the transaction that held them. The old
    /// state is fenced (its late results are dropped), and reading seeks back.
    fn rewind(&self, consumer: &BaseConsumer<Ctx>, slots: &[Arc<Slot>]) {
        if slots.is_empty() {
            return;
        }
        // Fenced before anything can fail: their in-memory progress includes hand-offs that
        // were just aborted, so none of it may ever be committed.
        let mut tpl = TopicPartitionList::new();
        for slot in slots {
            fence(slot);
            tpl.add_partition(&slot.labels.topic, slot.labels.partition);
        }
        let committed = match consumer.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => committed_metadata(&c),
            Err(e) => {
                return self.fail(format!(
                    "cannot read the committed offsets to rewind to after an aborted transaction: {e}"
                ));
            }
        };
        let mut current = self.slots();
        for old in slots {
            let tp = (old.labels.topic.clone(), old.labels.partition);
            if !current.get(&tp).is_some_and(|s| Arc::ptr_eq(s, old)) {
                continue; // Revoked meanwhile.
            }
            let fresh = Slot::new(&tp.0, tp.1);
            fresh.resumed.store(true, AtomicOrdering::SeqCst);
            fresh.lock().skip_units(old.lock().committed_hand_offs());
            let point = committed
                .iter()
                .find(|(t, p, _, _)| *t == tp.0 && *p == tp.1);
            let offset = match point {
                Some((_, _, offset, metadata)) => {
                    if let Ok(map) = FinishedMap::decode(metadata, *offset) {
                        fresh.lock().resume(map);
                    }
                    Offset::Offset(*offset)
                }
                // Nothing committed yet: where a first owner starts (auto.offset.reset).
                None => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(&tp.0, tp.1, offset, Duration::from_secs(10)) {
                return self.fail(format!(
                    "cannot rewind {}/{} to {offset:?} after an aborted transaction: {e}",
                    tp.0, tp.1
                ));
            }
            tracing::info!(topic = %tp.0, partition = tp.1, ?offset, "rewound after an aborted transaction");
            self.metrics.rewinds.get_or_create(&old.labels).inc();
            current.insert(tp, Arc::new(fresh));
        }
    }

    /// The consumer cannot go on: stop it (the host exits with this reason, and is
    /// restarted from the last commit).
    fn fail(&self, reason: String) {
        tracing::error!(%reason, "the Kafka consumer stops");
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(reason);
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
            match hand_off(&shared, &units[f.event], &events[f.event], f, &fenced).await {
                HandOff::Done => {
                    in_txn();
                    slot.lock().handed_off(units[f.event].offset, group);
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
        let (ready, rest): (Vec<Unit>, Vec<Unit>) = pending
            .into_iter()
            .partition(|u| !still.iter().any(|f| units[f.event].offset == u.offset));
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
fn finish(shared: &Arc<Shared>, slot: &Arc<Slot>, units: &[Unit]) -> bool {
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
fn unfinished(shared: &Shared, slot: &Slot, units: usize) {
    shared
        .metrics
        .fenced
        .get_or_create(&slot.labels)
        .inc_by(units as u64);
    slot.end();
    shared.wake.notify();
}

/// Send a failed unit to its group's retry topic, or dead-letter it.
async fn hand_off(
    shared: &Shared,
    unit: &Unit,
    event: &Event,
    failure: &Failure,
    fenced: &impl Fn() -> bool,
) -> HandOff {
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
        shared.txn.republisher(),
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
    let mut retry_topics: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, g) in pipeline.runtimes().iter().enumerate() {
        retry_topics
            .entry(g.def.retry_topic.clone())
            .or_default()
            .push(i);
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
                    deliver(&shared, &consumer, event, &mut touched);
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
                            deliver_to(&shared, &consumer, &slot, event, &mut touched);
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
            // Synchronous, on this thread: a transaction's round trips per interval (fetching
            // goes on in librdkafka's threads meanwhile); a failed commit is known here, and
            // the next one carries its offsets.
            let _ = shared.commit(&consumer, &[]);
            last_commit = Instant::now();
        }
        if shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            break;
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
fn deliver(
    shared: &Shared,
    consumer: &BaseConsumer<Ctx>,
    event: Event,
    touched: &mut Vec<Arc<Slot>>,
) {
    let tp = (event.topic.clone(), event.partition);
    let Some(slot) = shared.slots().get(&tp).cloned() else {
        tracing::error!(topic = %tp.0, partition = tp.1, "message of an unassigned partition ignored");
        return;
    };
    deliver_to(shared, consumer, &slot, event, touched);
}

/// Register one consumed message with its (known) partition.
fn deliver_to(
    shared: &Shared,
    consumer: &BaseConsumer<Ctx>,
    slot: &Arc<Slot>,
    event: Event,
    touched: &mut Vec<Arc<Slot>>,
) {
    shared.resume(consumer, slot);
    let tp = (&slot.labels.topic, slot.labels.partition);
    let event = Arc::new(event);
    let units = shared.units(&event);
    shared.metrics.events.get_or_create(&slot.labels).inc();
    let mut st = slot.lock();
    match st.deliver(event.offset, event.payload.len(), units) {
        Ok(Delivered::Skipped) => {
            shared.metrics.skipped.get_or_create(&slot.labels).inc();
        }
        Ok(Delivered::Queued | Delivered::Unrouted) => {}
        Err(e) => {
            // Only a client bug could cause this; nothing past this offset is committed
            // without the tracker's say, so it is not lost.
            tracing::error!(error = %e, topic = %tp.0, partition = tp.1, "message out of order; ignored");
            return;
        }
    }
    drop(st);
    if !touched.iter().any(|s| Arc::ptr_eq(s, slot)) {
        touched.push(slot.clone());
    }
}

/// Each partition's committed offset and metadata, the metadata as raw bytes: rust-rdkafka's
/// `metadata()` panics on bytes that are not UTF-8, and whoever may commit for the group can
/// write any. Partitions without a committed offset are left out.
fn committed_metadata(tpl: &TopicPartitionList) -> Vec<(String, i32, i64, Vec<u8>)> {
    // SAFETY: `tpl` owns a valid list of `cnt` elements for the whole borrow; each element's
    // topic is a NUL-terminated string and a non-null `metadata` points at `metadata_size`
    // bytes, all owned by the list.
    let raw = unsafe { &*tpl.ptr() };
    let elems: &[rdkafka::bindings::rd_kafka_topic_partition_t] = match raw.cnt {
        n if n > 0 && !raw.elems.is_null() => unsafe {
            std::slice::from_raw_parts(raw.elems, n as usize)
        },
        _ => &[],
    };
    elems
        .iter()
        .filter(|el| el.offset >= 0)
        .map(|el| {
            let topic = unsafe { std::ffi::CStr::from_ptr(el.topic) }.to_string_lossy();
            let metadata = if el.metadata.is_null() {
                Vec::new()
            } else {
                unsafe { std::slice::from_raw_parts(el.metadata.cast::<u8>(), el.metadata_size) }
                    .to_vec()
            };
            (topic.into_owned(), el.partition, el.offset, metadata)
        })
        .collect()
}
