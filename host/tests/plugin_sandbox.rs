//! A plugin that panics, loops or balloons fails only that call, with a clear error; the next
//! call on the same plugin works. Needs the fixtures built (scripts/build-plugins).

use feature_host::event::Event;
use feature_host::plugin::{PluginEngine, PluginError};
use feature_host::spec::PluginLimits;
use std::path::Path;

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
    let wasm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist/hostile.wasm");
    assert!(
        wasm.is_file(),
        "fixture not built: run scripts/build-plugins"
    );
    let limits = PluginLimits {
        timeout_ms: 300,
        memory_mb: 32,
    };
    let plugin = PluginEngine::new()
        .unwrap()
        .load("hostile", &wasm, None, &limits)
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
