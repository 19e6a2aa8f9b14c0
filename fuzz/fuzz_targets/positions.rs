//! Positions read back from storage on any bytes: an entity's applied-offset watermark (in
//! every stored item) and the finished-offset map in a consumer group's commit metadata
//! (which anyone with the group's ACL can write). Each fails or decodes to a value that
//! encodes and decodes to itself.
#![no_main]

use feature_host::feature::Watermark;
use feature_host::stream::offset_map::FinishedMap;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &[u8], i64)| {
    let (watermark, metadata, committed) = input;
    if let Some(w) = Watermark::decode(watermark) {
        // `holds` binary-searches the list: whatever was stored, it is sorted, without
        // duplicates, and above the floor once read.
        assert!(
            w.applied.windows(2).all(|p| p[0] < p[1]) && w.applied.iter().all(|&o| o >= w.floor),
            "{w:?}"
        );
        assert_eq!(Watermark::decode(&w.encode()), Some(w));
    }
    if let Ok(map) = FinishedMap::decode(metadata, committed) {
        // Hand-off sections past the metadata limit are left out of an encoding; the
        // finished offsets never are.
        let again = FinishedMap::decode(map.encode().as_bytes(), committed)
            .expect("an encoded map decodes");
        assert!(again.offsets().eq(map.offsets()));
    }
});
