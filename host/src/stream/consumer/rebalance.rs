//! Rebalance callbacks: new partitions get their state (and, at the first delivery, the
//! previous owner's finished map); revoked ones are drained, committed and fenced.

use super::*;

impl Shared {
    /// New partitions get their state and their own queue, split off before librdkafka
    /// starts fetching them (so no message of theirs reaches the main queue). What the
    /// previous owner finished above its commit is read at the first delivery
    /// ([`Shared::resume`]).
    ///
    /// An assignment served while the consumer closes (the second round of a cooperative
    /// rebalance that began just before the stop) is not taken: this host consumes nothing
    /// more, the close revokes it at once, and the new owner resumes from the commit.
    pub(super) fn assign(&self, consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) {
        // Splitting a partition's queue needs the shared handle, which is gone only while
        // the consumer is being dropped, that is closed.
        let Some(handle) = self.consumer.get().and_then(Weak::upgrade) else {
            tracing::info!(
                partitions = tpl.count(),
                "assignment received while the consumer closes: not taken; the group's next owner resumes from the commit"
            );
            return;
        };
        self.metrics.consumer_joined.set(1);
        let sources = match sources(consumer, tpl) {
            Ok(s) => s,
            Err(e) => {
                // Not tracked: their messages are ignored (never processed, never
                // committed) until the host restarts and asks again.
                return self.fail(format!(
                    "cannot read the assigned topics' ids, which name their positions: {e}"
                ));
            }
        };
        let mut slots = self.slots();
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        for el in tpl.elements() {
            let tp = (el.topic().to_owned(), el.partition());
            let source = sources.get(&tp.0).cloned().unwrap_or_else(|| tp.0.clone());
            tracing::info!(topic = %tp.0, partition = tp.1, %source, "partition assigned");
            if let Some(mut q) = handle.split_partition_queue(&tp.0, tp.1) {
                let wake = self.wake.clone();
                q.set_nonempty_callback(move || wake.notify());
                queues.insert(tp.clone(), q);
            }
            slots.insert(tp.clone(), Arc::new(Slot::new(&tp.0, tp.1, source)));
        }
    }

    /// Before a partition's first delivery: read the finished-offset map committed with its
    /// offset. Not at assignment: a `read_committed` consumer reads only stable offsets, and
    /// while a crashed owner's transaction is still open they are not; by the first
    /// delivery librdkafka has read them itself.
    pub(super) fn resume(&self, consumer: &BaseConsumer<Ctx>, slot: &Slot) {
        if slot.resumed.swap(true, AtomicOrdering::SeqCst) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&slot.labels.topic, slot.labels.partition);
        let mut maps = self.finished_maps(consumer, &tpl);
        if let Some(map) = maps.remove(&(slot.labels.topic.clone(), slot.labels.partition)) {
            slot.lock().resume(map, self.pipeline.router().groups());
        }
    }

    /// The finished-offset maps committed with the partitions' offsets
    /// ([`super::super::offset_map`]), as [`read_map`] takes them.
    pub(super) fn finished_maps(
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
            if let Some(map) = read_map(&topic, partition, offset, &metadata) {
                maps.insert((topic, partition), map);
            }
        }
        maps
    }

    /// A partition whose offsets went back, from `last` delivered to `offset`: its topic was
    /// deleted and created again while assigned (librdkafka reset the fetch position to the
    /// new log's start; no rebalance happens). Its state belongs to a log that is gone:
    /// fenced under the gate (a hand-off of the old log in the open transaction dooms it, so
    /// none is committed later), and the partition starts over under its topic's new id. The
    /// committed offset and its map described the old log, so no map is read. If the id did
    /// not change — a truncated log, or brokers that have not seen the new topic yet — or
    /// cannot be read, the consumer stops (`None`): its successor resumes from the last
    /// commit, and nothing of the new log is taken meanwhile.
    pub(super) fn restart(
        &self,
        consumer: &BaseConsumer<Ctx>,
        old: &Arc<Slot>,
        offset: i64,
        last: i64,
    ) -> Option<Arc<Slot>> {
        let (topic, partition) = (old.labels.topic.clone(), old.labels.partition);
        tracing::warn!(%topic, partition, offset, last, unfinished = old.lock().in_flight(),
            "the partition's offsets went back: its topic was deleted and created again; its state starts over, and what was unfinished of the old log is dropped");
        {
            let _no_hand_offs = self.txn.exclusive();
            fence(old);
            if old.in_txn.load(AtomicOrdering::SeqCst) {
                self.txn.poison(format!(
                    "partition {topic}/{partition} started over with hand-offs of its old log in the transaction"
                ));
            }
        }
        let tp = (topic.clone(), partition);
        self.slots().remove(&tp);
        self.metrics.drop_partition(&old.labels);
        let topics = [topic.clone()];
        let mut tries = 0;
        let source = loop {
            match topic_ids::sources(consumer.client(), &topics, Duration::from_secs(10)) {
                Ok(mut s) => {
                    let source = s.remove(&topic).unwrap_or_else(|| topic.clone());
                    if source != old.source {
                        break source;
                    }
                    tries += 1;
                    if tries == 5 {
                        self.fail(format!("the offsets of {topic}/{partition} went back from {last} to {offset} but its topic id did not change (a truncated log, or a cluster without topic ids): stopping, to resume from the last commit"));
                        return None;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => {
                    self.fail(format!(
                        "cannot read the id of {topic}, whose offsets went back: {e}"
                    ));
                    return None;
                }
            }
        };
        tracing::info!(%topic, partition, %source, "partition started over under its topic's new id");
        let fresh = Arc::new(Slot::new(&topic, partition, source));
        fresh.resumed.store(true, AtomicOrdering::SeqCst);
        self.metrics.log_resets.get_or_create(&old.labels).inc();
        self.slots().insert(tp, fresh.clone());
        Some(fresh)
    }

    /// Drain (bounded by `drain_timeout`), commit, fence, forget. Runs on the poll thread
    /// inside librdkafka's rebalance callback, before the partitions are released.
    pub(super) fn revoke(
        &self,
        consumer: &BaseConsumer<Ctx>,
        tpl: &TopicPartitionList,
        lost: bool,
    ) {
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
}

/// The source name of each assigned topic's positions ([`topic_ids`]), read from the
/// brokers at every assignment: a topic deleted and created again revokes its partitions and
/// assigns them anew, with its new incarnation's id. Three tries of ten seconds (a
/// rebalance during a broker failover), then an error.
fn sources(
    consumer: &BaseConsumer<Ctx>,
    tpl: &TopicPartitionList,
) -> Result<HashMap<String, String>, TopicIdError> {
    let mut topics: Vec<String> = tpl
        .elements()
        .iter()
        .map(|el| el.topic().to_owned())
        .collect();
    topics.sort();
    topics.dedup();
    let mut tries = 0;
    loop {
        tries += 1;
        match topic_ids::sources(consumer.client(), &topics, Duration::from_secs(10)) {
            Err(e) if tries < 3 => {
                tracing::warn!(error = %e, "cannot read topic ids yet; trying again");
            }
            result => return result,
        }
    }
}
