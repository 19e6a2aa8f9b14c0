//! Golden events: sample events with the writes (or the rejection) a plugin must produce
//! for them. A FeatureGroup lists a golden file in `spec.plugin.golden`; every plugin
//! version is run over it before it may serve — at start and on every hot reload — so a
//! plugin that compiles and type-checks but computes the wrong thing never goes live.
//!
//! One case per line, the event in the local-event format of `stream::local`:
//!
//! ```text
//! {"event": {"topic": "web-events", "key": "u1", "timestamp": 5, "payload": {"type": "click", "user_id": "u1"}},
//!  "writes": [{"entity": "u1", "feature": "clicks", "op": {"incr": {"t": "int", "v": 1}}, "event_time_ms": 5}]}
//! {"event": {...}, "invalid": "missing field"}
//! ```
//!
//! `writes` must match exactly and in order (after the spec's type checks); `invalid` /
//! `retryable` must be the event's outcome, with a message containing the given text. An
//! event without `timestamp` gets 0, so cases do not depend on the clock.

use super::{EventFailure, Plugin, PluginError};
use crate::event::Event;
use crate::feature::{Write, check_write};
use crate::spec::GroupDef;
use serde::Deserialize;
use std::path::Path;

/// One golden event and its expected outcome.
#[derive(Debug, Clone)]
pub struct GoldenCase {
    /// `file:line`, for messages.
    pub at: String,
    pub event: Event,
    pub expect: Expected,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    Writes(Vec<Write>),
    Invalid(String),
    Retryable(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    event: serde_json::Value,
    #[serde(default)]
    writes: Option<Vec<Write>>,
    #[serde(default)]
    invalid: Option<String>,
    #[serde(default)]
    retryable: Option<String>,
}

/// The largest golden file read: golden events are a handful of examples per plugin.
pub const MAX_GOLDEN_BYTES: u64 = 16 << 20;

/// Parse a golden file: a regular file of at most [`MAX_GOLDEN_BYTES`]. The error names the
/// file, the line and the problem.
pub fn load(path: &Path) -> Result<Vec<GoldenCase>, String> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let cannot = |e: std::io::Error| format!("cannot read golden events {}: {e}", path.display());
    // Non-blocking: a FIFO put in the file's place must not hang the loader (and with it
    // every later reload); regular files read the same either way.
    let file = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot)?;
    // The opened file, whatever a link pointed to when it was checked.
    if !file.metadata().map_err(cannot)?.is_file() {
        return Err(format!(
            "golden events {} is not a regular file",
            path.display()
        ));
    }
    let mut text = String::new();
    file.take(MAX_GOLDEN_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_GOLDEN_BYTES {
        return Err(format!(
            "golden events {} are larger than {} MiB",
            path.display(),
            MAX_GOLDEN_BYTES >> 20
        ));
    }
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        cases.push(parse_case(line, at)?);
    }
    if cases.is_empty() {
        return Err(format!("golden file {} holds no events", path.display()));
    }
    Ok(cases)
}

fn parse_case(line: &str, at: String) -> Result<GoldenCase, String> {
    let l: Line =
        serde_json::from_str(line).map_err(|e| format!("{at}: not a golden case: {e}"))?;
    let mut event = l.event;
    if let Some(obj) = event.as_object_mut() {
        obj.entry("timestamp").or_insert(0.into());
    }
    let event = crate::stream::local::parse_event(&event.to_string(), None, None)
        .map_err(|e| format!("{at}: {e}"))?;
    let expect = match (l.writes, l.invalid, l.retryable) {
        (Some(w), None, None) => Expected::Writes(w),
        (None, Some(m), None) => Expected::Invalid(m),
        (None, None, Some(m)) => Expected::Retryable(m),
        _ => {
            return Err(format!(
                "{at}: give exactly one of `writes`, `invalid` and `retryable`"
            ));
        }
    };
    Ok(GoldenCase { at, event, expect })
}

/// The outcome of one event, in golden-file form (for `plugin test --golden`).
pub fn case_line(
    event_json: &serde_json::Value,
    outcome: &Result<Vec<Write>, EventFailure>,
) -> serde_json::Value {
    match outcome {
        Ok(w) => serde_json::json!({ "event": event_json, "writes": w }),
        Err(EventFailure::Invalid(m)) => serde_json::json!({ "event": event_json, "invalid": m }),
        Err(EventFailure::Retryable(m)) => {
            serde_json::json!({ "event": event_json, "retryable": m })
        }
    }
}

/// Run `plugin` over the group's golden events (one batch) and compare. Blocking.
pub fn check(plugin: &Plugin, def: &GroupDef) -> Result<(), PluginError> {
    if def.golden.is_empty() {
        return Ok(());
    }
    let fail = |message: String| PluginError::Golden {
        plugin: format!("{}@{}", plugin.group(), plugin.version()),
        message,
    };
    let events: Vec<Event> = def.golden.iter().map(|c| c.event.clone()).collect();
    let results = plugin
        .process_blocking(&events)
        .map_err(|e| fail(e.to_string()))?;
    for (case, result) in def.golden.iter().zip(results) {
        let got = result.map(|writes| {
            writes
                .into_iter()
                .map(|w| check_write(&def.spec, w.clone()).map_err(|e| (w, e.to_string())))
                .collect::<Vec<_>>()
        });
        let mismatch = |got: String| {
            fail(format!(
                "{}: expected {}, got {got}",
                case.at,
                describe(&case.expect)
            ))
        };
        match (&case.expect, got) {
            (Expected::Writes(want), Ok(got)) => {
                if let Some((w, e)) = got.iter().find_map(|r| r.as_ref().err()) {
                    return Err(fail(format!(
                        "{}: the plugin wrote {} which the spec refuses: {e}",
                        case.at,
                        serde_json::to_string(w).unwrap_or_default()
                    )));
                }
                let got: Vec<Write> = got.into_iter().filter_map(Result::ok).collect();
                if &got != want {
                    return Err(mismatch(format!(
                        "writes {}",
                        serde_json::to_string(&got).unwrap_or_default()
                    )));
                }
            }
            (Expected::Invalid(m), Err(EventFailure::Invalid(got)))
            | (Expected::Retryable(m), Err(EventFailure::Retryable(got))) => {
                if !got.contains(m.as_str()) {
                    return Err(mismatch(format!("the message {got:?}")));
                }
            }
            (_, Ok(got)) => {
                return Err(mismatch(format!("{} write(s)", got.len())));
            }
            (_, Err(EventFailure::Invalid(m))) => return Err(mismatch(format!("invalid: {m}"))),
            (_, Err(EventFailure::Retryable(m))) => {
                return Err(mismatch(format!("retryable: {m}")));
            }
        }
    }
    Ok(())
}

fn describe(e: &Expected) -> String {
    match e {
        Expected::Writes(w) => format!("writes {}", serde_json::to_string(w).unwrap_or_default()),
        Expected::Invalid(m) => format!("invalid containing {m:?}"),
        Expected::Retryable(m) => format!("retryable containing {m:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::{Op, Value};

    #[test]
    fn parses_writes_and_rejections_with_default_time() {
        let c = parse_case(
            r#"{"event":{"topic":"t","key":"u1","payload":{"a":1}},"writes":[{"entity":"u1","feature":"n","op":{"incr":{"t":"int","v":1}},"event_time_ms":0}]}"#,
            "g:1".into(),
        )
        .unwrap();
        assert_eq!(c.event.timestamp_ms, 0);
        assert_eq!(c.event.key.as_deref(), Some(&b"u1"[..]));
        assert_eq!(
            c.expect,
            Expected::Writes(vec![Write {
                entity: "u1".into(),
                feature: "n".into(),
                op: Op::Incr(Value::Int(1)),
                event_time_ms: 0
            }])
        );
        let c = parse_case(
            r#"{"event":{"topic":"t","timestamp":9,"payload":"x"},"invalid":"bad"}"#,
            "g:2".into(),
        )
        .unwrap();
        assert_eq!(c.event.timestamp_ms, 9);
        assert_eq!(c.expect, Expected::Invalid("bad".into()));
    }

    #[test]
    fn rejects_ambiguous_or_malformed_cases_naming_the_line() {
        let e = parse_case(
            r#"{"event":{"topic":"t","payload":1},"invalid":"a","retryable":"b"}"#,
            "g:3".into(),
        )
        .unwrap_err();
        assert!(e.starts_with("g:3: give exactly one"), "{e}");
        let e = parse_case(r#"{"event":{"payload":1},"writes":[]}"#, "g:4".into()).unwrap_err();
        assert!(e.starts_with("g:4: not a local event"), "{e}");
        let e = parse_case("nope", "g:5".into()).unwrap_err();
        assert!(e.starts_with("g:5: not a golden case"), "{e}");
    }
}
