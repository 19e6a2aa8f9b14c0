//! Bulk sources: local paths and `s3://` URIs with globs (`*`, `**`, `?`, `[..]`) and a
//! `{date}` placeholder filled per day (`dt={date}` partitions). Listing turns a run's URIs
//! into files; reading fetches a file's bytes (or a byte range, for Parquet footers). Every
//! file listed or read is checked against the specs' [`SpecScope`] first.

pub use crate::spec::scope::Location;
use crate::spec::scope::SpecScope;
use anyhow::Context as _;
use chrono::NaiveDate;
use globset::{GlobBuilder, GlobMatcher};
use std::path::{Path, PathBuf};

/// One file of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    pub uri: String,
    pub size: u64,
}

/// The URIs a run reads: `{date}` replaced by each day of `[from, to]` (ISO dates,
/// inclusive). A URI without the placeholder is taken as is; one with it needs a range.
pub fn expand_dates(
    uri: &str,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> anyhow::Result<Vec<String>> {
    if !uri.contains("{date}") {
        return Ok(vec![uri.to_owned()]);
    }
    let (Some(from), Some(to)) = (from, to.or(from)) else {
        anyhow::bail!(
            "source URI {uri:?} has a {{date}} placeholder: give a date range (--from/--to) \
             or run it on a schedule"
        );
    };
    anyhow::ensure!(from <= to, "date range is empty: {from} is after {to}");
    anyhow::ensure!(
        (to - from).num_days() < 3660,
        "date range {from}..{to} spans more than 10 years; split the backfill"
    );
    Ok(from
        .iter_days()
        .take_while(|d| *d <= to)
        .map(|d| uri.replace("{date}", &d.format("%Y-%m-%d").to_string()))
        .collect())
}

/// The literal part of a pattern before its first glob character, and the matcher for the
/// whole pattern (`None` without glob characters).
fn split_glob(pattern: &str) -> anyhow::Result<(String, Option<GlobMatcher>)> {
    match crate::spec::scope::glob_start(pattern) {
        i if i == pattern.len() => Ok((pattern.to_owned(), None)),
        i => {
            let base = pattern[..i]
                .rfind('/')
                .map_or(String::new(), |j| pattern[..=j].to_owned());
            // `*` stays within one path segment; `**` crosses them.
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .with_context(|| format!("source pattern {pattern:?} is not a valid glob"))?;
            Ok((base, Some(glob.compile_matcher())))
        }
    }
}

/// Reads sources within a scope; holds the S3 client (built on first use).
#[derive(Clone, Default)]
pub struct Sources {
    s3_endpoint: Option<String>,
    s3: std::sync::Arc<tokio::sync::OnceCell<aws_sdk_s3::Client>>,
    scope: SpecScope,
}

impl Sources {
    /// `s3_endpoint` overrides the AWS endpoint (moto, MinIO); path-style addressing then.
    pub fn new(s3_endpoint: Option<String>, scope: SpecScope) -> Sources {
        Sources {
            s3_endpoint,
            s3: Default::default(),
            scope,
        }
    }

    async fn s3(&self) -> &aws_sdk_s3::Client {
        self.s3
            .get_or_init(|| async {
                let shared = crate::app::aws_config().await;
                let mut config = aws_sdk_s3::config::Builder::from(&shared);
                if let Some(url) = &self.s3_endpoint {
                    config = config.endpoint_url(url).force_path_style(true);
                }
                aws_sdk_s3::Client::from_conf(config.build())
            })
            .await
    }

    /// Every file matching `uris`, in a stable order (URI order, then name), without
    /// duplicates. A URI that matches nothing is not an error (a day without exports) but
    /// all of them matching nothing is.
    pub async fn list(&self, uris: &[String]) -> anyhow::Result<Vec<SourceFile>> {
        let mut files = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for uri in uris {
            let mut found = match Location::parse(uri)? {
                Location::Local(path) => {
                    let found =
                        list_local(&path).with_context(|| format!("cannot list source {uri}"))?;
                    for f in &found {
                        self.scope
                            .check_file(Path::new(&f.uri))
                            .with_context(|| format!("source {uri} lists a file out of scope"))?;
                    }
                    found
                }
                Location::S3 { bucket, key } => self
                    .list_s3(&bucket, &key)
                    .await
                    .with_context(|| format!("cannot list source {uri}"))?,
            };
            found.sort_by(|a, b| a.uri.cmp(&b.uri));
            files.extend(found.into_iter().filter(|f| seen.insert(f.uri.clone())));
        }
        anyhow::ensure!(
            !files.is_empty(),
            "no files match the source {}",
            uris.join(", ")
        );
        Ok(files)
    }

    async fn list_s3(&self, bucket: &str, pattern: &str) -> anyhow::Result<Vec<SourceFile>> {
        let (prefix, matcher) = split_glob(pattern)?;
        self.scope.check_s3(bucket, &prefix)?;
        let client = self.s3().await;
        let mut out = Vec::new();
        let mut token = None;
        loop {
            let page = client
                .list_objects_v2()
                .bucket(bucket)
                .prefix(&prefix)
                .set_continuation_token(token)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", aws_sdk_s3::error::DisplayErrorContext(e)))?;
            for o in page.contents() {
                let Some(key) = o.key() else { continue };
                let keep = match &matcher {
                    Some(m) => m.is_match(key),
                    // A key, or a "directory" (with or without its trailing slash).
                    None => {
                        key == pattern
                            || key.starts_with(&format!("{}/", pattern.trim_end_matches('/')))
                    }
                };
                if keep && !key.ends_with('/') {
                    out.push(SourceFile {
                        uri: format!("s3://{bucket}/{key}"),
                        size: o.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            token = page.next_continuation_token().map(str::to_owned);
            if token.is_none() {
                return Ok(out);
            }
        }
    }

    /// A whole file.
    pub async fn read(&self, uri: &str) -> anyhow::Result<bytes::Bytes> {
        match Location::parse(uri)? {
            Location::Local(path) => {
                use tokio::io::AsyncReadExt as _;
                let mut f = tokio::fs::File::from_std(self.scope.open(&path)?);
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)
                    .await
                    .with_context(|| format!("cannot read {}", path.display()))?;
                Ok(bytes.into())
            }
            Location::S3 { bucket, key } => self.get_s3(&bucket, &key, None).await,
        }
    }

    /// `len` bytes at `offset`.
    pub async fn read_range(
        &self,
        uri: &str,
        offset: u64,
        len: u64,
    ) -> anyhow::Result<bytes::Bytes> {
        match Location::parse(uri)? {
            Location::Local(path) => {
                use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
                let mut f = tokio::fs::File::from_std(self.scope.open(&path)?);
                f.seek(std::io::SeekFrom::Start(offset)).await?;
                let mut buf = vec![0; len as usize];
                f.read_exact(&mut buf).await.with_context(|| {
                    format!(
                        "cannot read {} bytes at {offset} of {}",
                        len,
                        path.display()
                    )
                })?;
                Ok(buf.into())
            }
            Location::S3 { bucket, key } => self.get_s3(&bucket, &key, Some((offset, len))).await,
        }
    }

    async fn get_s3(
        &self,
        bucket: &str,
        key: &str,
        range: Option<(u64, u64)>,
    ) -> anyhow::Result<bytes::Bytes> {
        self.scope.check_s3(bucket, key)?;
        let out = self
            .s3()
            .await
            .get_object()
            .bucket(bucket)
            .key(key)
            .set_range(range.map(|(o, l)| format!("bytes={o}-{}", o + l.max(1) - 1)))
            .send()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read s3://{bucket}/{key}: {}",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                )
            })?;
        let body = out
            .body
            .collect()
            .await
            .with_context(|| format!("reading s3://{bucket}/{key} broke off"))?;
        Ok(body.into_bytes())
    }
}

fn list_local(pattern: &Path) -> anyhow::Result<Vec<SourceFile>> {
    let text = pattern.to_string_lossy();
    let (base, matcher) = split_glob(&text)?;
    let Some(matcher) = matcher else {
        let meta = match std::fs::metadata(pattern) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        if meta.is_dir() {
            // A directory means every file in it.
            let all = format!("{}/**/*", text.trim_end_matches('/'));
            return list_local(Path::new(&all));
        }
        return Ok(vec![SourceFile {
            uri: text.into_owned(),
            size: meta.len(),
        }]);
    };
    let root = if base.is_empty() {
        ".".to_owned()
    } else {
        base
    };
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from(&root)];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(path);
            } else {
                // Match the path as written in the pattern (`./` prefixes aside).
                let shown = path.to_string_lossy();
                let shown = if text.starts_with("./") {
                    shown.into_owned()
                } else {
                    shown.trim_start_matches("./").to_owned()
                };
                if matcher.is_match(&shown) {
                    out.push(SourceFile {
                        uri: shown,
                        // The target's size: a link's own length would mis-shard it.
                        size: std::fs::metadata(&path)?.len(),
                    });
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn dates_fill_the_placeholder_per_day() {
        let uris = expand_dates(
            "s3://b/events/dt={date}/*.parquet",
            Some(d("2026-02-27")),
            Some(d("2026-03-01")),
        )
        .unwrap();
        assert_eq!(
            uris,
            vec![
                "s3://b/events/dt=2026-02-27/*.parquet",
                "s3://b/events/dt=2026-02-28/*.parquet",
                "s3://b/events/dt=2026-03-01/*.parquet",
            ]
        );
        assert_eq!(
            expand_dates("/x/{date}.csv", Some(d("2026-01-01")), None).unwrap(),
            vec!["/x/2026-01-01.csv"]
        );
        assert_eq!(
            expand_dates("/x/*.csv", None, None).unwrap(),
            vec!["/x/*.csv"]
        );
        let e = expand_dates("/x/{date}.csv", None, None).unwrap_err();
        assert!(e.to_string().contains("--from"), "{e}");
        assert!(expand_dates("/x/{date}", Some(d("2026-01-02")), Some(d("2026-01-01"))).is_err());
    }

    /// A link inside the root that points out of it is refused when a run lists or reads
    /// it, whatever the spec's URI looked like at validation.
    #[tokio::test]
    async fn a_run_refuses_a_file_that_resolves_outside_its_roots() {
        let tmp = std::env::temp_dir().join(format!("fh-src-scope-{}", rand::random::<u64>()));
        let (root, outside) = (tmp.join("root"), tmp.join("secret.jsonl"));
        std::fs::create_dir_all(root.join("data")).unwrap();
        std::fs::write(root.join("data/a.jsonl"), "{}\n").unwrap();
        std::fs::write(&outside, "{\"token\": \"s3cr3t\"}\n").unwrap();
        let sources = Sources::new(
            None,
            SpecScope::new(std::slice::from_ref(&root), None).unwrap(),
        );
        let glob = root.join("data/*.jsonl").to_string_lossy().into_owned();
        assert_eq!(
            sources
                .list(std::slice::from_ref(&glob))
                .await
                .unwrap()
                .len(),
            1
        );
        std::os::unix::fs::symlink(&outside, root.join("data/leak.jsonl")).unwrap();
        let e = sources.list(&[glob]).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("is outside the directories"),
            "{e:#}"
        );
        let leak = root.join("data/leak.jsonl").to_string_lossy().into_owned();
        let e = sources.read(&leak).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("is outside the directories"),
            "{e:#}"
        );
        assert!(sources.read_range(&leak, 0, 4).await.is_err());
        let e = sources.read(&outside.to_string_lossy()).await.unwrap_err();
        assert!(
            format!("{e:#}").contains("is outside the directories"),
            "{e:#}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn globs_split_at_the_literal_prefix() {
        let (base, m) = split_glob("exports/dt=2026-01-01/*.parquet").unwrap();
        assert_eq!(base, "exports/dt=2026-01-01/");
        let m = m.unwrap();
        assert!(m.is_match("exports/dt=2026-01-01/part-0.parquet"));
        assert!(!m.is_match("exports/dt=2026-01-02/part-0.parquet"));
        let (base, m) = split_glob("a/b.csv").unwrap();
        assert_eq!((base.as_str(), m.is_none()), ("a/b.csv", true));
        assert!(split_glob("a/[.csv").is_err());
    }

    #[test]
    fn local_listing_matches_globs_and_directories() {
        let root = std::env::temp_dir().join(format!("fh-src-{}", rand::random::<u64>()));
        std::fs::create_dir_all(root.join("dt=1")).unwrap();
        std::fs::create_dir_all(root.join("dt=2")).unwrap();
        std::fs::write(root.join("dt=1/a.jsonl"), "{}\n").unwrap();
        std::fs::write(root.join("dt=2/b.jsonl"), "{}\n{}\n").unwrap();
        std::fs::write(root.join("dt=2/c.csv"), "x\n").unwrap();
        let r = root.to_string_lossy();
        let names = |p: String| -> Vec<String> {
            let mut v: Vec<String> = list_local(Path::new(&p))
                .unwrap()
                .into_iter()
                .map(|f| f.uri.rsplit('/').next().unwrap().to_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(names(format!("{r}/*/*.jsonl")), vec!["a.jsonl", "b.jsonl"]);
        assert_eq!(names(format!("{r}/dt=2/*")), vec!["b.jsonl", "c.csv"]);
        assert_eq!(names(format!("{r}")), vec!["a.jsonl", "b.jsonl", "c.csv"]);
        assert_eq!(names(format!("{r}/dt=9/*.jsonl")), Vec::<String>::new());
        assert_eq!(names(format!("{r}/missing.csv")), Vec::<String>::new());
        std::fs::remove_dir_all(root).unwrap();
    }
}
