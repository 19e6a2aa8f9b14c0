//! A plugin that panics, loops or balloons fails only that call, with a clear error; the next
//! call on the same plugin works. Components of the wrong shape are refused at load time.
//! Needs the fixtures built (scripts/build-plugins).

use feature_host::event::Event;
use feature_host::plugin::{EngineSettings, PluginEngine, PluginError};
use feature_host::spec::PluginLimits;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/dist")
        .join(name);
    assert!(
        wasm.is_file(),
        "fixture {name} not built: run scripts/build-plugins"
    );
    wasm
}

fn limits(timeout_ms: u64, memory_mb: u64, recycle_mb: Option<u64>) -> PluginLimits {
    PluginLimits {
        timeout_ms,
        memory_mb,
        recycle_mb,
        ..PluginLimits::default()
    }
}

fn event(payload: &str) -> Event {
    Event {
        topic: "t".into(),
        partition: 0,
        offset: 1,
        key: None,
        timestamp_ms: 7,
        headers: vec![],
        payload: payload.as_bytes().to_vec(),
        position: None,
    }
}

#[test]
fn hostile_calls_are_contained_and_the_plugin_keeps_serving() {
    let wasm = fixture("hostile.wasm");
    let plugin = PluginEngine::new()
        .unwrap()
        .load("hostile", &wasm, None, &limits(300, 32, None))
        .unwrap();
    let ok = |p: &feature_host::plugin::Plugin| {
        let out = p.process_blocking(&[event("fine")]).unwrap();
        assert_eq!(out[0].as_ref().unwrap()[0].feature, "n");
    };
    ok(&plugin);

    match plugin.process_blocking(&[event("fine"), event("panic")]) {
        Err(PluginError::Trap { message, .. }) => {
            assert!(
                message.contains("hostile plugin was told to panic"),
                "panic message: {message}"
            );
            assert!(message.contains("src/lib.rs"), "panic location: {message}");
        }
        other => panic!("expected a trap, got {:?}", other.map(|r| r.len())),
    }
    ok(&plugin);

    match plugin.process_blocking(&[event("loop")]) {
        Err(PluginError::Timeout {
            timeout_ms: 300, ..
        }) => {}
        other => panic!("expected a timeout, got {:?}", other.map(|r| r.len())),
    }
    ok(&plugin);

    // No clock but the events' time, no environment, no filesystem.
    let seen = plugin
        .process_blocking(&[event("clock"), event("env")])
        .unwrap();
    let values: Vec<_> = seen
        .into_iter()
        .flat_map(|r| r.unwrap())
        .map(|w| (w.feature, w.op))
        .collect();
    use feature_host::feature::{Op, Value};
    assert_eq!(
        values,
        vec![
            ("clock_ms".to_string(), Op::Set(Value::Int(0))),
            ("env_vars".to_string(), Op::Set(Value::Int(0))),
            ("can_read_files".to_string(), Op::Set(Value::Bool(false))),
        ]
    );

    match plugin.process_blocking(&[event("balloon")]) {
        Err(PluginError::Trap { .. }) => {}
        other => panic!(
            "expected a trap at the memory cap, got {:?}",
            other.map(|r| r.len())
        ),
    }
    ok(&plugin);
}

fn expect_err(r: Result<feature_host::plugin::Plugin, PluginError>) -> PluginError {
    match r {
        Ok(p) => panic!("loaded {}", p.version()),
        Err(e) => e,
    }
}

#[test]
fn components_of_the_wrong_shape_are_refused_with_the_reason() {
    let engine = PluginEngine::new().unwrap();
    let l = limits(300, 32, None);
    let load = |bytes: &[u8]| {
        let file = feature_host::plugin::ComponentBytes::new(bytes.to_vec());
        engine.load_bytes("g", "x.wasm", &file, None, &l)
    };

    // Same export names, other types: an SDK from another world.
    let impostor = std::fs::read(fixture("wrong_interface.wasm")).unwrap();
    let e = expect_err(load(&impostor));
    assert!(matches!(e, PluginError::Interface { .. }), "{e}");
    assert!(e.to_string().contains("does not implement"), "{e}");

    // A component that exports nothing.
    let empty_component = b"\0asm\x0d\0\x01\0";
    let e = expect_err(load(empty_component));
    assert!(matches!(e, PluginError::Interface { .. }), "{e}");

    // A core module (a `wasm32-unknown-unknown` build), and garbage.
    for bytes in [&b"\0asm\x01\0\0\0"[..], b"hello, world"] {
        let e = expect_err(load(bytes));
        assert!(matches!(e, PluginError::Compile { .. }), "{e}");
    }
}

/// A guest's randomness (std's hash keys among it) comes from a secret of the host's, mixed
/// with the plugin version: stable for a version within one host (instances agree, so a
/// golden check and live traffic see the same hash order), unpredictable to producers, who
/// could otherwise craft keys that collide in a plugin's hash maps.
#[test]
fn randomness_is_secret_per_host_and_memory_hogs_are_recycled() {
    let wasm = fixture("hostile.wasm");
    let random = |p: &feature_host::plugin::Plugin| {
        let out = p.process_blocking(&[event("random")]).unwrap();
        out[0].as_ref().unwrap()[0].op.clone()
    };
    // One engine, two fresh instances of a version: the same numbers.
    let engine = PluginEngine::new().unwrap();
    let a = engine
        .load("g", &wasm, None, &limits(1000, 32, None))
        .unwrap();
    let b = engine
        .load("g", &wasm, None, &limits(1000, 32, Some(1)))
        .unwrap();
    assert_eq!(random(&a), random(&b));
    // Another host (engine): other numbers for the same version (equal by chance once in
    // 2^64 runs). Both first draws of fresh instances: a warm instance draws on.
    let here = engine
        .load("g", &wasm, None, &limits(1000, 32, None))
        .unwrap();
    let elsewhere = PluginEngine::new()
        .unwrap()
        .load("g", &wasm, None, &limits(1000, 32, None))
        .unwrap();
    assert_ne!(
        random(&here),
        random(&elsewhere),
        "the seed is public: it follows from the version alone"
    );
    // Replicas given one deployment secret draw alike (a rebalance moves an entity between
    // them, a restart replays it); a host with another secret does not.
    let with_secret = |secret: &str| {
        PluginEngine::with_settings(&EngineSettings {
            max_instances: 16,
            seed_secret: Some(secret.into()),
            ..Default::default()
        })
        .unwrap()
        .load("g", &wasm, None, &limits(1000, 32, None))
        .unwrap()
    };
    let shared = "seed-secret-0123456789abcdef0123456789";
    assert_eq!(random(&with_secret(shared)), random(&with_secret(shared)));
    assert_ne!(
        random(&with_secret(shared)),
        random(&with_secret("another-secret-0123456789abcdef01234"))
    );

    // Default threshold (half the cap): a small plugin's instance is reused.
    a.process_blocking(&[event("fine")]).unwrap();
    assert_eq!(a.take_recycled(), 0);
    assert_eq!(a.pooled_instances(), 1);
    // A 1 MiB threshold: every instance (a Rust module starts above 1 MiB) is replaced.
    b.process_blocking(&[event("fine")]).unwrap();
    b.process_blocking(&[event("fine")]).unwrap();
    assert_eq!(b.take_recycled(), 3);
    assert_eq!(b.pooled_instances(), 0);
    // Still serving, from fresh instances.
    let out = b.process_blocking(&[event("fine")]).unwrap();
    assert_eq!(out[0].as_ref().unwrap()[0].feature, "n");
}

#[test]
fn precompiled_artifacts_are_reused_and_corrupt_ones_recompiled() {
    let dir = std::env::temp_dir().join(format!("fh-artifacts-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = EngineSettings {
        max_instances: 16,
        cache_dir: Some(dir.clone()),
        ..Default::default()
    };
    let wasm = fixture("hostile.wasm");
    let l = limits(1000, 32, None);
    let engine = PluginEngine::with_settings(&settings).unwrap();
    let first = engine.load("g", &wasm, None, &l).unwrap();
    assert!(
        cwasm_files(&dir).is_empty(),
        "kept before the plugin was accepted"
    );
    // Accepted (a host does this once the plugin passed its golden events): kept.
    engine.keep(&first);
    let artifacts = cwasm_files(&dir);
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let name = artifacts[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        name.starts_with(first.version()) && name.ends_with(".cwasm"),
        "{name}"
    );

    // A new engine (a restart) loads the artifact.
    let again = PluginEngine::with_settings(&settings)
        .unwrap()
        .load("g", &wasm, None, &l)
        .unwrap();
    assert_eq!(again.version(), first.version());
    again.process_blocking(&[event("fine")]).unwrap();

    // A damaged artifact is discarded and the component compiled again.
    std::fs::write(&artifacts[0], b"not machine code").unwrap();
    let engine = PluginEngine::with_settings(&settings).unwrap();
    let third = engine.load("g", &wasm, None, &l).unwrap();
    engine.keep(&third);
    third.process_blocking(&[event("fine")]).unwrap();
    assert!(std::fs::metadata(&artifacts[0]).unwrap().len() > 1000);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn cwasm_files(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    files.sort();
    files
}

/// Loading an artifact runs its machine code: one that this host did not write for this
/// component is not loaded, even when it is a valid artifact (another component's, renamed
/// to this one's key: its code would serve this group).
#[test]
fn an_artifact_of_another_component_under_this_ones_name_is_not_loaded() {
    let dir = std::env::temp_dir().join(format!("fh-artifact-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let settings = EngineSettings {
        max_instances: 16,
        cache_dir: Some(dir.clone()),
        ..Default::default()
    };
    let l = limits(1000, 32, None);
    let engine = PluginEngine::with_settings(&settings).unwrap();
    let victim = engine
        .load("victim", &fixture("user_activity.wasm"), Some(&serde_json::json!({"entity_field": "user_id", "list_field": "item_id", "list_feature": "last_viewed", "last_k": 20})), &l)
        .unwrap();
    let attacker = engine
        .load("attacker", &fixture("hostile.wasm"), None, &l)
        .unwrap();
    engine.keep(&victim);
    engine.keep(&attacker);
    let files = cwasm_files(&dir);
    let name_of = |version: &str| {
        files
            .iter()
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(version)
            })
            .unwrap_or_else(|| panic!("no artifact for {version} in {files:?}"))
            .clone()
    };
    let (victims, attackers) = (name_of(victim.version()), name_of(attacker.version()));
    std::fs::copy(&attackers, &victims).unwrap();

    let restarted = PluginEngine::with_settings(&settings)
        .unwrap()
        .load("victim", &fixture("user_activity.wasm"), Some(&serde_json::json!({"entity_field": "user_id", "list_field": "item_id", "list_feature": "last_viewed", "last_k": 20})), &l)
        .unwrap();
    // The hostile fixture panics on this payload; the real plugin dead-letters it as
    // malformed JSON (invalid), without a trap.
    let out = restarted.process_blocking(&[event("panic")]).unwrap();
    assert!(
        matches!(&out[0], Err(feature_host::plugin::EventFailure::Invalid(_))),
        "the victim group ran another component's code: {out:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A component file over the size bound is refused before it is read whole or compiled: a
/// hostile file would otherwise hold the compiler's time and memory beside the stream.
#[test]
fn an_oversized_component_is_refused_before_compiling() {
    let path = std::env::temp_dir().join(format!("fh-huge-{}.wasm", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    file.set_len((128 << 20) + 1).unwrap(); // sparse: no disk used
    let e = PluginEngine::new()
        .unwrap()
        .load("huge", &path, None, &PluginLimits::default())
        .err()
        .expect("refused");
    std::fs::remove_file(&path).unwrap();
    assert!(
        e.to_string().contains("is larger than 134217728 bytes"),
        "{e}"
    );
}
