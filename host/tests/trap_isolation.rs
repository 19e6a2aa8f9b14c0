//! A plugin that traps on one event of a batch fails that event only, under its own reason,
//! in every group the plugin serves; the rest of the batch is written. (Before, the whole
//! batch went to the retry topic with the one event's panic message and a 14-frame wasm
//! backtrace.) Needs the fixtures built (scripts/build-plugins); no services.

mod common;

use feature_host::retry::{FailureKind, InPlace};

fn group(name: &str) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: {name}}}\nspec:\n  entity: e\n  features: [{{name: n, type: int}}]\n  plugin: {{wasm: hostile.wasm}}\n  sources: [{{topic: t}}]\n  store: {{table: trap-{name}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trap_fails_only_its_own_event_in_every_group() {
    let h = common::hostile_pipeline(&[("a.yaml", group("a")), ("b.yaml", group("b"))]).await;
    let pipeline = &h.pipeline;
    let events = common::events(&[
        "fine", "fine", "panic", "fine", "fine", "fine", "fine", "fine",
    ]);
    let pairs = pipeline.route(&events);
    assert_eq!(pairs.len(), 16, "both groups read t");
    let (failures, stats) = pipeline
        .process_with_retries(&events, &pairs, InPlace::StoreOnly(1), false)
        .await;

    assert_eq!(failures.len(), 2, "one failure per group: {failures:#?}");
    for f in &failures {
        assert_eq!(f.event.index(), 2, "only the panicking event fails");
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
}
