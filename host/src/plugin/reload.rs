//! Hot reload: watch the plugin and spec directories and replace a group's plugin (and the
//! parts of its spec that can change live) without a redeploy and without losing an event.
//!
//! On a change (debounced; writers should rename files into place) every group is
//! re-examined. A group whose plugin bytes or spec changed gets a candidate built off the
//! hot path: compiled, type-checked against the interface, initialized with its config, and
//! run over the spec's golden events. Only a candidate that passes every step is swapped in
//! — atomically, so the next batch runs on it while batches in flight finish on the old
//! version. A candidate that fails any step is rejected with its reason (log, metric,
//! `/v1/plugins`, `feature-host plugin status`) and the old version keeps serving. The
//! version it replaced is kept for rollback.
//!
//! Fixed while the host runs (a change is rejected with "restart to apply"): the set of
//! groups, a group's sources (topics and filters), ordering, retry and dead-letter topics,
//! and store table — the consumer's subscriptions and lanes are built from them.

use super::engine::{ComponentBytes, read_component};
use super::{PluginEngine, PluginError, golden};
use crate::metrics::ReloadLabels;
use crate::pipeline::{GroupRuntime, Pipeline};
use crate::sink::writer::GroupSink;
use crate::spec::{GroupDef, SpecError, SpecScope, load_dir_tolerant};
use notify::{EventKind, RecursiveMode, Watcher as _};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Reload records kept per group.
const HISTORY: usize = 20;

/// Compile, type-check, initialize and golden-check `def`'s plugin. Blocking.
pub fn build_runtime(engine: &PluginEngine, def: &GroupDef) -> Result<GroupRuntime, PluginError> {
    let file = read_component(&def.plugin_path)?;
    build_from_bytes(engine, def, &file)
}

fn build_from_bytes(
    engine: &PluginEngine,
    def: &GroupDef,
    file: &ComponentBytes,
) -> Result<GroupRuntime, PluginError> {
    // The bytes that are compiled are the bytes that are checked.
    if let Some(pinned) = &def.spec.plugin.sha256
        && !file.sha256().eq_ignore_ascii_case(pinned)
    {
        return Err(PluginError::Pinned {
            path: def.plugin_path.display().to_string(),
            pinned: pinned.clone(),
            actual: file.sha256().to_owned(),
        });
    }
    let plugin = engine.load_bytes(
        &def.name,
        &def.plugin_path.display().to_string(),
        file,
        def.spec.plugin.config.as_ref(),
        &def.spec.plugin.limits,
    )?;
    golden::check(&plugin, def)?;
    engine.keep(&plugin);
    Ok(GroupRuntime {
        def: def.clone(),
        plugin,
        sink: GroupSink::from_def(def),
    })
}

/// What a group's spec contributes to its identity: a change of any of it is a new
/// candidate, even with the same plugin bytes.
fn spec_fingerprint(def: &GroupDef) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&def.spec).unwrap_or_default());
    h.update(format!("{:?}", def.golden));
    hex::encode(&h.finalize()[..8])
}

/// Why `new` cannot replace `old` live, if it cannot.
fn fixed_field_change(old: &GroupDef, new: &GroupDef) -> Option<&'static str> {
    let json = |v: &[crate::spec::SourceSpec]| serde_json::to_value(v).unwrap_or_default();
    if json(&old.spec.sources) != json(&new.spec.sources) {
        return Some("spec.sources");
    }
    if old.spec.ordering != new.spec.ordering {
        return Some("spec.ordering");
    }
    if old.retry_topic != new.retry_topic {
        return Some("spec.retry.topic");
    }
    if old.dead_letter_topic != new.dead_letter_topic {
        return Some("spec.retry.deadLetterTopic");
    }
    if old.spec.store.table != new.spec.store.table {
        return Some("spec.store.table");
    }
    None
}

/// Outcome of one reload attempt for one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReloadResult {
    Applied,
    Rejected,
    RolledBack,
    /// Built, but a rollback was made meanwhile: not applied, and not tried again until the
    /// plugin or its spec changes.
    Discarded,
}

impl ReloadResult {
    fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Rejected => "rejected",
            ReloadResult::RolledBack => "rolled_back",
            ReloadResult::Discarded => "discarded",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadRecord {
    pub at_ms: i64,
    pub result: ReloadResult,
    /// The candidate's plugin version (content hash), when its bytes could be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds from the change being noticed to the swap (applied) or the verdict.
    pub took_ms: u64,
}

/// Candidates kept pinned away per group: a rollback and the candidates it discarded (more
/// only if rollbacks keep racing new builds).
const PINNED_KEPT: usize = 8;

fn pin_away(pinned: &mut Vec<(String, String)>, candidate: (String, String)) {
    if !pinned.contains(&candidate) {
        if pinned.len() == PINNED_KEPT {
            pinned.remove(0);
        }
        pinned.push(candidate);
    }
}

/// A group's plugin status, as `/v1/plugins` and `feature-host plugin status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub version: String,
    pub spec: String,
    pub wasm: String,
    pub loaded_at_ms: i64,
    /// The version a rollback returns to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<ReloadRecord>,
    /// The candidate version being compiled and checked right now, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub building: Option<String>,
    pub history: Vec<ReloadRecord>,
}

struct GroupState {
    loaded_at_ms: i64,
    spec_fp: String,
    previous: Option<(Arc<GroupRuntime>, String)>,
    /// The candidate last rejected (plugin SHA-256, spec fingerprint, reason): not retried
    /// until the plugin or its spec changes again.
    refused: Option<(String, String, String)>,
    /// Candidates rolled back from, or discarded by a rollback (plugin SHA-256, spec
    /// fingerprint): not applied until a different candidate is.
    pinned_away: Vec<(String, String)>,
    /// Swaps so far (reloads applied and rollbacks). A pass builds its candidate without a
    /// lock and swaps it in only if this did not change meanwhile: a rollback made while a
    /// candidate compiled is not undone by it.
    swaps: u64,
    /// The candidate version a pass is building.
    building: Option<String>,
    history: VecDeque<ReloadRecord>,
}

/// Watches the directories and swaps group runtimes in a [`Pipeline`].
pub struct Reloader {
    pipeline: Arc<Pipeline>,
    engine: PluginEngine,
    spec_dir: PathBuf,
    plugin_dir: PathBuf,
    sources: SpecScope,
    groups: Mutex<BTreeMap<String, GroupState>>,
    /// Spec files or groups set aside in the last pass (not tied to a running group).
    notes: Mutex<Vec<String>>,
    /// One reload pass at a time. A rollback does not take it: it must not wait for a
    /// pass's compile.
    pass: tokio::sync::Mutex<()>,
}

use crate::sink::unix_now_ms as now_ms;

impl Reloader {
    pub fn new(
        pipeline: Arc<Pipeline>,
        engine: PluginEngine,
        spec_dir: &Path,
        plugin_dir: &Path,
        sources: SpecScope,
    ) -> Arc<Reloader> {
        let now = now_ms();
        let groups = pipeline
            .runtimes()
            .iter()
            .map(|rt| {
                (
                    rt.def.name.clone(),
                    GroupState {
                        loaded_at_ms: now,
                        spec_fp: spec_fingerprint(&rt.def),
                        previous: None,
                        refused: None,
                        pinned_away: Vec::new(),
                        swaps: 0,
                        building: None,
                        history: VecDeque::new(),
                    },
                )
            })
            .collect();
        Arc::new(Reloader {
            pipeline,
            engine,
            spec_dir: spec_dir.to_path_buf(),
            plugin_dir: plugin_dir.to_path_buf(),
            sources,
            groups: Mutex::new(groups),
            notes: Mutex::new(Vec::new()),
            pass: tokio::sync::Mutex::new(()),
        })
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Every group's status.
    pub fn status(&self) -> Vec<GroupStatus> {
        let groups = self.groups.lock().expect("reload state");
        self.pipeline
            .runtimes()
            .into_iter()
            .map(|rt| {
                let st = groups.get(&rt.def.name);
                GroupStatus {
                    group: rt.def.name.clone(),
                    version: rt.plugin.version().into(),
                    spec: rt.def.file.display().to_string(),
                    wasm: rt.def.plugin_path.display().to_string(),
                    loaded_at_ms: st.map_or(0, |s| s.loaded_at_ms),
                    previous_version: st
                        .and_then(|s| s.previous.as_ref())
                        .map(|(p, _)| p.plugin.version().to_owned()),
                    last_reload: st.and_then(|s| s.history.back().cloned()),
                    building: st.and_then(|s| s.building.clone()),
                    history: st
                        .map(|s| s.history.iter().cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Problems of the last pass that belong to no running group (a new group's spec, a
    /// file that does not parse and defined no running group).
    pub fn notes(&self) -> Vec<String> {
        self.notes.lock().expect("reload notes").clone()
    }

    fn record(&self, group: &str, record: ReloadRecord) {
        let labels = ReloadLabels {
            group: group.into(),
            result: record.result.as_str().into(),
        };
        self.pipeline
            .metrics()
            .plugin_reloads
            .get_or_create(&labels)
            .inc();
        let mut groups = self.groups.lock().expect("reload state");
        if let Some(st) = groups.get_mut(group) {
            if st.history.len() == HISTORY {
                st.history.pop_front();
            }
            st.history.push_back(record);
        }
    }

    /// Re-examine every group and apply what changed. Returns how many groups were swapped.
    pub async fn reload(&self) -> usize {
        let _pass = self.pass.lock().await;
        let noticed = std::time::Instant::now();
        let (spec_dir, plugin_dir) = (self.spec_dir.clone(), self.plugin_dir.clone());
        let sources = self.sources.clone();
        let (set, errors) = match tokio::task::spawn_blocking(move || {
            load_dir_tolerant(&spec_dir, &plugin_dir, &sources)
        })
        .await
        {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "spec reload task failed");
                return 0;
            }
        };
        let mut notes: Vec<String> = Vec::new();
        let mut swapped = 0;
        // The directory itself could not be read: say so, rather than "every spec is gone".
        let unreadable = set.groups.is_empty()
            && errors
                .iter()
                .any(|e| e.file == self.spec_dir.display().to_string());
        for (g, current) in self.pipeline.router().ids().zip(self.pipeline.runtimes()) {
            let name = current.def.name.clone();
            let file = current.def.file.display().to_string();
            let mine: Vec<&SpecError> = errors
                .iter()
                .filter(|e| e.file.split('#').next() == Some(file.as_str()))
                .collect();
            let Some(def) = set.groups.get(&name) else {
                let reason = if unreadable {
                    errors
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                } else if mine.is_empty() {
                    format!(
                        "the spec of group {name} is gone; the loaded version keeps serving until a restart"
                    )
                } else {
                    mine.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                self.reject(&name, None, "", reason, noticed, true);
                continue;
            };
            if def.file != current.def.file {
                let reason = format!(
                    "{} now also defines group {name}, which {} defines: duplicate group name",
                    def.file.display(),
                    current.def.file.display()
                );
                self.reject(&name, None, "", reason, noticed, true);
                continue;
            }
            if let Some(field) = fixed_field_change(&current.def, def) {
                let reason = format!(
                    "{}: {field} changed; it is fixed while the host runs: restart to apply",
                    def.file.display()
                );
                self.reject(&name, None, "", reason, noticed, true);
                continue;
            }
            let path = def.plugin_path.clone();
            let read = tokio::task::spawn_blocking(move || read_component(&path));
            let file = match read.await {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    self.reject(&name, None, "", e.to_string(), noticed, true);
                    continue;
                }
                Err(e) => {
                    let reason = format!("cannot read plugin {}: {e}", def.plugin_path.display());
                    self.reject(&name, None, "", reason, noticed, true);
                    continue;
                }
            };
            let (sha256, version) = (file.sha256().to_owned(), file.version().to_owned());
            let spec_fp = spec_fingerprint(def);
            let swaps = {
                let mut groups = self.groups.lock().expect("reload state");
                let st = groups.get(&name);
                // Whole digests: two builds made to share a 16-digit version are still two.
                if sha256 == current.plugin.sha256() && st.is_some_and(|s| s.spec_fp == spec_fp) {
                    continue; // unchanged
                }
                if st
                    .and_then(|s| s.refused.as_ref())
                    .is_some_and(|(d, f, _)| *d == sha256 && *f == spec_fp)
                {
                    continue; // already refused: wait for the next change
                }
                if st.is_some_and(|s| {
                    s.pinned_away
                        .iter()
                        .any(|(d, f)| *d == sha256 && *f == spec_fp)
                }) {
                    continue; // rolled back from, or discarded: wait for the next change
                }
                let Some(st) = groups.get_mut(&name) else {
                    continue;
                };
                st.building = Some(version.clone());
                st.swaps
            };
            let (engine, d) = (self.engine.clone(), def.clone());
            let built =
                tokio::task::spawn_blocking(move || build_from_bytes(&engine, &d, &file)).await;
            let built = match built {
                Ok(b) => b,
                Err(e) => Err(PluginError::Cancelled(e.to_string())),
            };
            if let Some(st) = self.groups.lock().expect("reload state").get_mut(&name) {
                st.building = None;
            }
            match built {
                Ok(runtime) => {
                    // Swap and bookkeeping under one lock, so a rollback sees both or neither.
                    let old = {
                        let mut groups = self.groups.lock().expect("reload state");
                        let Some(st) = groups.get_mut(&name) else {
                            continue;
                        };
                        if st.swaps != swaps {
                            // Rolled back while this candidate was built: the operator's
                            // choice stands, until the plugin or its spec changes again.
                            pin_away(&mut st.pinned_away, (sha256, spec_fp));
                            drop(groups);
                            tracing::warn!(group = %name, version = %version, "rolled back while this candidate was built; discarded");
                            self.record(
                                &name,
                                ReloadRecord {
                                    at_ms: now_ms(),
                                    result: ReloadResult::Discarded,
                                    version: Some(version),
                                    error: Some(
                                        "a rollback was made while this candidate was built; it \
                                         is applied once its plugin or spec changes again"
                                            .into(),
                                    ),
                                    took_ms: noticed.elapsed().as_millis() as u64,
                                },
                            );
                            continue;
                        }
                        let old = self.pipeline.replace(g, Arc::new(runtime));
                        let old_fp = std::mem::replace(&mut st.spec_fp, spec_fp);
                        st.previous = Some((old.clone(), old_fp));
                        st.loaded_at_ms = now_ms();
                        st.refused = None;
                        st.pinned_away.clear();
                        st.swaps += 1;
                        old
                    };
                    // Kept for rollback only: its warm instances would hold pool slots.
                    let _ = old.plugin.reset_pool(false);
                    let took_ms = noticed.elapsed().as_millis() as u64;
                    tracing::info!(group = %name, from = old.plugin.version(), to = %version, took_ms, "plugin reloaded");
                    self.record(
                        &name,
                        ReloadRecord {
                            at_ms: now_ms(),
                            result: ReloadResult::Applied,
                            version: Some(version),
                            error: None,
                            took_ms,
                        },
                    );
                    swapped += 1;
                }
                Err(e) => {
                    // A deadline or cancellation may be load, not the candidate: try it again
                    // on the next pass instead of refusing it until its file changes.
                    let remember =
                        !matches!(e, PluginError::Timeout { .. } | PluginError::Cancelled(_));
                    self.reject(
                        &name,
                        Some(sha256),
                        &spec_fp,
                        e.to_string(),
                        noticed,
                        remember,
                    )
                }
            }
        }
        for (name, def) in &set.groups {
            if self.pipeline.group_id(name).is_none() {
                notes.push(format!(
                    "{}: new group {name} is valid; it starts consuming after a restart",
                    def.file.display()
                ));
            }
        }
        for e in &errors {
            let owned =
                self.pipeline.runtimes().iter().any(|rt| {
                    e.file.split('#').next() == Some(&*rt.def.file.display().to_string())
                });
            if !owned {
                notes.push(e.to_string());
            }
        }
        for n in &notes {
            tracing::warn!("spec reload: {n}");
        }
        *self.notes.lock().expect("reload notes") = notes;
        swapped
    }

    /// Record a refused candidate, once per distinct candidate and reason (`remember`:
    /// and do not try it again until it changes).
    fn reject(
        &self,
        group: &str,
        sha256: Option<String>,
        spec_fp: &str,
        reason: String,
        noticed: std::time::Instant,
        remember: bool,
    ) {
        let version = sha256.as_ref().map(|d| d[..16].to_owned());
        {
            let mut groups = self.groups.lock().expect("reload state");
            let Some(st) = groups.get_mut(group) else {
                return;
            };
            let key = (
                sha256.unwrap_or_default(),
                spec_fp.to_owned(),
                reason.clone(),
            );
            if st.refused.as_ref() == Some(&key) {
                return;
            }
            if remember {
                st.refused = Some(key);
            }
        }
        tracing::warn!(group, version = version.as_deref().unwrap_or("-"), reason = %reason,
            "plugin reload rejected; the loaded version keeps serving");
        self.record(
            group,
            ReloadRecord {
                at_ms: now_ms(),
                result: ReloadResult::Rejected,
                version,
                error: Some(reason),
                took_ms: noticed.elapsed().as_millis() as u64,
            },
        );
    }

    /// Serve `group` with the version it had before its last swap. The version rolled back
    /// from is not re-applied until its plugin or spec changes again.
    pub async fn rollback(&self, group: &str) -> Result<String, String> {
        // Only the state lock, held briefly: a pass swaps under it too, and a candidate
        // being built meanwhile is discarded (see `GroupState::swaps`).
        let g = self
            .pipeline
            .group_id(group)
            .ok_or_else(|| format!("unknown feature group {group:?}"))?;
        let mut groups = self.groups.lock().expect("reload state");
        let st = groups
            .get_mut(group)
            .ok_or_else(|| format!("unknown feature group {group:?}"))?;
        let (previous, previous_fp) = st
            .previous
            .take()
            .ok_or_else(|| format!("group {group} has no previous version to roll back to"))?;
        let to = previous.plugin.version().to_owned();
        let old = self.pipeline.replace(g, previous);
        let _ = old.plugin.reset_pool(false);
        let old_fp = std::mem::replace(&mut st.spec_fp, previous_fp);
        pin_away(
            &mut st.pinned_away,
            (old.plugin.sha256().to_owned(), old_fp.clone()),
        );
        st.refused = None;
        st.previous = Some((old.clone(), old_fp));
        st.loaded_at_ms = now_ms();
        st.swaps += 1;
        drop(groups);
        tracing::warn!(group, from = old.plugin.version(), to = %to, "plugin rolled back");
        self.record(
            group,
            ReloadRecord {
                at_ms: now_ms(),
                result: ReloadResult::RolledBack,
                version: Some(to.clone()),
                error: None,
                took_ms: 0,
            },
        );
        Ok(to)
    }

    /// Watch the spec and plugin directories until `shutdown`, reloading `debounce` after
    /// the last change, and every `poll` regardless (file systems without change events).
    /// The directories are watched when this returns (a change made after it is seen);
    /// the returned future runs the reloads.
    pub fn watch(
        self: Arc<Self>,
        debounce: Duration,
        poll: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
                match res {
                    // Reads (ours included) are not changes.
                    Ok(e)
                        if matches!(
                            e.kind,
                            EventKind::Access(notify::event::AccessKind::Close(
                                notify::event::AccessMode::Write
                            )) | EventKind::Create(_)
                                | EventKind::Modify(_)
                                | EventKind::Remove(_)
                        ) =>
                    {
                        let _ = tx.send(());
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "file watcher error"),
                }
            })?;
        for dir in [&self.spec_dir, &self.plugin_dir] {
            watcher
                .watch(dir, RecursiveMode::Recursive)
                .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", dir.display()))?;
        }
        tracing::info!(specs = %self.spec_dir.display(), plugins = %self.plugin_dir.display(), "watching for plugin and spec changes");
        Ok(async move {
            let _watching = watcher;
            let mut ticker = tokio::time::interval(poll);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                tokio::select! {
                    _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
                    _ = ticker.tick() => {}
                    got = rx.recv() => {
                        if got.is_none() {
                            return;
                        }
                        // Quiet for `debounce` (bounded, so a constant trickle still reloads).
                        let deadline = tokio::time::Instant::now() + debounce * 20;
                        while let Ok(Some(())) = tokio::time::timeout_at(
                            deadline.min(tokio::time::Instant::now() + debounce),
                            rx.recv(),
                        )
                        .await
                        {}
                    }
                }
                self.reload().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::load::load_files;

    fn def(dir: &Path, body: &str) -> GroupDef {
        let file = dir.join("g.yaml");
        std::fs::write(&file, body).unwrap();
        std::fs::write(dir.join("p.wasm"), b"x").unwrap();
        load_files(&[file], dir, &Default::default())
            .unwrap()
            .groups
            .into_values()
            .next()
            .unwrap()
    }

    const BASE: &str = "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {name: g}\nspec:\n  entity: user\n  features: [{name: n, type: int}]\n  plugin: {wasm: p.wasm, config: {a: 1}}\n  sources: [{topic: t}]\n";

    #[test]
    fn live_and_fixed_fields() {
        let dir = std::env::temp_dir().join(format!("fh-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let base = def(&dir, BASE);
        let config = def(&dir, &BASE.replace("{a: 1}", "{a: 2}"));
        assert_eq!(fixed_field_change(&base, &config), None);
        assert_ne!(spec_fingerprint(&base), spec_fingerprint(&config));
        let topic = def(&dir, &BASE.replace("{topic: t}", "{topic: u}"));
        assert_eq!(fixed_field_change(&base, &topic), Some("spec.sources"));
        let ordering = def(&dir, &format!("{BASE}  ordering: unordered\n"));
        assert_eq!(fixed_field_change(&base, &ordering), Some("spec.ordering"));
        let table = def(&dir, &format!("{BASE}  store: {{table: other}}\n"));
        assert_eq!(fixed_field_change(&base, &table), Some("spec.store.table"));
        assert_eq!(spec_fingerprint(&base), spec_fingerprint(&def(&dir, BASE)));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
