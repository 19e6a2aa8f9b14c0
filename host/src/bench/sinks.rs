//! `feature-host bench sinks`: feature writes/s of the [`FeatureWriter`] per cache
//! strategy against DynamoDB and Redis (the stack's: `eval "$(scripts/stack env)"`), next to
//! the raw ceiling measured in the same run: plain aws-sdk-dynamodb / redis client loops
//! sending the same requests (same count, same item sizes, same concurrency) with none of
//! the writer's work — no merge, no conditions, no coalescing.
//!
//! A batch is `--entities` entities × `--features` int features (one `set` each, a new
//! source offset per entity), written `--batches` times to the same entities, one batch at a
//! time like a partition's batches. Our requests per batch (counted, not assumed):
//! DynamoDB `BatchGetItem` per 100 keys plus one conditional `PutItem` per entity; Redis one
//! pipeline for write-through / write-around; for cache-only one read pipeline plus one
//! compare-and-swap script call for the batch. The raw loop sends exactly those,
//! unconditioned (plain `HSET`s).

use super::{Report, unique};
use crate::config::StoreSettings;
use crate::feature::{Mutation, Op, Position, Value, Versioned};
use crate::sink::dynamo::{DynamoStore, encode_item};
use crate::sink::redis_cache::RedisCache;
use crate::sink::writer::{CacheStore, FeatureWriter, GroupSink};
use crate::sink::{Cache, CacheFill, Loaded, SinkError, Store, Swap, Target};
use crate::spec::{CacheStrategy, FeatureType};
use anyhow::Context as _;
use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use futures::stream::{self, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct SinksBenchArgs {
    /// Entities per batch.
    #[arg(long, default_value_t = 256)]
    pub entities: usize,
    /// Features written per entity.
    #[arg(long, default_value_t = 8)]
    pub features: usize,
    /// Timed batches per strategy (after one warm-up batch).
    #[arg(long, default_value_t = 40)]
    pub batches: usize,
    /// Only these strategies (default: all), e.g. `--strategy cache-only` to profile one.
    #[arg(long = "strategy", value_parser = strategy)]
    pub strategies: Vec<CacheStrategy>,
    #[command(flatten)]
    pub stores: StoreSettings,
}

/// A strategy as specs spell it (`cache-only`).
fn strategy(name: &str) -> Result<CacheStrategy, String> {
    serde_json::from_value(serde_json::Value::String(name.into())).map_err(|_| {
        format!("{name:?} is not one of store-only, write-through, write-around, cache-only")
    })
}

/// Requests sent, by kind.
#[derive(Default)]
struct Counts {
    ddb: AtomicU64,
    redis: AtomicU64,
}

impl Counts {
    fn take(&self) -> (u64, u64) {
        (
            self.ddb.swap(0, Ordering::Relaxed),
            self.redis.swap(0, Ordering::Relaxed),
        )
    }
}

/// DynamoDB, counting requests.
struct CountedStore(DynamoStore, Arc<Counts>);

#[async_trait]
impl Store for CountedStore {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    async fn ensure_table(&self, table: &str) -> Result<(), SinkError> {
        self.0.ensure_table(table).await
    }
    async fn load(&self, t: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        self.1
            .ddb
            .fetch_add(keys.len().div_ceil(100) as u64, Ordering::Relaxed);
        self.0.load(t, keys).await
    }
    async fn compare_and_swap(
        &self,
        t: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        self.1.ddb.fetch_add(1, Ordering::Relaxed);
        self.0.compare_and_swap(t, key, expected, next).await
    }
}

/// Redis, counting round trips: a pipeline is one, and so is a batch's swaps (exact while
/// they fit one script call, as the default 256 entities do).
struct CountedCache(RedisCache, Arc<Counts>);

impl CountedCache {
    fn one(&self) {
        self.1.redis.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Cache for CountedCache {
    fn backend(&self) -> &'static str {
        Cache::backend(&self.0)
    }
    async fn put_if_newer(&self, fills: &[CacheFill]) -> Result<(), SinkError> {
        self.one();
        self.0.put_if_newer(fills).await
    }
    async fn invalidate(&self, keys: &[(String, u64)], ttl: Duration) -> Result<(), SinkError> {
        self.one();
        self.0.invalidate(keys, ttl).await
    }
    async fn get(&self, key: &str) -> Result<Option<Versioned>, SinkError> {
        self.one();
        Cache::get(&self.0, key).await
    }
}

#[async_trait]
impl Store for CountedCache {
    fn backend(&self) -> &'static str {
        Store::backend(&self.0)
    }
    async fn load(&self, t: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        self.one();
        self.0.load(t, keys).await
    }
    async fn compare_and_swap(
        &self,
        t: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        self.one();
        self.0.compare_and_swap(t, key, expected, next).await
    }
    async fn compare_and_swap_many(
        &self,
        t: &Target,
        swaps: &[Swap<'_>],
    ) -> Result<Vec<Result<bool, SinkError>>, SinkError> {
        self.one();
        self.0.compare_and_swap_many(t, swaps).await
    }
}

const STRATEGIES: [(CacheStrategy, &str); 4] = [
    (CacheStrategy::StoreOnly, "store_only"),
    (CacheStrategy::WriteThrough, "write_through"),
    (CacheStrategy::WriteAround, "write_around"),
    (CacheStrategy::CacheOnly, "cache_only"),
];

/// Concurrent conditional writes per batch: the writer's bound, used by the raw loop too.
const CONCURRENCY: usize = crate::sink::SWAP_CONCURRENCY;

fn sink(args: &SinksBenchArgs, id: &str, strategy: CacheStrategy) -> GroupSink {
    GroupSink {
        target: Target {
            group: format!("bench-{id}"),
            table: format!("bench-sinks-{id}"),
            types: (0..args.features)
                .map(|f| (format!("f{f}"), FeatureType::Int))
                .collect(),
        },
        strategy,
        store_ttl: Some(Duration::from_secs(86_400)),
        cache_ttl: Duration::from_secs(600),
    }
}

/// Batch `b`: every entity sets every feature, at a new offset and event time.
fn batch(args: &SinksBenchArgs, b: usize) -> Vec<(String, Mutation)> {
    (0..args.entities)
        .map(|e| {
            let offset = (b * args.entities + e) as i64;
            let ops = (0..args.features)
                .map(|f| {
                    (
                        format!("f{f}"),
                        Op::Set(Value::Int(offset * 31 + f as i64)),
                        1_764_028_800_000 + offset,
                    )
                })
                .collect();
            (
                format!("entity-{e:05}"),
                Mutation {
                    position: Some(Position::sequential("bench", 0, offset)),
                    ops,
                    overwrite: false,
                },
            )
        })
        .collect()
}

pub async fn run(args: SinksBenchArgs) -> anyhow::Result<Report> {
    let endpoint = args.stores.dynamodb_endpoint.clone().context(
        "bench sinks measures DynamoDB and Redis: set FH_DYNAMODB_ENDPOINT and FH_REDIS_URL (eval \"$(scripts/stack env)\")",
    )?;
    let redis_url = args
        .stores
        .redis_url
        .clone()
        .context("bench sinks needs FH_REDIS_URL (eval \"$(scripts/stack env)\")")?;
    let counts = Arc::new(Counts::default());
    let store = Arc::new(CountedStore(
        DynamoStore::connect(Some(&endpoint)).await,
        counts.clone(),
    ));
    let cache: Arc<dyn CacheStore> = Arc::new(CountedCache(
        RedisCache::connect(redis_url.expose()).await?,
        counts.clone(),
    ));
    let writer = FeatureWriter::new(store.clone(), cache);
    let raw_ddb = DynamoStore::connect(Some(&endpoint)).await.client().clone();
    let raw_redis = redis::Client::open(redis_url.expose())?
        .get_connection_manager()
        .await?;
    let (e, f, n) = (args.entities, args.features, args.batches);
    // Both services warm (JIT, connections) before anything is timed.
    {
        let id = unique();
        let warm = sink(&args, &id, CacheStrategy::WriteThrough);
        store.ensure_table(&warm.target.table).await?;
        for b in 0..10 {
            writer.apply(&warm, batch(&args, b)).await;
        }
        let _ = raw_ddb
            .delete_table()
            .table_name(&warm.target.table)
            .send()
            .await;
    }
    eprintln!("sinks: {e} entities x {f} features per batch, {n} batches per strategy");
    let mut report = Report::default();
    let chosen = STRATEGIES
        .into_iter()
        .filter(|(s, _)| args.strategies.is_empty() || args.strategies.contains(s));
    for (strategy, name) in chosen {
        let id = unique();
        let sink = sink(&args, &id, strategy);
        if strategy != CacheStrategy::CacheOnly {
            store.ensure_table(&sink.target.table).await?;
        }
        // Warm-up: creates the entities, so every timed batch updates existing ones.
        let warm = writer.apply(&sink, batch(&args, 0)).await;
        anyhow::ensure!(
            warm.failed.is_empty() && warm.cache_error.is_none(),
            "warm-up write failed: {:?} {:?}",
            warm.failed.first(),
            warm.cache_error
        );
        counts.take();

        // The raw ceiling: the same requests, item sizes and concurrency, plain clients.
        let entries: Vec<(String, Versioned)> = batch(&args, 0)
            .into_iter()
            .map(|(entity, m)| {
                let mut state = crate::feature::EntityState::default();
                state.apply(&m);
                state.expires_at = Some(crate::sink::unix_now() + 86_400);
                (sink.target.key(&entity), Versioned { version: 2, state })
            })
            .collect();
        let items: Vec<HashMap<String, AttributeValue>> =
            entries.iter().map(|(k, v)| encode_item(k, v)).collect();
        let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
        let cached: Vec<(String, Vec<String>)> = entries
            .iter()
            .map(|(k, v)| Ok((format!("fh:raw:{k}"), RedisCache::fields(v)?)))
            .collect::<Result<_, SinkError>>()?;

        // Ours and raw alternate batch by batch, so both see the services in the same state
        // (DynamoDB Local's JIT warms up over the run; the machine is shared).
        let (mut ours_time, mut raw_time) = (Duration::ZERO, Duration::ZERO);
        // Where the time goes: this process's CPU and Redis's, each sampled outside the
        // timed windows.
        let (mut ours_cpu, mut raw_cpu) = (Cpu::default(), Cpu::default());
        for b in 1..=n {
            // Built outside the timed window: the mutations are the plugin's work, and the
            // raw loop's requests are built once too.
            let mutations = batch(&args, b);
            let before = Cpu::sample(&raw_redis).await?;
            let start = Instant::now();
            let r = writer.apply(&sink, mutations).await;
            ours_time += start.elapsed();
            ours_cpu.add(&before, &Cpu::sample(&raw_redis).await?);
            anyhow::ensure!(
                r.failed.is_empty() && r.cache_error.is_none() && r.written == e,
                "batch {b} of {name}: written {} of {e}, failed {:?}, cache {:?}",
                r.written,
                r.failed.first(),
                r.cache_error
            );
            let before = Cpu::sample(&raw_redis).await?;
            let start = Instant::now();
            match strategy {
                CacheStrategy::CacheOnly => raw_redis_cache_only(&raw_redis, &cached).await?,
                _ => {
                    raw_dynamodb(&raw_ddb, &sink.target.table, &keys, &items).await?;
                    match strategy {
                        CacheStrategy::WriteThrough => {
                            raw_redis_pipeline(&raw_redis, &cached, false).await?
                        }
                        CacheStrategy::WriteAround => {
                            raw_redis_pipeline(&raw_redis, &cached, true).await?
                        }
                        _ => {}
                    }
                }
            }
            raw_time += start.elapsed();
            raw_cpu.add(&before, &Cpu::sample(&raw_redis).await?);
        }
        let (ddb_requests, redis_requests) = counts.take();
        let ours = (e * f * n) as f64 / ours_time.as_secs_f64();
        let raw = (e * f * n) as f64 / raw_time.as_secs_f64();
        report.add(&format!("sinks_{name}_writes_per_s"), ours);
        report.add(&format!("sinks_{name}_raw_writes_per_s"), raw);
        report.add(&format!("sinks_{name}_vs_raw"), ours / raw);
        report.add(
            &format!("sinks_{name}_dynamodb_requests_per_batch"),
            ddb_requests as f64 / n as f64,
        );
        report.add(
            &format!("sinks_{name}_redis_round_trips_per_batch"),
            redis_requests as f64 / n as f64,
        );
        for (side, cpu) in [("", &ours_cpu), ("raw_", &raw_cpu)] {
            report.add(
                &format!("sinks_{name}_{side}host_cpu_us_per_batch"),
                cpu.host_us / n as f64,
            );
            report.add(
                &format!("sinks_{name}_{side}redis_cpu_us_per_batch"),
                cpu.redis_us / n as f64,
            );
        }
        if strategy != CacheStrategy::CacheOnly {
            let _ = raw_ddb
                .delete_table()
                .table_name(&sink.target.table)
                .send()
                .await;
        }
    }
    Ok(report)
}

/// CPU time, µs: this process's (every thread) and the Redis server's (every client's: the
/// bench is its only busy one).
#[derive(Debug, Default, Clone, Copy)]
struct Cpu {
    host_us: f64,
    redis_us: f64,
}

impl Cpu {
    async fn sample(redis: &redis::aio::ConnectionManager) -> anyhow::Result<Cpu> {
        // SAFETY: getrusage only writes the struct it is given.
        let usage = unsafe {
            let mut u: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_SELF, &mut u);
            u
        };
        let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut redis.clone())
            .await
            .context("bench sinks reads Redis's CPU time with INFO cpu")?;
        let redis_us = info
            .lines()
            .filter_map(|l| {
                let (k, v) = l.trim().split_once(':')?;
                matches!(k, "used_cpu_sys" | "used_cpu_user").then(|| v.parse::<f64>().ok())?
            })
            .sum::<f64>()
            * 1e6;
        Ok(Cpu {
            host_us: us(usage.ru_utime) + us(usage.ru_stime),
            redis_us,
        })
    }

    fn add(&mut self, before: &Cpu, after: &Cpu) {
        self.host_us += after.host_us - before.host_us;
        self.redis_us += after.redis_us - before.redis_us;
    }
}

/// Run `requests` with at most `concurrency` in flight; the first error, if any.
async fn all_ok<F>(requests: impl Iterator<Item = F>, concurrency: usize) -> anyhow::Result<()>
where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    let results: Vec<anyhow::Result<()>> = stream::iter(requests)
        .buffer_unordered(concurrency)
        .collect()
        .await;
    results.into_iter().collect()
}

/// What the writer sends DynamoDB per batch, minus its work: `BatchGetItem` per 100 keys
/// (concurrently), then one unconditional `PutItem` per entity at the writer's concurrency.
pub(super) async fn raw_dynamodb(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    keys: &[String],
    items: &[HashMap<String, AttributeValue>],
) -> anyhow::Result<()> {
    let gets = keys.chunks(100).map(|chunk| {
        let req = KeysAndAttributes::builder()
            .set_keys(Some(
                chunk
                    .iter()
                    .map(|k| HashMap::from([("pk".to_owned(), AttributeValue::S(k.clone()))]))
                    .collect(),
            ))
            .consistent_read(true)
            .build();
        async move {
            client
                .batch_get_item()
                .request_items(table, req?)
                .send()
                .await?;
            anyhow::Ok(())
        }
    });
    all_ok(gets, 8).await?;
    let puts = items.iter().map(|item| async move {
        client
            .put_item()
            .table_name(table)
            .set_item(Some(item.clone()))
            .send()
            .await?;
        anyhow::Ok(())
    });
    all_ok(puts, CONCURRENCY).await
}

/// One pipeline per batch: per entity an `HSET` of its fields as the cache holds them
/// (write-through) or of an invalidation marker (write-around), and a `PEXPIRE`.
pub(super) async fn raw_redis_pipeline(
    conn: &redis::aio::ConnectionManager,
    entries: &[(String, Vec<String>)],
    marker: bool,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    for (key, fields) in entries {
        if marker {
            pipe.cmd("HSET")
                .arg(key)
                .arg("__v")
                .arg(2)
                .arg("__inv")
                .arg(1)
                .ignore();
        } else {
            pipe.cmd("HSET")
                .arg(key)
                .arg("__v")
                .arg(2)
                .arg(fields)
                .ignore();
        }
        pipe.pexpire(key, 600_000).ignore();
    }
    pipe.query_async::<()>(&mut conn.clone()).await?;
    Ok(())
}

/// Cache-only: one read pipeline (`HMGET` per entity), then one write pipeline (per entity
/// `HSET` + `EXPIREAT`).
async fn raw_redis_cache_only(
    conn: &redis::aio::ConnectionManager,
    entries: &[(String, Vec<String>)],
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    for (key, _) in entries {
        pipe.cmd("HMGET")
            .arg(key)
            .arg("__v")
            .arg("__s")
            .arg("__inv");
    }
    let _: Vec<redis::Value> = pipe.query_async(&mut conn.clone()).await?;
    let expire_at = crate::sink::unix_now() + 600;
    let mut pipe = redis::pipe();
    for (key, fields) in entries {
        pipe.cmd("HSET")
            .arg(key)
            .arg("__v")
            .arg(2)
            .arg(fields)
            .ignore()
            .cmd("EXPIREAT")
            .arg(key)
            .arg(expire_at)
            .ignore();
    }
    pipe.query_async::<()>(&mut conn.clone()).await?;
    Ok(())
}
