//! Where offsets are committed: the low watermarks and finished maps of every partition,
//! in the hand-off transaction ([`super::super::transaction`]), and the rewind after an
//! aborted one.

use super::*;

impl Shared {
    /// Commit, in the open transaction with its hand-offs, the low watermark and finished
    /// map of every assigned partition (and of `revoking`, which are no longer in the
    /// assignment, and are fenced before the gate opens again) that changed; then open the
    /// next transaction. An aborted transaction rewinds the partitions that handed off in it
    /// to their last commit.
    pub(super) fn commit(
        &self,
        consumer: &BaseConsumer<Ctx>,
        revoking: &[Arc<Slot>],
    ) -> Result<(), TxnError> {
        // Under the gate: no hand-off runs, so every record in the transaction belongs to a
        // finished unit, which the offsets read now cover.
        let txn = self.txn.exclusive();
        let result = self.commit_exclusive(&txn, consumer, revoking);
        for slot in revoking {
            fence(slot);
        }
        result
    }

    pub(super) fn commit_exclusive(
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
            if let Some(next) = st.to_commit(self.pipeline.router().groups()) {
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
        let result = txn.commit(&tpl, consumer.group_metadata());
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
        // An abort leaves its hand-offs recorded: every partition that handed off in it is
        // rewound or revoked below, and until its old state is fenced, a batch still running
        // reads that state's floor, which must stay below them.
        if result.is_ok() {
            for slot in &slots {
                slot.lock().transaction_committed();
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
    pub(super) fn rewind(&self, consumer: &BaseConsumer<Ctx>, slots: &[Arc<Slot>]) {
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
            let fresh = Slot::new(&tp.0, tp.1, old.source.clone());
            fresh.resumed.store(true, AtomicOrdering::SeqCst);
            fresh.lock().skip_units(old.lock().committed_hand_offs());
            let point = committed
                .iter()
                .find(|(t, p, _, _)| *t == tp.0 && *p == tp.1);
            let offset = match point {
                Some((_, _, offset, metadata)) => {
                    if let Some(map) = read_map(&tp.0, tp.1, *offset, metadata) {
                        fresh.lock().resume(map, self.pipeline.router().groups());
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
    pub(super) fn fail(&self, reason: String) {
        tracing::error!(%reason, "the Kafka consumer stops");
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(reason);
    }
}

/// The finished map committed with `offset` of `topic`/`partition`, if it holds anything. A
/// map that cannot be read is left out: its events are processed again, deduplicated by the
/// stores, as before maps existed.
pub(super) fn read_map(
    topic: &str,
    partition: i32,
    offset: i64,
    metadata: &[u8],
) -> Option<FinishedMap> {
    match FinishedMap::decode(metadata, offset) {
        Ok(map) if map.is_empty() => None,
        Ok(map) => {
            tracing::info!(%topic, partition, offset, finished = map.len(),
                "resuming: offsets finished above the commit are skipped");
            Some(map)
        }
        Err(e) => {
            tracing::warn!(%topic, partition, offset, error = %e,
                "finished map ignored; its events are processed again");
            None
        }
    }
}

/// Each partition's committed offset and metadata, the metadata as raw bytes: rust-rdkafka's
/// `metadata()` panics on bytes that are not UTF-8, and whoever may commit for the group can
/// write any. Partitions without a committed offset are left out.
pub(super) fn committed_metadata(tpl: &TopicPartitionList) -> Vec<(String, i32, i64, Vec<u8>)> {
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
