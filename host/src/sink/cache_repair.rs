//! Cache repairs: what happens when the cache fails after the store write succeeded.
//!
//! The store (DynamoDB) is the truth, so a failed cache update must neither fail nor hold up
//! the write. But the cache then holds an older value for the entity, and serving it would
//! be a regression. So the entity's key is queued here: a background task repeats the
//! update as an invalidation at the store's new version (readers miss; fills older than
//! that version are refused) until the cache takes it, and until then this process's read
//! path skips the cache for the key and reads the store.
//!
//! While anything is queued the cache is treated as down: later write-through and
//! write-around updates are queued at once instead of each batch waiting on a dead
//! connection. The queue holds at most `max_keys` keys; past that, a group's further keys
//! are not tracked one by one — instead its cache is not read at all until every entry
//! that could be stale has expired (now + the group's cache TTL).
//!
//! The queue is in memory: a host that dies with repairs queued leaves those entries to the
//! cache TTL, and readers on other replicas do not know about this replica's queue (see
//! README "Cache failure").

use super::Cache;
use crate::metrics::{GroupLabels, Metrics};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Keys tracked one by one before a group falls back to not reading its cache.
pub const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Invalidations per cache request of the repair task.
const CHUNK: usize = 500;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
struct Pending {
    /// The store version the cache must not be older than.
    version: u64,
    /// TTL of the invalidation marker (the group's cache TTL).
    ttl: Duration,
}

#[derive(Default)]
struct State {
    /// Store key → the repair it needs.
    pending: HashMap<String, Pending>,
    /// Group → when its cache may be read again (set on overflow).
    untrusted: HashMap<String, Instant>,
}

/// The queue of cache repairs of one process.
pub struct CacheRepairs {
    state: Mutex<State>,
    max_keys: usize,
    worker: AtomicBool,
    metrics: OnceLock<Arc<Metrics>>,
}

impl Default for CacheRepairs {
    fn default() -> Self {
        CacheRepairs::new(DEFAULT_MAX_KEYS)
    }
}

impl CacheRepairs {
    pub fn new(max_keys: usize) -> CacheRepairs {
        CacheRepairs {
            state: Mutex::default(),
            max_keys: max_keys.max(1),
            worker: AtomicBool::new(false),
            metrics: OnceLock::new(),
        }
    }

    /// Report queue length and outcomes on these metrics from now on.
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
        self.publish(self.pending());
    }

    /// Keys waiting for a repair.
    pub fn pending(&self) -> usize {
        self.state.lock().expect("repairs lock").pending.len()
    }

    /// Whether the cache is currently trusted to take updates directly (nothing queued).
    pub fn idle(&self) -> bool {
        self.pending() == 0
    }

    /// Whether a reader must skip the cache for `key` of `group`.
    pub fn bypass(&self, group: &str, key: &str) -> bool {
        let state = self.state.lock().expect("repairs lock");
        state.pending.contains_key(key)
            || state
                .untrusted
                .get(group)
                .is_some_and(|until| *until > Instant::now())
    }

    /// Queue repairs of `keys` (store key, store version) of `group` and make sure the
    /// repair task runs. `ttl` is the group's cache TTL.
    pub fn enqueue(
        self: &Arc<Self>,
        cache: &Arc<dyn Cache>,
        group: &str,
        keys: impl IntoIterator<Item = (String, u64)>,
        ttl: Duration,
    ) {
        let (mut queued, mut overflowed) = (0u64, 0usize);
        let len = {
            let mut state = self.state.lock().expect("repairs lock");
            for (key, version) in keys {
                queued += 1;
                let len = state.pending.len();
                match state.pending.get_mut(&key) {
                    Some(p) => p.version = p.version.max(version),
                    None if len < self.max_keys => {
                        state.pending.insert(key, Pending { version, ttl });
                    }
                    None => overflowed += 1,
                }
            }
            if overflowed > 0 {
                let until = Instant::now() + ttl;
                let slot = state.untrusted.entry(group.to_owned()).or_insert(until);
                *slot = (*slot).max(until);
            }
            state.untrusted.retain(|_, until| *until > Instant::now());
            state.pending.len()
        };
        if overflowed > 0 {
            tracing::warn!(group, overflowed, ttl = ?ttl, "cache repair queue full: the group's cache is not read until its entries have expired");
        }
        if let Some(m) = self.metrics.get() {
            m.cache_repairs_queued
                .get_or_create(&GroupLabels::new(group))
                .inc_by(queued);
        }
        self.publish(len);
        if len > 0 && !self.worker.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().work(cache.clone()));
        }
    }

    fn publish(&self, pending: usize) {
        if let Some(m) = self.metrics.get() {
            m.cache_repairs_pending.set(pending as i64);
        }
    }

    /// Take up to `n` queued repairs, grouped by marker TTL.
    fn snapshot(&self, n: usize) -> BTreeMap<Duration, Vec<(String, u64)>> {
        let state = self.state.lock().expect("repairs lock");
        let mut by_ttl: BTreeMap<Duration, Vec<(String, u64)>> = BTreeMap::new();
        for (key, p) in state.pending.iter().take(n) {
            by_ttl
                .entry(p.ttl)
                .or_default()
                .push((key.clone(), p.version));
        }
        by_ttl
    }

    /// Forget repairs that landed, unless a newer version was queued meanwhile.
    fn done(&self, landed: &[(String, u64)]) -> usize {
        let mut state = self.state.lock().expect("repairs lock");
        for (key, version) in landed {
            if state
                .pending
                .get(key)
                .is_some_and(|p| p.version <= *version)
            {
                state.pending.remove(key);
            }
        }
        state.pending.len()
    }

    /// The repair task: invalidate queued keys until none is left, backing off while the
    /// cache keeps failing.
    async fn work(self: Arc<Self>, cache: Arc<dyn Cache>) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let batch = self.snapshot(CHUNK);
            if batch.is_empty() {
                self.worker.store(false, Ordering::Release);
                // A key queued between the snapshot and the flag: take it over again.
                if self.idle() || self.worker.swap(true, Ordering::AcqRel) {
                    return;
                }
                continue;
            }
            let mut failed = None;
            for (ttl, keys) in &batch {
                match cache.invalidate(keys, *ttl).await {
                    Ok(()) => {
                        let left = self.done(keys);
                        self.publish(left);
                        if let Some(m) = self.metrics.get() {
                            m.cache_repairs.inc_by(keys.len() as u64);
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                Some(e) => {
                    tracing::warn!(pending = self.pending(), error = %e, retry_in = ?backoff, "cache repair failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                None => {
                    if backoff > FIRST_BACKOFF {
                        tracing::info!(
                            pending = self.pending(),
                            "cache reachable again; repairs landing"
                        );
                    }
                    backoff = FIRST_BACKOFF;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::Versioned;
    use crate::sink::memory_cache::MemoryCache;
    use crate::sink::{CacheFill, SinkError};
    use async_trait::async_trait;

    /// A cache that fails while `down` is set.
    #[derive(Default)]
    struct Flaky {
        inner: MemoryCache,
        down: AtomicBool,
    }

    impl Flaky {
        fn check(&self) -> Result<(), SinkError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(SinkError::Unavailable {
                    backend: "flaky",
                    message: "down".into(),
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Cache for Flaky {
        fn backend(&self) -> &'static str {
            "flaky"
        }
        async fn put_if_newer(&self, fills: &[CacheFill]) -> Result<(), SinkError> {
            self.check()?;
            self.inner.put_if_newer(fills).await
        }
        async fn invalidate(&self, keys: &[(String, u64)], ttl: Duration) -> Result<(), SinkError> {
            self.check()?;
            self.inner.invalidate(keys, ttl).await
        }
        async fn get(&self, key: &str) -> Result<Option<Versioned>, SinkError> {
            self.check()?;
            Cache::get(&self.inner, key).await
        }
    }

    async fn wait_idle(r: &CacheRepairs) {
        for _ in 0..500 {
            if r.idle() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("repairs never landed: {} pending", r.pending());
    }

    #[tokio::test]
    async fn repairs_wait_for_the_cache_and_then_invalidate() {
        let flaky = Arc::new(Flaky::default());
        let stale = Versioned {
            version: 1,
            ..Default::default()
        };
        flaky
            .put_if_newer(&[CacheFill {
                key: "g#u".into(),
                entry: stale,
                ttl: Duration::from_secs(60),
            }])
            .await
            .unwrap();
        flaky.down.store(true, Ordering::SeqCst);
        let cache: Arc<dyn Cache> = flaky.clone();
        let r = Arc::new(CacheRepairs::new(10));
        r.enqueue(
            &cache,
            "g",
            [("g#u".to_owned(), 3)],
            Duration::from_secs(60),
        );
        assert!(r.bypass("g", "g#u"));
        assert!(!r.bypass("g", "g#other"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.pending(), 1, "nothing lands while the cache is down");
        flaky.down.store(false, Ordering::SeqCst);
        wait_idle(&r).await;
        assert!(!r.bypass("g", "g#u"));
        assert!(
            Cache::get(&*flaky, "g#u").await.unwrap().is_none(),
            "the stale entry is now an invalidation marker"
        );
        // A fill older than the repaired version is refused; the store's version is taken.
        for (version, kept) in [(2, false), (3, true)] {
            flaky
                .put_if_newer(&[CacheFill {
                    key: "g#u".into(),
                    entry: Versioned {
                        version,
                        ..Default::default()
                    },
                    ttl: Duration::from_secs(60),
                }])
                .await
                .unwrap();
            assert_eq!(Cache::get(&*flaky, "g#u").await.unwrap().is_some(), kept);
        }
    }

    #[tokio::test]
    async fn a_newer_version_queued_meanwhile_is_kept() {
        let r = Arc::new(CacheRepairs::new(10));
        let cache: Arc<dyn Cache> = Arc::new(Flaky::default());
        r.state.lock().unwrap().pending.insert(
            "k".into(),
            Pending {
                version: 5,
                ttl: Duration::from_secs(1),
            },
        );
        assert_eq!(r.done(&[("k".into(), 4)]), 1, "5 is still to be repaired");
        assert_eq!(r.done(&[("k".into(), 5)]), 0);
        r.enqueue(&cache, "g", [("k".to_owned(), 1)], Duration::from_secs(1));
        wait_idle(&r).await;
    }

    #[tokio::test]
    async fn overflow_stops_reading_the_group_until_its_ttl_passed() {
        let flaky = Arc::new(Flaky::default());
        flaky.down.store(true, Ordering::SeqCst);
        let cache: Arc<dyn Cache> = flaky.clone();
        let r = Arc::new(CacheRepairs::new(2));
        let keys = (0..5).map(|i| (format!("g#{i}"), 1));
        r.enqueue(&cache, "g", keys, Duration::from_millis(200));
        assert_eq!(r.pending(), 2);
        assert!(r.bypass("g", "g#4"), "an untracked key of the group");
        assert!(!r.bypass("h", "h#4"), "other groups are unaffected");
        flaky.down.store(false, Ordering::SeqCst);
        wait_idle(&r).await;
        assert!(r.bypass("g", "g#4"), "still within the TTL");
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(!r.bypass("g", "g#4"));
    }
}
