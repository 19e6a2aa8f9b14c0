//! The host's own topics — every group's retry and dead-letter topic — created as production
//! needs them, and checked before the first event is consumed.
//!
//! **Guarantee.** When [`provision`] returns `Ok`, every hand-off topic exists and a
//! republish with `acks=all` can be acknowledged while the topic has its full replica set:
//! its replication factor is at least its `min.insync.replicas`. A topic that cannot meet
//! that is refused by name at startup, instead of failing every hand-off later with
//! `NOT_ENOUGH_REPLICAS` and stalling the partitions whose low watermark waits on them.
//!
//! **Defaults.** A missing topic is created with the partitions and replication factor its
//! groups' specs give (`retry.partitions`, `retry.replicationFactor`), else with as many
//! partitions as the largest of the groups' source topics (retry traffic spreads over the
//! consumer group like the source traffic does) and the cluster's
//! `default.replication.factor` (what MSK sets to 3 on a multi-AZ cluster).
//!
//! **Limit.** Existing topics are checked, never altered: a topic with fewer partitions than
//! the spec asks for is logged, not repartitioned (that would move keys between partitions
//! under a running consumer group).

use super::kafka::{KafkaClient, KafkaContext};
use crate::spec::GroupDef;
use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer as _};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// What the host's groups want of one hand-off topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub topic: String,
    /// The groups handing off through it, for error messages.
    pub groups: Vec<String>,
    /// `retry.partitions` of those groups (validation keeps them from disagreeing).
    pub partitions: Option<i32>,
    /// `retry.replicationFactor` of those groups.
    pub replication_factor: Option<i32>,
    /// Every source topic of those groups: the default partition count is their largest.
    pub sources: BTreeSet<String>,
}

/// Broker-wide defaults that decide a new topic's replication and what `acks=all` needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cluster {
    pub brokers: i32,
    pub default_replication_factor: i32,
    pub min_insync_replicas: i32,
}

/// A topic as the cluster has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Existing {
    pub partitions: i32,
    pub replication_factor: i32,
    /// The topic's effective `min.insync.replicas` (its override, or the broker default).
    pub min_insync_replicas: i32,
}

/// What to do about one hand-off topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Create {
        partitions: i32,
        replication_factor: i32,
    },
    /// It exists and can take `acks=all` writes.
    Keep,
}

/// Why the host's topics are not usable; the host does not start.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error(
        "hand-off topic {topic} (groups {groups:?}) has replication factor {replication_factor}, below its min.insync.replicas {min_insync_replicas}: every acks=all republish would fail with NOT_ENOUGH_REPLICAS. {fix}"
    )]
    BelowMinIsr {
        topic: String,
        groups: Vec<String>,
        replication_factor: i32,
        min_insync_replicas: i32,
        fix: &'static str,
    },
    #[error(
        "hand-off topic {topic} (groups {groups:?}) wants replication factor {replication_factor}, but the cluster has {brokers} broker(s): lower spec.retry.replicationFactor"
    )]
    TooFewBrokers {
        topic: String,
        groups: Vec<String>,
        replication_factor: i32,
        brokers: i32,
    },
    #[error("cannot {what}: {cause}")]
    Kafka { what: String, cause: String },
}

/// The hand-off topics of `groups`, with their groups' wishes merged.
pub fn wanted<'a>(groups: impl IntoIterator<Item = &'a GroupDef>) -> Vec<Wanted> {
    let mut by_topic: BTreeMap<String, Wanted> = BTreeMap::new();
    for g in groups {
        for topic in [&g.retry_topic, &g.dead_letter_topic] {
            let w = by_topic.entry(topic.clone()).or_insert_with(|| Wanted {
                topic: topic.clone(),
                groups: Vec::new(),
                partitions: None,
                replication_factor: None,
                sources: BTreeSet::new(),
            });
            w.groups.push(g.name.clone());
            let retry = &g.spec.retry;
            w.partitions = w.partitions.or(retry.partitions.map(|p| p as i32));
            w.replication_factor = w
                .replication_factor
                .or(retry.replication_factor.map(i32::from));
            w.sources
                .extend(g.spec.sources.iter().map(|s| s.topic.clone()));
        }
    }
    by_topic.into_values().collect()
}

/// Decide for one topic. `source_partitions` is the largest partition count among its
/// groups' existing source topics (`None` when none exists yet: then 1).
pub fn decide(
    w: &Wanted,
    source_partitions: Option<i32>,
    existing: Option<&Existing>,
    cluster: &Cluster,
) -> Result<Decision, TopicError> {
    let below = |replication_factor, min_insync_replicas, fix| TopicError::BelowMinIsr {
        topic: w.topic.clone(),
        groups: w.groups.clone(),
        replication_factor,
        min_insync_replicas,
        fix,
    };
    if let Some(e) = existing {
        if e.replication_factor < e.min_insync_replicas {
            return Err(below(
                e.replication_factor,
                e.min_insync_replicas,
                "Raise the topic's replication (kafka-reassign-partitions) or lower its min.insync.replicas, or point spec.retry at another topic.",
            ));
        }
        if let Some(p) = w.partitions
            && p > e.partitions
        {
            tracing::warn!(topic = %w.topic, existing = e.partitions, wanted = p,
                "hand-off topic has fewer partitions than spec.retry.partitions; left as it is");
        }
        return Ok(Decision::Keep);
    }
    let replication_factor = w
        .replication_factor
        .unwrap_or(cluster.default_replication_factor);
    if replication_factor > cluster.brokers {
        return Err(TopicError::TooFewBrokers {
            topic: w.topic.clone(),
            groups: w.groups.clone(),
            replication_factor,
            brokers: cluster.brokers,
        });
    }
    if replication_factor < cluster.min_insync_replicas {
        return Err(below(
            replication_factor,
            cluster.min_insync_replicas,
            "Raise spec.retry.replicationFactor (or leave it out to use the cluster's default.replication.factor).",
        ));
    }
    Ok(Decision::Create {
        partitions: w.partitions.or(source_partitions).unwrap_or(1).max(1),
        replication_factor,
    })
}

fn kafka_err(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> TopicError {
    let what = what.into();
    move |e| TopicError::Kafka {
        what,
        cause: e.to_string(),
    }
}

const TIMEOUT: Duration = Duration::from_secs(15);

/// Partition and replica counts of every topic, and the broker ids — read through a producer
/// handle that is polled meanwhile, so that OAUTHBEARER refreshes and the client's logs and
/// errors are served (an admin client's are not), and a failure says why.
async fn metadata(
    client: &KafkaClient,
) -> Result<(BTreeMap<String, (i32, i32)>, Vec<i32>), TopicError> {
    let what = "read the cluster's metadata";
    let producer: BaseProducer<KafkaContext> = client
        .cfg
        .create_with_context(client.context())
        .map_err(kafka_err(what))?;
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            producer.poll(Duration::from_millis(50));
            match producer.client().fetch_metadata(None, Duration::from_secs(1)) {
                Ok(m) => {
                    let topics = m
                        .topics()
                        .iter()
                        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
                        .map(|t| {
                            let rf = t.partitions().iter().map(|p| p.replicas().len()).min();
                            (
                                t.name().to_owned(),
                                (t.partitions().len() as i32, rf.unwrap_or(0) as i32),
                            )
                        })
                        .collect();
                    return Ok((topics, m.brokers().iter().map(|b| b.id()).collect()));
                }
                Err(e) if std::time::Instant::now() >= deadline => {
                    let why = producer.context().last_error().map_or_else(String::new, |r| format!(" ({r})"));
                    return Err(TopicError::Kafka {
                        what: format!("{what} within {TIMEOUT:?}"),
                        cause: format!("{e}{why}; check FH_KAFKA_BROKERS and the TLS/SASL settings (FH_KAFKA_PROPERTIES, FH_KAFKA_AUTH)"),
                    });
                }
                Err(_) => {}
            }
        }
    })
    .await
    .map_err(|e| TopicError::Kafka {
        what: what.into(),
        cause: e.to_string(),
    })?
}

/// Check every hand-off topic of `groups` and create the missing ones (see the module docs).
pub async fn provision<'a>(
    client: &KafkaClient,
    groups: impl IntoIterator<Item = &'a GroupDef>,
) -> Result<(), TopicError> {
    let wanted = wanted(groups);
    if wanted.is_empty() {
        return Ok(());
    }
    let admin = client.admin().map_err(|e| TopicError::Kafka {
        what: "create a Kafka admin client".into(),
        cause: format!("{e:#}"),
    })?;
    let (topics, brokers) = metadata(client).await?;
    let Some(&broker) = brokers.first() else {
        return Err(TopicError::Kafka {
            what: "find a broker".into(),
            cause: "the cluster's metadata lists none".into(),
        });
    };
    let opts = AdminOptions::new().request_timeout(Some(TIMEOUT));
    let int_config = |r: &rdkafka::admin::ConfigResource, name: &str| -> Result<i32, TopicError> {
        r.get(name)
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| TopicError::Kafka {
                what: format!("read {name}"),
                cause: format!("{:?} does not report it", r.specifier),
            })
    };
    let existing_topics: Vec<&str> = wanted
        .iter()
        .filter(|w| topics.contains_key(&w.topic))
        .map(|w| w.topic.as_str())
        .collect();
    let mut resources = vec![ResourceSpecifier::Broker(broker)];
    resources.extend(existing_topics.iter().map(|t| ResourceSpecifier::Topic(t)));
    let described = admin
        .describe_configs(&resources, &opts)
        .await
        .map_err(kafka_err(
            "describe the cluster's and the hand-off topics' configs (the host's principal needs DescribeConfigs)",
        ))?;
    let mut described = described.into_iter();
    let broker_config = described
        .next()
        .ok_or_else(|| TopicError::Kafka {
            what: "describe the broker's config".into(),
            cause: "no result".into(),
        })?
        .map_err(|code| TopicError::Kafka {
            what: format!("describe broker {broker}'s config"),
            cause: code.to_string(),
        })?;
    let cluster = Cluster {
        brokers: brokers.len() as i32,
        default_replication_factor: int_config(&broker_config, "default.replication.factor")?,
        min_insync_replicas: int_config(&broker_config, "min.insync.replicas")?,
    };
    let mut existing = BTreeMap::new();
    for (topic, result) in existing_topics.iter().zip(described) {
        let config = result.map_err(|code| TopicError::Kafka {
            what: format!("describe topic {topic}'s config"),
            cause: code.to_string(),
        })?;
        let (partitions, replication_factor) = topics[*topic];
        existing.insert(
            topic.to_string(),
            Existing {
                partitions,
                replication_factor,
                min_insync_replicas: int_config(&config, "min.insync.replicas")?,
            },
        );
    }

    let mut create = Vec::new();
    for w in &wanted {
        let source_partitions = w
            .sources
            .iter()
            .filter_map(|s| topics.get(s))
            .map(|t| t.0)
            .max();
        if source_partitions.is_none() && w.partitions.is_none() && !existing.contains_key(&w.topic)
        {
            tracing::warn!(topic = %w.topic, sources = ?w.sources,
                "no source topic of this hand-off topic exists yet: creating it with 1 partition");
        }
        match decide(w, source_partitions, existing.get(&w.topic), &cluster)? {
            Decision::Keep => {}
            Decision::Create {
                partitions,
                replication_factor,
            } => create.push((w.topic.clone(), partitions, replication_factor)),
        }
    }
    if create.is_empty() {
        return Ok(());
    }
    let new: Vec<NewTopic> = create
        .iter()
        .map(|(t, p, rf)| NewTopic::new(t, *p, TopicReplication::Fixed(*rf)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new()
                .request_timeout(Some(TIMEOUT))
                .operation_timeout(Some(TIMEOUT)),
        )
        .await
        .map_err(kafka_err("create the hand-off topics"))?;
    for (r, (topic, partitions, replication_factor)) in results.into_iter().zip(&create) {
        match r {
            Ok(_) => {
                tracing::info!(%topic, partitions, replication_factor, "hand-off topic created")
            }
            // Another replica created it first: same defaults, nothing to do.
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(TopicError::Kafka {
                    what: format!(
                        "create hand-off topic {topic} ({partitions} partitions, replication factor {replication_factor})"
                    ),
                    cause: code.to_string(),
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(partitions: Option<i32>, rf: Option<i32>) -> Wanted {
        Wanted {
            topic: "g.retry".into(),
            groups: vec!["g".into()],
            partitions,
            replication_factor: rf,
            sources: ["events".to_owned()].into(),
        }
    }

    const MSK: Cluster = Cluster {
        brokers: 3,
        default_replication_factor: 3,
        min_insync_replicas: 2,
    };

    #[test]
    fn a_new_topic_takes_the_source_partitions_and_the_cluster_replication() {
        assert_eq!(
            decide(&want(None, None), Some(12), None, &MSK).unwrap(),
            Decision::Create {
                partitions: 12,
                replication_factor: 3
            }
        );
        assert_eq!(
            decide(&want(Some(4), Some(2)), Some(12), None, &MSK).unwrap(),
            Decision::Create {
                partitions: 4,
                replication_factor: 2
            },
            "the spec wins"
        );
        assert_eq!(
            decide(&want(None, None), None, None, &MSK).unwrap(),
            Decision::Create {
                partitions: 1,
                replication_factor: 3
            },
            "no source topic yet"
        );
    }

    #[test]
    fn replication_below_min_isr_is_refused_by_name() {
        let e = decide(&want(None, Some(1)), Some(3), None, &MSK).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, TopicError::BelowMinIsr { .. }), "{text}");
        assert!(
            text.contains("g.retry") && text.contains("min.insync.replicas 2"),
            "{text}"
        );
        assert!(text.contains("spec.retry.replicationFactor"), "{text}");

        // The old hard-coded RF 1 topic on an MSK-like cluster.
        let old = Existing {
            partitions: 1,
            replication_factor: 1,
            min_insync_replicas: 2,
        };
        let e = decide(&want(None, None), Some(3), Some(&old), &MSK).unwrap_err();
        assert!(
            matches!(
                e,
                TopicError::BelowMinIsr {
                    replication_factor: 1,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn an_existing_topic_that_can_take_acks_all_is_kept_as_it_is() {
        let ok = Existing {
            partitions: 1,
            replication_factor: 3,
            min_insync_replicas: 2,
        };
        assert_eq!(
            decide(&want(Some(8), None), Some(3), Some(&ok), &MSK).unwrap(),
            Decision::Keep
        );
    }

    #[test]
    fn more_replicas_than_brokers_is_refused() {
        let single = Cluster {
            brokers: 1,
            default_replication_factor: 1,
            min_insync_replicas: 1,
        };
        assert_eq!(
            decide(&want(None, None), Some(1), None, &single).unwrap(),
            Decision::Create {
                partitions: 1,
                replication_factor: 1
            }
        );
        let e = decide(&want(None, Some(3)), Some(1), None, &single).unwrap_err();
        assert!(
            matches!(e, TopicError::TooFewBrokers { brokers: 1, .. }),
            "{e}"
        );
    }
}
