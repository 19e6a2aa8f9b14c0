//! Where events that cannot be processed go, with their reason: a Kafka topic per group in
//! production (see [`super::envelope`] for its headers), a JSON-lines file in the no-services
//! default. Nothing is dropped silently.

use crate::event::Event;
use crate::retry::Failure;
use base64::Engine as _;
use std::io::Write as _;
use std::path::PathBuf;

/// One dead-lettered event as a JSON line (the local dead-letter file's format).
pub fn to_json_line(event: &Event, group: &str, failure: &Failure) -> String {
    let payload = match std::str::from_utf8(&event.payload) {
        Ok(s) => serde_json::json!({ "text": s }),
        Err(_) => {
            serde_json::json!({ "base64": base64::engine::general_purpose::STANDARD.encode(&event.payload) })
        }
    };
    serde_json::json!({
        "group": group,
        "kind": failure.kind.as_str(),
        "reason": failure.reason,
        "topic": event.topic,
        "partition": event.partition,
        "offset": event.offset,
        "key": event.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "timestamp": event.timestamp_ms,
        "payload": payload,
    })
    .to_string()
}

/// Appends dead letters to a local file.
#[derive(Debug, Clone)]
pub struct DeadLetterFile {
    path: PathBuf,
}

impl DeadLetterFile {
    pub fn new(path: PathBuf) -> DeadLetterFile {
        DeadLetterFile { path }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Append and fsync: the events are only "finished" once this returns.
    pub fn write(&self, lines: &[String]) -> std::io::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        for l in lines {
            writeln!(f, "{l}")?;
        }
        f.sync_data()
    }
}
