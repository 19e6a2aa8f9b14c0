//! Precompiled plugin artifacts on disk, keyed by the component's SHA-256 and the engine's
//! compatibility hash (wasmtime version, compiler settings, CPU features). A host restart or
//! a second replica on the same volume loads machine code instead of compiling.
//!
//! Loading an artifact runs its machine code, so what is loaded must be what this host
//! wrote, for that component:
//! - the directory is created `0700`, and files are written under a temporary name and
//!   renamed into place, so a reader never sees a partial artifact;
//! - every artifact carries an HMAC-SHA256 over its file name and bytes, under a key kept
//!   in the directory (`.key`, `0600`, made on first use). An artifact of another component
//!   renamed to this one's key, or one written by anything without the key, is refused.
//!
//! An artifact that fails to load (its MAC, a corrupt file, another engine despite the key)
//! is deleted and recompiled.
//!
//! Bounded: only plugins that were accepted are written (see `PluginEngine::keep`), the
//! cache keeps under its size by deleting the artifacts used least recently (a hit renews
//! a file's time), and temporary files a crash left behind are deleted when it opens (after
//! [`ABANDONED_AFTER`]: another replica on the volume may be writing one right now).

use hmac::{KeyInit as _, Mac as _};
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use wasmtime::Engine;
use wasmtime::component::Component;

type Hmac = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC at the start of an artifact file.
const TAG_BYTES: usize = 32;

/// A temporary file this old was left by a writer that is gone.
pub(super) const ABANDONED_AFTER: Duration = Duration::from_secs(600);

#[derive(Clone)]
pub(super) struct ArtifactCache {
    dir: PathBuf,
    engine_hash: String,
    key: [u8; 32],
    max_bytes: u64,
}

impl ArtifactCache {
    /// The cache in `dir`, kept under `max_bytes`.
    pub(super) fn open(
        dir: &Path,
        engine: &Engine,
        max_bytes: u64,
    ) -> std::io::Result<ArtifactCache> {
        std::fs::create_dir_all(dir)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let cache = ArtifactCache {
            dir: dir.to_path_buf(),
            engine_hash: format!("{:016x}", h.finish()),
            key: load_or_make_key(&dir.join(".key"))?,
            max_bytes,
        };
        cache.prune(&[]);
        Ok(cache)
    }

    /// Delete abandoned temporary files, then the artifacts used least recently until the
    /// rest fit in `max_bytes`; never those of the components in `keep` (SHA-256s: the ones
    /// serving, and the one just written). Errors only cost disk.
    fn prune(&self, keep: &[&str]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let now = SystemTime::now();
        let mut artifacts = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || name.starts_with('.') {
                continue; // the key, and whatever is not ours
            }
            let used = meta.modified().unwrap_or(now);
            if is_temporary(&name) {
                if now.duration_since(used).unwrap_or_default() >= ABANDONED_AFTER {
                    let _ = std::fs::remove_file(entry.path());
                }
            } else if name.ends_with(".cwasm") {
                artifacts.push((used, meta.len(), name));
            }
        }
        artifacts.sort();
        let mut total: u64 = artifacts.iter().map(|(_, len, _)| len).sum();
        for (_, len, name) in artifacts {
            if total <= self.max_bytes {
                break;
            }
            if !keep.iter().any(|sha| name.starts_with(sha)) {
                tracing::info!(artifact = %name, "plugin artifact cache full; deleting the artifact used least recently");
                let _ = std::fs::remove_file(self.dir.join(&name));
                total -= len;
            }
        }
    }

    fn name(&self, sha256: &str) -> String {
        format!("{sha256}-{}.cwasm", self.engine_hash)
    }

    fn tag(&self, name: &str, artifact: &[u8]) -> Hmac {
        let mut mac = Hmac::new_from_slice(&self.key).expect("any key length");
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(artifact);
        mac
    }

    /// The cached component of the component whose SHA-256 is `sha256`, if a usable
    /// artifact exists.
    pub(super) fn get(&self, engine: &Engine, sha256: &str) -> Option<Component> {
        let name = self.name(sha256);
        let path = self.dir.join(&name);
        // Read, not mapped: a mapped file truncated by someone else would crash the process
        // with SIGBUS the next time the code runs.
        let bytes = std::fs::read(&path).ok()?;
        let discard = |why: String| {
            tracing::warn!(path = %path.display(), error = %why, "discarding unusable precompiled plugin");
            let _ = std::fs::remove_file(&path);
            None
        };
        if bytes.len() < TAG_BYTES {
            return discard("shorter than its MAC".into());
        }
        let (tag, artifact) = bytes.split_at(TAG_BYTES);
        if self.tag(&name, artifact).verify_slice(tag).is_err() {
            return discard(
                "its MAC does not match: not written by this host for this component".into(),
            );
        }
        // SAFETY: the MAC proves the bytes were written by `put` below, for this component,
        // from wasmtime's own serialization; wasmtime additionally checks that they were
        // produced by a compatible engine and refuses them otherwise.
        match unsafe { Component::deserialize(engine, artifact) } {
            Ok(c) => {
                touch(&path); // used: the last to be deleted when the cache is full
                Some(c)
            }
            Err(e) => discard(format!("{e:#}")),
        }
    }

    /// Store a compiled component, then prune, sparing `in_use` (SHA-256s, this one's among
    /// them). Failures only cost a recompile later: logged, not fatal.
    pub(super) fn put(&self, sha256: &str, component: &Component, in_use: &[&str]) {
        let name = self.name(sha256);
        let path = self.dir.join(&name);
        let result = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|artifact| {
                let tag = self.tag(&name, &artifact).finalize().into_bytes();
                let mut bytes = Vec::with_capacity(TAG_BYTES + artifact.len());
                bytes.extend_from_slice(&tag);
                bytes.extend_from_slice(&artifact);
                // Unique even across replicas sharing the volume (all PID 1 in containers).
                let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
                std::fs::write(&tmp, bytes)?;
                std::fs::rename(&tmp, &path)
            });
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache the precompiled plugin");
        }
        self.prune(in_use);
    }

    /// The artifact of `sha256` is in use (its plugin was accepted again): the last to go.
    pub(super) fn renew(&self, sha256: &str) {
        touch(&self.dir.join(self.name(sha256)));
    }
}

/// Mark an artifact used now (pruning deletes the least recently used first).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().write(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// `<sha256>-<engine hash>.tmp-<16 hex>`: a temporary file of [`ArtifactCache::put`] (and
/// nothing else, should the directory be shared).
fn is_temporary(name: &str) -> bool {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let Some((stem, random)) = name.split_once(".tmp-") else {
        return false;
    };
    let Some((sha, engine)) = stem.split_once('-') else {
        return false;
    };
    hex(sha, 64) && hex(engine, 16) && hex(random, 16)
}

/// The directory's MAC key: read, or made (32 random bytes, `0600`, created exclusively so
/// two replicas starting together agree on one).
fn load_or_make_key(path: &Path) -> std::io::Result<[u8; 32]> {
    use std::io::Write as _;
    let read = |path: &Path| -> std::io::Result<[u8; 32]> {
        let bytes = std::fs::read(path)?;
        bytes.try_into().map_err(|_| {
            std::io::Error::other(format!(
                "{} is not a 32-byte key; delete it to make a new one",
                path.display()
            ))
        })
    };
    match read(path) {
        Ok(key) => return Ok(key),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    let key: [u8; 32] = rand::random();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let tmp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
    let mut f = options.open(&tmp)?;
    f.write_all(&key)?;
    f.sync_all()?;
    drop(f);
    // A link, not a rename: if another replica made the key meanwhile, keep theirs.
    let made = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match made {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(e),
    }
}
