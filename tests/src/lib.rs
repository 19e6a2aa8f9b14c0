//! Helpers for end-to-end tests against the real local stack started by `scripts/stack up`.
//! Tests fail (not skip) when the stack is not up: `scripts/test` starts it.

pub mod delivery;

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

    /// Create `topics` with `partitions` each and the cluster's default replication.
    pub async fn create_topics(&self, topics: &[&str], partitions: i32) {
        create_topics(&self.kafka, topics, partitions).await
    }

    /// The environment of a host on this stack with its own data dir, consumer group and
    /// an admin port of its own.
    pub fn host_env(
        &self,
        tmp: &Path,
        spec_dir: &Path,
        group_id: &str,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("FH_SPEC_DIR", spec_dir.display().to_string()),
            ("FH_PLUGIN_DIR", plugin_dir().display().to_string()),
            ("FH_DATA_DIR", tmp.join("data").display().to_string()),
            ("FH_KAFKA_BROKERS", self.kafka.clone()),
            ("FH_KAFKA_GROUP_ID", group_id.to_owned()),
            ("FH_DYNAMODB_ENDPOINT", self.dynamodb.clone()),
            ("FH_REDIS_URL", self.redis.clone()),
            ("FH_ADMIN_ADDR", "127.0.0.1:0".into()),
        ]
    }

    /// [`host_env`](Self::host_env) with the admin API on a known free port (returned).
    pub fn host_env_on_port(
        &self,
        tmp: &Path,
        spec_dir: &Path,
        group_id: &str,
    ) -> (Vec<(&'static str, String)>, u16) {
        let port = free_port();
        let mut env = self.host_env(tmp, spec_dir, group_id);
        env.retain(|(k, _)| *k != "FH_ADMIN_ADDR");
        env.push(("FH_ADMIN_ADDR", format!("127.0.0.1:{port}")));
        (env, port)
    }

    /// Offsets committed by consumer group `group_id` for partitions `0..partitions` of
    /// `topic` (-1 where nothing is committed).
    pub fn committed(&self, group_id: &str, topic: &str, partitions: i32) -> Vec<i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .set("group.id", group_id)
            .create()
            .unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => -1,
            })
            .collect()
    }

    /// Every message of `topic` up to its current end, as a `read_committed` consumer sees
    /// them: aborted transactional writes are not in it.
    pub fn read_all(&self, topic: &str) -> Vec<Record> {
        read_all(&self.kafka, topic)
    }

    /// An idempotent producer: when a broker fails, its resends are not appended twice (a
    /// plain `acks=all` producer duplicates an event whose acknowledgement was lost, and the
    /// host rightly counts both copies).
    pub fn producer(&self) -> FutureProducer {
        ClientConfig::new()
            .set("bootstrap.servers", &self.kafka)
            .set("enable.idempotence", "true")
            .create()
            .unwrap()
    }
}

/// Create `topics` on `brokers` with `partitions` each and the cluster's default replication
/// factor.
pub async fn create_topics(brokers: &str, topics: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(-1)))
        .collect();
    for r in admin
        .create_topics(&new, &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("create topic {t}: {e}"));
    }
}

/// Delete `topic` on `brokers` and create it again under its name with `partitions` (a new
/// incarnation: its offsets start at 0, its topic id is new). Deletion finishes in the
/// background, so the creation is tried until the name is free.
pub async fn recreate_topic(brokers: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    for r in admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .unwrap()
    {
        r.unwrap_or_else(|(t, e)| panic!("delete topic {t}: {e}"));
    }
    let new = [NewTopic::new(
        topic,
        partitions,
        TopicReplication::Fixed(-1),
    )];
    let start = Instant::now();
    loop {
        match admin
            .create_topics(&new, &AdminOptions::new())
            .await
            .unwrap()
            .remove(0)
        {
            Ok(_) => return,
            Err((t, e)) if start.elapsed() > Duration::from_secs(60) => {
                panic!("create topic {t} again: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The node that coordinates consumer group `group_id` on `brokers`: the leader of its
/// partition of `__consumer_offsets` (Kafka places a group by the Java hash of its id).
/// `None` until that topic exists (a group's first use creates it).
pub fn group_coordinator(brokers: &str, group_id: &str) -> Option<i32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap();
    let m = c
        .fetch_metadata(Some("__consumer_offsets"), Duration::from_secs(10))
        .ok()?;
    let partitions = m.topics().first()?.partitions();
    if partitions.is_empty() {
        return None;
    }
    // Kafka's `Utils.abs`: `Math.abs`, with `Integer.MIN_VALUE` mapped to 0.
    let h = java_hash(group_id);
    let at = if h == i32::MIN { 0 } else { h.abs() } % partitions.len() as i32;
    partitions.iter().find(|p| p.id() == at).map(|p| p.leader())
}

/// Java's `String.hashCode`, which Kafka places groups and transactional ids by.
pub fn java_hash(s: &str) -> i32 {
    s.encode_utf16()
        .fold(0i32, |h, c| h.wrapping_mul(31).wrapping_add(c as i32))
}

/// Every message of every partition of `topic` on `brokers` up to the partitions' ends when
/// the call starts, as a `read_committed` consumer sees them (partition by partition).
pub fn read_all(brokers: &str, topic: &str) -> Vec<Record> {
    read_messages(brokers, topic)
        .into_iter()
        .map(|m| (m.payload, m.headers))
        .collect()
}

/// A consumed message with its record timestamp.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub timestamp_ms: i64,
}

/// [`read_all`] with record timestamps.
pub fn read_messages(brokers: &str, topic: &str) -> Vec<Consumed> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::{Headers, Message};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", unique()))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let Ok(metadata) = c.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return Vec::new();
    };
    let partitions: Vec<i32> = metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for partition in partitions {
        // The end a read_committed consumer can reach: the last stable offset.
        let (_, end) = c
            .fetch_watermarks(topic, partition, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("watermarks of {topic}/{partition}: {e}"));
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, rdkafka::Offset::Beginning)
            .unwrap();
        c.assign(&tpl).unwrap();
        let position = |c: &BaseConsumer| match c
            .position()
            .ok()
            .and_then(|p| p.find_partition(topic, partition).map(|e| e.offset()))
        {
            Some(rdkafka::Offset::Offset(o)) => o,
            _ => 0,
        };
        let start = Instant::now();
        while position(&c) < end {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{topic}/{partition}: read to {} of {end} in 60 s",
                position(&c)
            );
            let Some(m) = c.poll(Duration::from_millis(200)) else {
                continue;
            };
            // Transport errors (a broker of the bootstrap list down) are reported and retried
            // by the client; the 60 s bound above catches one that never ends.
            let Ok(m) = m else { continue };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
                timestamp_ms: m.timestamp().to_millis().unwrap_or(-1),
            });
        }
    }
    out
}

/// Event time `ms` on the tests' clock: an hour before this test process started, plus `ms`.
/// Tests write small, readable times (`ts(4_000)`); they land recent, so the broker's
/// time-based retention (7 days) never deletes a test's events — it deletes even the active
/// segment of a topic whose records are all older than that.
pub fn ts(ms: i64) -> i64 {
    static BASE: std::sync::LazyLock<i64> =
        std::sync::LazyLock::new(|| feature_host::sink::unix_now_ms() - 3_600_000);
    *BASE + ms
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

/// A consumed message: payload and headers (as text).
pub type Record = (Vec<u8>, Vec<(String, String)>);

/// A FeatureGroup spec for tests. Retry and dead-letter topics are `<name>.retry` and
/// `<name>.dlq`: give each test's group a unique name so tests never share them.
pub fn group_spec(
    name: &str,
    topics: &[&str],
    wasm: &str,
    features: &[(&str, &str)],
    config: &str,
    table: &str,
    extra: &str,
) -> String {
    let sources: String = topics
        .iter()
        .map(|t| format!("    - topic: {t}\n"))
        .collect();
    let features: String = features
        .iter()
        .map(|(n, t)| format!("    - {{name: {n}, type: {t}}}\n"))
        .collect();
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata:\n  name: {name}\nspec:\n  entity: x\n  features:\n{features}  plugin:\n    wasm: {wasm}\n    config: {config}\n  sources:\n{sources}  store: {{table: {table}, ttl: 1d}}\n  cache: {{strategy: write-through, ttl: 10m}}\n{extra}"
    )
}

/// Integer feature `feature` of every entity of `group` in `table` (strongly consistent scan).
pub async fn counts(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
    feature: &str,
) -> std::collections::BTreeMap<String, i64> {
    attributes(client, table, group, feature)
        .await
        .into_iter()
        .filter_map(|(e, a)| Some((e, a.as_n().ok()?.parse().ok()?)))
        .collect()
}

/// String feature `feature` of every entity of `group` in `table`.
pub async fn strings(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
    feature: &str,
) -> std::collections::BTreeMap<String, String> {
    attributes(client, table, group, feature)
        .await
        .into_iter()
        .filter_map(|(e, a)| Some((e, a.as_s().ok()?.clone())))
        .collect()
}

async fn attributes(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
    feature: &str,
) -> std::collections::BTreeMap<String, aws_sdk_dynamodb::types::AttributeValue> {
    items(client, table, group)
        .await
        .into_iter()
        .filter_map(|(e, mut item)| Some((e, item.remove(&format!("f:{feature}"))?)))
        .collect()
}

/// Every stored item of `group` in `table`, by entity, with all its attributes.
pub async fn items(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    group: &str,
) -> std::collections::BTreeMap<
    String,
    std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
> {
    let mut out = std::collections::BTreeMap::new();
    let mut start = None;
    loop {
        let page = match client
            .scan()
            .table_name(table)
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
        {
            Ok(p) => p,
            Err(_) => return out, // table not created yet
        };
        for item in page.items() {
            let Some(pk) = item.get("pk").and_then(|a| a.as_s().ok()) else {
                continue;
            };
            if let Some(entity) = pk.strip_prefix(&format!("{group}#")) {
                out.insert(entity.to_owned(), item.clone());
            }
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            return out;
        }
    }
}

/// The hostile fixture with its build label replaced (at most 15 bytes): a distinct plugin
/// version that writes `label` = `label`. Labels starting with `bad` miscount; with
/// `initfail` the plugin refuses to start.
pub fn relabeled_hostile(label: &str) -> Vec<u8> {
    assert!(label.len() <= 15);
    let mut bytes = std::fs::read(plugin_dir().join("hostile.wasm")).unwrap();
    let marker = b"fh-label:";
    let found: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, w)| *w == marker)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(found.len(), 1, "the label marker must occur exactly once");
    let at = found[0] + marker.len();
    let mut padded = label.as_bytes().to_vec();
    padded.resize(15, b'.');
    bytes[at..at + 15].copy_from_slice(&padded);
    bytes
}

/// The version (content hash) the host gives a plugin's bytes.
pub fn plugin_version(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(bytes)[..8])
}

/// Write `bytes` to `path` the way deploy tools should: a temporary file, then a rename.
pub fn install_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET a path from a loopback HTTP server; the body, or None if it is not reachable.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    http(port, "GET", path, &[]).await.map(|(_, body)| body)
}

/// One HTTP/1.0 request to the loopback port: status and body, `None` if unreachable.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    s.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: localhost\r\n{extra}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
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

/// Run the `feature-host` CLI with `args` in `env`; panics with its stderr unless it exits 0.
/// Returns its stdout.
pub fn host_cli(env: &[(&str, String)], args: &[&str]) -> Vec<u8> {
    let out = Command::new(host_binary())
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run feature-host");
    assert!(
        out.status.success(),
        "feature-host {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
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

    /// SIGKILL and wait: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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

/// A TCP proxy on loopback in front of a real service, to cut the network to it: while
/// down it resets live connections and refuses new ones (accepts and closes at once).
pub struct Proxy {
    pub port: u16,
    down: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    /// Proxy to `upstream` (`host:port`, or an `http://host:port` URL).
    pub async fn start(upstream: &str) -> Proxy {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: the client sees the connection close
                }
                let (upstream, mut watch) = (upstream.clone(), watch.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|d| *d) => {}
                    }
                });
            }
        });
        Proxy { port, down }
    }

    /// The proxy's address as an `http://` URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

/// A `redis-server` of a test's own (the stack's is shared), persisting to `dir` with an
/// append-only file, so that a restart brings its data back — as a Redis with persistence
/// does in production, stale entries included.
pub struct OwnRedis {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnRedis {
    pub fn start(dir: &Path) -> OwnRedis {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = OwnRedis {
            port: free_port(),
            dir: dir.to_owned(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Start (again) on the same port and data directory; waits until it answers PING.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--dir", &self.dir.display().to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/stack install)");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let ping = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "redis-server did not answer on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGSTOP: the process keeps its connections but answers nothing.
    pub fn pause(&self) {
        signal(self.child.as_ref().expect("running").id(), "-STOP");
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) {
        signal(self.child.as_ref().expect("running").id(), "-CONT");
    }

    /// SIGKILL (a crash; the append-only file has every acknowledged write) and wait.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (Redis flushes its append-only file and exits) and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid} failed");
}

/// An Apache Kafka cluster of the test's own (one broker can be killed without disturbing other
/// tests), started by `scripts/stack kafka` in a directory of its own: the same broker, jars
/// and settings as the stack's. Stopped when dropped.
pub struct OwnKafka {
    dir: PathBuf,
    /// The PLAINTEXT bootstrap list.
    pub brokers: String,
    env: Vec<(String, String)>,
}

impl OwnKafka {
    /// `nodes` combined broker+controller nodes; `args` go to `scripts/stack kafka up`
    /// (`--listener NAME=PROTOCOL`, `--config FILE`, `--scram SPEC`).
    pub fn start(dir: &Path, nodes: usize, args: &[&str]) -> OwnKafka {
        std::fs::create_dir_all(dir).unwrap();
        let mut k = OwnKafka {
            dir: dir.to_owned(),
            brokers: String::new(),
            env: Vec::new(),
        };
        let nodes = nodes.to_string();
        let mut up = vec!["up", "--brokers", &nodes];
        up.extend_from_slice(args);
        k.script(&up);
        let env = k.script(&["env"]);
        k.env = env
            .lines()
            .filter_map(|l| l.strip_prefix("export ")?.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        k.brokers = k.var("FH_KAFKA_BROKERS");
        k
    }

    /// A bootstrap list from `scripts/stack kafka env`, e.g. `FH_KAFKA_SCRAM_BROKERS` for a
    /// listener named `SCRAM`.
    pub fn var(&self, name: &str) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{name} not in scripts/stack kafka env: {:?}", self.env))
    }

    /// SIGKILL node `node` (1-based): a crash.
    pub fn kill(&self, node: usize) {
        self.script(&["kill", &node.to_string()]);
    }

    /// Start node `node` again on its port and log dir; returns once it serves.
    pub fn restart(&self, node: usize) {
        self.script(&["start", &node.to_string()]);
    }

    fn script(&self, args: &[&str]) -> String {
        let script = std::env::var("FH_STACK_SCRIPT")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("scripts/stack"));
        let out = Command::new(script)
            .arg("kafka")
            .args(args)
            .env("FH_STACK_DIR", &self.dir)
            .env("KAFKA_HEAP", "512m")
            .stdin(Stdio::null())
            .output()
            .expect("run scripts/stack");
        assert!(
            out.status.success(),
            "scripts/stack kafka {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/stack"))
            .args(["kafka", "down"])
            .env("FH_STACK_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A DynamoDB Local of the test's own (it can be paused without disturbing other tests), from
/// the install `scripts/stack` made (`FH_DYNAMODB_LOCAL_DIR`).
pub struct OwnDynamo {
    pub port: u16,
    child: Child,
}

impl OwnDynamo {
    pub fn start() -> OwnDynamo {
        let dir = std::env::var("FH_DYNAMODB_LOCAL_DIR")
            .expect("FH_DYNAMODB_LOCAL_DIR (eval \"$(scripts/stack env)\")");
        let port = free_port();
        let child = Command::new("java")
            .current_dir(&dir)
            .args([
                "-Djava.library.path=./DynamoDBLocal_lib",
                "-jar",
                "DynamoDBLocal.jar",
            ])
            .args(["-inMemory", "-port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("java (scripts/stack install)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "DynamoDB Local did not start"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        OwnDynamo { port, child }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pause(&self) {
        signal(self.child.id(), "-STOP");
    }

    pub fn resume(&self) {
        signal(self.child.id(), "-CONT");
    }
}

impl Drop for OwnDynamo {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A number from a Prometheus text exposition: the sample whose series (name and labels,
/// as printed) is `series`; 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Click event `i` of a stream spread over `users` users: (key, payload) for the
/// user-activity plugin.
pub fn click(i: usize, users: usize) -> (String, String) {
    let user = format!("u{}", i % users);
    (
        user.clone(),
        format!(r#"{{"type":"click","user_id":"{user}","item_id":"i{i}"}}"#),
    )
}

/// Clicks per user after clicks `0..n` over `users` users.
pub fn expected_clicks(n: usize, users: usize) -> std::collections::BTreeMap<String, i64> {
    let mut m = std::collections::BTreeMap::new();
    for i in 0..n {
        *m.entry(click(i, users).0).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn java_hash_is_javas() {
        // "abc".hashCode() is 96354 on every JVM; the second sum wraps past i32::MAX.
        assert_eq!(super::java_hash("abc"), 96354);
        assert_eq!(super::java_hash("consumer-group-1"), 147_483_020);
    }
}
