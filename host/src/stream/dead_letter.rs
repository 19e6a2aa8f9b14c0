//! Where events that cannot be processed go, with their reason: a Kafka topic per group in
//! production (see [`super::envelope`] for its headers), a JSON-lines file in the no-services
//! default. Nothing is dropped silently.

use crate::event::Event;
use crate::retry::Failure;
use anyhow::Context as _;
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

/// Why dead letters could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// The file reached its size limit. The events stay unfinished (the caller reports the
    /// failure, so they are sent or read again), rather than the disk filling up.
    #[error(
        "the dead-letter file {path} is full ({limit_mb} MiB, FH_DEAD_LETTER_MAX_MB): handle \
         its events (fix, then ingest them again with `feature-host run --events`) and move it \
         away, or raise the limit"
    )]
    Full { path: String, limit_mb: u64 },
    #[error("cannot write the dead-letter file: {0}")]
    Io(#[from] std::io::Error),
}

/// Appends dead letters to a local file, up to a size limit.
#[derive(Debug, Clone)]
pub struct DeadLetterFile {
    path: PathBuf,
    limit_mb: u64,
}

/// The default size limit (`FH_DEAD_LETTER_MAX_MB`).
pub const DEFAULT_LIMIT_MB: u64 = 1024;

impl DeadLetterFile {
    /// A file at `path` of at most [`DEFAULT_LIMIT_MB`].
    pub fn new(path: PathBuf) -> DeadLetterFile {
        DeadLetterFile {
            path,
            limit_mb: DEFAULT_LIMIT_MB,
        }
    }

    /// This file, of at most `limit_mb` MiB.
    pub fn with_limit_mb(self, limit_mb: u64) -> DeadLetterFile {
        DeadLetterFile { limit_mb, ..self }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Append and fsync: the events are only "finished" once this returns. All the lines or
    /// none: a write that would pass the limit writes nothing.
    pub fn write(&self, lines: &[String]) -> Result<(), DeadLetterError> {
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
        // The size check and the append under one exclusive lock (released when `f` is
        // dropped): writers that each saw room for one more write would otherwise all make
        // it. `flock` also covers other processes on the same data directory.
        f.lock()?;
        let adding: u64 = lines.iter().map(|l| l.len() as u64 + 1).sum();
        let size = f.metadata()?.len();
        if size.saturating_add(adding) > self.limit_mb.saturating_mul(1 << 20) {
            return Err(DeadLetterError::Full {
                path: self.path.display().to_string(),
                limit_mb: self.limit_mb,
            });
        }
        let mut text = String::with_capacity(adding as usize);
        for l in lines {
            text.push_str(l);
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
        f.sync_data()?;
        Ok(())
    }

    /// [`write`](Self::write) from async code: off the async workers (the write takes a
    /// file lock and an fsync), with the file named in the error.
    pub async fn append(&self, lines: Vec<String>) -> anyhow::Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let file = self.clone();
        tokio::task::spawn_blocking(move || file.write(&lines))
            .await
            .map_err(|e| anyhow::anyhow!("the dead-letter write failed: {e}"))?
            .with_context(|| format!("cannot write dead letters to {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_past_the_limit_writes_nothing() {
        let path = std::env::temp_dir().join(format!("fh-dlq-{}.jsonl", rand::random::<u32>()));
        let file = DeadLetterFile::new(path.clone()).with_limit_mb(1);
        let line = "x".repeat(1000);
        file.write(&vec![line.clone(); 1000]).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        assert_eq!(before, 1001 * 1000);
        let e = file.write(&vec![line; 100]).unwrap_err();
        assert!(
            matches!(e, DeadLetterError::Full { limit_mb: 1, .. }),
            "{e}"
        );
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        file.write(&["small".into()]).unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn writers_racing_for_the_last_room_do_not_pass_the_limit() {
        // Several writers (the HTTP push, the stream, two processes on one data dir) each
        // see room for one more write; only as many as fit may make it.
        for round in 0..10 {
            let path = std::env::temp_dir().join(format!(
                "fh-dlq-race-{}-{round}.jsonl",
                rand::random::<u32>()
            ));
            let barrier = std::sync::Barrier::new(16);
            std::thread::scope(|s| {
                for _ in 0..16 {
                    let (path, barrier) = (path.clone(), &barrier);
                    s.spawn(move || {
                        let file = DeadLetterFile::new(path).with_limit_mb(1);
                        let line = "x".repeat(100 << 10);
                        barrier.wait();
                        while file.write(std::slice::from_ref(&line)).is_ok() {}
                    });
                }
            });
            let size = std::fs::metadata(&path).unwrap().len();
            let _ = std::fs::remove_file(&path);
            assert!(
                size <= 1 << 20,
                "round {round}: the file grew to {size} bytes"
            );
        }
    }
}
