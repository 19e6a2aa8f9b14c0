//! A specs directory mounted from a ConfigMap, laid out and updated exactly as kubelet does:
//! the host starts from it (each spec loaded once, not once per link), and a running host's
//! watcher sees kubelet's atomic `..data` swap and applies the new spec, with the periodic
//! reload pass off so that only the change event can trigger it. No services needed (the
//! embedded default); needs the plugins built (scripts/build-plugins).

#[path = "common/process.rs"]
mod process;

use process::{TOKEN, http, http_as, repo, run_host};
use std::path::Path;
use std::time::{Duration, Instant};

/// The spec of group `live`, keeping the last `last_k` viewed items.
fn live_spec(last_k: u32) -> String {
    format!(
        "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {{name: live}}\nspec:\n  entity: user\n  features: [{{name: clicks, type: int}}, {{name: views, type: int}}, {{name: last_viewed, type: string-list}}]\n  plugin:\n    wasm: live.wasm\n    config: {{entity_field: user_id, list_field: item_id, list_feature: last_viewed, last_k: {last_k}}}\n  sources: [{{topic: web-events}}]\n"
    )
}

/// What kubelet does to publish a ConfigMap's contents: the files in a new timestamped
/// directory, a `..data` link to it made under a temporary name and renamed over the old one
/// (the atomic swap), a `name → ..data/name` link per file, then the previous directory
/// removed.
fn publish(dir: &Path, stamp: &str, files: &[(&str, String)]) {
    let previous = std::fs::read_link(dir.join("..data")).ok();
    let data = dir.join(stamp);
    std::fs::create_dir(&data).unwrap();
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap();
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(stamp, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    for (name, _) in files {
        let link = dir.join(name);
        if link.symlink_metadata().is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
        }
    }
    if let Some(previous) = previous {
        std::fs::remove_dir_all(dir.join(previous)).unwrap();
    }
}

fn status(addr: &str) -> serde_json::Value {
    let (code, body) = http(addr, "GET", "/v1/plugins", "");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Push one view of `item` by `user` and return the user's `last_viewed` after it.
fn view(addr: &str, user: &str, item: &str) -> Vec<String> {
    // Later views later in event time, so that each is the newest.
    static CLOCK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1_000);
    let at = CLOCK.fetch_add(1_000, std::sync::atomic::Ordering::Relaxed);
    let event = format!(
        r#"{{"topic":"web-events","key":"{user}","timestamp":{at},"payload":{{"type":"view","user_id":"{user}","item_id":"{item}"}}}}"#
    );
    let (code, summary) = http_as(addr, "POST", "/v1/events", &event, Some(TOKEN));
    assert_eq!(code, 200, "{summary}");
    let (code, got) = http(addr, "GET", &format!("/v1/features/live/{user}"), "");
    assert_eq!(code, 200, "{got}");
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    serde_json::from_value(got["features"]["last_viewed"].clone()).unwrap_or_default()
}

#[test]
fn a_configmap_mount_starts_the_host_and_its_swap_reaches_the_running_watcher() {
    let dir = std::env::temp_dir().join(format!("fh-configmap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (specs, plugins) = (dir.join("specs"), dir.join("plugins"));
    std::fs::create_dir_all(&specs).unwrap();
    std::fs::create_dir_all(&plugins).unwrap();
    std::fs::copy(
        repo().join("plugins/dist/user_activity.wasm"),
        plugins.join("live.wasm"),
    )
    .unwrap();
    publish(
        &specs,
        "..2026_12_03_06_00_00.000000001",
        &[("live.yaml", live_spec(2))],
    );

    let cache = dir.join("cache");
    let env = [
        ("FH_SPEC_DIR", specs.to_str().unwrap()),
        ("FH_PLUGIN_DIR", plugins.to_str().unwrap()),
        ("FH_PLUGIN_CACHE_DIR", cache.to_str().unwrap()),
        // No periodic pass: only the watcher's change event can apply the update.
        ("FH_RELOAD_POLL", "1h"),
    ];
    let (mut host, addr) = run_host(&dir.join("data"), &env);
    let groups = status(&addr)["groups"].clone();
    assert_eq!(groups.as_array().map(Vec::len), Some(1), "{groups:#}");
    let file = groups[0]["spec"].as_str().unwrap().to_owned();
    assert!(
        file.ends_with("specs/live.yaml") && !file.contains("..2026"),
        "the spec is known by its visible name, not kubelet's directory: {file}"
    );
    for item in ["a", "b", "c"] {
        view(&addr, "u1", item);
    }
    assert_eq!(view(&addr, "u1", "d").len(), 2, "last_k 2 as first mounted");

    // Waited for as a new reload, not a result: the start's own may already say "applied".
    let before = status(&addr)["groups"][0]["last_reload"].clone();
    publish(
        &specs,
        "..2026_12_03_06_05_00.000000002",
        &[("live.yaml", live_spec(4))],
    );
    let start = Instant::now();
    loop {
        let g = status(&addr)["groups"][0].clone();
        if g["last_reload"] != before && g["last_reload"]["result"] == "applied" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the swap was never applied: {g:#}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for item in ["e", "f", "g"] {
        view(&addr, "u1", item);
    }
    assert_eq!(
        view(&addr, "u1", "h").len(),
        4,
        "the running host serves the swapped spec (last_k 4)"
    );

    assert!(host.terminate(), "SIGTERM exits 0");
    let _ = std::fs::remove_dir_all(&dir);
}
