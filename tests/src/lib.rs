//! Helpers for end-to-end tests against the real local stack started by `scripts/stack up`.
//! Tests fail (not skip) when the stack is not up: `scripts/test` starts it.

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Endpoints of the running stack.
#[derive(Debug, Clone)]
pub struct Stack {
    pub kafka: String,
    pub dynamodb: String,
    pub redis: String,
}

impl Stack {
    pub fn from_env() -> Stack {
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| {
                panic!("{k} is not set: start the stack with `scripts/stack up && eval \"$(scripts/stack env)\"` (scripts/test does both)")
            })
        };
        Stack {
            kafka: var("FH_KAFKA_BROKERS"),
            dynamodb: var("FH_DYNAMODB_ENDPOINT"),
            redis: var("FH_REDIS_URL"),
        }
    }

    pub async fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "e2e",
            ))
            .load()
            .await;
        let conf = aws_sdk_dynamodb::config::Builder::from(&shared)
            .endpoint_url(&self.dynamodb)
            .build();
        aws_sdk_dynamodb::Client::from_conf(conf)
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .create()
            .unwrap();
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
            .collect();
        for r in admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .unwrap()
        {
            r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
        }
    }

    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .set("acks", "all")
            .create()
            .unwrap()
    }
}

/// Produce one message and wait for the broker's acknowledgement.
pub async fn produce(
    p: &FutureProducer,
    topic: &str,
    key: &str,
    ts_ms: i64,
    payload: &str,
    headers: &[(&str, &str)],
) {
    let mut h = OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(Header {
            key: k,
            value: Some(*v),
        });
    }
    let record = FutureRecord::to(topic)
        .key(key)
        .payload(payload)
        .timestamp(ts_ms)
        .headers(h);
    p.send(record, Duration::from_secs(10))
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
}

/// A short random suffix so tests never share topics, tables or consumer groups.
pub fn unique() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The `feature-host` binary of this build (scripts/test builds it before the tests).
pub fn host_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join("feature-host");
    assert!(
        bin.is_file(),
        "{} missing: run `cargo build -p feature-host` first (scripts/test does)",
        bin.display()
    );
    bin
}

pub fn plugin_dir() -> PathBuf {
    let dir = repo_root().join("plugins/dist");
    assert!(
        dir.join("user_activity.wasm").is_file(),
        "plugins not built: run scripts/build-plugins (scripts/test does)"
    );
    dir
}

/// A host process, killed when dropped.
pub struct Host {
    pub child: Child,
}

impl Host {
    pub fn spawn(args: &[&str], env: &[(&str, String)]) -> Host {
        let mut cmd = Command::new(host_binary());
        cmd.args(args)
            .stdin(Stdio::null())
            .env("RUST_LOG", "info,feature_host=debug");
        for (k, v) in env {
            cmd.env(k, v);
        }
        Host {
            child: cmd.spawn().expect("spawn feature-host"),
        }
    }

    /// SIGTERM and wait; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Poll `f` until it returns `Some`, or panic after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
