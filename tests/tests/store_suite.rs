//! One suite, two backends: the same write scenarios through the [`FeatureWriter`] against
//! the embedded default (redb file + in-process cache) and the real stack (DynamoDB Local +
//! Redis). Same operations, same results — and on the real stack, the TTLs are native
//! (DynamoDB's `ttl` attribute, Redis `PEXPIRE`).

use aws_sdk_dynamodb::types::AttributeValue;
use feature_host::feature::{EntityState, Mutation, Op, Position, Value, Versioned};
use feature_host::sink::dynamo::DynamoStore;
use feature_host::sink::embedded::EmbeddedStore;
use feature_host::sink::memory_cache::MemoryCache;
use feature_host::sink::redis_cache::RedisCache;
use feature_host::sink::writer::{CacheStore, FeatureWriter, GroupSink};
use feature_host::sink::{Cache, SinkError, Store, Swap, Target, unix_now};
use feature_host::spec::{CacheStrategy, FeatureType};
use feature_host_e2e::{Stack, unique};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const STORE_TTL: Duration = Duration::from_secs(86_400);
const CACHE_TTL: Duration = Duration::from_secs(600);

struct Backends {
    writer: FeatureWriter,
    store: Arc<dyn Store>,
    cache: Arc<dyn CacheStore>,
    table: String,
}

fn sink(b: &Backends, group: &str, strategy: CacheStrategy) -> GroupSink {
    let types = [
        ("name", FeatureType::String),
        ("count", FeatureType::Int),
        ("score", FeatureType::Float),
        ("low", FeatureType::Float),
        ("tags", FeatureType::StringList),
        ("gone", FeatureType::String),
    ];
    GroupSink {
        target: Target {
            group: group.to_owned(),
            table: b.table.clone(),
            types: types.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
        },
        strategy,
        store_ttl: Some(STORE_TTL),
        cache_ttl: CACHE_TTL,
    }
}

const EVENTS: usize = 40;
const TAGS: u32 = 5;

/// Event `i` (event time grows with `i`): every op kind on entity `e`. The newest event
/// deletes `gone`; all others set it.
fn event(i: usize) -> (String, Mutation) {
    let t = 1_000 + 10 * i as i64;
    let score = ((i * 37) % 101) as f64;
    let mut ops = vec![
        (
            "name".to_owned(),
            Op::Set(Value::String(format!("v{i}"))),
            t,
        ),
        ("count".to_owned(), Op::Incr(Value::Int(1)), t),
        ("score".to_owned(), Op::Max(Value::Float(score)), t),
        ("low".to_owned(), Op::Min(Value::Float(score)), t),
        (
            "tags".to_owned(),
            Op::Append {
                item: Value::String(format!("t{i}")),
                cap: TAGS,
            },
            t,
        ),
    ];
    ops.push(if i == EVENTS - 1 {
        ("gone".to_owned(), Op::Delete, t)
    } else {
        (
            "gone".to_owned(),
            Op::Set(Value::String(format!("g{i}"))),
            t,
        )
    });
    // Floor 0: nothing was committed yet when these events were processed, so every
    // offset may still arrive (as out of order as it likes).
    let position = Position {
        floor: 0,
        ..Position::sequential("src", 0, i as i64)
    };
    (
        "e".to_owned(),
        Mutation {
            position: Some(position),
            ops,
            overwrite: false,
        },
    )
}

/// A fixed scramble of `0..n`: the newest events arrive first, interleaved with the oldest.
fn arrival_order(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).map(|i| (i * 17 + 5) % n).collect();
    order.reverse();
    order
}

fn value<'a>(v: &'a Versioned, feature: &str) -> Option<&'a Value> {
    v.state.features.get(feature)?.value.as_ref()
}

async fn load(b: &Backends, sink: &GroupSink, entity: &str) -> Option<Versioned> {
    let store: &dyn Store = match sink.strategy {
        CacheStrategy::CacheOnly => &*b.cache,
        _ => &*b.store,
    };
    store
        .load(&sink.target, &[sink.target.key(entity)])
        .await
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()
}

/// Out of order, in several batches, then all replayed in another order: the newest event
/// time wins for set/delete, max/min are extremes, last-k is newest first, increments exact.
async fn out_of_order_and_replayed(b: &Backends, group: &str) {
    let s = sink(b, group, CacheStrategy::WriteThrough);
    let order = arrival_order(EVENTS);
    for chunk in order.chunks(7) {
        let r = b
            .writer
            .apply(&s, chunk.iter().map(|&i| event(i)).collect())
            .await;
        assert!(r.failed.is_empty(), "{:?}", r.failed);
    }
    let first = load(b, &s, "e").await.expect("entity written");
    let want_tags: Vec<String> = (0..TAGS as usize)
        .map(|k| format!("t{}", EVENTS - 1 - k))
        .collect();
    let scores: Vec<f64> = (0..EVENTS).map(|i| ((i * 37) % 101) as f64).collect();
    assert_eq!(
        value(&first, "name"),
        Some(&Value::String(format!("v{}", EVENTS - 1)))
    );
    assert_eq!(value(&first, "count"), Some(&Value::Int(EVENTS as i64)));
    assert_eq!(
        value(&first, "score"),
        Some(&Value::Float(
            scores.iter().cloned().fold(f64::MIN, f64::max)
        ))
    );
    assert_eq!(
        value(&first, "low"),
        Some(&Value::Float(
            scores.iter().cloned().fold(f64::MAX, f64::min)
        ))
    );
    assert_eq!(value(&first, "tags"), Some(&Value::StringList(want_tags)));
    assert_eq!(value(&first, "gone"), None, "the newest op was a delete");
    assert!(
        first.state.features.contains_key("gone"),
        "the delete left a tombstone"
    );

    // Replay everything (a redelivery after a crash), newest-last this time.
    let r = b.writer.apply(&s, (0..EVENTS).map(event).collect()).await;
    assert_eq!((r.written, r.replayed), (0, EVENTS), "replays are no-ops");
    let again = load(b, &s, "e").await.unwrap();
    assert_eq!(
        again, first,
        "state unchanged by the replay, version included"
    );
    // The cache holds what the store holds.
    let cached = Cache::get(&*b.cache, &s.target.key("e")).await.unwrap();
    assert_eq!(cached.as_ref(), Some(&first));
}

/// A stale `set` is skipped without blocking the same event's `incr`; `overwrite` bypasses
/// event time on purpose.
async fn stale_sets_and_overwrite(b: &Backends, group: &str) {
    let s = sink(b, group, CacheStrategy::StoreOnly);
    let m = |offset: i64, t: i64, name: &str, overwrite: bool| {
        (
            "e".to_owned(),
            Mutation {
                position: Some(Position::sequential("src", 0, offset)),
                ops: vec![
                    ("name".into(), Op::Set(Value::String(name.into())), t),
                    ("count".into(), Op::Incr(Value::Int(1)), t),
                ],
                overwrite,
            },
        )
    };
    b.writer.apply(&s, vec![m(1, 500, "new", false)]).await;
    let r = b.writer.apply(&s, vec![m(2, 100, "old", false)]).await;
    assert_eq!(r.outcome.stale_skips, 1);
    let v = load(b, &s, "e").await.unwrap();
    assert_eq!(value(&v, "name"), Some(&Value::String("new".into())));
    assert_eq!(value(&v, "count"), Some(&Value::Int(2)), "the incr applied");
    b.writer.apply(&s, vec![m(3, 50, "backfilled", true)]).await;
    let v = load(b, &s, "e").await.unwrap();
    assert_eq!(value(&v, "name"), Some(&Value::String("backfilled".into())));
}

/// Each strategy leaves store and cache as documented, with TTLs set.
async fn strategies(b: &Backends, prefix: &str) {
    for strategy in [
        CacheStrategy::StoreOnly,
        CacheStrategy::WriteThrough,
        CacheStrategy::WriteAround,
        CacheStrategy::CacheOnly,
    ] {
        let s = sink(b, &format!("{prefix}-{strategy:?}"), strategy);
        let key = s.target.key("e");
        let r = b.writer.apply(&s, vec![event(0), event(1)]).await;
        assert!(
            r.failed.is_empty() && r.cache_error.is_none(),
            "{strategy:?}: {r:?}"
        );
        let stored = Store::load(&*b.store, &s.target, std::slice::from_ref(&key))
            .await
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        let cached = Cache::get(&*b.cache, &key).await.unwrap();
        let now = unix_now();
        let expires = |v: &Versioned, ttl: Duration| {
            let at = v.state.expires_at.expect("expiry set");
            let want = now + ttl.as_secs() as i64;
            assert!(
                (want - 5..=want + 5).contains(&at),
                "{strategy:?}: expires at {at}, want ~{want}"
            );
        };
        match strategy {
            CacheStrategy::StoreOnly => {
                expires(stored.as_ref().expect("in the store"), STORE_TTL);
                assert!(cached.is_none(), "store-only never caches");
            }
            CacheStrategy::WriteThrough => {
                let stored = stored.expect("in the store");
                expires(&stored, STORE_TTL);
                assert_eq!(cached.as_ref(), Some(&stored), "cached as stored");
            }
            CacheStrategy::WriteAround => {
                let stored = stored.expect("in the store");
                assert!(
                    cached.is_none(),
                    "write-around leaves an invalidation marker"
                );
                let read = b.writer.get(&s, "e").await.unwrap();
                assert_eq!(read.as_ref(), Some(&stored), "read through the store");
                let filled = Cache::get(&*b.cache, &key).await.unwrap();
                assert_eq!(filled.as_ref(), Some(&stored), "the read filled the cache");
            }
            CacheStrategy::CacheOnly => {
                assert!(stored.is_none(), "cache-only never touches the store");
                expires(cached.as_ref().expect("in the cache"), CACHE_TTL);
            }
        }
        assert_eq!(
            b.writer
                .get(&s, "e")
                .await
                .unwrap()
                .and_then(|v| value(&v, "count").cloned()),
            Some(Value::Int(2)),
            "{strategy:?}: the read path"
        );
    }
}

/// A batch's swaps through one call are answered each on its own and in order: a swap at
/// the expected version wins, one whose item moved on loses, whatever their order. On the
/// store and on the cache serving as a `cache-only` store (Redis: one script call).
async fn batch_swaps(b: &Backends, group: &str) {
    let s = sink(b, group, CacheStrategy::CacheOnly);
    let entry = |version: u64| {
        let mut state = EntityState::default();
        state.apply(&event(version as usize).1);
        Versioned { version, state }
    };
    let (one, two) = (entry(1), entry(2));
    for (name, store) in [
        ("store", b.store.clone()),
        ("cache", b.cache.clone() as Arc<dyn Store>),
    ] {
        let (fresh, moved) = (
            format!("{group}#{name}-fresh"),
            format!("{group}#{name}-moved"),
        );
        assert!(
            store
                .compare_and_swap(&s.target, &moved, 0, &one)
                .await
                .unwrap()
        );
        let asks = [
            Swap {
                key: &moved,
                expected: 0,
                next: &two,
                previous: None,
            },
            Swap {
                key: &fresh,
                expected: 0,
                next: &one,
                previous: None,
            },
            Swap {
                key: &moved,
                expected: 1,
                next: &two,
                previous: None,
            },
        ];
        let answers: Vec<bool> = store
            .compare_and_swap_many(&s.target, &asks)
            .await
            .unwrap()
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            answers,
            [false, true, true],
            "{name}: each swap answered in order"
        );
        let loaded = store.load(&s.target, &[fresh, moved]).await.unwrap();
        let versions: Vec<u64> = loaded
            .into_iter()
            .map(|l| l.unwrap().unwrap().version)
            .collect();
        assert_eq!(versions, [1, 2], "{name}");
    }
}

async fn suite(b: &Backends) {
    let id = unique();
    out_of_order_and_replayed(b, &format!("ooo-{id}")).await;
    stale_sets_and_overwrite(b, &format!("stale-{id}")).await;
    strategies(b, &format!("strategy-{id}")).await;
    batch_swaps(b, &format!("swaps-{id}")).await;
}

#[tokio::test]
async fn embedded_store_and_memory_cache() {
    let dir = std::env::temp_dir().join(format!("fh-suite-{}", unique()));
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("store.redb")).unwrap());
    let cache: Arc<dyn CacheStore> = Arc::new(MemoryCache::new());
    let b = Backends {
        writer: FeatureWriter::new(store.clone(), cache.clone()),
        store,
        cache,
        table: "features".into(),
    };
    suite(&b).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_and_redis() {
    let stack = Stack::from_env();
    let table = format!("suite-{}", unique());
    let dynamo = DynamoStore::connect(Some(&stack.dynamodb)).await;
    let client = dynamo.client().clone();
    dynamo.ensure_table(&table).await.unwrap();
    let store: Arc<dyn Store> = Arc::new(dynamo);
    let cache: Arc<dyn CacheStore> = Arc::new(RedisCache::connect(&stack.redis).await.unwrap());
    let b = Backends {
        writer: FeatureWriter::new(store.clone(), cache.clone()),
        store,
        cache,
        table: table.clone(),
    };
    suite(&b).await;

    // Native TTLs: DynamoDB's TTL attribute is enabled on `ttl` and set on the item; Redis
    // keys expire after the group's cache TTL.
    let ttl = client
        .describe_time_to_live()
        .table_name(&table)
        .send()
        .await
        .unwrap();
    let desc = ttl.time_to_live_description().unwrap();
    assert_eq!(desc.attribute_name(), Some("ttl"));
    let s = sink(&b, "ttl-check", CacheStrategy::WriteThrough);
    b.writer.apply(&s, vec![event(0)]).await;
    let item = client
        .get_item()
        .table_name(&table)
        .key("pk", AttributeValue::S(s.target.key("e")))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    let at: i64 = item["ttl"].as_n().unwrap().parse().unwrap();
    assert!(
        (at - unix_now() - STORE_TTL.as_secs() as i64).abs() < 5,
        "ttl {at}"
    );
    let mut redis = stack.redis().await;
    let pttl: i64 = redis::cmd("PTTL")
        .arg(RedisCache::redis_key(&s.target.key("e")))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        pttl > 0 && pttl <= CACHE_TTL.as_millis() as i64,
        "Redis expiry {pttl} ms"
    );

    unreadable_items_fail_only_their_entity(&b, &client, &mut redis).await;
    a_key_of_another_type_fails_only_its_swap(&b, &mut redis).await;
    swaps_beyond_one_call(&b, &mut redis).await;
    a_script_refused_by_acl_is_named(&stack, &b, &mut redis).await;
    a_read_refused_inside_the_script_is_an_outage(&stack, &b, &mut redis).await;
    cache_only_keys_expire_in_redis(&b, &mut redis).await;
    a_swap_removes_only_what_is_gone(&b, &mut redis).await;
}

/// A batch larger than one script call, by count and by bytes, is answered in full and in
/// order, and another writer's key in a later call fails only itself.
async fn swaps_beyond_one_call(b: &Backends, redis: &mut redis::aio::MultiplexedConnection) {
    let s = sink(
        b,
        &format!("swap-many-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let keys: Vec<String> = (0..600).map(|i| s.target.key(&format!("e{i}"))).collect();
    put_raw(redis, "SET", &keys[400], &["a string"]).await;
    let small = Versioned {
        version: 1,
        state: EntityState::default(),
    };
    // Three entries of 3 MB: no two of them fit one call's 4 MiB.
    let mut big = EntityState::default();
    big.apply(&Mutation {
        position: None,
        ops: vec![(
            "name".into(),
            Op::Set(Value::String("x".repeat(3 << 20))),
            1,
        )],
        overwrite: false,
    });
    let big = Versioned {
        version: 1,
        state: big,
    };
    // One entry of 1,500 features: more field/value pairs than one `HSET` of the script
    // takes, between other entries of the same call.
    let mut wide = EntityState::default();
    wide.apply(&Mutation {
        position: None,
        ops: (0..1500)
            .map(|f| (format!("f{f}"), Op::Set(Value::Int(f)), 1))
            .collect(),
        overwrite: false,
    });
    let wide = Versioned {
        version: 1,
        state: wide,
    };
    let asks: Vec<Swap<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Swap {
            key,
            expected: 0,
            next: match i {
                5 => &wide,
                10..13 => &big,
                _ => &small,
            },
            previous: None,
        })
        .collect();
    let answers = Store::compare_and_swap_many(&*b.cache, &s.target, &asks)
        .await
        .unwrap();
    assert_eq!(answers.len(), 600);
    for (i, a) in answers.iter().enumerate() {
        match i {
            400 => assert!(matches!(a, Err(SinkError::Rejected { .. })), "{i}: {a:?}"),
            _ => assert!(matches!(a, Ok(true)), "{i}: {a:?}"),
        }
    }
    let loaded = Store::load(&*b.cache, &s.target, &keys[..20])
        .await
        .unwrap();
    for (i, l) in loaded.into_iter().enumerate() {
        let v = l.unwrap().expect("written");
        let name = v.state.features.get("name").and_then(|f| f.value.clone());
        let features = if i == 5 {
            1500
        } else {
            usize::from(name.is_some())
        };
        assert_eq!(v.state.features.len(), features, "entry {i}'s features");
        assert_eq!(
            name.is_some(),
            (10..13).contains(&i),
            "entry {i} is its own"
        );
    }
    // What serving clients read: one field per feature beside `__v` and `__s`.
    for (i, fields) in [(4, 2), (5, 1502), (6, 2)] {
        let len: usize = redis::cmd("HLEN")
            .arg(RedisCache::redis_key(&keys[i]))
            .query_async(redis)
            .await
            .unwrap();
        assert_eq!(len, fields, "entry {i}'s hash fields");
    }
}

/// A Redis user allowed everything but `refused` (an ACL category or command), connected
/// as the host would be; drop it with [`drop_user`].
async fn restricted_user(
    stack: &Stack,
    redis: &mut redis::aio::MultiplexedConnection,
    refused: &str,
) -> (String, RedisCache) {
    let user = format!(
        "fh-no{}-{}",
        refused.trim_start_matches(['-', '@']),
        unique()
    );
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", &user, "on", ">pw", "~*", "&*", "+@all", refused])
        .query_async(redis)
        .await
        .unwrap();
    let url = stack
        .redis
        .replacen("redis://", &format!("redis://{user}:pw@"), 1);
    let cache = RedisCache::connect(&url).await.unwrap();
    (user, cache)
}

async fn drop_user(redis: &mut redis::aio::MultiplexedConnection, user: &str) {
    let _: () = redis::cmd("ACL")
        .arg(&["DELUSER", user])
        .query_async(redis)
        .await
        .unwrap();
}

/// A Redis user whose ACL refuses scripts: every swap fails as an outage (its events retry
/// until an operator fixes the ACL) under a reason that names the refused script load, not
/// a bare NOSCRIPT.
async fn a_script_refused_by_acl_is_named(
    stack: &Stack,
    b: &Backends,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    // The script must not be cached already for the refusal to matter.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(redis)
        .await
        .unwrap();
    let (user, refused) = restricted_user(stack, redis, "-script").await;
    let s = sink(
        b,
        &format!("swap-acl-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let key = s.target.key("e");
    let next = Versioned {
        version: 1,
        state: EntityState::default(),
    };
    let answers = Store::compare_and_swap_many(
        &refused,
        &s.target,
        &[Swap {
            key: &key,
            expected: 0,
            next: &next,
            previous: None,
        }],
    )
    .await
    .unwrap();
    drop_user(redis, &user).await;
    match &answers[0] {
        Err(e @ SinkError::Unavailable { message, .. }) => assert!(
            message.contains("cannot load the compare-and-swap script")
                && message.to_lowercase().contains("noperm"),
            "{e}"
        ),
        other => panic!("a refused script load: {other:?}"),
    }
}

/// A Redis user whose ACL lets the script run but refuses its `HGET`: not another writer's
/// key (that would dead-letter every event of the group) but an outage, under Redis's reason.
async fn a_read_refused_inside_the_script_is_an_outage(
    stack: &Stack,
    b: &Backends,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    let (user, refused) = restricted_user(stack, redis, "-hget").await;
    let s = sink(
        b,
        &format!("swap-nohget-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let (one, two) = (s.target.key("one"), s.target.key("two"));
    let next = Versioned {
        version: 1,
        state: EntityState::default(),
    };
    let asks = [&one, &two].map(|key| Swap {
        key,
        expected: 0,
        next: &next,
        previous: None,
    });
    let answers = Store::compare_and_swap_many(&refused, &s.target, &asks)
        .await
        .unwrap();
    drop_user(redis, &user).await;
    for a in &answers {
        match a {
            Err(e @ SinkError::Unavailable { message, .. }) => assert!(
                message.contains("can't run this command"),
                "Redis's reason: {e}"
            ),
            other => panic!("a refused HGET inside the script: {other:?}"),
        }
    }
}

/// Cache-only keys carry their expiry in Redis itself (`EXPIREAT`), not only in `__s`: a
/// key without one would stay forever. Checked on every swap of a call, after an entry of
/// many features and after another writer's key that the call skipped.
async fn cache_only_keys_expire_in_redis(
    b: &Backends,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    let s = sink(
        b,
        &format!("swap-ttl-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let keys: Vec<String> = (0..4).map(|i| s.target.key(&format!("e{i}"))).collect();
    put_raw(redis, "SET", &keys[1], &["a string"]).await;
    let at = unix_now() + 600;
    let small = Versioned {
        version: 1,
        state: EntityState {
            expires_at: Some(at),
            ..EntityState::default()
        },
    };
    let mut wide = small.clone();
    wide.state.apply(&Mutation {
        position: None,
        ops: (0..1500)
            .map(|f| (format!("f{f}"), Op::Set(Value::Int(f)), 1))
            .collect(),
        overwrite: false,
    });
    let asks: Vec<Swap<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Swap {
            key,
            expected: 0,
            next: if i == 2 { &wide } else { &small },
            previous: None,
        })
        .collect();
    let answers = Store::compare_and_swap_many(&*b.cache, &s.target, &asks)
        .await
        .unwrap();
    assert!(
        matches!(answers[1], Err(SinkError::Rejected { .. })),
        "{answers:?}"
    );
    for i in [0, 2, 3] {
        assert!(matches!(answers[i], Ok(true)), "{i}: {:?}", answers[i]);
        let expires: i64 = redis::cmd("EXPIRETIME")
            .arg(RedisCache::redis_key(&keys[i]))
            .query_async(redis)
            .await
            .unwrap();
        assert_eq!(expires, at, "entry {i}'s expiry in Redis");
    }
}

/// The hash's fields, sorted: what serving clients see.
async fn hash(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<(String, String)> {
    let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
        .arg(RedisCache::redis_key(key))
        .query_async(redis)
        .await
        .unwrap();
    fields.into_iter().filter(|(f, _)| f != "__s").collect()
}

/// A swap that knows the state at its expected version removes only the fields of the
/// features gone since (`HDEL`, no `DEL`: another writer's field stays), and one without an
/// expiry clears the old one; a first write replaces whatever hash is at the key; the
/// writer, which knows the state it read, removes a deleted feature from the hash.
async fn a_swap_removes_only_what_is_gone(
    b: &Backends,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    let s = sink(
        b,
        &format!("swap-gone-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let set = |name: &str, v: i64, t: i64| (name.to_owned(), Op::Set(Value::Int(v)), t);
    let mut one = Versioned {
        version: 1,
        state: EntityState {
            expires_at: Some(unix_now() + 600),
            ..EntityState::default()
        },
    };
    one.state.apply(&Mutation {
        position: None,
        ops: vec![set("a", 1, 1), set("b", 2, 1)],
        overwrite: false,
    });
    let mut two = Versioned {
        version: 2,
        state: EntityState {
            expires_at: None,
            ..one.state.clone()
        },
    };
    two.state.apply(&Mutation {
        position: None,
        ops: vec![("b".into(), Op::Delete, 2), set("c", 3, 2)],
        overwrite: false,
    });
    let (key, stray, other) = (
        s.target.key("e"),
        s.target.key("stray"),
        s.target.key("other"),
    );
    // A hash without `__v` (another writer's, a partial clean-up) reads as absent: the
    // first write replaces it, whatever the swap knows.
    put_raw(redis, "HSET", &stray, &["leftover", "1"]).await;
    let empty = EntityState::default();
    let swap = |key, expected, next, previous| Swap {
        key,
        expected,
        next,
        previous,
    };
    let first = [
        swap(&key, 0, &one, None),
        swap(&stray, 0, &one, Some(&empty)),
    ];
    let first = Store::compare_and_swap_many(&*b.cache, &s.target, &first);
    assert!(matches!(first.await.unwrap()[..], [Ok(true), Ok(true)]));
    // A field no state holds: left alone by a swap that removes only what is gone, so it
    // tells `HDEL` from `DEL`.
    put_raw(redis, "HSET", &key, &["sentinel", "1"]).await;
    // The second swap of the call comes after one that removed a field.
    let second = [
        swap(&key, 1, &two, Some(&one.state)),
        swap(&other, 0, &one, None),
    ];
    let second = Store::compare_and_swap_many(&*b.cache, &s.target, &second);
    assert!(matches!(second.await.unwrap()[..], [Ok(true), Ok(true)]));
    let field = |f: &str, v: &str| (f.to_owned(), v.to_owned());
    assert_eq!(
        hash(redis, &key).await,
        [
            field("__v", "2"),
            field("a", "1"),
            field("c", "3"),
            field("sentinel", "1")
        ],
        "b removed, c added, nothing else touched"
    );
    let written_once = [field("__v", "1"), field("a", "1"), field("b", "2")];
    assert_eq!(
        hash(redis, &stray).await,
        written_once,
        "the stray hash replaced"
    );
    assert_eq!(
        hash(redis, &other).await,
        written_once,
        "the call's next swap"
    );
    let ttl: i64 = redis::cmd("TTL")
        .arg(RedisCache::redis_key(&key))
        .query_async(redis)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "an entry without an expiry keeps none");

    let event = |ops| {
        (
            "w".to_owned(),
            Mutation {
                position: None,
                ops,
                overwrite: false,
            },
        )
    };
    let name = |v: &str| ("name".to_owned(), Op::Set(Value::String(v.into())), 1);
    let gone = |v: &str| ("gone".to_owned(), Op::Set(Value::String(v.into())), 1);
    let r = b
        .writer
        .apply(&s, vec![event(vec![name("n"), gone("g")])])
        .await;
    assert!(r.failed.is_empty() && r.written == 1, "{r:?}");
    let deleted = vec![("gone".to_owned(), Op::Delete, 2)];
    let r = b.writer.apply(&s, vec![event(deleted)]).await;
    assert!(r.failed.is_empty() && r.written == 1, "{r:?}");
    let fields: Vec<String> = hash(redis, &s.target.key("w"))
        .await
        .into_iter()
        .map(|(f, _)| f)
        .collect();
    assert_eq!(
        fields,
        ["__v", "name"],
        "the deleted feature's field is gone"
    );
}

/// In a batch's one script call, another writer's key of another type fails its own swap
/// (as data: `Rejected`), and the others of the call are written.
async fn a_key_of_another_type_fails_only_its_swap(
    b: &Backends,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    let s = sink(
        b,
        &format!("swap-type-{}", unique()),
        CacheStrategy::CacheOnly,
    );
    let (typed, good) = (s.target.key("typed"), s.target.key("good"));
    put_raw(redis, "SET", &typed, &["a string"]).await;
    let next = Versioned {
        version: 1,
        state: EntityState::default(),
    };
    let asks = [
        Swap {
            key: &typed,
            expected: 0,
            next: &next,
            previous: None,
        },
        Swap {
            key: &good,
            expected: 0,
            next: &next,
            previous: None,
        },
    ];
    let answers = Store::compare_and_swap_many(&*b.cache, &s.target, &asks)
        .await
        .unwrap();
    assert!(
        matches!(&answers[0], Err(SinkError::Rejected { .. })),
        "the key of another type: {:?}",
        answers[0]
    );
    assert!(
        matches!(answers[1], Ok(true)),
        "the other swap: {:?}",
        answers[1]
    );
}

/// Write the cache key of `key` as another writer would: `cmd` (HSET, SET) with `args`.
async fn put_raw(
    redis: &mut redis::aio::MultiplexedConnection,
    cmd: &str,
    key: &str,
    args: &[&str],
) {
    let _: () = redis::cmd(cmd)
        .arg(RedisCache::redis_key(key))
        .arg(args)
        .query_async(redis)
        .await
        .unwrap();
}

/// An item this host cannot read (another writer's, or a float serde read as infinity) fails
/// its own entity, named in the error, and no other entity of the batch: one bad item must
/// not dead-letter a whole group's events. It is not overwritten either.
async fn unreadable_items_fail_only_their_entity(
    b: &Backends,
    client: &aws_sdk_dynamodb::Client,
    redis: &mut redis::aio::MultiplexedConnection,
) {
    let id = unique();
    let stored = sink(b, &format!("unreadable-{id}"), CacheStrategy::WriteThrough);
    let bad = stored.target.key("bad");
    client
        .put_item()
        .table_name(&b.table)
        .item("pk", AttributeValue::S(bad.clone()))
        .item("v", AttributeValue::S("not a number".into()))
        .send()
        .await
        .unwrap();
    // A vector component beyond f32's range: serde reads it as infinity, which would be
    // written back as `null` and leave the entry unreadable for good.
    let cached = sink(
        b,
        &format!("unreadable-cache-{id}"),
        CacheStrategy::CacheOnly,
    );
    let bad_cached = cached.target.key("bad");
    let state = r#"{"features":{"x":{"value":{"t":"vector","v":[1e39]},"event_time_ms":1}}}"#;
    put_raw(redis, "HSET", &bad_cached, &["__v", "1", "__s", state]).await;
    // Another writer's version that is not a number, and a key of another type.
    let versioned = sink(
        b,
        &format!("unreadable-version-{id}"),
        CacheStrategy::CacheOnly,
    );
    let bad_version = versioned.target.key("bad");
    put_raw(redis, "HSET", &bad_version, &["__v", "1.5", "__s", "{}"]).await;
    let typed = sink(
        b,
        &format!("unreadable-type-{id}"),
        CacheStrategy::CacheOnly,
    );
    let bad_type = typed.target.key("bad");
    put_raw(redis, "SET", &bad_type, &["a string"]).await;
    for (s, bad) in [
        (&stored, &bad),
        (&cached, &bad_cached),
        (&versioned, &bad_version),
        (&typed, &bad_type),
    ] {
        let r = b
            .writer
            .apply(
                s,
                vec![("bad".into(), event(0).1), ("good".into(), event(1).1)],
            )
            .await;
        let failed: Vec<&String> = r.failed.iter().map(|(k, _)| k).collect();
        assert_eq!(
            failed,
            [bad],
            "{:?}: only the unreadable entity fails",
            s.strategy
        );
        assert_eq!(
            r.written, 1,
            "{:?}: the readable entity is written",
            s.strategy
        );
        let reason = r.failed[0].1.to_string();
        assert!(
            reason.contains(bad.as_str()),
            "the reason names the item: {reason}"
        );
        assert!(
            load(b, s, "good").await.is_some(),
            "{:?}: the good entity",
            s.strategy
        );
    }
    // In front of a store, such a cache entry is replaced, not a reason to fail the batch's
    // cache update (and, through the repair queue, every later one).
    let fronted = sink(
        b,
        &format!("unreadable-front-{id}"),
        CacheStrategy::WriteThrough,
    );
    let (versioned_key, typed_key) = (fronted.target.key("v"), fronted.target.key("t"));
    put_raw(redis, "HSET", &versioned_key, &["__v", "abc"]).await;
    put_raw(redis, "SET", &typed_key, &["a string"]).await;
    let r = b
        .writer
        .apply(
            &fronted,
            vec![("v".into(), event(0).1), ("t".into(), event(1).1)],
        )
        .await;
    assert!(
        r.failed.is_empty() && r.cache_error.is_none() && r.cache_queued == 0,
        "{r:?}"
    );
    for key in [&versioned_key, &typed_key] {
        let hit = Cache::get(&*b.cache, key).await.unwrap();
        assert!(hit.is_some(), "{key} is cached");
    }
    let raw: Option<String> = redis::cmd("HGET")
        .arg(RedisCache::redis_key(&bad_cached))
        .arg("__s")
        .query_async(redis)
        .await
        .unwrap();
    assert_eq!(
        raw.as_deref(),
        Some(state),
        "the unreadable entry is left as it was"
    );
}
