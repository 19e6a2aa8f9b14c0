//! Dead-letter replay: after a fix (a new plugin version, a corrected spec), re-inject a
//! group's dead letters into its **retry topic**, so that only that group processes them
//! again — not every group reading the original topic.
//!
//! A replayed message carries `fh-replay-of: <dead-letter topic>/<partition>/<offset>`, kept
//! through later retries, and that is its position for exactly-once effect: replaying the
//! same dead letter twice (a second replay, a crash mid-replay) applies it once.

use super::envelope::{self, Envelope, headers};
use super::kafka::{KafkaClient, KafkaContext, Republisher, to_event};
use crate::feature::Position;
use crate::retry::FailureKind;
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use std::time::{Duration, Instant};

/// What to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    /// Only dead letters whose reason contains this text.
    pub reason_contains: Option<String>,
    /// Only dead letters from this original topic.
    pub source_topic: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// One dead letter, as listed by a dry run.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub source: String,
    pub kind: String,
    pub attempts: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplaySummary {
    pub dead_letter_topic: String,
    pub retry_topic: String,
    /// Messages read from the dead-letter topic.
    pub scanned: usize,
    /// Of those, the ones matching the group and filter.
    pub matched: usize,
    /// Republished to the retry topic (0 on a dry run).
    pub replayed: usize,
    /// Dead letters the retry topic refused for good (e.g. larger than its limit).
    pub refused: usize,
    /// Unreadable messages (not written by this host), left alone.
    pub unreadable: usize,
    pub dry_run: bool,
    pub dead_letters: Vec<DeadLetter>,
}

/// The header value naming a dead letter; `topic` is the dead-letter topic's source name
/// ([`super::topic_ids::source_name`]).
pub fn replay_of(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}/{partition}/{offset}")
}

/// The position of a replayed message: its dead letter's place (`None` if not a replay).
pub fn replay_position(value: &[u8]) -> Option<Position> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.rsplitn(3, '/');
    let offset: i64 = parts.next()?.parse().ok()?;
    let partition: i32 = parts.next()?.parse().ok()?;
    let topic = parts.next()?;
    // Floor 0: dead letters are replayed in any order and any subset, so no offset may
    // count as covered by a later one.
    Some(Position {
        source: format!("replay:{topic}"),
        partition,
        offset,
        floor: 0,
    })
}

/// Read `group`'s dead-letter topic from its start to its current end and, unless
/// `dry_run`, republish the matching dead letters to the group's retry topic, due now, with
/// a fresh attempt count.
pub async fn replay(
    client: &KafkaClient,
    group: &str,
    dead_letter_topic: &str,
    retry_topic: &str,
    filter: &ReplayFilter,
    dry_run: bool,
) -> anyhow::Result<ReplaySummary> {
    let mut summary = ReplaySummary {
        dead_letter_topic: dead_letter_topic.into(),
        retry_topic: retry_topic.into(),
        dry_run,
        ..Default::default()
    };
    let consumer: BaseConsumer<KafkaContext> = client
        .cfg
        .clone()
        .set(
            "group.id",
            format!("feature-host-dlq-replay-{:08x}", rand::random::<u32>()),
        )
        .set("enable.auto.commit", "false")
        // Hand-offs are transactional: only committed dead letters are replayed, and a
        // partition's end may be a transaction marker, which is never delivered — the
        // end-of-partition event says the reader got there.
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(client.context())
        .context("cannot create the replay consumer")?;
    let (topic, consumer) = (dead_letter_topic.to_owned(), std::sync::Arc::new(consumer));
    // The end of each partition now: the replay stops there, even while new dead letters
    // keep arriving.
    // The dead-letter topic's incarnation names the replayed events' positions
    // (`replay:<topic>~<id>`): a dead-letter topic created again restarts its offsets at 0.
    let (source, ends): (String, Vec<(i32, i64)>) = {
        let (consumer, topic) = (consumer.clone(), topic.clone());
        tokio::task::spawn_blocking(move || -> anyhow::Result<(String, Vec<(i32, i64)>)> {
            let source = super::topic_ids::sources(
                consumer.client(),
                std::slice::from_ref(&topic),
                Duration::from_secs(10),
            )
            .with_context(|| format!("cannot read the id of {topic}"))?
            .remove(&topic)
            .unwrap_or_else(|| topic.clone());
            let meta = consumer
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .with_context(|| format!("cannot read the metadata of {topic}"))?;
            let t = meta
                .topics()
                .first()
                .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                .with_context(|| format!("dead-letter topic {topic} does not exist"))?;
            let ends = t
                .partitions()
                .iter()
                .map(|p| {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, p.id(), Duration::from_secs(10))
                        .with_context(|| format!("cannot read the end of {topic}/{}", p.id()))?;
                    Ok((p.id(), high))
                })
                .collect::<anyhow::Result<_>>()?;
            Ok((source, ends))
        })
        .await??
    };
    let mut tpl = TopicPartitionList::new();
    for (p, high) in &ends {
        if *high > 0 {
            tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
        }
    }
    if tpl.count() == 0 {
        return Ok(summary);
    }
    consumer.assign(&tpl)?;
    let republisher = (!dry_run).then(|| Republisher::new(client)).transpose()?;
    let mut remaining: std::collections::HashMap<i32, i64> =
        ends.into_iter().filter(|(_, h)| *h > 0).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !remaining.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "replay stopped: {topic} was not read to its end within 2 minutes ({} partitions left)",
            remaining.len()
        );
        let message = {
            let consumer = consumer.clone();
            tokio::task::spawn_blocking(move || {
                consumer
                    .poll(Duration::from_millis(500))
                    .map(|m| m.map(|m| to_event(&m)))
            })
            .await?
        };
        let Some(message) = message else { continue };
        let message = match message {
            Err(rdkafka::error::KafkaError::PartitionEOF(p)) => {
                remaining.remove(&p);
                continue;
            }
            m => m.with_context(|| format!("reading {topic}"))?,
        };
        if let Some(end) = remaining.get(&message.partition)
            && message.offset + 1 >= *end
        {
            remaining.remove(&message.partition);
        }
        summary.scanned += 1;
        let Ok((original, env)) = envelope::unwrap(&message) else {
            summary.unreadable += 1;
            continue;
        };
        let matches = env.group == group
            && filter
                .reason_contains
                .as_ref()
                .is_none_or(|t| env.error.contains(t.as_str()))
            && filter
                .source_topic
                .as_ref()
                .is_none_or(|t| *t == original.topic);
        if !matches || filter.limit.is_some_and(|l| summary.matched >= l) {
            continue;
        }
        summary.matched += 1;
        summary.dead_letters.push(DeadLetter {
            partition: message.partition,
            offset: message.offset,
            source: format!(
                "{}/{}@{}",
                original.topic, original.partition, original.offset
            ),
            kind: env.kind.as_str().into(),
            attempts: env.attempts,
            reason: env.error.clone(),
        });
        if let Some(r) = &republisher {
            let now = crate::sink::unix_now_ms();
            let mut h = envelope::wrap(
                &original,
                &Envelope {
                    group: group.into(),
                    kind: FailureKind::Retryable,
                    error: format!("replayed from {topic}: {}", env.error),
                    attempts: 0,
                    first_failure_ms: env.first_failure_ms,
                    due_ms: Some(now),
                },
            );
            // A dead letter replayed before keeps its first identity.
            if original.header(headers::REPLAY_OF).is_none() {
                h.push((
                    headers::REPLAY_OF.into(),
                    replay_of(&source, message.partition, message.offset).into_bytes(),
                ));
            }
            match r.publish(retry_topic, &original, &h, || false).await {
                super::kafka::Published::Acknowledged => summary.replayed += 1,
                super::kafka::Published::Refused(code) => {
                    tracing::warn!(topic = %retry_topic, dead_letter = message.offset, %code,
                        "the retry topic refused a replayed dead letter; it stays in the dead-letter topic");
                    summary.refused += 1;
                }
                // A plain producer neither gives up (`|| false`) nor aborts.
                super::kafka::Published::GaveUp | super::kafka::Published::Aborts { .. } => {}
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recreated_dead_letter_topic_gives_its_replays_new_identities() {
        let old = replay_of(
            &super::super::topic_ids::source_name("users.dlq", Some("AAAA")),
            0,
            3,
        );
        let new = replay_of(
            &super::super::topic_ids::source_name("users.dlq", Some("BBBB")),
            0,
            3,
        );
        let (old, new) = (
            replay_position(old.as_bytes()).unwrap(),
            replay_position(new.as_bytes()).unwrap(),
        );
        assert_eq!(old.source, "replay:users.dlq~AAAA");
        assert_ne!(old.key(), new.key());
        assert_eq!((old.partition, old.offset), (new.partition, new.offset));
    }

    #[test]
    fn replay_identity_round_trips() {
        let v = replay_of("users.dlq", 2, 41);
        let p = replay_position(v.as_bytes()).unwrap();
        assert_eq!(
            p,
            Position {
                source: "replay:users.dlq".into(),
                partition: 2,
                offset: 41,
                floor: 0
            }
        );
        assert!(replay_position(b"garbage").is_none());
        assert!(replay_position(b"t/x/1").is_none());
    }
}
