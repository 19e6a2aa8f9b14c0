//! The batch row decoders on any file: an Ingestion reads files exported by other systems.
//! A bad file or row is an error with its place, never an escaping panic (which would fail
//! the shard without its reason). The first byte picks the format; the last choice takes a valid
//! Parquet file and damages it where the input says (random bytes rarely get past Parquet's
//! footer, damaged files do).
#![no_main]

use feature_host::batch::format::{decode_footer, decode_unit, sample_click_parquet};
use feature_host::batch::plan::Unit;
use feature_host::spec::BatchFormat;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// A Parquet file of 40 click rows in row groups of 16 (Snappy, as exports are).
fn valid_parquet() -> &'static [u8] {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| sample_click_parquet(40, 16).expect("write the Parquet seed"))
}

fuzz_target!(|data: &[u8]| {
    // `decode_unit` catches the parquet crate's panics on damaged pages and turns them into
    // errors naming the file; libfuzzer-sys's hook would abort on them before that. A panic
    // that escapes `decode_unit` is still a crash: libfuzzer-sys aborts on it after unwinding.
    // Panic messages are printed with FH_FUZZ_VERBOSE=1 (to see an escaping one's).
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let verbose = std::env::var_os("FH_FUZZ_VERBOSE").is_some();
        std::panic::set_hook(Box::new(move |info| {
            if verbose {
                eprintln!("{info}");
            }
        }))
    });
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (format, file) = match selector % 4 {
        0 => (BatchFormat::Jsonl, rest.to_vec()),
        1 => (BatchFormat::Csv, rest.to_vec()),
        2 => (BatchFormat::Parquet, rest.to_vec()),
        _ => {
            // `rest` is (position: 2 bytes, value: 1 byte) triples; a last lone byte cuts the
            // file short by that many bytes.
            let mut file = valid_parquet().to_vec();
            let mut damage = rest.chunks_exact(3);
            for d in damage.by_ref() {
                let at = usize::from(u16::from_le_bytes([d[0], d[1]])) % file.len();
                file[at] = d[2];
            }
            if let [cut] = damage.remainder() {
                file.truncate(file.len().saturating_sub(usize::from(*cut)));
            }
            (BatchFormat::Parquet, file)
        }
    };
    let unit = Unit {
        uri: "fuzz".into(),
        row_group: Some(u32::from(selector >> 6)),
        rows: None,
        bytes: file.len() as u64,
    };
    // Planning reads a Parquet file's footer on its own (two range reads, not the file):
    // that decoder must not panic either.
    if format == BatchFormat::Parquet && file.len() >= 12 && file.ends_with(b"PAR1") {
        let end = file.len() - 8;
        let len = u32::from_le_bytes(file[end..end + 4].try_into().expect("4 bytes")) as usize;
        if len <= end {
            let _ = decode_footer("fuzz", &file[end - len..end]);
        }
    }
    // Every record, resumed after `skip`, is the same as read from the start: a shard that
    // resumes from its checkpoint neither loses nor repeats a row. Every error names the file.
    let file = bytes::Bytes::from(file);
    let read = |skip: u64| {
        let mut records = Vec::new();
        let result = decode_unit(file.clone(), &unit, format, skip, 16, |batch| {
            records.extend(batch);
            records.len() < 100_000
        });
        (result.map_err(|e| format!("{e:#}")), records)
    };
    let (whole, all) = read(0);
    let skip = u64::from(selector >> 4 & 3);
    let (resumed, rest) = read(skip);
    let problems = all.iter().chain(&rest).filter_map(|r| r.as_ref().err());
    for problem in problems
        .chain(whole.as_ref().err())
        .chain(resumed.as_ref().err())
    {
        assert!(
            problem.contains("fuzz"),
            "an error without its file: {problem}"
        );
    }
    if whole.is_ok() && resumed.is_ok() && all.len() < 100_000 {
        let from = (skip as usize).min(all.len());
        assert_eq!(rest, all[from..], "resumed after {skip} records");
    }
});
