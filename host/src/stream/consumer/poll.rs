//! The poll thread: reads each partition below its bound, registers what it read, spawns
//! what became ready, commits periodically, and on stop revokes everything.

use super::*;

/// The poll thread. Each round serves the main queue (rebalances, statistics, errors) and
/// takes messages from every partition queue whose partition is below its bound — a
/// partition at its bound is simply not read (its fetching stops once the client's
/// prefetch queue is full), so nothing is discarded and refetched. Then it spawns what
/// became ready and commits periodically. On stop it revokes everything (drain, commit,
/// fence) and closes the consumer.
pub(super) fn poll_loop(
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<Ctx>>,
    stop: Arc<AtomicBool>,
) {
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
                let Some(mut slot) = shared.slots().get(tp).cloned() else {
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
                            delivered += 1;
                            match deliver_to(&shared, &consumer, &slot, event, &mut touched) {
                                Delivery::Same => {}
                                Delivery::Restarted(fresh) => slot = fresh,
                                Delivery::Stopped => break,
                            }
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
    // Leave the group once this thread holds the last reference (the queues just dropped
    // held the others); never wait forever.
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
pub(super) fn deliver(
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
    let _ = deliver_to(shared, consumer, &slot, event, touched);
}

/// What became of a partition's state with a delivery.
pub(super) enum Delivery {
    Same,
    /// It started over ([`Shared::restart`]): the caller's slot is fenced; use this one.
    Restarted(Arc<Slot>),
    /// It could not start over: the consumer stops; read no more of the partition.
    Stopped,
}

/// Register one consumed message with its (known) partition. An offset below the last one
/// delivered means the partition's log is a new one ([`Shared::restart`]): the message goes
/// to the partition's fresh state.
pub(super) fn deliver_to(
    shared: &Shared,
    consumer: &BaseConsumer<Ctx>,
    slot: &Arc<Slot>,
    mut event: Event,
    touched: &mut Vec<Arc<Slot>>,
) -> Delivery {
    shared.resume(consumer, slot);
    let tp = (&slot.labels.topic, slot.labels.partition);
    if let Some(p) = event.position.as_mut() {
        p.source.clone_from(&slot.source);
    }
    let event = Arc::new(event);
    let units = shared.units(&event);
    shared.metrics.events.get_or_create(&slot.labels).inc();
    let mut st = slot.lock();
    match st.deliver(event.offset, event.payload.len(), units) {
        Ok(Delivered::Skipped) => {
            shared.metrics.skipped.get_or_create(&slot.labels).inc();
        }
        Ok(Delivered::Queued | Delivered::Unrouted) => {}
        Err(OffsetError::OutOfOrder { offset, last }) if offset < last => {
            drop(st);
            let Some(fresh) = shared.restart(consumer, slot, offset, last) else {
                return Delivery::Stopped;
            };
            let event = Arc::unwrap_or_clone(event);
            // The fresh state has delivered nothing: this cannot restart again.
            let _ = deliver_to(shared, consumer, &fresh, event, touched);
            return Delivery::Restarted(fresh);
        }
        Err(e) => {
            // Only a client bug could cause this; nothing past this offset is committed
            // without the tracker's say, so it is not lost.
            tracing::error!(error = %e, topic = %tp.0, partition = tp.1, "message out of order; ignored");
            return Delivery::Same;
        }
    }
    drop(st);
    if !touched.iter().any(|s| Arc::ptr_eq(s, slot)) {
        touched.push(slot.clone());
    }
    Delivery::Same
}
