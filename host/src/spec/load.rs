//! Loading a spec directory: YAML → structural check against the JSON Schema (every
//! violation, with its field path) → typed documents → semantic checks across documents
//! (duplicates, references, cycles, cron, durations, plugin files).

use super::model::*;
use super::scope::{Location, SpecScope, file_inside, relative_inside};
use schemars::schema_for;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

/// One problem in one spec file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The file (and document, for multi-document files): `specs/a.yaml` or `specs/a.yaml#2`.
    pub file: String,
    /// Dotted field path inside the document, e.g. `spec.features[1].type`; empty for the
    /// whole document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.field, self.message)
        }
    }
}

/// All problems found in a set of spec files.
#[derive(Debug, Clone, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} spec error(s):", self.0.len())?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// A validated FeatureGroup with its derived settings.
#[derive(Debug, Clone)]
pub struct GroupDef {
    pub name: String,
    pub file: PathBuf,
    pub spec: FeatureGroupSpec,
    /// Resolved path of the plugin component.
    pub plugin_path: PathBuf,
    pub store_ttl: Option<Duration>,
    pub cache_ttl: Duration,
    pub retry_backoff: Duration,
    pub retry_topic: String,
    pub dead_letter_topic: String,
    /// The golden events of `spec.plugin.golden`, parsed.
    pub golden: Vec<crate::plugin::golden::GoldenCase>,
}

/// A validated Ingestion.
#[derive(Debug, Clone)]
pub struct IngestionDef {
    pub name: String,
    pub file: PathBuf,
    pub spec: IngestionSpec,
}

/// Every valid document of a spec directory.
#[derive(Debug, Clone, Default)]
pub struct SpecSet {
    pub groups: BTreeMap<String, GroupDef>,
    pub ingestions: BTreeMap<String, IngestionDef>,
    /// Where the ingestions were allowed to read: runs check every file against it again.
    pub sources: SpecScope,
}

impl SpecSet {
    /// Every Kafka topic some group consumes.
    pub fn topics(&self) -> BTreeSet<String> {
        self.groups
            .values()
            .flat_map(|g| g.spec.sources.iter().map(|s| s.topic.clone()))
            .collect()
    }
}

/// The JSON Schema of a spec document, for editors (`yaml-language-server`) and CI.
pub fn json_schema() -> serde_json::Value {
    let mut schema = serde_json::to_value(schema_for!(Document)).expect("schema serializes");
    schema["title"] = "feature-host spec document".into();
    schema
}

struct Validators {
    group: jsonschema::Validator,
    ingestion: jsonschema::Validator,
}

static VALIDATORS: LazyLock<Validators> = LazyLock::new(|| {
    let compile = |schema: schemars::Schema| {
        let mut value = serde_json::to_value(schema).expect("schema serializes");
        // `kind` is the enum tag, not a field of the per-kind structs.
        if let Some(props) = value.get_mut("properties").and_then(|p| p.as_object_mut()) {
            props.insert("kind".into(), serde_json::json!({"type": "string"}));
        }
        jsonschema::validator_for(&value).expect("generated schema compiles")
    };
    Validators {
        group: compile(schema_for!(FeatureGroupDoc)),
        ingestion: compile(schema_for!(IngestionDoc)),
    }
});

/// Load and validate every `*.yaml` / `*.yml` below `dir` (recursively). Plugin paths resolve
/// against `plugin_dir`; batch sources may read below `dir` and from any S3 bucket.
pub fn load_dir(dir: &Path, plugin_dir: &Path) -> Result<SpecSet, SpecErrors> {
    load_dir_in(dir, plugin_dir, &SpecScope::spec_dir(dir))
}

/// [`load_dir`] with batch sources limited to `scope`.
pub fn load_dir_in(
    dir: &Path,
    plugin_dir: &Path,
    scope: &SpecScope,
) -> Result<SpecSet, SpecErrors> {
    load_files(&spec_files(dir)?, plugin_dir, scope)
}

/// The spec files below `dir`, sorted.
pub fn spec_files(dir: &Path) -> Result<Vec<PathBuf>, SpecErrors> {
    let mut files = Vec::new();
    if let Err(e) = collect_yaml(dir, &mut files, &mut BTreeSet::new()) {
        return Err(SpecErrors(vec![SpecError {
            file: dir.display().to_string(),
            field: String::new(),
            message: format!("cannot read spec directory: {e}"),
        }]));
    }
    files.sort();
    Ok(files)
}

/// Load what can be loaded: files with problems are set aside, with their errors, and the
/// others load as a set. Hot reload uses this so that one team's broken spec does not hold
/// back another team's update.
pub fn load_dir_tolerant(
    dir: &Path,
    plugin_dir: &Path,
    scope: &SpecScope,
) -> (SpecSet, Vec<SpecError>) {
    let mut files = match spec_files(dir) {
        Ok(f) => f,
        Err(e) => return (SpecSet::default(), e.0),
    };
    let mut set_aside = Vec::new();
    // Removing a file can surface another's problem (a reference to a group it defined):
    // a few rounds settle it.
    for _ in 0..4 {
        match load_files(&files, plugin_dir, scope) {
            Ok(set) => return (set, set_aside),
            Err(errors) => {
                let bad: BTreeSet<String> = errors
                    .0
                    .iter()
                    .map(|e| e.file.split('#').next().unwrap_or_default().to_owned())
                    .collect();
                files.retain(|f| !bad.contains(&f.display().to_string()));
                set_aside.extend(errors.0);
            }
        }
    }
    (SpecSet::default(), set_aside)
}

/// The `*.yaml` / `*.yml` files below `dir`. Entries whose name starts with `.` are not
/// walked: kubelet mounts a ConfigMap as a hidden `..<timestamp>/` directory holding the files,
/// `..data` pointing at it, and each visible file a symlink `x.yaml -> ..data/x.yaml` — walking
/// the hidden entries loads every spec three times (each a duplicate of itself); editors'
/// backup and swap files are hidden too. Symlinks are followed (the visible files are
/// symlinks), and each directory is walked once by its canonical path, so a link to a parent
/// does not loop.
fn collect_yaml(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    walked: &mut BTreeSet<PathBuf>,
) -> std::io::Result<()> {
    if !walked.insert(std::fs::canonicalize(dir)?) {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            collect_yaml(&path, out, walked)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

/// Load and validate the given files as one set.
pub fn load_files(
    files: &[PathBuf],
    plugin_dir: &Path,
    scope: &SpecScope,
) -> Result<SpecSet, SpecErrors> {
    let mut errors = Vec::new();
    let mut texts = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => texts.push((file.clone(), text)),
            Err(e) => errors.push(SpecError {
                file: file.display().to_string(),
                field: String::new(),
                message: format!("cannot read file: {e}"),
            }),
        }
    }
    validate(&texts, plugin_dir, scope, errors)
}

/// [`load_files`] of files already read: `(path, text)` (the fuzz target's entry).
pub fn load_texts(
    texts: &[(PathBuf, String)],
    plugin_dir: &Path,
    scope: &SpecScope,
) -> Result<SpecSet, SpecErrors> {
    validate(texts, plugin_dir, scope, Vec::new())
}

fn validate(
    texts: &[(PathBuf, String)],
    plugin_dir: &Path,
    scope: &SpecScope,
    mut errors: Vec<SpecError>,
) -> Result<SpecSet, SpecErrors> {
    let mut docs = Vec::new();
    for (file, text) in texts {
        parse_file(file, text, &mut docs, &mut errors);
    }
    let set = check_semantics(docs, plugin_dir, scope, &mut errors);
    // Group each file's problems together (stable: structural before semantic).
    errors.sort_by(|a, b| a.file.cmp(&b.file));
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(SpecErrors(errors))
    }
}

struct ParsedDoc {
    file: PathBuf,
    label: String,
    doc: Document,
}

fn parse_file(file: &Path, text: &str, docs: &mut Vec<ParsedDoc>, errors: &mut Vec<SpecError>) {
    let mut raw = Vec::new();
    for (i, de) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = serde_norway::Value::deserialize(de);
        // After a syntax error the document stream cannot resynchronize (and would repeat
        // the error forever): report it once and stop reading this file.
        let stop = value.is_err();
        raw.push((i, value));
        if stop {
            break;
        }
    }
    let many = raw.len() > 1;
    for (i, value) in raw {
        let label = if many {
            format!("{}#{}", file.display(), i + 1)
        } else {
            file.display().to_string()
        };
        let err = |field: &str, message: String| SpecError {
            file: label.clone(),
            field: field.into(),
            message,
        };
        let value = match value {
            Ok(serde_norway::Value::Null) => continue, // empty document (e.g. trailing `---`)
            Ok(v) => v,
            Err(e) => {
                errors.push(err("", format!("not valid YAML: {e}")));
                continue;
            }
        };
        let json = match serde_json::to_value(&value) {
            Ok(j) => j,
            Err(e) => {
                errors.push(err(
                    "",
                    format!("not representable as JSON (non-string keys or tags?): {e}"),
                ));
                continue;
            }
        };
        let api_version = json.get("apiVersion").and_then(|v| v.as_str());
        if api_version != Some(API_VERSION) {
            errors.push(err(
                "apiVersion",
                format!(
                    "unsupported {:?}: expected {API_VERSION:?}",
                    api_version.unwrap_or("")
                ),
            ));
        }
        let validator = match json.get("kind").and_then(|k| k.as_str()) {
            Some("FeatureGroup") => &VALIDATORS.group,
            Some("Ingestion") => &VALIDATORS.ingestion,
            Some(other) => {
                errors.push(err(
                    "kind",
                    format!("unknown kind {other:?}: expected FeatureGroup or Ingestion"),
                ));
                continue;
            }
            None => {
                errors.push(err(
                    "kind",
                    "missing: expected FeatureGroup or Ingestion".into(),
                ));
                continue;
            }
        };
        let before = errors.len();
        for e in validator.iter_errors(&json) {
            errors.push(err(
                &pointer_to_path(e.instance_path().as_str()),
                e.to_string(),
            ));
        }
        if errors.len() > before {
            continue;
        }
        match serde_path_to_error::deserialize::<_, Document>(json) {
            Ok(doc) => docs.push(ParsedDoc {
                file: file.to_path_buf(),
                label,
                doc,
            }),
            Err(e) => errors.push(err(&e.path().to_string(), e.inner().to_string())),
        }
    }
}

/// `/spec/features/1/type` → `spec.features[1].type`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) && !seg.is_empty() {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

/// The longest TTL a spec may give: ten years, far below what Redis refuses (`EXPIREAT`
/// beyond ~292 million years fails the whole cache-only script call it is in) and what a
/// Unix time in `i64` seconds holds.
const MAX_TTL: Duration = Duration::from_secs(3650 * 86_400);

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("invalid duration {s:?} ({e}); use e.g. `30s`, `10m`, `12h`, `30d`"))
}

fn check_semantics(
    docs: Vec<ParsedDoc>,
    plugin_dir: &Path,
    scope: &SpecScope,
    errors: &mut Vec<SpecError>,
) -> SpecSet {
    let mut set = SpecSet {
        sources: scope.clone(),
        ..SpecSet::default()
    };
    let mut seen: BTreeMap<(&'static str, String), String> = BTreeMap::new();
    let mut ingestion_docs = Vec::new();

    for ParsedDoc { file, label, doc } in docs {
        let err = |field: &str, message: String| SpecError {
            file: label.clone(),
            field: field.into(),
            message,
        };
        let (kind, api_version, name) = match &doc {
            Document::FeatureGroup(d) => ("FeatureGroup", &d.api_version, d.metadata.name.clone()),
            Document::Ingestion(d) => ("Ingestion", &d.api_version, d.metadata.name.clone()),
        };
        let mut problems = Vec::new();
        if api_version != API_VERSION {
            // Already reported while parsing; keep the document out of the set.
            continue;
        }
        if let Some(first) = seen.get(&(kind, name.clone())) {
            problems.push(err(
                "metadata.name",
                format!("duplicate {kind} {name:?}: already defined in {first}"),
            ));
        } else {
            seen.insert((kind, name.clone()), label.clone());
        }
        match doc {
            Document::FeatureGroup(d) => {
                let group =
                    check_group(&name, &file, d.spec, plugin_dir, scope, &err, &mut problems);
                if problems.is_empty() {
                    set.groups.insert(name, group);
                }
            }
            Document::Ingestion(d) => {
                if let Some(schedule) = &d.spec.schedule
                    && let Err(e) = schedule.parse::<croner::Cron>()
                {
                    problems.push(err(
                        "spec.schedule",
                        format!("invalid cron expression {schedule:?}: {e}"),
                    ));
                }
                if let Err(e) = Location::parse(&d.spec.source.uri) {
                    problems.push(err("spec.source.uri", format!("{e:#}")));
                } else if let Err(e) = scope.check_uri(&d.spec.source.uri, &file) {
                    problems.push(err("spec.source.uri", e.to_string()));
                }
                ingestion_docs.push((label.clone(), file, name, d.spec, problems.is_empty()));
            }
        }
        errors.extend(problems);
    }

    // A retry or dead-letter topic that is also a source would feed failures back in as new
    // events for every group reading it.
    let sources: BTreeSet<String> = set
        .groups
        .values()
        .flat_map(|g| g.spec.sources.iter().map(|s| s.topic.clone()))
        .collect();
    let mut clashes = Vec::new();
    for g in set.groups.values() {
        for (field, topic) in [
            ("spec.retry.topic", &g.retry_topic),
            ("spec.retry.deadLetterTopic", &g.dead_letter_topic),
        ] {
            if sources.contains(topic) {
                clashes.push((g.name.clone(), SpecError {
                    file: g.file.display().to_string(),
                    field: field.into(),
                    message: format!(
                        "topic {topic:?} is also a source topic; retry and dead-letter topics must be the host's own"
                    ),
                }));
            }
        }
    }
    // Groups sharing a hand-off topic must not disagree on how it is created.
    let mut first: BTreeMap<&str, (&GroupDef, &str)> = BTreeMap::new();
    for g in set.groups.values() {
        for (topic, field) in [
            (g.retry_topic.as_str(), "spec.retry.topic"),
            (g.dead_letter_topic.as_str(), "spec.retry.deadLetterTopic"),
        ] {
            let Some((other, other_field)) = first.get(topic).copied() else {
                first.insert(topic, (g, field));
                continue;
            };
            let (a, b) = (&other.spec.retry, &g.spec.retry);
            for (setting, mine, theirs) in [
                (
                    "partitions",
                    b.partitions.map(u64::from),
                    a.partitions.map(u64::from),
                ),
                (
                    "replicationFactor",
                    b.replication_factor.map(u64::from),
                    a.replication_factor.map(u64::from),
                ),
            ] {
                if let (Some(mine), Some(theirs)) = (mine, theirs)
                    && mine != theirs
                {
                    clashes.push((g.name.clone(), SpecError {
                        file: g.file.display().to_string(),
                        field: format!("spec.retry.{setting}"),
                        message: format!(
                            "{mine}, but group {:?} ({}) hands off through the same topic {topic:?} ({other_field}) with {setting} {theirs}",
                            other.name,
                            other.file.display()
                        ),
                    }));
                }
            }
        }
    }
    for (name, e) in clashes {
        set.groups.remove(&name);
        errors.push(e);
    }

    // Cross-references need every group loaded first.
    let names: BTreeSet<String> = ingestion_docs
        .iter()
        .map(|(_, _, n, _, _)| n.clone())
        .collect();
    let group_names: BTreeSet<String> = seen
        .keys()
        .filter(|(k, _)| *k == "FeatureGroup")
        .map(|(_, n)| n.clone())
        .collect();
    for (label, file, name, spec, ok) in &ingestion_docs {
        let mut ok = *ok;
        let err = |field: &str, message: String| SpecError {
            file: label.clone(),
            field: field.into(),
            message,
        };
        if !group_names.contains(&spec.feature_group) {
            ok = false;
            errors.push(err(
                "spec.featureGroup",
                format!("unknown FeatureGroup {:?}", spec.feature_group),
            ));
        }
        for (i, dep) in spec.depends_on.iter().enumerate() {
            if dep == name {
                ok = false;
                errors.push(err(
                    &format!("spec.dependsOn[{i}]"),
                    "an ingestion cannot depend on itself".into(),
                ));
            } else if !names.contains(dep) {
                ok = false;
                errors.push(err(
                    &format!("spec.dependsOn[{i}]"),
                    format!("unknown Ingestion {dep:?}"),
                ));
            }
        }
        if ok {
            set.ingestions.insert(
                name.clone(),
                IngestionDef {
                    name: name.clone(),
                    file: file.clone(),
                    spec: spec.clone(),
                },
            );
        }
    }
    let edges: BTreeMap<String, (String, Vec<String>)> = ingestion_docs
        .iter()
        .map(|(label, _, n, s, _)| (n.clone(), (label.clone(), s.depends_on.clone())))
        .collect();
    for cycle in find_cycles(&edges) {
        let (label, _) = &edges[&cycle[0]];
        errors.push(SpecError {
            file: label.clone(),
            field: "spec.dependsOn".into(),
            message: format!("dependency cycle: {} -> {}", cycle.join(" -> "), cycle[0]),
        });
        for n in &cycle {
            set.ingestions.remove(n);
        }
    }
    set
}

fn check_group(
    name: &str,
    file: &Path,
    spec: FeatureGroupSpec,
    plugin_dir: &Path,
    scope: &SpecScope,
    err: &dyn Fn(&str, String) -> SpecError,
    problems: &mut Vec<SpecError>,
) -> GroupDef {
    let mut names = BTreeSet::new();
    for (i, f) in spec.features.iter().enumerate() {
        if !names.insert(f.name.as_str()) {
            problems.push(err(
                &format!("spec.features[{i}].name"),
                format!("duplicate feature {:?}", f.name),
            ));
        }
        if f.dim.is_some() && f.ty != FeatureType::Vector {
            problems.push(err(
                &format!("spec.features[{i}].dim"),
                "`dim` is only valid for type `vector`".into(),
            ));
        }
    }
    let mut topics = BTreeSet::new();
    for (i, s) in spec.sources.iter().enumerate() {
        if !topics.insert(s.topic.as_str()) {
            problems.push(err(
                &format!("spec.sources[{i}].topic"),
                format!("topic {:?} listed twice", s.topic),
            ));
        }
        if let Some(f) = &s.filter
            && f.header.is_some() == f.field.is_some()
        {
            problems.push(err(
                &format!("spec.sources[{i}].filter"),
                "give exactly one of `header` and `field`".into(),
            ));
        }
    }
    let mut duration = |field: &str, s: &str| match parse_duration(s) {
        Ok(d) if d.is_zero() => {
            problems.push(err(field, "must be greater than zero".into()));
            Duration::from_secs(1)
        }
        Ok(d) => d,
        Err(m) => {
            problems.push(err(field, m));
            Duration::from_secs(1)
        }
    };
    let store_ttl = spec
        .store
        .ttl
        .as_deref()
        .map(|t| duration("spec.store.ttl", t));
    let cache_ttl = duration("spec.cache.ttl", &spec.cache.ttl);
    let retry_backoff = duration("spec.retry.backoff", &spec.retry.backoff);
    // After the last use of `duration`, which holds `problems`.
    for (field, ttl) in [
        ("spec.store.ttl", store_ttl),
        ("spec.cache.ttl", Some(cache_ttl)),
    ] {
        if ttl.is_some_and(|t| t > MAX_TTL) {
            let or = match field {
                "spec.store.ttl" => ", or leave it out for items that never expire",
                _ => "",
            };
            problems.push(err(
                field,
                format!(
                    "is longer than ten years, the longest TTL this host takes; set at most {}d{or}",
                    MAX_TTL.as_secs() / 86_400
                ),
            ));
        }
    }
    // Only between two valid durations (an invalid one has its own error).
    let valid = |t: &str| parse_duration(t).ok();
    if let (Some(store), Some(cache)) = (
        spec.store.ttl.as_deref().and_then(valid),
        valid(&spec.cache.ttl),
    ) && cache > store
    {
        problems.push(err(
            "spec.cache.ttl",
            format!(
                "{} is longer than spec.store.ttl ({}): a cached entity would outlive the stored one and be served after the store dropped it; set spec.cache.ttl to at most {} (the default is 1h)",
                spec.cache.ttl,
                spec.store.ttl.as_deref().unwrap_or_default(),
                spec.store.ttl.as_deref().unwrap_or_default()
            ),
        ));
    }
    let plugin_path = plugin_dir.join(&spec.plugin.wasm);
    if let Err(e) = relative_inside(&spec.plugin.wasm, "plugin directory") {
        problems.push(err("spec.plugin.wasm", e.to_string()));
    } else if !plugin_path.is_file() {
        problems.push(err(
            "spec.plugin.wasm",
            format!(
                "plugin file {} not found (plugin directory: {})",
                plugin_path.display(),
                plugin_dir.display()
            ),
        ));
    } else if let Some(pinned) = &spec.plugin.sha256 {
        match file_sha256(&plugin_path) {
            Ok(actual) if actual.eq_ignore_ascii_case(pinned) => {}
            Ok(actual) => problems.push(err(
                "spec.plugin.sha256",
                format!(
                    "the spec pins {pinned}, the plugin file's SHA-256 is {actual}; ship the reviewed build, or update the pin"
                ),
            )),
            Err(e) => problems.push(err(
                "spec.plugin.wasm",
                format!("cannot read plugin file {}: {e}", plugin_path.display()),
            )),
        }
    }
    let golden = match &spec.plugin.golden {
        Some(rel) => match relative_inside(rel, "spec file's directory") {
            Err(e) => {
                problems.push(err("spec.plugin.golden", e.to_string()));
                Vec::new()
            }
            Ok(()) => {
                let dir = file
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                let path = dir.join(rel);
                match file_inside(&path, dir) {
                    Err(e) => {
                        problems.push(err("spec.plugin.golden", e.to_string()));
                        Vec::new()
                    }
                    Ok(()) => crate::plugin::golden::load(&path).unwrap_or_else(|m| {
                        problems.push(err("spec.plugin.golden", m));
                        Vec::new()
                    }),
                }
            }
        },
        None => Vec::new(),
    };
    if let Err(e) = scope.check_table(&spec.store.table) {
        problems.push(err("spec.store.table", e.to_string()));
    }
    for (i, s) in spec.sources.iter().enumerate() {
        if let Err(e) = scope.check_topic(&s.topic) {
            problems.push(err(&format!("spec.sources[{i}].topic"), e.to_string()));
        }
    }
    let retry_topic = spec
        .retry
        .topic
        .clone()
        .unwrap_or_else(|| format!("{name}.retry"));
    let dead_letter_topic = spec
        .retry
        .dead_letter_topic
        .clone()
        .unwrap_or_else(|| format!("{name}.dlq"));
    for (field, topic) in [
        ("spec.retry.topic", &retry_topic),
        ("spec.retry.deadLetterTopic", &dead_letter_topic),
    ] {
        if let Err(e) = scope.check_topic(topic) {
            problems.push(err(field, e.to_string()));
        }
    }
    GroupDef {
        golden,
        name: name.to_owned(),
        file: file.to_path_buf(),
        retry_topic,
        dead_letter_topic,
        spec,
        plugin_path,
        store_ttl,
        cache_ttl,
        retry_backoff,
    }
}

/// The SHA-256 of a file, hex, read in pieces.
fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read as _;
    let mut hasher = Sha256::new();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(hex::encode(hasher.finalize())),
            n => hasher.update(&buf[..n]),
        }
    }
}

/// Each elementary cycle once, as the list of its nodes starting from the smallest name.
fn find_cycles(edges: &BTreeMap<String, (String, Vec<String>)>) -> Vec<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        n: &str,
        edges: &BTreeMap<String, (String, Vec<String>)>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut BTreeSet<Vec<String>>,
    ) {
        marks.insert(n.to_owned(), Mark::Active);
        stack.push(n.to_owned());
        for d in edges.get(n).map(|(_, d)| d.as_slice()).unwrap_or_default() {
            match marks.get(d).copied().unwrap_or(Mark::New) {
                Mark::Active => {
                    let start = stack
                        .iter()
                        .position(|s| s == d)
                        .expect("active node is on the stack");
                    let mut cycle = stack[start..].to_vec();
                    let min = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap_or(0);
                    cycle.rotate_left(min);
                    out.insert(cycle);
                }
                Mark::New if edges.contains_key(d) => visit(d, edges, marks, stack, out),
                _ => {}
            }
        }
        stack.pop();
        marks.insert(n.to_owned(), Mark::Done);
    }
    let mut marks = BTreeMap::new();
    let mut out = BTreeSet::new();
    for n in edges.keys() {
        if marks.get(n).copied().unwrap_or(Mark::New) == Mark::New {
            visit(n, edges, &mut marks, &mut Vec::new(), &mut out);
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(files: &[(&str, &str)]) -> Result<SpecSet, SpecErrors> {
        let dir = std::env::temp_dir().join(format!("fh-spec-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.wasm"), b"").unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let out = load_dir(&dir, &dir);
        std::fs::remove_dir_all(&dir).unwrap();
        out
    }

    const GROUP: &str = "apiVersion: feature-host/v1\nkind: FeatureGroup\nmetadata: {name: g}\nspec:\n  entity: user\n  features: [{name: n, type: int}]\n  plugin: {wasm: p.wasm}\n  sources: [{topic: t}]\n";

    /// A specs directory laid out as kubelet mounts a ConfigMap: the files in a timestamped
    /// directory, `..data` pointing at it, and each file a symlink through `..data`.
    fn configmap(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
        let data = dir.join(stamp);
        std::fs::create_dir_all(&data).unwrap();
        for (name, text) in files {
            std::fs::write(data.join(name), text).unwrap();
        }
        // The atomic swap: a new link, renamed over `..data`.
        let tmp = dir.join("..data_tmp");
        std::os::unix::fs::symlink(stamp, &tmp).unwrap();
        std::fs::rename(&tmp, dir.join("..data")).unwrap();
        for (name, _) in files {
            let link = dir.join(name);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(name), link).unwrap();
            }
        }
    }

    #[test]
    fn a_configmap_mount_loads_each_spec_once_and_follows_the_swap() {
        let dir = std::env::temp_dir().join(format!("fh-spec-cm-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.wasm"), b"").unwrap();
        configmap(
            &dir,
            "..2026_12_01_10_00_00.000000001",
            &[("g.yaml", GROUP)],
        );
        let set = load_dir(&dir, &dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.groups.len(), 1);
        assert_eq!(set.groups["g"].spec.features[0].name, "n");

        // kubelet updates the ConfigMap: a new directory, `..data` swapped, the old one gone.
        let renamed = GROUP.replace("name: n,", "name: m,");
        configmap(
            &dir,
            "..2026_12_01_10_05_00.000000002",
            &[("g.yaml", &renamed)],
        );
        std::fs::remove_dir_all(dir.join("..2026_12_01_10_00_00.000000001")).unwrap();
        let set = load_dir(&dir, &dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.groups["g"].spec.features[0].name, "m");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_loop_and_hidden_files_are_not_walked() {
        let dir = std::env::temp_dir().join(format!("fh-spec-loop-{}", rand::random::<u64>()));
        std::fs::create_dir_all(dir.join("team")).unwrap();
        std::fs::write(dir.join("p.wasm"), b"").unwrap();
        std::fs::write(dir.join("team/g.yaml"), GROUP).unwrap();
        std::os::unix::fs::symlink("..", dir.join("team/up")).unwrap();
        std::fs::write(dir.join("team/.g.yaml.swp"), "not yaml").unwrap();
        std::fs::write(dir.join(".hidden.yaml"), "not: [a spec").unwrap();
        let set = load_dir(&dir, &dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(set.groups.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn valid_group_gets_defaults() {
        let set = load_str(&[("g.yaml", GROUP)]).unwrap();
        let g = &set.groups["g"];
        assert_eq!(g.spec.cache.strategy, CacheStrategy::WriteThrough);
        assert_eq!(g.spec.ordering, Ordering::Key);
        assert_eq!(g.cache_ttl, Duration::from_secs(3600));
        assert_eq!(g.dead_letter_topic, "g.dlq");
        assert_eq!(g.retry_topic, "g.retry");
        assert_eq!(g.spec.plugin.limits.memory_mb, 64);
        assert_eq!(
            set.topics().into_iter().collect::<Vec<_>>(),
            vec!["t".to_string()]
        );
    }

    #[test]
    fn retry_topic_must_not_be_a_source() {
        let other = GROUP
            .replace("name: g}", "name: h}")
            .replace("topic: t}", "topic: g.retry}");
        let errs = load_str(&[("g.yaml", GROUP), ("h.yaml", &other)])
            .unwrap_err()
            .0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].file.ends_with("g.yaml"));
        assert_eq!(errs[0].field, "spec.retry.topic");
        assert!(errs[0].message.contains("also a source topic"));
    }

    #[test]
    fn groups_sharing_a_hand_off_topic_must_agree_on_its_shape() {
        let with = |name: &str, retry: &str| {
            GROUP.replace("name: g}", &format!("name: {name}}}"))
                + &format!("  retry: {{topic: shared.retry, {retry}}}\n")
        };
        let set = load_str(&[
            ("a.yaml", &with("a", "partitions: 6")),
            ("b.yaml", &with("b", "replicationFactor: 3")),
        ])
        .unwrap();
        assert_eq!(set.groups.len(), 2, "different settings do not conflict");
        let errs = load_str(&[
            ("a.yaml", &with("a", "partitions: 6")),
            ("b.yaml", &with("b", "partitions: 12")),
        ])
        .unwrap_err()
        .0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].file.ends_with("b.yaml"), "{errs:?}");
        assert_eq!(errs[0].field, "spec.retry.partitions");
        assert!(
            errs[0].message.contains("\"a\"") && errs[0].message.contains("shared.retry"),
            "{}",
            errs[0].message
        );
        let errs = load_str(&[("a.yaml", &with("a", "replicationFactor: 0"))])
            .unwrap_err()
            .0;
        assert!(
            errs[0].field.contains("replicationFactor"),
            "out of range: {errs:?}"
        );
    }

    /// Redis refuses an expiry beyond ~292 million years (`EXPIREAT`: "invalid expire
    /// time"), and a cache-only batch's one script call stops at its first refusal: every
    /// entity after it would be retried forever. A TTL no store takes is the spec's error.
    #[test]
    fn ttls_are_bounded() {
        let with = |store: &str, cache: &str| {
            GROUP.to_owned()
                + &format!("  store: {{table: feats, ttl: {store}}}\n  cache: {{ttl: {cache}}}\n")
        };
        assert!(load_str(&[("g.yaml", &with("3650d", "3650d"))]).is_ok());
        let errs = load_str(&[("g.yaml", &with("300000000y", "300000000y"))])
            .unwrap_err()
            .0;
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["spec.store.ttl", "spec.cache.ttl"], "{errs:?}");
        assert!(
            errs[0].message.contains("at most 3650d"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn the_cache_may_not_outlive_the_store() {
        let with = |store: &str, cache: &str| {
            GROUP.to_owned()
                + &format!("  store: {{table: feats, ttl: {store}}}\n  cache: {{ttl: {cache}}}\n")
        };
        assert!(load_str(&[("g.yaml", &with("1d", "10m"))]).is_ok());
        assert!(load_str(&[("g.yaml", &with("10m", "10m"))]).is_ok());
        let errs = load_str(&[("g.yaml", &with("10m", "1h"))]).unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.cache.ttl");
        assert!(
            errs[0].message.contains("at most 10m"),
            "{}",
            errs[0].message
        );
    }

    #[test]
    fn every_error_names_file_and_field() {
        let bad = GROUP
            .replace("type: int", "type: integer")
            .replace("entity: user", "entity: user\n  extra: 1");
        let errs = load_str(&[("bad.yaml", &bad)]).unwrap_err().0;
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().all(|e| e.file.ends_with("bad.yaml")));
        assert!(
            errs.iter()
                .any(|e| e.field == "spec.features[0].type" && e.message.contains("integer"))
        );
        assert!(
            errs.iter()
                .any(|e| e.field == "spec" && e.message.contains("extra"))
        );
    }

    #[test]
    fn parallelism_accepts_auto_or_number_only() {
        let ing = |p: &str| {
            format!(
                "apiVersion: feature-host/v1\nkind: Ingestion\nmetadata: {{name: i}}\nspec:\n  featureGroup: g\n  source: {{uri: x.csv, format: csv}}\n  parallelism: {p}\n"
            )
        };
        let set = load_str(&[("g.yaml", GROUP), ("i.yaml", &ing("auto"))]).unwrap();
        assert_eq!(set.ingestions["i"].spec.parallelism, Parallelism::Auto);
        let set = load_str(&[("g.yaml", GROUP), ("i.yaml", &ing("12"))]).unwrap();
        assert_eq!(
            set.ingestions["i"].spec.parallelism,
            Parallelism::Shards(12)
        );
        let errs = load_str(&[("g.yaml", GROUP), ("i.yaml", &ing("lots"))])
            .unwrap_err()
            .0;
        assert!(
            errs.iter().any(|e| e.field.starts_with("spec.parallelism")),
            "{errs:?}"
        );
    }

    #[test]
    fn published_schema_has_both_kinds() {
        let s = json_schema().to_string();
        assert!(
            s.contains("FeatureGroup")
                && s.contains("Ingestion")
                && s.contains("additionalProperties")
        );
    }

    #[test]
    fn pointer_paths_read_like_fields() {
        assert_eq!(
            pointer_to_path("/spec/features/1/type"),
            "spec.features[1].type"
        );
        assert_eq!(pointer_to_path(""), "");
        assert_eq!(
            pointer_to_path("/metadata/labels/a~1b"),
            "metadata.labels.a/b"
        );
    }

    #[test]
    fn cycles_are_found_once() {
        let e = |deps: &[&str]| {
            (
                String::new(),
                deps.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let edges = BTreeMap::from([
            ("a".to_string(), e(&["b"])),
            ("b".to_string(), e(&["c"])),
            ("c".to_string(), e(&["a"])),
            ("d".to_string(), e(&["a"])),
        ]);
        assert_eq!(
            find_cycles(&edges),
            vec![vec!["a".to_string(), "b".into(), "c".into()]]
        );
        let acyclic = BTreeMap::from([("a".to_string(), e(&["b"])), ("b".to_string(), e(&[]))]);
        assert!(find_cycles(&acyclic).is_empty());
    }
}
