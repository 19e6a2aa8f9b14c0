//! Precompiled plugin artifacts on disk, keyed by the component's content hash and the
//! engine's compatibility hash (wasmtime version, compiler settings, CPU features). A host
//! restart or a second replica on the same volume loads machine code instead of compiling.
//!
//! Loading an artifact runs its machine code, so the directory must be writable only by
//! the host's user: it is created `0700`, and files are written under a temporary name and
//! renamed into place so a reader never sees a partial artifact. An artifact that fails to
//! load (corrupt, or from another engine despite the key) is deleted and recompiled.

use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

#[derive(Clone)]
pub(super) struct ArtifactCache {
    dir: PathBuf,
    engine_hash: String,
}

impl ArtifactCache {
    pub(super) fn open(dir: &Path, engine: &Engine) -> std::io::Result<ArtifactCache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(ArtifactCache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", h.finish()),
        })
    }

    fn path(&self, content_hash: &str) -> PathBuf {
        self.dir
            .join(format!("{content_hash}-{}.cwasm", self.engine_hash))
    }

    /// The cached component for `content_hash`, if a usable artifact exists.
    pub(super) fn get(&self, engine: &Engine, content_hash: &str) -> Option<Component> {
        let path = self.path(content_hash);
        // Read, not mapped: a mapped file truncated by someone else would crash the process
        // with SIGBUS the next time the code runs.
        let bytes = std::fs::read(&path).ok()?;
        // SAFETY: the file was written by `put` below (same user, 0700 directory, atomic
        // rename) from wasmtime's own serialization; wasmtime additionally checks that it
        // was produced by a compatible engine and refuses it otherwise.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "discarding unusable precompiled plugin");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Store a compiled component. Failures only cost a recompile later: logged, not fatal.
    pub(super) fn put(&self, content_hash: &str, component: &Component) {
        let path = self.path(content_hash);
        let result = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                // Unique even across replicas sharing the volume (all PID 1 in containers).
                let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the precompiled plugin");
        }
    }
}
