//! A plugin that traps on one event of a batch fails that event only, under its own reason,
//! in every group the plugin serves; the rest of the batch is written. (Before, the whole
//! batch went to the retry topic with the one event's panic message and a 14-frame wasm
//! backtrace.) Needs the fixtures built (scripts/build-plugins); no services.

use feature_host::event::Event;
use feature_host::feature::Position;
use feature_host::retry::{FailureKind, InPlace};
use feature_host::sink::memory_cache::MemoryCache;
use feature_host::sink::writer::FeatureWriter;
use std::path::Path;
use std::sync::Arc;

fn group(name: &str) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: {name}}}\nspec:\n  entity: e\n  features: [{{name: n, type: int}}]\n  plugin: {{wasm: hostile.wasm}}\n  sources: [{{topic: t}}]\n  store: {{table: trap-{name}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_its_own_event_in_every_group() {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
    assert!(
        plugins.join("hostile.wasm").is_file(),
        "fixtures not built: run scripts/build-plugins"
    );
    let specs = std::env::temp_dir().join(format!("fh-trap-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::write(specs.join("a.yaml"), group("a")).unwrap();
    std::fs::write(specs.join("b.yaml"), group("b")).unwrap();
    let set = feature_host::spec::load_dir(&specs, &plugins).unwrap();
    let store = Arc::new(MemoryCache::new());
    let writer = FeatureWriter::new(store.clone(), Arc::new(MemoryCache::new()));
    let pipeline = feature_host::app::build_pipeline(&set, writer)
        .await
        .unwrap();

    let payloads = [
        "fine", "fine", "panic", "fine", "fine", "fine", "fine", "fine",
    ];
    let events: Vec<Event> = payloads
        .iter()
        .enumerate()
        .map(|(i, p)| Event {
            topic: "t".into(),
            partition: 0,
            offset: i as i64,
            key: Some(format!("k{i}").into_bytes()),
            timestamp_ms: 1,
            headers: vec![],
            payload: p.as_bytes().to_vec(),
            position: Some(Position::sequential("t", 0, i as i64)),
        })
        .collect();
    let events = Arc::new(events);
    let pairs = pipeline.route(&events);
    assert_eq!(pairs.len(), 16, "both groups read t");
    let (failures, stats) = pipeline
        .process_with_retries(&events, &pairs, InPlace::StoreOnly(1), false)
        .await;

    assert_eq!(failures.len(), 2, "one failure per group: {failures:#?}");
    for f in &failures {
        assert_eq!(f.event, 2, "only the panicking event fails");
        assert_eq!(f.kind, FailureKind::Retryable);
        assert!(
            f.reason.contains("hostile plugin was told to panic"),
            "its own reason: {}",
            f.reason
        );
        assert!(
            !f.reason.contains("wasm function") && f.reason.len() < 600,
            "a short reason, not a backtrace ({} bytes): {}",
            f.reason.len(),
            f.reason
        );
    }
    assert_eq!(stats.writes, 14, "the 7 good events wrote in both groups");
    let _ = std::fs::remove_dir_all(&specs);
}
