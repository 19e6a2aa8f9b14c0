//! The Redis cache's `__s` field (an entity's whole state as JSON) on any bytes: reads
//! decode it. It fails with a reason or gives a state that serializes back to itself (no
//! float read as infinity, which would be written back as `null`), and whose cache fields
//! can be built.
#![no_main]

use feature_host::feature::{EntityState, Versioned};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(state) = EntityState::from_stored_json(data) else {
        return;
    };
    for w in state.positions.values() {
        assert!(
            w.applied.windows(2).all(|p| p[0] < p[1]) && w.applied.iter().all(|&o| o >= w.floor),
            "{w:?}"
        );
    }
    let text = serde_json::to_string(&state).expect("a state serializes");
    let again: EntityState = serde_json::from_str(&text).expect("a serialized state parses");
    assert_eq!(again, state);
    let _ = feature_host::sink::redis_cache::RedisCache::fields(&Versioned { version: 1, state });
});
