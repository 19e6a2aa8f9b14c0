//! A plugin cannot make the host allocate more than its output bound: the component model
//! lets every string of a result point at one guest buffer, so a guest holding 1 MiB can
//! return a hundred writes that a host copying each string holds 100 MiB for. The event that
//! does it is dead-lettered with the reason, the rest of its batch is written, and the host's
//! peak memory stays far below what the copies would take. Writes that no store could hold
//! (too many for one event, a value too large) are refused the same way.
//!
//! Alone in its test binary: it reads the process's peak RSS. Needs the fixtures built
//! (scripts/build-plugins); no services.

mod common;

use feature_host::retry::{FailureKind, InPlace};
use std::sync::Arc;

const GROUP: &str = "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {name: g}\nspec:\n  entity: e\n  features: [{name: n, type: int}, {name: label, type: string}]\n  plugin: {wasm: hostile.wasm}\n  sources: [{topic: t}]\n  store: {table: output-bounds}\n";

/// Peak resident set of this process since the last [`reset_peak`], in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// Start a new peak at the current RSS (Linux ≥ 4.0: `5` to `clear_refs`).
fn reset_peak() {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_cannot_make_the_host_copy_more_than_its_output_bound() {
    let h = common::hostile_pipeline(&[("g.yaml", GROUP.to_owned())]).await;
    let pipeline = &h.pipeline;

    // 96 writes over one 1 MiB buffer: 96 MiB if copied, under Wasmtime's own default
    // bound (128 MiB) and far over the spec's default `outputMb` (16).
    let payloads = [
        "fine",
        "alias:96:1024",
        "fine",
        "alias:1:512",
        "alias:20000:0",
        "fine",
    ];
    let events = common::events(&payloads);
    let pairs = pipeline.route(&events);

    // Warm up first (instances, allocator arenas), so the peak measures the hostile call.
    let warm = Arc::new(vec![events[0].clone()]);
    let warm_pairs = pipeline.route(&warm);
    let (failed, _) = pipeline
        .process_with_retries(&warm, &warm_pairs, InPlace::StoreOnly(1), false)
        .await;
    assert!(failed.is_empty(), "{failed:?}");
    reset_peak();
    let before = peak_rss_kib();

    let (mut failures, _) = pipeline
        .process_with_retries(&events, &pairs, InPlace::StoreOnly(1), false)
        .await;
    let grew_mib = (peak_rss_kib() - before) / 1024;
    eprintln!("peak RSS grew {grew_mib} MiB over the hostile batch");
    failures.sort_by_key(|f| f.event);
    assert!(
        grew_mib < 48,
        "the host's peak RSS grew {grew_mib} MiB over one batch (96 MiB if every alias were copied)"
    );

    let reasons: Vec<(usize, FailureKind, String)> = failures
        .iter()
        .map(|f| (f.event.index(), f.kind, f.reason.clone()))
        .collect();
    assert_eq!(
        reasons.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 3, 4],
        "only the hostile events fail: {reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| r.1 == FailureKind::Invalid),
        "each is dead-lettered at once, not retried: {reasons:?}"
    );
    assert!(
        reasons[0]
            .2
            .contains("returned more than 16 MiB from one call")
            && reasons[0].2.contains("outputMb"),
        "{}",
        reasons[0].2
    );
    assert!(
        reasons[1]
            .2
            .contains("a value of 524288 bytes; at most 262144"),
        "{}",
        reasons[1].2
    );
    assert!(
        reasons[2]
            .2
            .contains("20000 writes for one event; at most 10000"),
        "{}",
        reasons[2].2
    );
}
