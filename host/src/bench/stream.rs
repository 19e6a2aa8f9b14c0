//! `feature-host bench stream`: one partition, the same events, through the same pipeline
//! (user-activity plugin, checked writes) with
//! - a store that adds latency L per conditional write (in memory otherwise), and
//! - the real stores (DynamoDB + Redis, write-through) when they are configured;
//!
//! consumed (a) sequentially with auto-commit, (b) sequentially with a synchronous commit
//! per message, (c) by the host's consumer at several `max_in_flight` values — plus the
//! bare consumer (poll only) as this broker's ceiling. Rates count from the first message
//! consumed to the last one finished; each mode uses its own consumer group and fresh
//! stores. Ceilings: `min(C / L, bare)` with the nominal L, and with the L that (a)
//! measured per event (`C × (a)`).

use super::delay::Delays;
use super::{Report, bench_specs};
use crate::app;
use crate::config::StoreSettings;
use crate::event::Event;
use crate::feature::Versioned;
use crate::pipeline::Pipeline;
use crate::retry::InPlace;
use crate::sink::memory_cache::MemoryCache;
use crate::sink::writer::{CacheStore, FeatureWriter};
use crate::sink::{Loaded, SinkError, Store, Target};
use crate::stream::consumer::{StreamSettings, consume};
use crate::stream::kafka::to_event;
use crate::stream::partition::Limits;
use anyhow::Context as _;
use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct StreamBenchArgs {
    /// Events through the host's consumer per run (c).
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Events through the sequential baselines (a), (b) — they are slow by design.
    #[arg(long, default_value_t = 1_000)]
    pub baseline_events: usize,
    /// Latency the slow store adds per conditional write.
    #[arg(long, default_value = "2ms", value_parser = humantime::parse_duration)]
    pub latency: Duration,
    /// `max_in_flight` values for (c).
    #[arg(long, value_delimiter = ',', default_value = "16,64,256")]
    pub in_flight: Vec<usize>,
    /// Kafka bootstrap servers (the stack's: `eval "$(scripts/stack env)"`).
    #[arg(long, env = "FH_KAFKA_BROKERS")]
    pub brokers: String,
    #[command(flatten)]
    pub stores: StoreSettings,
}

/// A store that waits `latency` (precisely: [`Delays`]) before each conditional write, and
/// measures what the waits really took.
struct SlowStore {
    inner: MemoryCache,
    latency: Duration,
    delays: Delays,
    waited: Arc<Waited>,
}

/// Total time the slow stores' waits took, and how many there were.
#[derive(Default)]
struct Waited {
    ns: AtomicU64,
    count: AtomicU64,
}

impl Waited {
    fn reset(&self) {
        self.ns.store(0, AtomicOrdering::Relaxed);
        self.count.store(0, AtomicOrdering::Relaxed);
    }

    fn mean_ms(&self) -> f64 {
        let n = self.count.load(AtomicOrdering::Relaxed).max(1);
        self.ns.load(AtomicOrdering::Relaxed) as f64 / n as f64 / 1e6
    }
}

#[async_trait]
impl Store for SlowStore {
    fn backend(&self) -> &'static str {
        "slow-memory"
    }

    async fn load(&self, target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        self.inner.load(target, keys).await
    }

    async fn compare_and_swap(
        &self,
        target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        let start = Instant::now();
        self.delays.wait(self.latency).await;
        self.waited
            .ns
            .fetch_add(start.elapsed().as_nanos() as u64, AtomicOrdering::Relaxed);
        self.waited.count.fetch_add(1, AtomicOrdering::Relaxed);
        self.inner
            .compare_and_swap(target, key, expected, next)
            .await
    }
}

fn click(i: usize) -> (String, String) {
    let user = format!("u{}", i % 10_000);
    (
        user.clone(),
        format!(r#"{{"type":"click","user_id":"{user}","item_id":"i{i}"}}"#),
    )
}

/// The bench's topic: one partition, the cluster's default replication.
async fn create_topic(cfg: &ClientConfig, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = cfg.create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(topic, 1, TopicReplication::Fixed(-1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("cannot create topic {t}: {e}"))?;
    }
    Ok(())
}

async fn produce(cfg: &ClientConfig, topic: &str, n: usize) -> anyhow::Result<()> {
    // Batched as a producer in production batches (linger 5 ms): the consumer reads whole
    // record batches.
    let producer: FutureProducer = cfg
        .clone()
        .set("linger.ms", "5")
        .set("acks", "all")
        .create()?;
    // Event times just behind now: the broker's time-based retention (7 days by default)
    // deletes a topic whose records are all older — the active segment included — and a
    // later mode would then find the topic empty.
    let base = crate::sink::unix_now_ms() - n as i64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(2_000) {
        let sends = chunk.iter().map(|&i| {
            let (key, payload) = click(i);
            let producer = producer.clone();
            async move {
                producer
                    .send(
                        FutureRecord::to(topic)
                            .key(&key)
                            .payload(&payload)
                            .timestamp(base + i as i64),
                        Duration::from_secs(30),
                    )
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        for r in futures::future::join_all(sends).await {
            r.context("producing bench events")?;
        }
    }
    Ok(())
}

fn consumer(cfg: &ClientConfig, group: &str, auto_commit: bool) -> anyhow::Result<BaseConsumer> {
    Ok(cfg
        .clone()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set(
            "enable.auto.commit",
            if auto_commit { "true" } else { "false" },
        )
        .create()?)
}

/// Events/s of a bare consumer reading `n` messages (no processing).
fn bare(cfg: &ClientConfig, topic: &str, n: usize) -> anyhow::Result<f64> {
    let c = consumer(cfg, &format!("bench-bare-{}", super::unique()), false)?;
    c.subscribe(&[topic])?;
    let (mut seen, mut start) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen < n && Instant::now() < deadline {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            m?;
            start.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    anyhow::ensure!(seen == n, "bare consumer read {seen} of {n} messages");
    Ok(rate(n, start))
}

fn rate(n: usize, start: Option<Instant>) -> f64 {
    let secs = start.map_or(f64::INFINITY, |s| s.elapsed().as_secs_f64());
    n as f64 / secs
}

/// (a) / (b): one message at a time through the pipeline; `sync_commit` commits each.
async fn sequential(
    cfg: &ClientConfig,
    topic: &str,
    n: usize,
    pipeline: &Arc<Pipeline>,
    sync_commit: bool,
) -> anyhow::Result<f64> {
    let c = consumer(cfg, &format!("bench-seq-{}", super::unique()), !sync_commit)?;
    c.subscribe(&[topic])?;
    let (mut done, mut start) = (0, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    while done < n && Instant::now() < deadline {
        // Polling blocks briefly; it is the loop under test, so keep it on this task.
        let polled = tokio::task::block_in_place(|| {
            c.poll(Duration::from_millis(100)).map(|m| {
                m.map(|m| {
                    (
                        to_event(&m),
                        m.topic().to_owned(),
                        m.partition(),
                        m.offset(),
                    )
                })
            })
        });
        let Some(m) = polled else { continue };
        let (event, t, p, o): (Event, String, i32, i64) = m?;
        start.get_or_insert_with(Instant::now);
        let events = Arc::new(vec![event]);
        let pairs = pipeline.route(&events);
        let (failures, _) = pipeline
            .process_with_retries(&events, &pairs, InPlace::StoreOnly(1), false)
            .await;
        anyhow::ensure!(failures.is_empty(), "bench event failed: {failures:?}");
        if sync_commit {
            let mut tpl = rdkafka::TopicPartitionList::new();
            tpl.add_partition_offset(&t, p, rdkafka::Offset::Offset(o + 1))?;
            tokio::task::block_in_place(|| c.commit(&tpl, CommitMode::Sync))?;
        }
        done += 1;
    }
    anyhow::ensure!(done == n, "sequential run processed {done} of {n}");
    Ok(rate(n, start))
}

/// (c): the host's consumer at `max_in_flight` over the first `n` messages.
async fn parallel(
    cfg: &ClientConfig,
    topic: &str,
    n: usize,
    pipeline: &Arc<Pipeline>,
    max_in_flight: usize,
) -> anyhow::Result<f64> {
    let settings = StreamSettings {
        fetch_size: 1_000,
        limits: Limits {
            max_in_flight,
            max_buffered_bytes: 64 << 20,
            max_offset_span: 10_000,
        },
        commit_interval: Duration::from_millis(200),
        drain_timeout: Duration::from_secs(10),
        store_attempts: 1,
        transactional_id: None,
        transaction_timeout: Duration::from_secs(60),
    };
    let labels = crate::metrics::PartitionLabels::new(topic, 0);
    let finished = pipeline.metrics().finished.get_or_create(&labels).clone();
    let before = finished.get();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let run = tokio::spawn({
        let (cfg, pipeline) = (cfg.clone(), pipeline.clone());
        let group = format!("bench-par-{}", super::unique());
        async move { consume(&cfg.into(), &group, settings, pipeline, rx).await }
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut start = None;
    let mut last = before;
    while Instant::now() < deadline {
        let now = finished.get();
        if now > before {
            start.get_or_insert_with(Instant::now);
        }
        if now >= before + n as u64 {
            last = now;
            break;
        }
        if run.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let eps = rate(n, start);
    let _ = tx.send(true);
    run.await??;
    anyhow::ensure!(
        last >= before + n as u64,
        "consumer finished {} of {n} events",
        last - before
    );
    Ok(eps)
}

pub async fn run(args: StreamBenchArgs) -> anyhow::Result<Report> {
    let mut report = Report::default();
    // The bench's own clients take FH_KAFKA_PROPERTIES too (auth, debug contexts).
    let cfg = {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &args.brokers);
        for kv in std::env::var("FH_KAFKA_PROPERTIES")
            .unwrap_or_default()
            .split(',')
        {
            if let Some((k, v)) = kv.split_once('=') {
                c.set(k.trim(), v.trim());
            }
        }
        c
    };
    let id = super::unique();
    let topic = format!("bench-stream-{id}");
    create_topic(&cfg, &topic).await?;
    eprintln!("producing {} events to {topic} (1 partition)…", args.events);
    produce(&cfg, &topic, args.events).await?;

    let bare_eps = tokio::task::block_in_place(|| bare(&cfg, &topic, args.events))?;
    report.add("bare_consumer_eps", bare_eps);

    // Each mode gets fresh stores: re-reading the same positions into a store that already
    // holds them would be no-op replays, not writes.
    let mut dirs = Vec::new();
    let delays = Delays::new();
    let waited = Arc::new(Waited::default());
    let mut slow_pipeline = async |mode: &str| -> anyhow::Result<Arc<Pipeline>> {
        let (dir, specs) = bench_specs(&args.stores, &format!("{id}{mode}"), &topic, "store-only")?;
        dirs.push(dir);
        let slow: Arc<dyn Store> = Arc::new(SlowStore {
            inner: MemoryCache::new(),
            latency: args.latency,
            delays: delays.clone(),
            waited: waited.clone(),
        });
        let cache: Arc<dyn CacheStore> = Arc::new(MemoryCache::new());
        Ok(Arc::new(
            app::build_pipeline(&specs, FeatureWriter::new(slow, cache)).await?,
        ))
    };
    let pc_unavailable = super::parallel_consumer::unavailable();
    let l = args.latency.as_secs_f64();
    report.add("latency_ms", l * 1e3);

    eprintln!(
        "(a) sequential, auto-commit, {} events…",
        args.baseline_events
    );
    let a = sequential(
        &cfg,
        &topic,
        args.baseline_events,
        &slow_pipeline("a").await?,
        false,
    )
    .await?;
    report.add("seq_autocommit_eps", a);
    report.add("seq_measured_latency_ms", waited.mean_ms());
    eprintln!("(b) sequential, sync commit per message…");
    let b = sequential(
        &cfg,
        &topic,
        args.baseline_events,
        &slow_pipeline("b").await?,
        true,
    )
    .await?;
    report.add("seq_synccommit_eps", b);
    for &c in &args.in_flight {
        eprintln!(
            "(c) host consumer, max_in_flight={c}, {} events…",
            args.events
        );
        let pipeline = slow_pipeline(&format!("c{c}")).await?;
        waited.reset();
        let eps = parallel(&cfg, &topic, args.events, &pipeline, c).await?;
        let ceiling = (c as f64 / l).min(bare_eps);
        report.add(&format!("parallel_c{c}_eps"), eps);
        report.add(&format!("ours_measured_latency_c{c}_ms"), waited.mean_ms());
        report.add(&format!("ratio_c{c}_vs_autocommit"), eps / a);
        report.add(&format!("ratio_c{c}_vs_synccommit"), eps / b);
        report.add(&format!("ceiling_c{c}_eps"), ceiling);
        report.add(&format!("ratio_c{c}_vs_ceiling"), eps / ceiling);
        // The latency a write really costs here (tokio's timer rounds sleeps up to whole
        // milliseconds, and each event also pays the plugin call): what (a) achieved per
        // event, with C of them overlapped.
        let effective = (c as f64 * a).min(bare_eps);
        report.add(&format!("ceiling_measured_l_c{c}_eps"), effective);
        report.add(
            &format!("ratio_c{c}_vs_measured_l_ceiling"),
            eps / effective,
        );
        if let Some(why) = &pc_unavailable {
            eprintln!("Parallel Consumer skipped: {why}");
        } else {
            eprintln!("Confluent's Parallel Consumer, KEY ordering, max concurrency {c}…");
            let pc =
                super::parallel_consumer::run(&args.brokers, &topic, args.events, c, args.latency)
                    .await?;
            report.add(&format!("parallel_consumer_c{c}_eps"), pc.eps);
            report.add(
                &format!("parallel_consumer_measured_latency_c{c}_ms"),
                pc.latency_ms,
            );
            report.add(&format!("ours_vs_parallel_consumer_c{c}"), eps / pc.eps);
        }
    }

    // The same with the real stores, when configured.
    if args.stores.dynamodb_endpoint.is_some() && args.stores.redis_url.is_some() {
        let writer = app::connect_writer(&args.stores).await?;
        let mut real_pipeline = async |mode: &str| -> anyhow::Result<Arc<Pipeline>> {
            let (dir, specs) = bench_specs(
                &args.stores,
                &format!("{id}{mode}"),
                &topic,
                "write-through",
            )?;
            dirs.push(dir);
            app::ensure_tables(&writer, &specs).await?;
            Ok(Arc::new(app::build_pipeline(&specs, writer.clone()).await?))
        };
        eprintln!("real stores: (b) sequential, sync commit…");
        let rb = sequential(
            &cfg,
            &topic,
            args.baseline_events,
            &real_pipeline("rb").await?,
            true,
        )
        .await?;
        report.add("real_seq_synccommit_eps", rb);
        let c = args.in_flight.iter().copied().max().unwrap_or(256);
        eprintln!("real stores: (c) host consumer, max_in_flight={c}…");
        let rc = parallel(&cfg, &topic, args.events, &real_pipeline("rc").await?, c).await?;
        report.add(&format!("real_parallel_c{c}_eps"), rc);
        report.add(&format!("real_ratio_c{c}_vs_synccommit"), rc / rb);
    } else {
        eprintln!("real stores skipped: set FH_DYNAMODB_ENDPOINT and FH_REDIS_URL");
    }
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(report)
}
