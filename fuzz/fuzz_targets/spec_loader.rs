//! The spec loader on any text: a spec file is written by a tenant. It must return problems
//! (file, field, reason), never panic, whatever the YAML.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::{Path, PathBuf};

fuzz_target!(|text: &str| {
    let scope = feature_host::spec::SpecScope::default();
    let files = [(PathBuf::from("fuzz/spec.yaml"), text.to_owned())];
    let _ = feature_host::spec::load::load_texts(&files, Path::new("/nonexistent-plugins"), &scope);
});
