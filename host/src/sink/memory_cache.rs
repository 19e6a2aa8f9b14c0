//! The in-process cache, for running with no services. Same version rules as the Redis
//! cache; also usable as the store of `cache-only` groups.

use super::{Cache, CacheFill, Loaded, SinkError, Store, Target};
use crate::feature::Versioned;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

enum Entry {
    Value(Versioned),
    Invalidated(u64),
}

impl Entry {
    fn version(&self) -> u64 {
        match self {
            Entry::Value(v) => v.version,
            Entry::Invalidated(v) => *v,
        }
    }
}

type Entries = HashMap<String, (Entry, Option<Instant>)>;

#[derive(Default)]
struct Inner {
    map: Entries,
    swept_at: usize,
}

#[derive(Default)]
pub struct MemoryCache {
    entries: Mutex<Inner>,
}

/// Drop expired entries once the map has doubled since the last sweep: amortized O(1).
fn sweep(map: &mut Entries, swept_at: &mut usize) {
    if map.len() > (*swept_at).max(1024) * 2 {
        let now = Instant::now();
        map.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
        *swept_at = map.len();
    }
}

impl MemoryCache {
    pub fn new() -> MemoryCache {
        MemoryCache::default()
    }

    fn live<'a>(
        map: &'a HashMap<String, (Entry, Option<Instant>)>,
        key: &str,
    ) -> Option<&'a Entry> {
        map.get(key)
            .filter(|(_, exp)| exp.is_none_or(|e| e > Instant::now()))
            .map(|(e, _)| e)
    }
}

fn expiry(ttl: Duration) -> Option<Instant> {
    (!ttl.is_zero()).then(|| Instant::now() + ttl)
}

#[async_trait]
impl Cache for MemoryCache {
    fn backend(&self) -> &'static str {
        "memory cache"
    }

    async fn put_if_newer(&self, fills: &[CacheFill]) -> Result<(), SinkError> {
        let mut guard = self.entries.lock().expect("cache lock");
        let Inner { map, swept_at } = &mut *guard;
        sweep(map, swept_at);
        for f in fills {
            let accept = match Self::live(map, &f.key) {
                None => true,
                Some(Entry::Invalidated(v)) => f.entry.version >= *v,
                Some(Entry::Value(v)) => f.entry.version > v.version,
            };
            if accept {
                map.insert(
                    f.key.clone(),
                    (Entry::Value(f.entry.clone()), expiry(f.ttl)),
                );
            }
        }
        Ok(())
    }

    async fn invalidate(&self, keys: &[(String, u64)], ttl: Duration) -> Result<(), SinkError> {
        let mut guard = self.entries.lock().expect("cache lock");
        let Inner { map, swept_at } = &mut *guard;
        sweep(map, swept_at);
        for (key, version) in keys {
            if Self::live(map, key).is_none_or(|e| e.version() <= *version) {
                map.insert(key.clone(), (Entry::Invalidated(*version), expiry(ttl)));
            }
        }
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Versioned>, SinkError> {
        let guard = self.entries.lock().expect("cache lock");
        let map = &guard.map;
        Ok(match Self::live(map, key) {
            Some(Entry::Value(v)) => Some(v.clone()),
            _ => None,
        })
    }
}

#[async_trait]
impl Store for MemoryCache {
    fn backend(&self) -> &'static str {
        "memory cache"
    }

    async fn load(&self, _target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            out.push(Ok(Cache::get(self, k).await?));
        }
        Ok(out)
    }

    async fn compare_and_swap(
        &self,
        _target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        let mut guard = self.entries.lock().expect("cache lock");
        let Inner { map, swept_at } = &mut *guard;
        sweep(map, swept_at);
        let current = Self::live(map, key).map_or(0, Entry::version);
        if current != expected {
            return Ok(false);
        }
        let ttl = next
            .state
            .expires_at
            .map(|t| Duration::from_secs((t - super::unix_now()).max(1) as u64));
        map.insert(
            key.to_owned(),
            (Entry::Value(next.clone()), ttl.and_then(expiry)),
        );
        Ok(true)
    }
}
