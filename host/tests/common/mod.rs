//! Shared by the tests that run the hostile fixture through a pipeline on in-memory stores
//! (no services). Needs the fixtures built (scripts/build-plugins).

use feature_host::event::Event;
use feature_host::feature::Position;
use feature_host::pipeline::Pipeline;
use feature_host::sink::memory_cache::MemoryCache;
use feature_host::sink::writer::FeatureWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A pipeline of the given specs (`(file name, YAML)`), whose spec directory is removed on drop.
pub struct Hostile {
    pub pipeline: Pipeline,
    specs: PathBuf,
}

impl Drop for Hostile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.specs);
    }
}

pub async fn hostile_pipeline(specs: &[(&str, String)]) -> Hostile {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/dist");
    assert!(
        plugins.join("hostile.wasm").is_file(),
        "fixtures not built: run scripts/build-plugins"
    );
    let dir = std::env::temp_dir().join(format!("fh-hostile-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, yaml) in specs {
        std::fs::write(dir.join(name), yaml).unwrap();
    }
    let set = feature_host::spec::load_dir(&dir, &plugins).unwrap();
    let writer = FeatureWriter::new(Arc::new(MemoryCache::new()), Arc::new(MemoryCache::new()));
    let pipeline = feature_host::app::build_pipeline(&set, writer)
        .await
        .unwrap();
    Hostile {
        pipeline,
        specs: dir,
    }
}

/// One event of topic `t` per payload, keyed `k<i>`, at offset `i`.
pub fn events(payloads: &[&str]) -> Arc<Vec<Event>> {
    Arc::new(
        payloads
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
            .collect(),
    )
}
