//! Kafka plumbing shared by the consumer, the bench and the tests: client configuration,
//! topic creation, message conversion, and acknowledged republishing (retry and dead-letter
//! topics). The consumer itself is [`super::consumer`].

use crate::config::RunSettings;
use crate::event::Event;
use crate::feature::Position;
use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeSet;
use std::time::Duration;

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

/// Create the given topics if missing (one partition; used for retry and dead-letter topics).
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
        .with_context(|| format!("cannot create topics {topics:?}"))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => anyhow::bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

/// The host's event for a consumed message; its position is the message's own.
pub fn to_event(m: &BorrowedMessage<'_>) -> Event {
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
        position: Some(Position::sequential(m.topic(), m.partition(), m.offset())),
    }
}

/// Publishes events to retry and dead-letter topics and waits for the acknowledgement.
#[derive(Clone)]
pub struct Republisher {
    producer: FutureProducer,
}

impl Republisher {
    pub fn new(cfg: &ClientConfig) -> anyhow::Result<Republisher> {
        let producer = cfg
            .clone()
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()
            .context("cannot create Kafka producer")?;
        Ok(Republisher { producer })
    }

    /// Publish `event`'s key, payload and timestamp with `headers` to `topic`, retrying with
    /// backoff until the broker acknowledges. Returns false if `give_up` turned true first
    /// (the result no longer matters: the partition was revoked and will be re-read).
    pub async fn publish(
        &self,
        topic: &str,
        event: &Event,
        headers: &[(String, Vec<u8>)],
        give_up: impl Fn() -> bool,
    ) -> bool {
        let mut h = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut record = FutureRecord::to(topic)
                .payload(&event.payload)
                .timestamp(event.timestamp_ms)
                .headers(h.clone());
            if let Some(k) = &event.key {
                record = record.key(k);
            }
            match self.producer.send(record, Duration::from_secs(5)).await {
                Ok(_) => return true,
                Err((e, _)) => {
                    tracing::error!(error = %e, topic, "republish failed; retrying (the source offset stays uncommitted)");
                }
            }
            if give_up() {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
