//! Kafka plumbing shared by the consumer, the bench and the tests: client configuration,
//! topic creation, message conversion, and acknowledged republishing (retry and dead-letter
//! topics). The consumer itself is [`super::consumer`].

use crate::config::RunSettings;
use crate::event::Event;
use crate::feature::Position;
use anyhow::Context as _;
use rdkafka::client::{ClientContext, OAuthToken};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::Duration;

/// Client settings and what every client needs besides them (the MSK IAM token signer).
#[derive(Clone)]
pub struct KafkaClient {
    pub cfg: ClientConfig,
    pub iam: Option<Arc<super::msk_iam::MskIam>>,
}

impl From<ClientConfig> for KafkaClient {
    fn from(cfg: ClientConfig) -> KafkaClient {
        KafkaClient { cfg, iam: None }
    }
}

impl KafkaClient {
    /// From the process settings: `FH_KAFKA_PROPERTIES`, and with `FH_KAFKA_AUTH=msk-iam`
    /// SASL_SSL + OAUTHBEARER with tokens from the AWS default credential chain.
    pub async fn from_settings(
        settings: &RunSettings,
        brokers: &str,
    ) -> anyhow::Result<KafkaClient> {
        let mut cfg = client_config(settings, brokers)?;
        let iam = match settings.kafka_auth {
            crate::config::KafkaAuth::Properties => None,
            crate::config::KafkaAuth::MskIam => {
                cfg.set("security.protocol", "SASL_SSL")
                    .set("sasl.mechanism", "OAUTHBEARER");
                Some(Arc::new(super::msk_iam::MskIam::from_env().await?))
            }
        };
        Ok(KafkaClient { cfg, iam })
    }

    pub fn context(&self) -> KafkaContext {
        KafkaContext {
            iam: self.iam.clone(),
        }
    }
}

/// The context of the host's producers, admin clients and side consumers: answers
/// librdkafka's OAUTHBEARER token refreshes when MSK IAM is on.
#[derive(Clone, Default)]
pub struct KafkaContext {
    iam: Option<Arc<super::msk_iam::MskIam>>,
}

impl ClientContext for KafkaContext {
    const ENABLE_REFRESH_OAUTH_TOKEN: bool = true;

    fn generate_oauth_token(
        &self,
        _config: Option<&str>,
    ) -> Result<OAuthToken, Box<dyn std::error::Error>> {
        oauth_token(self.iam.as_deref())
    }
}

impl ConsumerContext for KafkaContext {}

/// A token for librdkafka, or why there is none.
pub fn oauth_token(
    iam: Option<&super::msk_iam::MskIam>,
) -> Result<OAuthToken, Box<dyn std::error::Error>> {
    let iam =
        iam.ok_or("OAUTHBEARER needs FH_KAFKA_AUTH=msk-iam (or a sasl.oauthbearer.config)")?;
    let (token, principal_name, lifetime_ms) = iam.token().map_err(|e| format!("{e:#}"))?;
    Ok(OAuthToken {
        token,
        principal_name,
        lifetime_ms,
    })
}

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
    producer: FutureProducer<KafkaContext>,
}

impl Republisher {
    pub fn new(client: &KafkaClient) -> anyhow::Result<Republisher> {
        let producer = client
            .cfg
            .clone()
            // Idempotent: the client's own resends after a lost acknowledgement are not
            // appended twice (acks=all comes with it).
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create_with_context(client.context())
            .context("cannot create Kafka producer")?;
        Ok(Republisher { producer })
    }

    /// Publish `event`'s key and payload with `headers` to `topic`, stamped with the time of
    /// the hand-off (the event time travels in `headers`: see [`super::envelope`]), retrying
    /// with backoff until the broker acknowledges. Returns false if `give_up` turned true first
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
                .timestamp(crate::sink::unix_now_ms())
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Wrapper {
        #[command(flatten)]
        run: RunSettings,
    }

    #[tokio::test]
    async fn msk_iam_turns_on_sasl_oauthbearer_and_properties_pass_through() {
        let w = Wrapper::parse_from([
            "x",
            "--kafka-auth",
            "msk-iam",
            "--kafka-properties",
            "client.id=fh, socket.timeout.ms=5000",
        ]);
        let c = KafkaClient::from_settings(&w.run, "b-1:9098")
            .await
            .unwrap();
        assert_eq!(c.cfg.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.cfg.get("sasl.mechanism"), Some("OAUTHBEARER"));
        assert_eq!(c.cfg.get("client.id"), Some("fh"));
        assert_eq!(c.cfg.get("bootstrap.servers"), Some("b-1:9098"));
        assert!(c.iam.is_some());

        let plain = Wrapper::parse_from(["x"]);
        let c = KafkaClient::from_settings(&plain.run, "k:9092")
            .await
            .unwrap();
        assert_eq!(c.cfg.get("sasl.mechanism"), None);
        let refused = oauth_token(None).err().unwrap().to_string();
        assert!(refused.contains("FH_KAFKA_AUTH=msk-iam"), "{refused}");
        let bad = Wrapper::parse_from(["x", "--kafka-properties", "novalue"]);
        let e = KafkaClient::from_settings(&bad.run, "k:9092")
            .await
            .err()
            .unwrap();
        assert!(e.to_string().contains("not key=value"), "{e}");
    }
}
