//! Applying a batch of mutations to a group's store and cache, per its cache strategy; and
//! the read path.

use super::cache_repair::CacheRepairs;
use super::{Cache, CacheFill, Loaded, SinkError, Store, Swap, Target, unix_now, unix_now_ms};
use crate::feature::{ApplyOutcome, Mutation, Versioned};
use crate::spec::{CacheStrategy, GroupDef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Compare-and-swap rounds before giving up on a contended entity.
const MAX_CAS_ROUNDS: u32 = 16;

/// A cache that can also serve as the store of `cache-only` groups.
pub trait CacheStore: Cache + Store {}
impl<T: Cache + Store> CacheStore for T {}

/// How one group writes.
#[derive(Debug, Clone)]
pub struct GroupSink {
    pub target: Target,
    pub strategy: CacheStrategy,
    pub store_ttl: Option<Duration>,
    pub cache_ttl: Duration,
}

impl GroupSink {
    pub fn from_def(def: &GroupDef) -> GroupSink {
        GroupSink {
            target: Target {
                group: def.name.clone(),
                table: def.spec.store.table.clone(),
                types: def
                    .spec
                    .features
                    .iter()
                    .map(|f| (f.name.clone(), f.ty))
                    .collect(),
            },
            strategy: def.spec.cache.strategy,
            store_ttl: def.store_ttl,
            cache_ttl: def.cache_ttl,
        }
    }
}

/// What a batch write did.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    pub entities: usize,
    /// Entities whose stored state changed.
    pub written: usize,
    pub outcome: ApplyOutcome,
    /// Mutations that were replays of already-applied positions.
    pub replayed: usize,
    pub cas_conflicts: u32,
    /// Batch runs' position entries dropped past their retention.
    pub positions_expired: usize,
    /// The longest applied-offset list among the entities written (see
    /// [`crate::feature::Watermark`]).
    pub max_applied: usize,
    /// Entities (store keys) whose write failed, with the reason; nothing of theirs applied.
    pub failed: Vec<(String, SinkError)>,
    /// A cache update that failed after the store write succeeded (its keys went to the
    /// repair queue).
    pub cache_error: Option<SinkError>,
    /// Cache updates (keys) queued for repair instead of applied: they failed, or the cache
    /// had repairs pending already.
    pub cache_queued: usize,
}

/// Writes features of any group to the store and the cache.
#[derive(Clone)]
pub struct FeatureWriter {
    store: Arc<dyn Store>,
    cache: Arc<dyn CacheStore>,
    repairs: Arc<CacheRepairs>,
    batch_position_retention: Duration,
}

/// How long an entity keeps a batch run's position entry after the run last wrote it (see
/// [`crate::feature::EXPIRING_SOURCE_PREFIX`]).
pub const DEFAULT_BATCH_POSITION_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl FeatureWriter {
    pub fn new(store: Arc<dyn Store>, cache: Arc<dyn CacheStore>) -> FeatureWriter {
        FeatureWriter {
            store,
            cache,
            repairs: Arc::default(),
            batch_position_retention: DEFAULT_BATCH_POSITION_RETENTION,
        }
    }

    /// Keep batch runs' position entries this long after their last write.
    pub fn with_batch_position_retention(mut self, retention: Duration) -> FeatureWriter {
        self.batch_position_retention = retention;
        self
    }

    pub fn batch_position_retention(&self) -> Duration {
        self.batch_position_retention
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Whether the store and the cache answer (for readiness): a read of a key that does not
    /// exist, in `table`, bounded by `timeout`. The problems, if any.
    pub async fn check(&self, table: Option<&Target>, timeout: std::time::Duration) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(t) = table {
            match tokio::time::timeout(timeout, self.store.load(t, &["__readyz".to_owned()])).await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => problems.push(format!("store: {e}")),
                Err(_) => problems.push(format!("store: no answer within {timeout:?}")),
            }
        }
        match tokio::time::timeout(timeout, Cache::get(&*self.cache, "fh:__readyz")).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => problems.push(format!("cache: {e}")),
            Err(_) => problems.push(format!("cache: no answer within {timeout:?}")),
        }
        problems
    }

    /// Cache updates that failed after their store write, waiting to be repaired.
    pub fn repairs(&self) -> &Arc<CacheRepairs> {
        &self.repairs
    }

    /// Queue repairs of `keys` (store key, version): their cache entries may be stale.
    fn queue_repairs(&self, sink: &GroupSink, keys: Vec<(String, u64)>) -> usize {
        let n = keys.len();
        let cache: Arc<dyn Cache> = self.cache.clone();
        self.repairs
            .enqueue(&cache, &sink.target.group, keys, sink.cache_ttl);
        n
    }

    fn primary(&self, sink: &GroupSink) -> Arc<dyn Store> {
        match sink.strategy {
            CacheStrategy::CacheOnly => self.cache.clone(),
            _ => self.store.clone(),
        }
    }

    /// Apply `batch` (entity, mutation) — all mutations of one entity coalesced into one
    /// read and one conditional write. Entities are independent: one entity's failure is
    /// reported in [`WriteReport::failed`] while the others are written (and cached).
    pub async fn apply(&self, sink: &GroupSink, batch: Vec<(String, Mutation)>) -> WriteReport {
        let mut by_entity: BTreeMap<String, Vec<Mutation>> = BTreeMap::new();
        for (entity, m) in batch {
            by_entity
                .entry(sink.target.key(&entity))
                .or_default()
                .push(m);
        }
        let store = self.primary(sink);
        let ttl = match sink.strategy {
            CacheStrategy::CacheOnly => Some(sink.cache_ttl),
            _ => sink.store_ttl,
        };
        let (now, now_ms) = (unix_now(), unix_now_ms());
        let retention = self.batch_position_retention.as_secs().max(1) as i64;
        let mut report = WriteReport {
            entities: by_entity.len(),
            ..Default::default()
        };
        let mut pending: Vec<String> = by_entity.keys().cloned().collect();
        let mut written: Vec<(String, Versioned)> = Vec::new();
        // Entities whose mutations were all replays, at the version the store holds.
        let mut refresh: Vec<(String, Versioned)> = Vec::new();
        let mut rounds = 0;
        while !pending.is_empty() {
            rounds += 1;
            if rounds > 1 {
                // Lost races: back off with jitter so contending writers spread out instead
                // of colliding again on the next round.
                let cap_us = 200u64 << (rounds - 2).min(6);
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..cap_us))).await;
            }
            if rounds > MAX_CAS_ROUNDS {
                let backend = store.backend();
                report.failed.extend(pending.drain(..).map(|key| {
                    let e = SinkError::Contended {
                        backend,
                        key: key.clone(),
                        attempts: MAX_CAS_ROUNDS,
                    };
                    (key, e)
                }));
                break;
            }
            let current = match store.load(&sink.target, &pending).await {
                // A key without an answer would be neither written nor failed: its events
                // would count as done.
                Ok(c) if c.len() != pending.len() => {
                    let e = SinkError::Unavailable {
                        backend: store.backend(),
                        message: format!("answered {} of {} keys", c.len(), pending.len()),
                    };
                    report
                        .failed
                        .extend(pending.drain(..).map(|k| (k, e.clone())));
                    break;
                }
                Ok(c) => c,
                Err(e) => {
                    report
                        .failed
                        .extend(pending.drain(..).map(|k| (k, e.clone())));
                    break;
                }
            };
            let mut swaps = Vec::new();
            for (key, cur) in pending.iter().zip(current) {
                let cur = match cur {
                    Ok(cur) => cur.unwrap_or_default(),
                    // Unreadable: this entity fails, the item is left as it is.
                    Err(e) => {
                        report.failed.push((key.clone(), e));
                        continue;
                    }
                };
                let mut next = Versioned {
                    version: cur.successor(now_ms),
                    state: cur.state.clone(),
                };
                let mut outcome = ApplyOutcome::default();
                let mut replayed = 0;
                for m in &by_entity[key] {
                    let o = next.state.apply(m);
                    replayed += usize::from(o.replayed);
                    if let (false, Some(pos)) = (o.replayed, &m.position) {
                        next.state.touch(pos, now);
                    }
                    outcome.add(o);
                }
                if next.state == cur.state {
                    // Nothing to write (all replays or stale): count, but skip the round trip.
                    report.replayed += replayed;
                    report.outcome.stale_skips += outcome.stale_skips;
                    // A replay may follow a crash between this entity's store write and its
                    // cache write: bring the cache to the store's version.
                    if replayed > 0 && cur.version > 0 {
                        refresh.push((key.clone(), cur));
                    }
                    continue;
                }
                // Round up: a sub-second TTL must not expire the entity at once.
                next.state.expires_at = ttl.map(|t| now + t.as_secs_f64().ceil() as i64);
                // Only on a write: expiring alone is not worth a round trip.
                report.positions_expired += next.state.expire_positions(now, retention);
                swaps.push((key.clone(), cur, next, outcome, replayed));
            }
            let asks: Vec<Swap<'_>> = swaps
                .iter()
                .map(|(key, cur, next, ..)| Swap {
                    key,
                    expected: cur.version,
                    next,
                    previous: Some(&cur.state),
                })
                .collect();
            let asked = if asks.is_empty() {
                Ok(Vec::new())
            } else {
                store.compare_and_swap_many(&sink.target, &asks).await
            };
            let answers = match asked {
                Ok(a) if a.len() == asks.len() => a,
                // A swap without an answer would be neither written nor failed.
                Ok(a) => {
                    let e = SinkError::Unavailable {
                        backend: store.backend(),
                        message: format!("answered {} of {} swaps", a.len(), asks.len()),
                    };
                    vec![Err(e); asks.len()]
                }
                Err(e) => vec![Err(e); asks.len()],
            };
            drop(asks);
            let results = swaps
                .into_iter()
                .zip(answers)
                .map(|((key, _, next, outcome, replayed), ok)| (key, next, outcome, replayed, ok));
            pending.clear();
            for (key, next, outcome, replayed, ok) in results {
                match ok {
                    Ok(true) => {
                        report.outcome.add(outcome);
                        report.replayed += replayed;
                        let longest = next.state.positions.values().map(|w| w.applied.len());
                        report.max_applied = report.max_applied.max(longest.max().unwrap_or(0));
                        written.push((key, next));
                    }
                    Ok(false) => {
                        report.cas_conflicts += 1;
                        pending.push(key);
                    }
                    Err(e) => report.failed.push((key, e)),
                }
            }
        }
        report.written = written.len();
        let cached = matches!(
            sink.strategy,
            CacheStrategy::WriteThrough | CacheStrategy::WriteAround
        );
        // The cache's versioned updates make a refresh at the current version a no-op
        // where the cache already has it.
        written.extend(refresh);
        if !cached || written.is_empty() {
            return report;
        }
        // Kept for the repair queue, should the cache not take the update.
        let versions: Vec<(String, u64)> = written
            .iter()
            .map(|(k, v)| (k.clone(), v.version))
            .collect();
        if !self.repairs.idle() {
            // The cache failed recently and repairs are still queued: queue these too
            // rather than make every batch wait on a cache that is down.
            report.cache_queued = self.queue_repairs(sink, versions);
            return report;
        }
        let result = match sink.strategy {
            CacheStrategy::WriteThrough => {
                let fills: Vec<CacheFill> = written
                    .into_iter()
                    .map(|(key, entry)| CacheFill {
                        key,
                        entry,
                        ttl: sink.cache_ttl,
                    })
                    .collect();
                self.cache.put_if_newer(&fills).await
            }
            _ => self.cache.invalidate(&versions, sink.cache_ttl).await,
        };
        if let Err(e) = result {
            // The store has the write; the cache may still hold the previous value. The
            // repair queue invalidates it once the cache answers, and readers skip it till
            // then.
            report.cache_queued = self.queue_repairs(sink, versions);
            report.cache_error = Some(e);
        }
        report
    }

    async fn load_one(&self, sink: &GroupSink, key: String) -> Loaded {
        let loaded = self.store.load(&sink.target, &[key]).await?.pop();
        loaded.unwrap_or(Ok(None))
    }

    /// Read an entity: the cache first, the store on a miss (filling the cache for
    /// write-through and write-around groups).
    pub async fn get(
        &self,
        sink: &GroupSink,
        entity: &str,
    ) -> Result<Option<Versioned>, SinkError> {
        let key = sink.target.key(entity);
        match sink.strategy {
            CacheStrategy::StoreOnly => Ok(live(self.load_one(sink, key).await?)),
            CacheStrategy::CacheOnly => Ok(live(
                Cache::get(&*self.cache, &key)
                    .await?
                    .map(|v| v.unless_expired(unix_now())),
            )),
            CacheStrategy::WriteThrough | CacheStrategy::WriteAround
                if self.repairs.bypass(&sink.target.group, &key) =>
            {
                // The cached entry may be older than the store: read the store, and leave
                // the cache to the repair queue.
                Ok(live(self.load_one(sink, key).await?))
            }
            CacheStrategy::WriteThrough | CacheStrategy::WriteAround => {
                match Cache::get(&*self.cache, &key).await {
                    Ok(Some(hit)) if hit.state.expires_at.is_none_or(|t| t > unix_now()) => {
                        return Ok(live(Some(hit)));
                    }
                    // Expired in the cache: gone, unless the store has it written again
                    // since (DynamoDB deletes expired items; the next write starts over).
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cache read failed; reading the store"),
                }
                let found = live(
                    self.load_one(sink, key.clone())
                        .await?
                        .map(|v| v.unless_expired(unix_now())),
                );
                if let Some(entry) = &found
                    && let Err(e) = self
                        .cache
                        .put_if_newer(&[CacheFill {
                            key,
                            entry: entry.clone(),
                            ttl: sink.cache_ttl,
                        }])
                        .await
                {
                    tracing::warn!(error = %e, "cache fill failed");
                }
                Ok(found)
            }
        }
    }
}

/// `None` for an entity without any live feature (expired, or only tombstones).
fn live(found: Option<Versioned>) -> Option<Versioned> {
    found.filter(|v| v.state.values().next().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::{Op, Position, Value};
    use crate::sink::memory_cache::MemoryCache;

    fn sink(strategy: CacheStrategy) -> GroupSink {
        GroupSink {
            target: Target {
                group: "g".into(),
                table: "t".into(),
                types: Default::default(),
            },
            strategy,
            store_ttl: None,
            cache_ttl: Duration::from_secs(60),
        }
    }

    fn incr(offset: i64) -> Mutation {
        Mutation {
            position: Some(Position::sequential("s", 0, offset)),
            ops: vec![("n".into(), Op::Incr(Value::Int(1)), offset)],
            overwrite: false,
        }
    }

    fn count(v: &Versioned) -> Option<&Value> {
        v.state.features.get("n").and_then(|c| c.value.as_ref())
    }

    #[tokio::test]
    async fn write_through_fills_cache_and_replays_are_noops() {
        let store = Arc::new(MemoryCache::new());
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(store.clone(), cache.clone());
        let s = sink(CacheStrategy::WriteThrough);
        let r = w
            .apply(
                &s,
                vec![
                    ("u".into(), incr(1)),
                    ("u".into(), incr(2)),
                    ("v".into(), incr(3)),
                ],
            )
            .await;
        assert_eq!((r.entities, r.written, r.replayed), (2, 2, 0));
        let r = w.apply(&s, vec![("u".into(), incr(2))]).await;
        assert_eq!((r.written, r.replayed), (0, 1));
        let cached = Cache::get(&*cache, "g#u").await.unwrap().unwrap();
        assert_eq!(count(&cached), Some(&Value::Int(2)));
        let stored = Store::load(&*store, &s.target, &["g#u".into()])
            .await
            .unwrap();
        assert_eq!(
            Some(cached.version),
            stored[0].as_ref().unwrap().as_ref().map(|v| v.version)
        );
    }

    #[tokio::test]
    async fn a_cache_hit_past_the_entitys_expiry_is_not_served() {
        let store = Arc::new(MemoryCache::new());
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(store.clone(), cache.clone());
        let s = sink(CacheStrategy::WriteThrough);
        w.apply(&s, vec![("u".into(), incr(1))]).await;
        // The entity expired (its store TTL passed) while the cache entry lives on.
        let mut hit = Cache::get(&*cache, "g#u").await.unwrap().unwrap();
        hit.state.expires_at = Some(unix_now() - 1);
        let expected = hit.version;
        hit.version += 1;
        assert!(
            Store::compare_and_swap(&*store, &s.target, "g#u", expected, &hit)
                .await
                .unwrap()
        );
        cache
            .put_if_newer(&[CacheFill {
                key: "g#u".into(),
                entry: hit,
                ttl: Duration::from_secs(60),
            }])
            .await
            .unwrap();
        assert!(
            w.get(&s, "u").await.unwrap().is_none(),
            "expired: not served"
        );
    }

    #[tokio::test]
    async fn write_around_invalidates_and_refuses_stale_fills() {
        let store = Arc::new(MemoryCache::new());
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(store.clone(), cache.clone());
        let s = sink(CacheStrategy::WriteAround);
        w.apply(&s, vec![("u".into(), incr(1))]).await;
        // Read fills the cache with the first version.
        let first = w.get(&s, "u").await.unwrap().unwrap().version;
        w.apply(&s, vec![("u".into(), incr(2))]).await;
        assert!(
            Cache::get(&*cache, "g#u").await.unwrap().is_none(),
            "invalidated"
        );
        // A slow reader that read version 1 before the write cannot re-fill it.
        let old = Versioned {
            version: first,
            ..Default::default()
        };
        cache
            .put_if_newer(&[CacheFill {
                key: "g#u".into(),
                entry: old,
                ttl: Duration::from_secs(60),
            }])
            .await
            .unwrap();
        assert!(Cache::get(&*cache, "g#u").await.unwrap().is_none());
        let v = w.get(&s, "u").await.unwrap().unwrap();
        assert_eq!((v.version, count(&v)), (first + 1, Some(&Value::Int(2))));
    }

    #[tokio::test]
    async fn cache_only_and_store_only_use_one_backend() {
        let store = Arc::new(MemoryCache::new());
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(store.clone(), cache.clone());
        w.apply(&sink(CacheStrategy::CacheOnly), vec![("u".into(), incr(1))])
            .await;
        assert!(Cache::get(&*store, "g#u").await.unwrap().is_none());
        assert!(Cache::get(&*cache, "g#u").await.unwrap().is_some());
        let s = sink(CacheStrategy::StoreOnly);
        w.apply(&s, vec![("x".into(), incr(1))]).await;
        assert!(Cache::get(&*cache, "g#x").await.unwrap().is_none());
        assert!(w.get(&s, "x").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn one_failing_entity_does_not_fail_the_others() {
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(Arc::new(Batches::default()), cache.clone());
        let s = sink(CacheStrategy::WriteThrough);
        let r = w
            .apply(&s, vec![("bad".into(), incr(1)), ("good".into(), incr(2))])
            .await;
        assert_eq!(r.written, 1);
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "g#bad");
        assert!(matches!(r.failed[0].1, SinkError::Rejected { .. }));
        assert!(
            Cache::get(&*cache, "g#good").await.unwrap().is_some(),
            "the good entity is cached"
        );
    }

    /// A test store: refuses key `g#bad` (entities fail independently), counts its batch
    /// calls, and, when `short`, answers them with one swap fewer than asked.
    #[derive(Default)]
    struct Batches {
        inner: MemoryCache,
        calls: std::sync::atomic::AtomicUsize,
        short: bool,
    }

    #[async_trait::async_trait]
    impl Store for Batches {
        fn backend(&self) -> &'static str {
            "batches"
        }
        async fn load(&self, t: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
            Store::load(&self.inner, t, keys).await
        }
        async fn compare_and_swap(
            &self,
            t: &Target,
            key: &str,
            e: u64,
            n: &Versioned,
        ) -> Result<bool, SinkError> {
            if key == "g#bad" {
                return Err(SinkError::Rejected {
                    backend: "batches",
                    message: "item too large".into(),
                });
            }
            self.inner.compare_and_swap(t, key, e, n).await
        }
        async fn compare_and_swap_many(
            &self,
            t: &Target,
            swaps: &[Swap<'_>],
        ) -> Result<Vec<Result<bool, SinkError>>, SinkError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut answers = Vec::new();
            for s in swaps {
                answers.push(self.compare_and_swap(t, s.key, s.expected, s.next).await);
            }
            if self.short {
                answers.pop();
            }
            Ok(answers)
        }
    }

    /// A batch's swaps go to the store in one call (Redis sends them as one pipeline).
    #[tokio::test]
    async fn a_batch_swaps_in_one_call() {
        let store = Arc::new(Batches::default());
        let w = FeatureWriter::new(store.clone(), Arc::new(MemoryCache::new()));
        let batch = (0..50).map(|i| (format!("u{i}"), incr(i))).collect();
        let r = w.apply(&sink(CacheStrategy::StoreOnly), batch).await;
        assert_eq!((r.written, r.failed.len()), (50, 0));
        assert_eq!(store.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    /// A swap the store did not answer is failed, not counted as done: its events retry.
    #[tokio::test]
    async fn swaps_without_an_answer_fail() {
        let store = Arc::new(Batches {
            short: true,
            ..Default::default()
        });
        let w = FeatureWriter::new(store, Arc::new(MemoryCache::new()));
        let batch = (0..3).map(|i| (format!("u{i}"), incr(i))).collect();
        let r = w.apply(&sink(CacheStrategy::StoreOnly), batch).await;
        assert_eq!((r.written, r.failed.len()), (0, 3), "{r:?}");
        assert!(matches!(r.failed[0].1, SinkError::Unavailable { .. }));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_never_lose_increments() {
        let store = Arc::new(MemoryCache::new());
        let cache = Arc::new(MemoryCache::new());
        let w = FeatureWriter::new(store, cache);
        let s = sink(CacheStrategy::StoreOnly);
        let tasks: Vec<_> = (0..8)
            .map(|p| {
                let (w, s) = (w.clone(), s.clone());
                tokio::spawn(async move {
                    for o in 0..20 {
                        let mut m = incr(o);
                        m.position.as_mut().unwrap().partition = p;
                        assert!(w.apply(&s, vec![("hot".into(), m)]).await.failed.is_empty());
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            count(&w.get(&s, "hot").await.unwrap().unwrap()),
            Some(&Value::Int(160))
        );
    }
}
