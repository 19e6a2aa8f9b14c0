//! Online store and cache writes.
//!
//! Every backend is a versioned key-value store with compare-and-swap ([`Store`]); the merge
//! rules live in [`crate::feature::state`], so backends cannot disagree on semantics. The
//! [`writer::FeatureWriter`] coalesces a batch per entity, merges, swaps, and applies the
//! group's cache strategy; [`writer::FeatureWriter::get`] is the read path. A cache update
//! that fails after its store write goes to [`cache_repair`], never back to the event.
//!
//! Backends: [`dynamo`] (DynamoDB, the source of truth), [`redis_cache`] (Redis, the remote
//! cache), [`embedded`] (redb file, the no-services default store), [`memory_cache`]
//! (in-process cache).

pub mod cache_repair;
pub mod dynamo;
pub mod embedded;
pub mod memory_cache;
pub mod redis_cache;
pub mod writer;

use crate::feature::{EntityState, Versioned};
use crate::spec::FeatureType;
use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use std::collections::BTreeMap;
use std::time::Duration;

/// A store or cache operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SinkError {
    /// Transient (network, throttling, service down): the events go to the retry path.
    #[error("{backend} unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
    },
    /// Bad data or configuration: retrying cannot help.
    #[error("{backend} rejected the request: {message}")]
    Rejected {
        backend: &'static str,
        message: String,
    },
    /// Optimistic concurrency kept losing races.
    #[error("{backend}: gave up on {key} after {attempts} conflicting concurrent updates")]
    Contended {
        backend: &'static str,
        key: String,
        attempts: u32,
    },
}

impl SinkError {
    /// An item that exists but cannot be read (another writer's, or damaged). Retrying
    /// cannot help, so its entity's events are dead-lettered, naming the item, until it is
    /// fixed or deleted; the batch's other entities are written, and the item is left as it
    /// is rather than overwritten.
    pub fn unreadable(backend: &'static str, key: &str, why: impl std::fmt::Display) -> Self {
        SinkError::Rejected {
            backend,
            message: format!(
                "item {key:?} is unreadable: {why} (fix or delete the item; its entity's \
                 events are dead-lettered until then)"
            ),
        }
    }
}

/// One key as a store read it: `Ok(None)` when absent or expired, `Err` when the item is
/// there but unreadable ([`SinkError::unreadable`]) — that key's entity fails, not the batch.
pub type Loaded = Result<Option<Versioned>, SinkError>;

/// Where and how one group's items are stored.
#[derive(Debug, Clone)]
pub struct Target {
    pub group: String,
    pub table: String,
    /// Declared feature types, used by backends whose encoding is not self-describing.
    pub types: BTreeMap<String, FeatureType>,
}

impl Target {
    /// The item key of `entity` in this group.
    pub fn key(&self, entity: &str) -> String {
        format!("{}#{}", self.group, entity)
    }
}

/// A versioned key-value store with compare-and-swap.
#[async_trait]
pub trait Store: Send + Sync {
    fn backend(&self) -> &'static str;

    /// Create the table if missing (idempotent).
    async fn ensure_table(&self, _table: &str) -> Result<(), SinkError> {
        Ok(())
    }

    /// Current state of each key, in the order of `keys`. The outer error fails every key
    /// (the store did not answer); an inner one only its key.
    async fn load(&self, target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError>;

    /// Replace the item at `key` with `next` iff its version is still `expected`
    /// (0: the item must not exist). False when another writer won the race.
    async fn compare_and_swap(
        &self,
        target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError>;

    /// [`compare_and_swap`](Store::compare_and_swap) of every swap of a batch, answered
    /// in their order. An inner error fails only its swap. The outer error fails every
    /// swap, whose outcome is then unknown: a connection lost after the store applied some
    /// of them looks the same, so callers must not count them as not applied — the writer
    /// retries their events, and the positions the store then holds mark them as replays.
    ///
    /// By default one request per swap, [`SWAP_CONCURRENCY`] in flight: DynamoDB has no
    /// conditional batch write. A store that can send them together overrides it (Redis:
    /// one script call, one round trip, per batch of small entities).
    async fn compare_and_swap_many(
        &self,
        target: &Target,
        swaps: &[Swap<'_>],
    ) -> Result<Vec<Result<bool, SinkError>>, SinkError> {
        // Futures collected first: a closure inside the stream would have to be general
        // over the swaps' lifetimes for the trait's `Send` bound.
        let asks: Vec<_> = swaps
            .iter()
            .enumerate()
            .map(|(i, s)| async move {
                let answer = self
                    .compare_and_swap(target, s.key, s.expected, s.next)
                    .await;
                (i, answer)
            })
            .collect();
        let mut answers: Vec<(usize, Result<bool, SinkError>)> = stream::iter(asks)
            .buffer_unordered(SWAP_CONCURRENCY)
            .collect()
            .await;
        answers.sort_unstable_by_key(|(i, _)| *i);
        Ok(answers.into_iter().map(|(_, a)| a).collect())
    }
}

/// One conditional write of a batch: [`Store::compare_and_swap`]'s arguments.
#[derive(Debug, Clone, Copy)]
pub struct Swap<'a> {
    pub key: &'a str,
    /// The version the item must still have (0: it must not exist).
    pub expected: u64,
    pub next: &'a Versioned,
    /// The state stored at `expected`, where the caller read it: a store that keeps each
    /// feature apart (Redis) then removes only the features `next` no longer holds instead
    /// of replacing the whole item. `None`: the store replaces the item.
    pub previous: Option<&'a EntityState>,
}

/// Conditional writes in flight at once where a store takes them one by one: bounds the
/// load one batch puts on DynamoDB.
pub const SWAP_CONCURRENCY: usize = 128;

/// One cache write of a write-through group.
#[derive(Debug, Clone)]
pub struct CacheFill {
    pub key: String,
    pub entry: Versioned,
    pub ttl: Duration,
}

/// A cache in front of a [`Store`]. Entries carry the store's version so that a slow writer
/// or reader can never replace a newer entry with an older one.
#[async_trait]
pub trait Cache: Send + Sync {
    fn backend(&self) -> &'static str;

    /// Store each entry unless the cache already holds that version or a newer one.
    async fn put_if_newer(&self, fills: &[CacheFill]) -> Result<(), SinkError>;

    /// Replace each entry with an invalidation marker at the given version: readers see a
    /// miss, and fills older than the version are refused.
    async fn invalidate(&self, keys: &[(String, u64)], ttl: Duration) -> Result<(), SinkError>;

    /// The cached entry, or `None` on a miss or an invalidation marker.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, SinkError>;
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> i64 {
    unix_now_ms() / 1000
}

/// Milliseconds since the Unix epoch.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
