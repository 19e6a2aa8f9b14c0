//! Record formats: JSON lines, CSV (with a header row) and Parquet. Every record becomes a
//! JSON payload for the group's plugin, so a batch row and a stream event look alike.
//!
//! - JSON lines: each non-blank line is the payload, as is.
//! - CSV: an object keyed by the header; a field that is a whole number or a decimal becomes
//!   a JSON number, `true`/`false` a boolean, an empty field `null`, anything else a string.
//! - Parquet: each row as a JSON object (nested groups as objects, lists as arrays).
//!
//! A record that cannot be decoded (a CSV row with the wrong field count, a Parquet row the
//! reader rejects) is handed on as an error and dead-lettered with its reason; the rest of
//! the file still loads. A file the reader cannot get through at all (a damaged footer or
//! page, on which the parquet crate may even panic) fails its shard, naming the file and row
//! group.

use super::plan::Unit;
use super::source::{SourceFile, Sources};
use crate::spec::BatchFormat;
use anyhow::Context as _;
use bytes::Bytes;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use parquet::file::reader::{FileReader as _, SerializedFileReader};

/// One record: its JSON payload, or why it could not be decoded.
pub type Record = Result<Vec<u8>, String>;

/// The units of one file: the whole file, or each Parquet row group.
pub async fn units(
    sources: &Sources,
    file: &SourceFile,
    format: BatchFormat,
) -> anyhow::Result<Vec<Unit>> {
    match format {
        BatchFormat::Jsonl | BatchFormat::Csv => Ok(vec![Unit {
            uri: file.uri.clone(),
            row_group: None,
            rows: None,
            bytes: file.size,
        }]),
        BatchFormat::Parquet => {
            let meta = parquet_footer(sources, file).await?;
            Ok(meta
                .row_groups()
                .iter()
                .enumerate()
                .map(|(i, rg)| Unit {
                    uri: file.uri.clone(),
                    row_group: Some(i as u32),
                    rows: Some(rg.num_rows().max(0) as u64),
                    bytes: rg.compressed_size().max(0) as u64,
                })
                .collect())
        }
    }
}

/// A Parquet file's metadata from its footer: two range reads, not the whole file.
async fn parquet_footer(sources: &Sources, file: &SourceFile) -> anyhow::Result<ParquetMetaData> {
    let not_parquet = || format!("{} is not a Parquet file", file.uri);
    anyhow::ensure!(file.size >= 12, "{} (too small)", not_parquet());
    let tail = sources.read_range(&file.uri, file.size - 8, 8).await?;
    anyhow::ensure!(&tail[4..] == b"PAR1", "{} (no PAR1 footer)", not_parquet());
    let len = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) as u64;
    anyhow::ensure!(
        len + 12 <= file.size,
        "{} (footer length {len})",
        not_parquet()
    );
    let footer = sources
        .read_range(&file.uri, file.size - 8 - len, len)
        .await?;
    decode_footer(&file.uri, &footer)
}

/// Decode the metadata of a Parquet file from its footer (the bytes before the last 8).
/// Planning runs it on files nobody checked; no footer that panics the reader is known
/// (the `rows` fuzz target looks for one), but one would fail the run without naming its file.
pub fn decode_footer(uri: &str, footer: &[u8]) -> anyhow::Result<ParquetMetaData> {
    let what = || format!("cannot read the Parquet metadata of {uri}");
    unpanicked(what, || {
        ParquetMetaDataReader::decode_metadata(footer).with_context(what)
    })
}

/// Run a Parquet reader call, turning a panic of the reader into an error that says `what`.
/// The parquet crate asserts on some damaged pages instead of returning an error (found by
/// fuzzing).
fn unpanicked<T>(
    what: impl Fn() -> String,
    read: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|panic| {
        let why = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        anyhow::bail!(
            "{}: the file is damaged (the Parquet reader failed: {why}); export it again",
            what()
        )
    })
}

/// Decode the records of one unit from its file's bytes, skipping the first `skip`, and pass
/// them on in batches of up to `batch` (a blocking call: run it off the async workers).
/// Stops early when `emit` returns false (the receiver is gone).
pub fn decode_unit(
    bytes: Bytes,
    unit: &Unit,
    format: BatchFormat,
    skip: u64,
    batch: usize,
    mut emit: impl FnMut(Vec<Record>) -> bool,
) -> anyhow::Result<()> {
    let mut out = Vec::with_capacity(batch);
    let mut push = |r: Record, out: &mut Vec<Record>| -> bool {
        out.push(r);
        if out.len() >= batch {
            return emit(std::mem::replace(out, Vec::with_capacity(batch)));
        }
        true
    };
    let mut index = 0u64;
    match format {
        BatchFormat::Jsonl => {
            for line in bytes.split(|b| *b == b'\n') {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                index += 1;
                if index > skip && !push(Ok(line.to_vec()), &mut out) {
                    return Ok(());
                }
            }
        }
        BatchFormat::Csv => {
            let mut reader = csv::ReaderBuilder::new()
                .has_headers(true)
                .from_reader(&bytes[..]);
            let headers: Vec<String> = reader
                .headers()
                .with_context(|| format!("cannot read the CSV header of {}", unit.uri))?
                .iter()
                .map(str::to_owned)
                .collect();
            for record in reader.records() {
                index += 1;
                if index <= skip {
                    continue;
                }
                let r = match record {
                    Ok(rec) => Ok(csv_row(&headers, &rec)),
                    Err(e) => Err(format!("{} row {index}: {e}", unit.uri)),
                };
                if !push(r, &mut out) {
                    return Ok(());
                }
            }
        }
        BatchFormat::Parquet => {
            let rg = unit.row_group.unwrap_or(0) as usize;
            // A panic here would fail the shard without naming the file.
            let what = || format!("cannot read row group {rg} of {}", unit.uri);
            let read = unpanicked(what, || -> anyhow::Result<bool> {
                let reader = SerializedFileReader::new(bytes)
                    .with_context(|| format!("cannot open Parquet file {}", unit.uri))?;
                anyhow::ensure!(
                    rg < reader.num_row_groups(),
                    "{} has no row group {rg}: the file changed since the run was planned",
                    unit.uri
                );
                let group = reader.get_row_group(rg).with_context(what)?;
                let rows = group.get_row_iter(None).with_context(what)?;
                for row in rows.skip(skip as usize) {
                    let r = row
                        .map(|row| {
                            serde_json::to_vec(&row.to_json_value()).expect("JSON values serialize")
                        })
                        .map_err(|e| format!("{} row group {rg}: {e}", unit.uri));
                    if !push(r, &mut out) {
                        return Ok(false);
                    }
                }
                Ok(true)
            });
            if !read? {
                return Ok(());
            }
        }
    }
    if !out.is_empty() {
        emit(out);
    }
    Ok(())
}

fn csv_row(headers: &[String], rec: &csv::StringRecord) -> Vec<u8> {
    let obj: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .zip(rec.iter())
        .map(|(h, v)| (h.clone(), csv_value(v)))
        .collect();
    serde_json::to_vec(&obj).expect("JSON values serialize")
}

fn csv_value(v: &str) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    match v {
        "true" => return true.into(),
        "false" => return false.into(),
        _ => {}
    }
    // Leading zeros ("007") are identifiers, not numbers.
    let digits = v.strip_prefix('-').unwrap_or(v);
    let leading_zero = digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.");
    if !leading_zero {
        if let Ok(i) = v.parse::<i64>() {
            return i.into();
        }
        if v.bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'-' || b == b'e' || b == b'E')
            && let Ok(f) = v.parse::<f64>()
            && let Some(n) = serde_json::Number::from_f64(f)
        {
            return n.into();
        }
    }
    v.into()
}

/// The bytes of a Parquet file of `n` views by 7 users, a millisecond apart, in row groups of
/// `group_rows` (written by [`write_click_parquet`]): a valid file for tests and the `rows`
/// fuzz target to damage.
pub fn sample_click_parquet(n: i64, group_rows: usize) -> anyhow::Result<Vec<u8>> {
    let path = std::env::temp_dir().join(format!("fh-sample-{}.parquet", rand::random::<u64>()));
    let rows: Vec<(String, String, &str, i64)> = (0..n)
        .map(|i| {
            (
                format!("u{}", i % 7),
                format!("i{i}"),
                "view",
                1_700_000_000_000 + i,
            )
        })
        .collect();
    let written = write_click_parquet(&path, &rows, group_rows);
    let bytes = written.and_then(|()| Ok(std::fs::read(&path)?));
    let _ = std::fs::remove_file(&path);
    bytes
}

/// Write a Parquet file of `rows` (each `(user_id, item_id, type, ts)`) in row groups of
/// `group_rows`, Snappy-compressed: the shape of a click-stream export. Used by the backfill
/// benchmark and the tests to generate sources.
pub fn write_click_parquet(
    path: &std::path::Path,
    rows: &[(String, String, &str, i64)],
    group_rows: usize,
) -> anyhow::Result<()> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let schema = Arc::new(parse_message_type(
        "message click { REQUIRED BYTE_ARRAY user_id (UTF8); REQUIRED BYTE_ARRAY item_id (UTF8); \
         REQUIRED BYTE_ARRAY type (UTF8); REQUIRED INT64 ts; }",
    )?);
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema, props)?;
    for chunk in rows.chunks(group_rows.max(1)) {
        let mut rg = writer.next_row_group()?;
        let strings: [Vec<ByteArray>; 3] = [
            chunk
                .iter()
                .map(|r| ByteArray::from(r.0.as_str()))
                .collect(),
            chunk
                .iter()
                .map(|r| ByteArray::from(r.1.as_str()))
                .collect(),
            chunk.iter().map(|r| ByteArray::from(r.2)).collect(),
        ];
        for column in strings {
            let mut c = rg.next_column()?.context("schema has a string column")?;
            c.typed::<ByteArrayType>()
                .write_batch(&column, None, None)?;
            c.close()?;
        }
        let ts: Vec<i64> = chunk.iter().map(|r| r.3).collect();
        let mut c = rg.next_column()?.context("schema has a ts column")?;
        c.typed::<Int64Type>().write_batch(&ts, None, None)?;
        c.close()?;
        rg.close()?;
    }
    writer.close()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sources that may read the temporary directory the tests write to.
    fn in_temp_dir() -> Sources {
        let scope = crate::spec::SpecScope::new(&[std::env::temp_dir()], None).unwrap();
        Sources::new(None, scope)
    }

    fn collect(bytes: &[u8], format: BatchFormat, skip: u64, unit: &Unit) -> Vec<Record> {
        let mut all = Vec::new();
        decode_unit(Bytes::copy_from_slice(bytes), unit, format, skip, 2, |b| {
            all.extend(b);
            true
        })
        .unwrap();
        all
    }

    fn unit(uri: &str) -> Unit {
        Unit {
            uri: uri.into(),
            row_group: None,
            rows: None,
            bytes: 0,
        }
    }

    fn text(r: &Record) -> String {
        String::from_utf8(r.clone().unwrap()).unwrap()
    }

    #[test]
    fn a_damaged_parquet_file_is_an_error_with_its_place_not_a_panic() {
        // Found by the `rows` fuzz target: one byte of a dictionary page zeroed makes the
        // parquet crate's dictionary decoder assert (a panic), which would fail the shard
        // as "reader task failed" without saying which file is damaged.
        let mut file = sample_click_parquet(40, 16).unwrap();
        file[7] = 0;
        let unit = Unit {
            row_group: Some(0),
            ..unit("s3://exports/clicks.parquet")
        };
        let mut records = Vec::new();
        let got = decode_unit(Bytes::from(file), &unit, BatchFormat::Parquet, 1, 16, |b| {
            records.extend(b);
            true
        });
        let problems: Vec<String> = records.into_iter().filter_map(Result::err).collect();
        let said = match got {
            Err(e) => format!("{e:#}"),
            Ok(()) => problems.join("; "),
        };
        assert!(
            said.contains("s3://exports/clicks.parquet") && said.contains("row group 0"),
            "{said:?}"
        );
    }

    #[test]
    fn jsonl_skips_blank_lines_and_resumes_by_record() {
        let data = b"{\"a\":1}\r\n\n  \n{\"a\":2}\n{\"a\":3}";
        let all = collect(data, BatchFormat::Jsonl, 0, &unit("x"));
        assert_eq!(
            all.iter().map(text).collect::<Vec<_>>(),
            vec!["{\"a\":1}", "{\"a\":2}", "{\"a\":3}"]
        );
        let rest = collect(data, BatchFormat::Jsonl, 2, &unit("x"));
        assert_eq!(rest.iter().map(text).collect::<Vec<_>>(), vec!["{\"a\":3}"]);
    }

    #[test]
    fn csv_rows_become_typed_objects_and_bad_rows_errors() {
        let data =
            b"user_id,n,score,flag,zip,empty\nu1,3,0.5,true,007,\nu2,1\nu3,-4,1e3,false,x,y\n";
        let all = collect(data, BatchFormat::Csv, 0, &unit("f.csv"));
        assert_eq!(all.len(), 3);
        let first: serde_json::Value = serde_json::from_slice(all[0].as_ref().unwrap()).unwrap();
        assert_eq!(
            first,
            serde_json::json!({"user_id":"u1","n":3,"score":0.5,"flag":true,"zip":"007","empty":null})
        );
        let e = all[1].as_ref().unwrap_err();
        assert!(e.contains("f.csv row 2"), "{e}");
        let third: serde_json::Value = serde_json::from_slice(all[2].as_ref().unwrap()).unwrap();
        assert_eq!(third["n"], -4);
        assert_eq!(third["score"], 1000.0);
        assert_eq!(collect(data, BatchFormat::Csv, 2, &unit("f.csv")).len(), 1);
    }

    #[test]
    fn parquet_round_trips_by_row_group_with_resume() {
        let dir = std::env::temp_dir().join(format!("fh-pq-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.parquet");
        let rows: Vec<(String, String, &str, i64)> = (0..25)
            .map(|i| (format!("u{i}"), format!("i{i}"), "click", 1_000 + i))
            .collect();
        write_click_parquet(&path, &rows, 10).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let file = SourceFile {
            uri: path.to_string_lossy().into_owned(),
            size,
        };
        let units = rt
            .block_on(units(&in_temp_dir(), &file, BatchFormat::Parquet))
            .unwrap();
        assert_eq!(
            units.iter().map(|u| u.rows).collect::<Vec<_>>(),
            vec![Some(10), Some(10), Some(5)]
        );
        let bytes = std::fs::read(&path).unwrap();
        let second = collect(&bytes, BatchFormat::Parquet, 3, &units[1]);
        assert_eq!(second.len(), 7);
        let v: serde_json::Value = serde_json::from_slice(second[0].as_ref().unwrap()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user_id":"u13","item_id":"i13","type":"click","ts":1013})
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_that_is_not_parquet_is_named() {
        let dir = std::env::temp_dir().join(format!("fh-pq-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.parquet");
        std::fs::write(&path, b"this is not parquet at all").unwrap();
        let file = SourceFile {
            uri: path.to_string_lossy().into_owned(),
            size: 26,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(units(&in_temp_dir(), &file, BatchFormat::Parquet))
            .unwrap_err();
        assert!(
            e.to_string().contains("bad.parquet is not a Parquet file"),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
