//! A replayed event refreshes the cache. If the host dies between an entity's store write
//! and its cache write, the redelivered event is a replay in the store (its position is
//! already applied) — and must still bring the cache up to the store's version, or
//! write-through reads serve the old value until the cache TTL, and write-around reads
//! keep the stale entry. No services: the in-memory store and cache.

use feature_host::feature::{Cell, EntityState, Mutation, Op, Position, Value, Versioned};
use feature_host::sink::memory_cache::MemoryCache;
use feature_host::sink::writer::{FeatureWriter, GroupSink};
use feature_host::sink::{Cache, CacheFill, Store, Target};
use feature_host::spec::{CacheStrategy, FeatureType};
use std::sync::Arc;
use std::time::Duration;

fn sink(strategy: CacheStrategy) -> GroupSink {
    GroupSink {
        target: Target {
            group: "g".into(),
            table: "t".into(),
            types: [("n".to_owned(), FeatureType::Int)].into(),
        },
        strategy,
        store_ttl: None,
        cache_ttl: Duration::from_secs(600),
    }
}

fn click(offset: i64) -> (String, Mutation) {
    (
        "u1".into(),
        Mutation {
            position: Some(Position {
                source: "events".into(),
                partition: 0,
                offset,
                floor: 0,
            }),
            ops: vec![("n".into(), Op::Incr(Value::Int(1)), 1_000 + offset)],
            overwrite: false,
        },
    )
}

async fn replay_after_a_crash_between_store_and_cache(strategy: CacheStrategy) {
    let store = Arc::new(MemoryCache::new());
    let cache = Arc::new(MemoryCache::new());
    let writer = FeatureWriter::new(store.clone(), cache.clone());
    let s = sink(strategy);
    writer.apply(&s, vec![click(0)]).await;
    let v1 = writer.get(&s, "u1").await.unwrap().unwrap();
    assert_eq!(v1.state.features["n"].value, Some(Value::Int(1)));

    // The host applies offset 1 in the store, then dies before the cache write: a writer
    // whose cache is a different, throwaway one did exactly that.
    let lost = FeatureWriter::new(store.clone(), Arc::new(MemoryCache::new()));
    lost.apply(&s, vec![click(1)]).await;
    let key = s.target.key("u1");
    let stored = Store::load(&*store, &s.target, std::slice::from_ref(&key))
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
        .unwrap();
    let first = v1.version;
    assert_eq!(stored.version, first + 1);

    // Redelivered after the restart: a replay in the store.
    let report = writer.apply(&s, vec![click(1)]).await;
    assert_eq!(report.replayed, 1);
    let read = writer.get(&s, "u1").await.unwrap().unwrap();
    assert_eq!(
        (read.version, read.state.features["n"].value.clone()),
        (first + 1, Some(Value::Int(2))),
        "{strategy:?}: the read path serves the store's version after the replay"
    );
    if let Ok(Some(cached)) = Cache::get(&*cache, &key).await {
        assert_eq!(
            cached.version,
            first + 1,
            "{strategy:?}: no stale entry left in the cache"
        );
    }
}

#[tokio::test]
async fn a_replay_refreshes_a_write_through_cache() {
    replay_after_a_crash_between_store_and_cache(CacheStrategy::WriteThrough).await;
}

#[tokio::test]
async fn a_replay_invalidates_a_write_around_cache() {
    replay_after_a_crash_between_store_and_cache(CacheStrategy::WriteAround).await;
}

/// DynamoDB deletes an item some time after its TTL, and the entity written again starts
/// over in the store. The cache may still hold the expired entry, at a higher version (a read
/// filled it shortly before the expiry, with the cache TTL from then): it must hide neither
/// the new value nor the cache update that carries it.
async fn written_again_after_the_store_deleted_it(strategy: CacheStrategy) {
    let s = sink(strategy);
    let key = s.target.key("u1");
    let cache = Arc::new(MemoryCache::new());
    let mut expired = EntityState::default();
    expired.features.insert(
        "n".into(),
        Cell {
            value: Some(Value::Int(57)),
            event_time_ms: 1_000,
            item_times: vec![],
        },
    );
    expired.expires_at = Some(feature_host::sink::unix_now() - 1);
    cache
        .put_if_newer(&[CacheFill {
            key: key.clone(),
            entry: Versioned {
                version: 57,
                state: expired,
            },
            ttl: s.cache_ttl,
        }])
        .await
        .unwrap();
    // The store no longer has the item.
    let writer = FeatureWriter::new(Arc::new(MemoryCache::new()), cache.clone());
    writer.apply(&s, vec![click(0)]).await;
    let read = writer.get(&s, "u1").await.unwrap();
    assert_eq!(
        read.map(|v| v.state.features["n"].value.clone()),
        Some(Some(Value::Int(1))),
        "{strategy:?}: the entity written again is served"
    );
    if strategy == CacheStrategy::WriteThrough {
        let cached = Cache::get(&*cache, &key).await.unwrap().unwrap();
        assert_eq!(
            cached.state.features["n"].value,
            Some(Value::Int(1)),
            "the cache took the new entity"
        );
    }
}

#[tokio::test]
async fn write_through_serves_an_entity_written_again_after_its_expiry() {
    written_again_after_the_store_deleted_it(CacheStrategy::WriteThrough).await;
}

#[tokio::test]
async fn write_around_serves_an_entity_written_again_after_its_expiry() {
    written_again_after_the_store_deleted_it(CacheStrategy::WriteAround).await;
}
