//! What a spec may name: the operator's allow-lists for batch sources, tables and topics,
//! and the directories plugin and golden files are taken from.
//!
//! A spec author chooses a source URI; on a shared host that author is not the operator, and
//! the host's process can read much that the author must not: `/proc/self/environ` (the admin
//! token), the service account's web-identity token, another team's exports in a bucket the
//! host's role can read. So a local source must lie under one of the configured roots (by
//! default the spec directory) and an S3 source under one of the configured `s3://bucket/prefix`
//! entries (by default any: the host's IAM role is then the only bound).
//!
//! Checked twice. At validation, [`SpecScope::check_uri`] refuses a spec whose URI can only
//! reach outside (file, field and reason, like every spec error). At read time,
//! [`SpecScope::check_file`] and [`SpecScope::check_s3`] check every file a run lists or
//! reads, after symlinks are resolved: a glob or a link inside a root cannot lead out of it.
//!
//! Tables and topics: with `FH_TABLE_PREFIXES` / `FH_TOPIC_PREFIXES`, a group's store table
//! and every topic it reads or hands off through must start with one of the prefixes, the
//! same plain prefixes an IAM policy (`table/team-a-*`) or a Kafka PREFIXED ACL grants, so a
//! spec cannot write into another team's table or read its topics through the host's
//! credentials. Plugin and golden files are named relative to the plugin directory and the
//! spec's directory, without `..` ([`relative_inside`]).

use std::path::{Component, Path, PathBuf};

/// A parsed source URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Local(PathBuf),
    S3 { bucket: String, key: String },
}

impl Location {
    pub fn parse(uri: &str) -> anyhow::Result<Location> {
        if let Some(rest) = uri.strip_prefix("s3://") {
            let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
            anyhow::ensure!(!bucket.is_empty(), "source URI {uri:?} names no S3 bucket");
            Ok(Location::S3 {
                bucket: bucket.into(),
                key: key.into(),
            })
        } else if uri.contains("://") {
            anyhow::bail!("source URI {uri:?}: only local paths and s3:// URIs are supported")
        } else {
            Ok(Location::Local(PathBuf::from(uri)))
        }
    }
}

/// Why a source is out of scope.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("{0:?} has a `..` component; name the path without it")]
    Parent(String),
    #[error(
        "{path} is outside the directories batch sources may read ({roots}); \
         the operator sets them with FH_SOURCE_ROOTS"
    )]
    OutsideRoots { path: String, roots: String },
    #[error(
        "s3://{bucket}/{key} is outside the S3 prefixes batch sources may read ({allowed}); \
         the operator sets them with FH_SOURCE_S3"
    )]
    OutsidePrefixes {
        bucket: String,
        key: String,
        allowed: String,
    },
    #[error("cannot resolve {path}: {reason}")]
    Unresolvable { path: String, reason: String },
    #[error("{path:?} is absolute; name the file relative to the {base}")]
    Absolute { path: String, base: &'static str },
    #[error("{path} is not a regular file")]
    NotAFile { path: String },
    #[error(
        "{path} resolves to {resolved}, outside {dir}: the file must lie in the spec file's \
         directory (a link may point only within it)"
    )]
    OutsideDir {
        path: String,
        resolved: String,
        dir: String,
    },
    #[error(
        "{name:?} does not start with one of the {kind} prefixes this host allows ({allowed}); \
         the operator sets them with {setting}"
    )]
    Prefix {
        kind: &'static str,
        name: String,
        allowed: String,
        setting: &'static str,
    },
}

/// `path` as a spec names a file inside `base` (what the path is relative to, for the
/// message): relative, without `..`. Lexical: for the plugin directory, whose contents are
/// the operator's (the plugin sync from S3, which makes no links), a link inside it is
/// theirs to make. Files in the spec directory are also checked with [`file_inside`].
pub fn relative_inside(path: &str, base: &'static str) -> Result<(), ScopeError> {
    let p = Path::new(path);
    if p.has_root() || p.is_absolute() {
        return Err(ScopeError::Absolute {
            path: path.to_owned(),
            base,
        });
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(ScopeError::Parent(path.to_owned()));
    }
    Ok(())
}

/// `path`, a file a spec names in its own directory `dir` (after [`relative_inside`]), is a
/// regular file that resolves inside `dir`. For files beside the spec (golden events): spec
/// directories are often synced from the spec authors' repository, where anyone can commit
/// a link to `/dev/zero` or to another team's files. `Ok` for a path that does not exist
/// (reading it then says so).
pub fn file_inside(path: &Path, dir: &Path) -> Result<(), ScopeError> {
    let shown = || path.display().to_string();
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    if !meta.is_file() {
        return Err(ScopeError::NotAFile { path: shown() });
    }
    let unresolvable = |e: std::io::Error| ScopeError::Unresolvable {
        path: shown(),
        reason: e.to_string(),
    };
    let resolved = path.canonicalize().map_err(unresolvable)?;
    let dir = dir.canonicalize().map_err(unresolvable)?;
    if !resolved.starts_with(&dir) {
        return Err(ScopeError::OutsideDir {
            path: shown(),
            resolved: resolved.display().to_string(),
            dir: dir.display().to_string(),
        });
    }
    Ok(())
}

/// The operator's allow-lists. The default allows no local path and any S3 object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecScope {
    /// Canonical directories.
    roots: Vec<PathBuf>,
    /// `(bucket, key prefix)`; `None`: any bucket.
    s3: Option<Vec<(String, String)>>,
    /// Prefixes store tables must start with; `None`: any table.
    tables: Option<Vec<String>>,
    /// Prefixes topics must start with; `None`: any topic.
    topics: Option<Vec<String>>,
}

impl SpecScope {
    /// `roots`: directories local sources may lie under (canonicalized here; one that does
    /// not exist is an error, since a typo would otherwise refuse every source). `s3`:
    /// `s3://bucket/prefix` entries, `None` for any. A prefix is a key directory: `team-a`
    /// allows `team-a/…`, not `team-ab/…`.
    pub fn new(roots: &[PathBuf], s3: Option<&[String]>) -> anyhow::Result<SpecScope> {
        let roots = roots
            .iter()
            .map(|r| {
                std::fs::canonicalize(r).map_err(|e| {
                    anyhow::anyhow!(
                        "source root {} cannot be resolved: {e}; FH_SOURCE_ROOTS lists existing directories",
                        r.display()
                    )
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let s3 = match s3 {
            None => None,
            Some(entries) => Some(
                entries
                    .iter()
                    .map(|e| parse_prefix(e))
                    .collect::<anyhow::Result<Vec<_>>>()?,
            ),
        };
        Ok(SpecScope {
            roots,
            s3,
            tables: None,
            topics: None,
        })
    }

    /// This scope, with store tables and topics restricted to names starting with one of
    /// `tables` / `topics` (`None`: any). An empty prefix is refused: it would allow all
    /// while reading as a restriction.
    pub fn with_prefixes(
        mut self,
        tables: Option<&[String]>,
        topics: Option<&[String]>,
    ) -> anyhow::Result<SpecScope> {
        let check = |list: Option<&[String]>, setting: &str| -> anyhow::Result<_> {
            list.map(|l| {
                l.iter()
                    .map(|p| {
                        let p = p.trim();
                        anyhow::ensure!(
                            !p.is_empty(),
                            "{setting} has an empty entry; list the prefixes, or unset it to allow any name"
                        );
                        Ok(p.to_owned())
                    })
                    .collect()
            })
            .transpose()
        };
        self.tables = check(tables, "FH_TABLE_PREFIXES")?;
        self.topics = check(topics, "FH_TOPIC_PREFIXES")?;
        Ok(self)
    }

    /// Whether a group may use store table `name`.
    pub fn check_table(&self, name: &str) -> Result<(), ScopeError> {
        check_prefix(self.tables.as_deref(), name, "table", "FH_TABLE_PREFIXES")
    }

    /// Whether a group may read or hand off through topic `name`.
    pub fn check_topic(&self, name: &str) -> Result<(), ScopeError> {
        check_prefix(self.topics.as_deref(), name, "topic", "FH_TOPIC_PREFIXES")
    }

    /// The default: local sources under the spec directory, S3 anywhere.
    pub fn spec_dir(dir: &Path) -> SpecScope {
        SpecScope {
            roots: std::fs::canonicalize(dir).into_iter().collect(),
            ..SpecScope::default()
        }
    }

    /// Whether `uri` (of a spec in `spec_file`; a relative local path is relative to that
    /// file's directory) can reach inside the scope. Checks the part before the first glob
    /// character or `{date}`: the rest is checked per file at read time.
    pub fn check_uri(&self, uri: &str, spec_file: &Path) -> Result<(), ScopeError> {
        match Location::parse(uri) {
            Ok(Location::Local(path)) => {
                // The URI as written: the spec directory itself may be named with `..`.
                if path.components().any(|c| c == Component::ParentDir) {
                    return Err(ScopeError::Parent(uri.to_owned()));
                }
                let path = match spec_file.parent() {
                    Some(dir) if path.is_relative() => dir.join(path),
                    _ => path,
                };
                let text = path.to_string_lossy();
                let literal = &text[..glob_start(&text)];
                // Up to the last separator: the directory every match lies in. Without a glob
                // the whole path.
                let dir = if literal.len() == text.len() {
                    literal
                } else {
                    &literal[..literal.rfind('/').map_or(0, |i| i + 1)]
                };
                let dir = if dir.is_empty() { "." } else { dir };
                self.check_local(&resolve_existing(Path::new(dir))?, uri)
            }
            Ok(Location::S3 { bucket, key }) => {
                let literal = &key[..glob_start(&key)];
                self.check_s3(&bucket, literal)
            }
            // Reported by the caller as a malformed URI.
            Err(_) => Ok(()),
        }
    }

    /// A local file a run lists or reads: its canonical path (symlinks resolved) must lie
    /// under a root. Returns that path.
    pub fn check_file(&self, path: &Path) -> Result<PathBuf, ScopeError> {
        let real = std::fs::canonicalize(path).map_err(|e| ScopeError::Unresolvable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        self.check_local(&real, &path.display().to_string())?;
        Ok(real)
    }

    /// Open a local file a run reads, then check where the opened file really is (the path
    /// the kernel gives its descriptor): a link swapped between a check and an open cannot
    /// lead out of the roots, since what is checked is what was opened.
    pub fn open(&self, path: &Path) -> Result<std::fs::File, ScopeError> {
        let unresolvable = |e: std::io::Error| ScopeError::Unresolvable {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let file = std::fs::File::open(path).map_err(unresolvable)?;
        let real = match opened_path(&file) {
            Some(p) => p,
            None => std::fs::canonicalize(path).map_err(unresolvable)?,
        };
        self.check_local(&real, &path.display().to_string())?;
        if !file.metadata().map_err(unresolvable)?.is_file() {
            return Err(ScopeError::Unresolvable {
                path: path.display().to_string(),
                reason: "not a regular file".into(),
            });
        }
        Ok(file)
    }

    /// An S3 object (or the literal prefix of a pattern).
    pub fn check_s3(&self, bucket: &str, key: &str) -> Result<(), ScopeError> {
        if key.split('/').any(|s| s == "..") {
            return Err(ScopeError::Parent(format!("s3://{bucket}/{key}")));
        }
        let Some(allowed) = &self.s3 else {
            return Ok(());
        };
        if allowed
            .iter()
            .any(|(b, prefix)| b == bucket && key.starts_with(prefix.as_str()))
        {
            return Ok(());
        }
        Err(ScopeError::OutsidePrefixes {
            bucket: bucket.to_owned(),
            key: key.to_owned(),
            allowed: if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed
                    .iter()
                    .map(|(b, p)| format!("s3://{b}/{p}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    fn check_local(&self, real: &Path, shown: &str) -> Result<(), ScopeError> {
        if self.roots.iter().any(|r| real.starts_with(r)) {
            return Ok(());
        }
        Err(ScopeError::OutsideRoots {
            path: if real.as_os_str() == shown {
                shown.to_owned()
            } else {
                format!("{shown} (resolved: {})", real.display())
            },
            roots: if self.roots.is_empty() {
                "none".to_owned()
            } else {
                self.roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }
}

fn check_prefix(
    allowed: Option<&[String]>,
    name: &str,
    kind: &'static str,
    setting: &'static str,
) -> Result<(), ScopeError> {
    match allowed {
        Some(list) if !list.iter().any(|p| name.starts_with(p.as_str())) => {
            Err(ScopeError::Prefix {
                kind,
                name: name.to_owned(),
                allowed: if list.is_empty() {
                    "none".into()
                } else {
                    list.join(", ")
                },
                setting,
            })
        }
        _ => Ok(()),
    }
}

/// Where a source pattern's first glob character (or `{date}` placeholder) is: the part
/// before it is literal. The pattern's length without one.
pub fn glob_start(pattern: &str) -> usize {
    pattern.find(['*', '?', '[', '{']).unwrap_or(pattern.len())
}

/// Where an open file really is, from `/proc/self/fd` (Linux); `None` elsewhere.
fn opened_path(file: &std::fs::File) -> Option<PathBuf> {
    use std::os::fd::AsRawFd as _;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
}

/// `s3://bucket/prefix` as `(bucket, prefix)`, the prefix ending in `/` unless empty.
fn parse_prefix(entry: &str) -> anyhow::Result<(String, String)> {
    let Ok(Location::S3 { bucket, key }) = Location::parse(entry.trim()) else {
        anyhow::bail!("FH_SOURCE_S3 entry {entry:?} is not an s3://bucket/prefix URI");
    };
    anyhow::ensure!(
        !key.contains(['*', '?', '[', '{']) && !key.split('/').any(|s| s == ".."),
        "FH_SOURCE_S3 entry {entry:?}: a prefix has no globs and no `..`"
    );
    let prefix = match key.trim_end_matches('/') {
        "" => String::new(),
        p => format!("{p}/"),
    };
    Ok((bucket, prefix))
}

/// `path` with symlinks resolved as far as it exists (a source directory may not exist yet:
/// a day's exports arrive later); the missing rest is appended as written.
fn resolve_existing(path: &Path) -> Result<PathBuf, ScopeError> {
    let mut missing = Vec::new();
    let mut existing = path;
    loop {
        match std::fs::canonicalize(existing) {
            Ok(real) => {
                return Ok(missing.iter().rev().fold(real, |p, c| p.join(c)));
            }
            Err(e) => match (existing.parent(), existing.file_name()) {
                (Some(parent), Some(name)) => {
                    missing.push(name.to_owned());
                    existing = if parent.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        parent
                    };
                }
                _ => {
                    return Err(ScopeError::Unresolvable {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    });
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory removed when dropped.
    struct Tmp(PathBuf);

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dirs() -> (Tmp, PathBuf, PathBuf) {
        let tmp = Tmp(std::env::temp_dir().join(format!("fh-scope-{}", rand::random::<u64>())));
        let specs = tmp.0.join("specs");
        let data = specs.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("a.csv"), "x\n1\n").unwrap();
        (tmp, specs.clone(), specs.join("team.yaml"))
    }

    #[test]
    fn uris_parse() {
        assert_eq!(
            Location::parse("s3://b/k/x.parquet").unwrap(),
            Location::S3 {
                bucket: "b".into(),
                key: "k/x.parquet".into()
            }
        );
        assert_eq!(
            Location::parse("data/x.csv").unwrap(),
            Location::Local("data/x.csv".into())
        );
        assert!(Location::parse("s3:///k").is_err());
        assert!(Location::parse("https://example.com/x").is_err());
    }

    #[test]
    fn the_default_scope_is_the_spec_directory() {
        let (_tmp, specs, file) = dirs();
        let scope = SpecScope::spec_dir(&specs);
        for ok in [
            "data/a.csv",
            "data/*.csv",
            "data/dt={date}/*.csv",
            "later/x.csv",
        ] {
            assert_eq!(scope.check_uri(ok, &file), Ok(()), "{ok}");
        }
        let absolute = specs.join("data/**/*.csv");
        assert_eq!(scope.check_uri(&absolute.to_string_lossy(), &file), Ok(()));
        for bad in [
            "/proc/self/environ",
            "/var/run/secrets/eks.amazonaws.com/serviceaccount/token",
            "/etc/*",
        ] {
            let e = scope.check_uri(bad, &file).unwrap_err();
            assert!(matches!(e, ScopeError::OutsideRoots { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("FH_SOURCE_ROOTS"), "{e}");
        }
        assert_eq!(
            scope.check_uri("data/../../x.csv", &file),
            Err(ScopeError::Parent("data/../../x.csv".into()))
        );
    }

    #[test]
    fn a_symlink_out_of_a_root_is_refused_at_validation_and_per_file() {
        let (_tmp, specs, file) = dirs();
        std::os::unix::fs::symlink("/proc/self", specs.join("data/proc")).unwrap();
        let scope = SpecScope::spec_dir(&specs);
        let e = scope.check_uri("data/proc/environ", &file).unwrap_err();
        assert!(e.to_string().contains("resolved: /proc/"), "{e}");
        // A glob inside the root that would match through the link: refused per file.
        assert_eq!(scope.check_uri("data/*/environ", &file), Ok(()));
        let e = scope
            .check_file(&specs.join("data/proc/environ"))
            .unwrap_err();
        assert!(matches!(e, ScopeError::OutsideRoots { .. }), "{e}");
        assert!(scope.check_file(&specs.join("data/a.csv")).is_ok());
        assert!(scope.open(&specs.join("data/a.csv")).is_ok());
        let e = scope.open(&specs.join("data/proc/environ")).unwrap_err();
        assert!(matches!(e, ScopeError::OutsideRoots { .. }), "{e}");
        let e = scope.open(&specs.join("data")).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    /// A spec directory named with `..` (`validate ../specs`) is not a `..` in the URI.
    #[test]
    fn only_the_uri_as_written_may_not_climb() {
        let (_tmp, specs, _) = dirs();
        let scope = SpecScope::spec_dir(&specs);
        let file = specs.join("data/../team.yaml");
        assert_eq!(scope.check_uri("data/a.csv", &file), Ok(()));
    }

    #[test]
    fn s3_sources_stay_under_their_prefixes() {
        let (_tmp, specs, file) = dirs();
        let any = SpecScope::spec_dir(&specs);
        assert_eq!(any.check_uri("s3://other/secret.parquet", &file), Ok(()));
        let scope = SpecScope::new(
            std::slice::from_ref(&specs),
            Some(&["s3://exports/team-a".into(), "s3://shared/".into()]),
        )
        .unwrap();
        for ok in [
            "s3://exports/team-a/dt={date}/*.parquet",
            "s3://exports/team-a/x.csv",
            "s3://shared/anything/*",
        ] {
            assert_eq!(scope.check_uri(ok, &file), Ok(()), "{ok}");
        }
        for bad in [
            "s3://exports/team-ab/x.csv",
            "s3://exports/*",
            "s3://exports/team-a/../team-b/x.csv",
            "s3://other/team-a/x.csv",
        ] {
            assert!(scope.check_uri(bad, &file).is_err(), "{bad}");
        }
        let none = SpecScope::new(&[], Some(&[])).unwrap();
        let e = none.check_s3("b", "k").unwrap_err();
        assert!(e.to_string().contains("(none)"), "{e}");
    }

    #[test]
    fn bad_allow_lists_are_refused() {
        assert!(SpecScope::new(&["/no/such/dir".into()], None).is_err());
        for bad in ["exports/x", "s3://b/x/*", "s3://b/../x"] {
            assert!(SpecScope::new(&[], Some(&[bad.into()])).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_must_carry_an_allowed_prefix() {
        let any = SpecScope::default();
        assert!(any.check_table("anything").is_ok());
        assert!(any.check_topic("anything").is_ok());
        let scope = SpecScope::default()
            .with_prefixes(
                Some(&["team-a-".into(), " shared-".into()]),
                Some(&["team-a.".into()]),
            )
            .unwrap();
        assert!(scope.check_table("team-a-features").is_ok());
        assert!(
            scope.check_table("shared-features").is_ok(),
            "entries are trimmed"
        );
        assert!(scope.check_topic("team-a.clicks").is_ok());
        let e = scope.check_table("team-ab").unwrap_err().to_string();
        assert_eq!(
            e,
            "\"team-ab\" does not start with one of the table prefixes this host allows \
             (team-a-, shared-); the operator sets them with FH_TABLE_PREFIXES"
        );
        assert!(
            scope.check_topic("team-a").is_err(),
            "the prefix itself is not a match"
        );
        let none = SpecScope::default().with_prefixes(Some(&[]), None).unwrap();
        assert!(
            none.check_table("x")
                .unwrap_err()
                .to_string()
                .contains("prefixes this host allows (none)")
        );
        assert!(
            SpecScope::default()
                .with_prefixes(None, Some(&["".into()]))
                .is_err(),
            "an empty prefix would allow every name"
        );
    }

    #[test]
    fn files_a_spec_names_stay_inside_their_directory() {
        for ok in ["user_activity.wasm", "team-a/v2/x.wasm", "./x.wasm"] {
            assert!(relative_inside(ok, "plugin directory").is_ok(), "{ok}");
        }
        assert_eq!(
            relative_inside("/etc/x.wasm", "plugin directory")
                .unwrap_err()
                .to_string(),
            "\"/etc/x.wasm\" is absolute; name the file relative to the plugin directory"
        );
        for up in ["../x.wasm", "a/../../x.wasm", "a/.."] {
            assert!(
                matches!(
                    relative_inside(up, "plugin directory"),
                    Err(ScopeError::Parent(_))
                ),
                "{up}"
            );
        }
    }
}
