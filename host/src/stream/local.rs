//! Local event sources for the no-services default: a JSON-lines file and HTTP push.
//!
//! One event per line:
//! `{"topic": "web-events", "key": "u1", "timestamp": 1700000000000, "headers": {"type": "click"},
//!   "payload": {...}}` — `payload` is any JSON (a JSON string is sent as its raw text);
//! `key`, `timestamp` (ms, default now), `headers`, `partition` (default 0) and `offset` are
//! optional.
//!
//! **Positions.** A file line's number is its offset within that file's content, so
//! re-ingesting the same file is a no-op (exactly-once effect; a rewritten file is a new
//! source), and the lines before a batch are its floor. A line's explicit `offset` puts it in
//! an offset space of its own (`local:<topic>`, apart from Kafka's `<topic>#<partition>`) with
//! floor 0: such events arrive in any order, so no offset covers a lower one. An HTTP push
//! may not choose its position (the admin API refuses `offset`: a caller could otherwise take
//! an events file's explicit offsets in the shared `local:<topic>` space, and the file's
//! events would then be dropped as replays), so a pushed event carries none and is applied at
//! least once: a client that resends a push, or a push retried in place after some of its
//! entities were written, may apply it twice.
//!
//! **The chain.** After parsing, a local batch takes the path every source takes — routing,
//! the groups' plugins, the checks, the store write and the one retry policy
//! ([`Pipeline::process_with_retries`], in place: a file has no retry topic) — and its
//! failures go to the dead-letter file instead of the dead-letter topic.

use super::dead_letter::{DeadLetterFile, to_json_line};
use crate::event::{Event, EventIdx};
use crate::feature::Position;
use crate::pipeline::Pipeline;
use crate::retry::{FailureKind, InPlace};
use anyhow::Context as _;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LocalEvent {
    topic: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    partition: Option<i32>,
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    timestamp: Option<i64>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    payload: serde_json::Value,
}

use crate::sink::unix_now_ms as now_ms;

/// Parse one local event. `line_offset` is the file line number (None for HTTP pushes).
pub fn parse_event(
    line: &str,
    line_offset: Option<i64>,
    origin: Option<&str>,
) -> Result<Event, String> {
    let e: LocalEvent =
        serde_json::from_str(line).map_err(|e| format!("not a local event: {e}"))?;
    let payload = match e.payload {
        serde_json::Value::String(s) => s.into_bytes(),
        other => other.to_string().into_bytes(),
    };
    let partition = e.partition.unwrap_or(0);
    let position = match (e.offset, line_offset, origin) {
        (Some(offset), _, _) => Some(Position {
            source: format!("local:{}", e.topic),
            partition,
            offset,
            floor: 0,
        }),
        (None, Some(line), Some(origin)) => Some(Position::sequential(origin, partition, line)),
        _ => None,
    };
    Ok(Event {
        partition,
        offset: e.offset.or(line_offset).unwrap_or(0),
        topic: e.topic,
        key: e.key.map(String::into_bytes),
        timestamp_ms: e.timestamp.unwrap_or_else(now_ms),
        headers: e
            .headers
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        payload,
        position,
    })
}

/// [`parse_event`] of an event from a source (an events file, an HTTP push): without the
/// host's `fh-*` headers, which only the host may set. Golden events and `plugin test` keep
/// them: they stand for events as the plugin sees them, retries included.
pub fn parse_source_event(
    line: &str,
    line_offset: Option<i64>,
    origin: Option<&str>,
) -> Result<Event, String> {
    let mut e = parse_event(line, line_offset, origin)?;
    super::envelope::strip_host_headers(&mut e.headers);
    Ok(e)
}

/// What ingesting some local events did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct IngestSummary {
    pub events: usize,
    /// (event, group) pairs.
    pub routed: usize,
    pub unrouted: usize,
    pub writes: usize,
    pub replayed: usize,
    pub stale_skips: u32,
    pub dead_lettered: usize,
}

impl IngestSummary {
    fn add(&mut self, o: &IngestSummary) {
        self.events += o.events;
        self.routed += o.routed;
        self.unrouted += o.unrouted;
        self.writes += o.writes;
        self.replayed += o.replayed;
        self.stale_skips += o.stale_skips;
        self.dead_lettered += o.dead_lettered;
    }
}

/// Process parsed events (and dead-letter lines that did not parse) through the pipeline.
pub async fn ingest(
    pipeline: &Pipeline,
    events: Vec<Event>,
    unparsed: Vec<(String, String)>,
    dead_letters: &DeadLetterFile,
) -> anyhow::Result<IngestSummary> {
    let events = Arc::new(events);
    let routes = pipeline.route(&events);
    let routed_events: std::collections::BTreeSet<EventIdx> =
        routes.iter().map(|r| r.event).collect();
    let (failures, stats) = pipeline
        .process_with_retries(&events, &routes, InPlace::All, false)
        .await;
    let mut lines: Vec<String> = failures
        .iter()
        .map(|f| to_json_line(&events[f.event.index()], pipeline.router().name(f.group), f))
        .collect();
    for (line, reason) in &unparsed {
        lines.push(serde_json::json!({"kind": FailureKind::Invalid.as_str(), "reason": reason, "line": line}).to_string());
    }
    dead_letters.append(lines).await?;
    for f in &failures {
        tracing::warn!(group = %pipeline.router().name(f.group), kind = f.kind.as_str(), reason = %f.reason,
            offset = events[f.event.index()].offset, "event dead-lettered");
    }
    Ok(IngestSummary {
        events: events.len() + unparsed.len(),
        routed: stats.routed,
        unrouted: events.len() - routed_events.len(),
        writes: stats.writes,
        replayed: stats.replayed,
        stale_skips: stats.stale_skips,
        dead_lettered: failures.len() + unparsed.len(),
    })
}

/// Ingest a JSON-lines file in batches of `batch_size` (non-empty lines).
pub async fn ingest_file(
    pipeline: &Pipeline,
    path: &Path,
    batch_size: usize,
    dead_letters: &DeadLetterFile,
) -> anyhow::Result<IngestSummary> {
    let text = tokio::fs::read_to_string(path)
        .await
        .with_context(|| format!("cannot read events file {}", path.display()))?;
    // Line numbers are positions only within one exact content: a rewritten file is a new
    // source, so its lines are not mistaken for replays.
    let canonical = tokio::fs::canonicalize(path)
        .await
        .unwrap_or_else(|_| path.to_path_buf());
    let digest = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(text.as_bytes())[..8]);
    let origin = format!("file:{}@{digest}", canonical.display());
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n + 1, l))
        .collect();
    let mut total = IngestSummary::default();
    for chunk in lines.chunks(batch_size.max(1)) {
        let mut events = Vec::with_capacity(chunk.len());
        let mut unparsed = Vec::new();
        // Lines before this chunk are finished (written or dead-lettered): the floor of its
        // positions.
        let floor = chunk.first().map_or(0, |&(n, _)| n as i64);
        for &(n, line) in chunk {
            match parse_source_event(line, Some(n as i64), Some(&origin)) {
                Ok(mut e) => {
                    if let Some(p) = e.position.as_mut().filter(|p| p.source == origin) {
                        p.floor = floor;
                    }
                    events.push(e)
                }
                Err(reason) => {
                    unparsed.push((line.to_owned(), format!("{}:{n}: {reason}", path.display())))
                }
            }
        }
        total.add(&ingest(pipeline, events, unparsed, dead_letters).await?);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_minimal_events() {
        let e = parse_event(
            r#"{"topic":"t","key":"u1","timestamp":5,"headers":{"type":"click"},"payload":{"a":1}}"#,
            Some(3),
            Some("file:x"),
        )
        .unwrap();
        assert_eq!((e.topic.as_str(), e.offset, e.timestamp_ms), ("t", 3, 5));
        assert_eq!(e.payload, br#"{"a":1}"#);
        assert_eq!(e.header("type"), Some(&b"click"[..]));
        assert_eq!(e.position.as_ref().unwrap().source, "file:x");

        let raw = parse_event(r#"{"topic":"t","payload":"not json at all"}"#, None, None).unwrap();
        assert_eq!(raw.payload, b"not json at all");
        assert!(
            raw.position.is_none(),
            "HTTP push without offset is not replayable"
        );

        let explicit = parse_event(
            r#"{"topic":"t","partition":2,"offset":9,"payload":1}"#,
            None,
            None,
        )
        .unwrap();
        let p = explicit.position.clone().unwrap();
        assert_eq!(
            (p.source.as_str(), p.partition, p.offset, p.floor),
            ("local:t", 2, 9, 0),
            "its own offset space (not Kafka's t#2), and no offset below it is claimed"
        );
    }

    #[test]
    fn the_hosts_headers_are_removed_from_local_and_pushed_events() {
        let line = r#"{"topic":"t","headers":{"type":"click","fh-replay-of":"g.dlq/0/5","fh-attempts":"9"},"payload":1}"#;
        let e = parse_source_event(line, Some(1), Some("file:x")).unwrap();
        assert_eq!(e.headers, vec![("type".into(), b"click".to_vec())]);
    }

    /// A golden event stands for what the plugin sees, a retry's `fh-attempts` included.
    #[test]
    fn golden_and_test_events_keep_the_hosts_headers() {
        let line = r#"{"topic":"t","headers":{"fh-attempts":"9"},"payload":1}"#;
        let golden = parse_event(line, None, None).unwrap();
        assert_eq!(golden.header("fh-attempts"), Some(&b"9"[..]));
    }

    #[test]
    fn rejects_with_reason() {
        assert!(
            parse_event("{", None, None)
                .unwrap_err()
                .contains("not a local event")
        );
        assert!(
            parse_event(r#"{"payload":1}"#, None, None)
                .unwrap_err()
                .contains("topic")
        );
        assert!(
            parse_event(r#"{"topic":"t","payload":1,"extra":2}"#, None, None)
                .unwrap_err()
                .contains("extra")
        );
    }
}
