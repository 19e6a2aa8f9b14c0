//! A replayed event refreshes the cache. If the host dies between an entity's store write
//! and its cache write, the redelivered event is a replay in the store (its position is
//! already applied) — and must still bring the cache up to the store's version, or
//! write-through reads serve the old value until the cache TTL, and write-around reads
//! keep the stale entry. No services: the in-memory store and cache.

use feature_host::feature::{Mutation, Op, Position, Value};
use feature_host::sink::memory_cache::MemoryCache;
use feature_host::sink::writer::{FeatureWriter, GroupSink};
use feature_host::sink::{Cache, Store, Target};
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
        .flatten()
        .unwrap();
    assert_eq!(stored.version, 2);

    // Redelivered after the restart: a replay in the store.
    let report = writer.apply(&s, vec![click(1)]).await;
    assert_eq!(report.replayed, 1);
    let read = writer.get(&s, "u1").await.unwrap().unwrap();
    assert_eq!(
        (read.version, read.state.features["n"].value.clone()),
        (2, Some(Value::Int(2))),
        "{strategy:?}: the read path serves the store's version after the replay"
    );
    if let Ok(Some(cached)) = Cache::get(&*cache, &key).await {
        assert_eq!(
            cached.version, 2,
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
