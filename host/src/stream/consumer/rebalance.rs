//! Rebalance callbacks: new partitions get their state (and, at the first delivery, the
//! previous owner's finished map); revoked ones are drained, committed and fenced.

use super::*;

impl Shared {
    /// New partitions get their state and their own queue, split off before librdkafka
    /// starts fetching them (so no message of theirs reaches the main queue). What the
    /// previous owner finished above its commit is read at the first delivery
    /// ([`Shared::resume`]).
    pub(super) fn assign(&self, tpl: &TopicPartitionList) {
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
    pub(super) fn resume(&self, consumer: &BaseConsumer<Ctx>, slot: &Slot) {
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
    /// ([`super::super::offset_map`]). A map that cannot be read is left out: its events are
    /// processed again, deduplicated by the stores, as before maps existed.
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
