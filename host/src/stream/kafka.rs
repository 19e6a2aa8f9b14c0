//! Kafka consumption: fetch a batch, process it through the pipeline, dead-letter what cannot
//! succeed (and wait for the broker's acknowledgement), then commit one past the last
//! offset of each partition in the batch. Every message below a committed offset is
//! finished, so a crash re-delivers and never skips; the stores' position checks make the
//! re-delivery a no-op.

use super::dead_letter::headers as dlh;
use crate::config::RunSettings;
use crate::event::Event;
use crate::pipeline::{Failure, Pipeline};
use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Client configuration shared by the consumer, producer and admin client.
pub fn client_config(settings: &RunSettings, brokers: &str) -> anyhow::Result<ClientConfig> {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", brokers);
    for kv in settings
        .kafka_properties
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("FH_KAFKA_PROPERTIES entry {kv:?} is not key=value"))?;
        cfg.set(k.trim(), v.trim());
    }
    Ok(cfg)
}

/// Create the given topics if missing (one partition; used for dead-letter topics).
pub async fn ensure_topics(cfg: &ClientConfig, topics: &BTreeSet<String>) -> anyhow::Result<()> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        cfg.create().context("cannot create Kafka admin client")?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("cannot create dead-letter topics")?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

fn to_event(m: &BorrowedMessage<'_>) -> Event {
    Event {
        topic: m.topic().to_owned(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        headers: m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default(),
        payload: m.payload().unwrap_or_default().to_vec(),
        replayable: true,
        origin: None,
    }
}

/// Consume until `shutdown` flips to true; then finish the current batch, commit, and return.
pub async fn run(
    settings: &RunSettings,
    brokers: &str,
    pipeline: Arc<Pipeline>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cfg = client_config(settings, brokers)?;
    let dlq_topics: BTreeSet<String> = pipeline
        .groups()
        .iter()
        .map(|g| g.def.dead_letter_topic.clone())
        .collect();
    ensure_topics(&cfg, &dlq_topics).await?;

    let consumer: StreamConsumer = cfg
        .clone()
        .set("group.id", &settings.kafka_group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .create()
        .context("cannot create Kafka consumer")?;
    let producer: FutureProducer = cfg
        .clone()
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .context("cannot create Kafka producer")?;
    let topics: Vec<&str> = pipeline.router().topics().collect();
    consumer
        .subscribe(&topics)
        .with_context(|| format!("cannot subscribe to {topics:?}"))?;
    tracing::info!(?topics, group_id = %settings.kafka_group_id, "consuming");

    // Next offset to commit per partition: everything below it is finished.
    let mut finished: BTreeMap<(String, i32), i64> = BTreeMap::new();
    loop {
        let first = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            m = consumer.recv() => m,
        };
        let mut events = match first {
            Ok(m) => vec![to_event(&m)],
            Err(e) => {
                tracing::warn!(error = %e, "Kafka consume error");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let deadline = tokio::time::Instant::now() + settings.batch_wait;
        while events.len() < settings.batch_size {
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(Ok(m)) => events.push(to_event(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Kafka consume error");
                    break;
                }
                Err(_) => break,
            }
        }
        let events = Arc::new(events);
        let pairs = pipeline.route(&events);
        let (failures, stats) = pipeline.process_with_retries(&events, &pairs).await;
        dead_letter(&producer, &pipeline, &events, &failures).await;
        tracing::debug!(
            events = events.len(),
            writes = stats.writes,
            replayed = stats.replayed,
            "batch done"
        );
        let mut batch: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for e in events.iter() {
            let next = batch.entry((e.topic.clone(), e.partition)).or_insert(0);
            *next = (*next).max(e.offset + 1);
        }
        commit(&consumer, &batch, CommitMode::Async);
        finished.extend(batch);
    }
    // The last batch is finished: make the commits of partitions we still own durable before
    // leaving the group (a revoked partition's new owner commits for itself).
    let owned: BTreeSet<(String, i32)> = consumer
        .assignment()
        .map(|a| {
            a.elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect()
        })
        .unwrap_or_default();
    finished.retain(|tp, _| owned.contains(tp));
    tokio::task::block_in_place(|| commit(&consumer, &finished, CommitMode::Sync));
    consumer.unsubscribe();
    tracing::info!("consumer stopped");
    Ok(())
}

/// Commit the given next offsets (one past the last finished message per partition).
fn commit(consumer: &StreamConsumer, next: &BTreeMap<(String, i32), i64>, mode: CommitMode) {
    if next.is_empty() {
        return;
    }
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in next {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, topic, partition, "cannot build commit");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => tracing::debug!(partitions = next.len(), ?mode, "offsets committed"),
        Err(e) => tracing::warn!(error = %e, "offset commit failed; the next commit covers it"),
    }
}

/// Publish failures to their group's dead-letter topic, retrying until the broker
/// acknowledges each: an event's offset is only committed after that.
async fn dead_letter(
    producer: &FutureProducer,
    pipeline: &Pipeline,
    events: &[Event],
    failures: &[Failure],
) {
    for f in failures {
        let event = &events[f.event];
        let group = &pipeline.groups()[f.group].def;
        tracing::warn!(group = %group.name, topic = %event.topic, partition = event.partition, offset = event.offset,
            kind = f.kind.as_str(), reason = %f.reason, "dead-lettering event");
        let (partition, offset) = (event.partition.to_string(), event.offset.to_string());
        let mut headers = OwnedHeaders::new();
        for (k, v) in &event.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let headers = headers
            .insert(Header {
                key: dlh::ERROR,
                value: Some(&f.reason),
            })
            .insert(Header {
                key: dlh::ERROR_KIND,
                value: Some(f.kind.as_str()),
            })
            .insert(Header {
                key: dlh::GROUP,
                value: Some(&group.name),
            })
            .insert(Header {
                key: dlh::SOURCE_TOPIC,
                value: Some(&event.topic),
            })
            .insert(Header {
                key: dlh::SOURCE_PARTITION,
                value: Some(&partition),
            })
            .insert(Header {
                key: dlh::SOURCE_OFFSET,
                value: Some(&offset),
            });
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::to(&group.dead_letter_topic)
                .payload(&event.payload)
                .headers(headers.clone());
            if let Some(k) = &event.key {
                record = record.key(k);
            }
            match producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => break,
                Err((e, _)) => {
                    tracing::error!(error = %e, topic = %group.dead_letter_topic, "dead-letter publish failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}
