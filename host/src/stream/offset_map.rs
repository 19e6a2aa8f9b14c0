//! The finished offsets above a partition's low watermark, committed with it in the offset
//! commit's metadata so that the partition's next owner skips them.
//!
//! **Why.** The committed offset is the low watermark ([`super::offsets`]): one event that
//! waits — a retry not yet due, a slow store — pins it while the events behind it finish,
//! written or handed to the retry or dead-letter topic. Without this map a new owner (after
//! a rebalance or a restart) processes all of them again. Their store writes are
//! deduplicated by position, but their hand-offs are not: each would be republished, and
//! the second copy in the retry topic later applies under a position of its own — counted
//! twice. With the map the new owner treats them as finished at once.
//!
//! **Format.** Kafka keeps a string of metadata per committed partition, at most
//! `offset.metadata.max.bytes` (4096 by default; also on Amazon MSK). The map is
//! `fh1:<base>:` then `r` and run lengths (LEB128 varints alternating gap, run, gap, run …
//! from `base`) or `b` and a bitset (bit `i` = offset `base + i`), whichever is shorter, in
//! unpadded URL-safe base64. `base` is the committed offset, so a map left behind by an
//! offset reset is recognised as stale and ignored. Any window up to [`MAX_SPAN`] offsets
//! fits in 4096 bytes as a bitset, and the consumer stops reading a partition at that span
//! (`FH_MAX_OFFSET_SPAN`, validated against it): the back-pressure that keeps the map inside
//! the limit.
//!
//! **Partly finished offsets.** An event routed to several groups finishes when all of them
//! are done; one group may have handed it off (committed) while another still runs. The map
//! also names, per group, the offsets whose unit for that group was handed off: `.` then
//! `<group>=` and the same encoding of its offsets, for each such group. The next owner runs
//! only their other groups, so the hand-off is not repeated. Group names cannot hold `.` or
//! `=`, base64 cannot either. If the sections would push the metadata past
//! [`METADATA_LIMIT`], they are left out (the offsets are then redone for every group).
//!
//! **Guarantee.** An offset in a committed map was finished by the member that committed
//! it, and a unit named in it was handed off in the same transaction or an earlier one, so
//! skipping them loses nothing. **Limit:** only what was committed — events finished
//! after the last commit (a crash) are processed again; their hand-offs were in the open
//! transaction, which aborts with the crash.
//!
//! Metadata is read as untrusted bytes: anyone who may commit for the consumer group can
//! write it. A malformed, stale or over-wide map is ignored (the events are processed
//! again, as without a map); it can never make a host skip more than [`MAX_SPAN`] offsets
//! above the committed one — less than committing a higher offset would.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::collections::BTreeMap;

/// The widest window a map covers: every map this wide fits Kafka's default
/// `offset.metadata.max.bytes` (4096) as a bitset.
pub const MAX_SPAN: u64 = 24_000;

/// Metadata longer than this is not read at all.
const MAX_METADATA_BYTES: usize = 64 * 1024;

const PREFIX: &str = "fh1:";

/// Kafka's default `offset.metadata.max.bytes` (also Amazon MSK's): what a map must fit.
pub const METADATA_LIMIT: usize = 4096;

/// Hand-off sections read at most: more groups than any host serves from one partition.
const MAX_SECTIONS: usize = 256;

/// Why committed metadata was not taken as a map.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("metadata not written by feature-host (no {PREFIX} prefix)")]
    Foreign,
    #[error("map of offset {base}, but the committed offset is {committed} (offsets were reset)")]
    Stale { base: i64, committed: i64 },
    #[error("malformed map: {0}")]
    Malformed(&'static str),
    #[error("map covers more than {MAX_SPAN} offsets above the committed one")]
    TooWide,
}

/// Finished offsets above a committed offset (`base`), and the units of unfinished ones that
/// were handed off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinishedMap {
    base: i64,
    /// Half-open `[start, end)` ranges, increasing, disjoint and not touching, all ≥ `base`.
    ranges: Vec<(i64, i64)>,
    /// Per group name: unfinished offsets (≥ `base`) whose unit for it was handed off, as
    /// ranges like `ranges`.
    handed_off: BTreeMap<String, Vec<(i64, i64)>>,
}

impl FinishedMap {
    /// The map of `finished` (increasing offsets ≥ `base`; others are ignored) above `base`.
    pub fn new(base: i64, finished: impl IntoIterator<Item = i64>) -> FinishedMap {
        FinishedMap {
            base,
            ranges: ranges(base, finished),
            handed_off: BTreeMap::new(),
        }
    }

    /// This map with the offsets `other` holds as finished at or above this map's base
    /// (its hand-offs are not taken). Linear in the two maps' ranges: a commit merges the
    /// previous owner's map this way without listing its offsets one by one.
    pub fn union(mut self, other: &FinishedMap) -> FinishedMap {
        let base = self.base;
        let theirs = other
            .ranges
            .iter()
            .filter(|&&(_, end)| end > base)
            .map(|&(start, end)| (start.max(base), end));
        let mut all: Vec<(i64, i64)> = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        let (mut mine, mut theirs) = (self.ranges.iter().copied().peekable(), theirs.peekable());
        loop {
            let next = match (mine.peek(), theirs.peek()) {
                (Some(a), Some(b)) if a.0 <= b.0 => mine.next(),
                (Some(_), Some(_)) => theirs.next(),
                (Some(_), None) => mine.next(),
                (None, _) => theirs.next(),
            };
            let Some((start, end)) = next else { break };
            match all.last_mut() {
                Some((_, last_end)) if start <= *last_end => *last_end = (*last_end).max(end),
                _ => all.push((start, end)),
            }
        }
        self.ranges = all;
        self
    }

    /// Add units `(offset, group name)` that were handed off while their offset is not
    /// finished; offsets below the base or finished are ignored.
    pub fn with_hand_offs<'a>(
        mut self,
        units: impl IntoIterator<Item = (i64, &'a str)>,
    ) -> FinishedMap {
        let mut by_group: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        for (offset, group) in units {
            if offset >= self.base && !self.contains(offset) {
                by_group.entry(group).or_default().push(offset);
            }
        }
        for (group, mut offsets) in by_group {
            offsets.sort_unstable();
            self.handed_off
                .insert(group.to_owned(), ranges(self.base, offsets));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty() && self.handed_off.is_empty()
    }

    /// How many offsets the map holds as finished.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(s, e)| (e - s) as u64).sum()
    }

    /// Whether `offset` was finished.
    pub fn contains(&self, offset: i64) -> bool {
        contains(&self.ranges, offset)
    }

    /// The finished offsets, increasing.
    pub fn offsets(&self) -> impl Iterator<Item = i64> + '_ {
        self.ranges.iter().flat_map(|&(start, end)| start..end)
    }

    /// The handed-off units of unfinished offsets: `(offset, group name)`.
    pub fn hand_offs(&self) -> impl Iterator<Item = (i64, &str)> + '_ {
        self.handed_off.iter().flat_map(|(group, ranges)| {
            ranges
                .iter()
                .flat_map(|&(start, end)| start..end)
                .map(move |o| (o, group.as_str()))
        })
    }

    /// The commit metadata: empty when nothing is finished or handed off above `base`. At
    /// most [`METADATA_LIMIT`] bytes whenever the finished offsets span at most
    /// [`MAX_SPAN`]: hand-off sections that would not fit are left out.
    pub fn encode(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut text = format!(
            "{PREFIX}{}:{}",
            self.base,
            encode_set(self.base, &self.ranges)
        );
        let plain = text.len();
        for (group, ranges) in &self.handed_off {
            text.push('.');
            text.push_str(group);
            text.push('=');
            text.push_str(&encode_set(self.base, ranges));
        }
        if text.len() > METADATA_LIMIT {
            text.truncate(plain);
        }
        text
    }

    /// Read the metadata committed with offset `committed`. Empty metadata is an empty map.
    pub fn decode(metadata: &[u8], committed: i64) -> Result<FinishedMap, MapError> {
        if metadata.is_empty() {
            return Ok(FinishedMap::new(committed, []));
        }
        if metadata.len() > MAX_METADATA_BYTES {
            return Err(MapError::Malformed("longer than any map"));
        }
        let text = std::str::from_utf8(metadata).map_err(|_| MapError::Foreign)?;
        let rest = text.strip_prefix(PREFIX).ok_or(MapError::Foreign)?;
        let (base, body) = rest.split_once(':').ok_or(MapError::Malformed("no base"))?;
        let base: i64 = base.parse().map_err(|_| MapError::Malformed("base"))?;
        if base != committed {
            return Err(MapError::Stale { base, committed });
        }
        let mut sections = body.split('.');
        let finished = sections.next().unwrap_or_default();
        let mut map = FinishedMap {
            base,
            ranges: decode_set(base, finished)?,
            handed_off: BTreeMap::new(),
        };
        for (i, section) in sections.enumerate() {
            if i >= MAX_SECTIONS {
                return Err(MapError::Malformed("too many hand-off sections"));
            }
            let (group, set) = section
                .split_once('=')
                .ok_or(MapError::Malformed("a hand-off section without its group"))?;
            if group.is_empty()
                || group.len() > 63
                || !group
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(MapError::Malformed("a hand-off section's group name"));
            }
            map.handed_off
                .insert(group.to_owned(), decode_set(base, set)?);
        }
        Ok(map)
    }
}

/// Increasing offsets as ranges; those below `base` are ignored.
fn ranges(base: i64, offsets: impl IntoIterator<Item = i64>) -> Vec<(i64, i64)> {
    let mut ranges: Vec<(i64, i64)> = Vec::new();
    for o in offsets {
        if o < base {
            continue;
        }
        match ranges.last_mut() {
            Some((_, end)) if o == *end => *end += 1,
            Some((_, end)) if o < *end => {}
            _ => ranges.push((o, o + 1)),
        }
    }
    ranges
}

fn contains(ranges: &[(i64, i64)], offset: i64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= offset);
    ranges.get(i).is_some_and(|&(start, _)| start <= offset)
}

/// A set of offsets above `base`: `r` and runs or `b` and a bitset, whichever is shorter.
fn encode_set(base: i64, ranges: &[(i64, i64)]) -> String {
    let runs = runs(base, ranges);
    let bits = bits(base, ranges);
    let (tag, bytes) = if runs.len() <= bits.len() {
        ('r', runs)
    } else {
        ('b', bits)
    };
    format!("{tag}{}", URL_SAFE_NO_PAD.encode(bytes))
}

fn decode_set(base: i64, body: &str) -> Result<Vec<(i64, i64)>, MapError> {
    let mut chars = body.chars();
    let tag = chars.next().ok_or(MapError::Malformed("no encoding"))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(chars.as_str())
        .map_err(|_| MapError::Malformed("base64"))?;
    let mut out: Vec<(i64, i64)> = Vec::new();
    let mut push = |start: i64, end: i64| -> Result<(), MapError> {
        if end.abs_diff(base) > MAX_SPAN {
            return Err(MapError::TooWide);
        }
        match out.last_mut() {
            Some((_, last)) if *last == start => *last = end,
            _ => out.push((start, end)),
        }
        Ok(())
    };
    match tag {
        'r' => {
            let mut values = Varints(&bytes);
            let mut at = base;
            while let Some(gap) = values.next().transpose()? {
                let len = values
                    .next()
                    .transpose()?
                    .ok_or(MapError::Malformed("a gap without its run"))?;
                if len == 0 {
                    return Err(MapError::Malformed("an empty run"));
                }
                if gap > MAX_SPAN || len > MAX_SPAN {
                    return Err(MapError::TooWide);
                }
                let start = at.checked_add(gap as i64).ok_or(MapError::TooWide)?;
                let end = start.checked_add(len as i64).ok_or(MapError::TooWide)?;
                push(start, end)?;
                at = end;
            }
        }
        'b' => {
            if bytes.len() as u64 * 8 > MAX_SPAN + 8 {
                return Err(MapError::TooWide);
            }
            for (i, byte) in bytes.iter().enumerate() {
                for bit in 0..8 {
                    if byte & (1 << bit) != 0 {
                        let o = base
                            .checked_add((i * 8 + bit) as i64 + 1)
                            .ok_or(MapError::TooWide)?;
                        push(o - 1, o)?;
                    }
                }
            }
        }
        _ => return Err(MapError::Malformed("unknown encoding")),
    }
    Ok(out)
}

fn runs(base: i64, ranges: &[(i64, i64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranges.len() * 4);
    let mut at = base;
    for &(start, end) in ranges {
        leb128((start - at) as u64, &mut out);
        leb128((end - start) as u64, &mut out);
        at = end;
    }
    out
}

fn bits(base: i64, ranges: &[(i64, i64)]) -> Vec<u8> {
    let Some(&(_, end)) = ranges.last() else {
        return Vec::new();
    };
    let mut out = vec![0u8; ((end - base) as usize).div_ceil(8)];
    for &(start, end) in ranges {
        for o in start..end {
            let i = (o - base) as usize;
            out[i / 8] |= 1 << (i % 8);
        }
    }
    out
}

/// Unsigned LEB128 (as in protobuf and wasm).
pub(crate) fn leb128(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// LEB128 values of a byte string; an error for a value cut short or over 64 bits.
struct Varints<'a>(&'a [u8]);

impl Iterator for Varints<'_> {
    type Item = Result<u64, MapError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.0.is_empty() {
            return None;
        }
        let mut v: u64 = 0;
        for (i, &byte) in self.0.iter().enumerate() {
            if i >= 10 {
                break;
            }
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some(Ok(v));
            }
        }
        self.0 = &[];
        Some(Err(MapError::Malformed("a varint cut short")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn assert_malformed(texts: &[&str]) {
        for bad in texts {
            assert!(
                matches!(
                    FinishedMap::decode(bad.as_bytes(), 10),
                    Err(MapError::Malformed(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn nothing_finished_is_no_metadata() {
        let m = FinishedMap::new(7, []);
        assert!(m.is_empty());
        assert_eq!(m.encode(), "");
        assert_eq!(FinishedMap::decode(b"", 7), Ok(m));
    }

    #[test]
    fn runs_for_few_ranges_bits_for_many() {
        let few = FinishedMap::new(100, 101..5_000);
        let text = few.encode();
        assert!(text.starts_with("fh1:100:r"), "{text}");
        assert!(text.len() < 20, "{text}");
        let scattered = FinishedMap::new(0, (0..3_000).filter(|o| o % 3 == 1));
        assert!(scattered.encode().starts_with("fh1:0:b"));
    }

    #[test]
    fn the_widest_window_fits_kafkas_default_metadata_limit() {
        // Every other offset finished: the worst case for runs; the bitset bounds it.
        let base = i64::MAX / 2;
        let worst = FinishedMap::new(base, (base..base + MAX_SPAN as i64).step_by(2));
        let text = worst.encode();
        assert!(text.len() <= 4096, "{} bytes", text.len());
        assert_eq!(FinishedMap::decode(text.as_bytes(), base), Ok(worst));
    }

    #[test]
    fn foreign_stale_and_hostile_metadata_is_refused() {
        let m = FinishedMap::new(10, [12, 13]).encode();
        assert_eq!(
            FinishedMap::decode(m.as_bytes(), 11),
            Err(MapError::Stale {
                base: 10,
                committed: 11
            })
        );
        assert_eq!(
            FinishedMap::decode(b"consumer-tool", 10),
            Err(MapError::Foreign)
        );
        assert_eq!(
            FinishedMap::decode(&[0xff, 0xfe], 10),
            Err(MapError::Foreign)
        );
        // One run claiming 2^40 offsets: a map never covers more than MAX_SPAN.
        let mut runs = Vec::new();
        leb128(0, &mut runs);
        leb128(1 << 40, &mut runs);
        let wide = format!("fh1:10:r{}", URL_SAFE_NO_PAD.encode(&runs));
        assert_eq!(
            FinishedMap::decode(wide.as_bytes(), 10),
            Err(MapError::TooWide)
        );
        assert_malformed(&[
            "fh1:10",
            "fh1:x:r",
            "fh1:10:z",
            "fh1:10:r!!",
            "fh1:10:rgA",
            "fh1:10:rAAA",
        ]);
    }

    #[test]
    fn hand_offs_of_unfinished_offsets_round_trip_by_group() {
        let map = FinishedMap::new(10, [12, 13]).with_hand_offs([
            (11, "clicks"),
            (15, "views"),
            (11, "views"),
            (12, "views"),
            (9, "clicks"),
        ]);
        let text = map.encode();
        assert!(text.starts_with("fh1:10:"), "{text}");
        assert!(
            text.contains(".clicks=") && text.contains(".views="),
            "{text}"
        );
        let back = FinishedMap::decode(text.as_bytes(), 10).unwrap();
        assert_eq!(back, map);
        let mut units: Vec<(i64, &str)> = back.hand_offs().collect();
        units.sort();
        assert_eq!(
            units,
            vec![(11, "clicks"), (11, "views"), (15, "views")],
            "finished (12) and committed (9) offsets need no hand-off entry"
        );
        let only = FinishedMap::new(10, []).with_hand_offs([(10, "clicks")]);
        assert!(!only.is_empty());
        assert_eq!(FinishedMap::decode(only.encode().as_bytes(), 10), Ok(only));
    }

    #[test]
    fn hand_off_sections_that_do_not_fit_are_left_out() {
        let base = 1_000;
        let finished = (base..base + MAX_SPAN as i64).step_by(2);
        let names: Vec<String> = (0..8).map(|i| format!("group-{i}")).collect();
        let units = (base + 1..base + MAX_SPAN as i64)
            .step_by(2)
            .flat_map(|o| names.iter().map(move |n| (o, n.as_str())));
        let map = FinishedMap::new(base, finished.clone()).with_hand_offs(units);
        let text = map.encode();
        assert!(text.len() <= METADATA_LIMIT, "{} bytes", text.len());
        let back = FinishedMap::decode(text.as_bytes(), base).unwrap();
        assert_eq!(back, FinishedMap::new(base, finished));
    }

    #[test]
    fn hostile_hand_off_sections_are_refused() {
        assert_malformed(&[
            "fh1:10:r.=rAAE",
            "fh1:10:r.clicks",
            "fh1:10:r.Clicks=rAAE",
            "fh1:10:r.a.b=rAAE",
            "fh1:10:r.clicks=z",
            "fh1:10:r.clicks=r!!",
        ]);
        let many = format!("fh1:10:r{}", ".g=r".repeat(MAX_SECTIONS + 1));
        assert!(FinishedMap::decode(many.as_bytes(), 10).is_err());
        let mut runs = Vec::new();
        leb128(0, &mut runs);
        leb128(1 << 40, &mut runs);
        let wide = format!("fh1:10:r.g=r{}", URL_SAFE_NO_PAD.encode(&runs));
        assert_eq!(
            FinishedMap::decode(wide.as_bytes(), 10),
            Err(MapError::TooWide)
        );
    }

    proptest! {
        /// Whatever is finished, the map round-trips through its metadata and answers
        /// `contains` exactly for the finished offsets at or above the base.
        #[test]
        fn round_trips_and_contains_exactly_the_finished(
            base in 0i64..1 << 40,
            steps in proptest::collection::vec((1i64..40, any::<bool>()), 0..400),
        ) {
            let mut finished = Vec::new();
            let mut o = base;
            for (step, done) in steps {
                if done {
                    finished.push(o);
                }
                o += step;
            }
            let map = FinishedMap::new(base, finished.iter().copied());
            let text = map.encode();
            prop_assert!(text.len() <= 4096);
            let back = FinishedMap::decode(text.as_bytes(), base).unwrap();
            prop_assert_eq!(&back, &map);
            prop_assert_eq!(back.len(), finished.len() as u64);
            for probe in base - 2..o + 2 {
                prop_assert_eq!(back.contains(probe), finished.binary_search(&probe).is_ok());
            }
        }

        /// The union of two maps is the map of the union of their offsets, clipped to the
        /// first one's base.
        #[test]
        fn union_is_the_map_of_both_sets(
            base in 0i64..60,
            other_base in 0i64..60,
            mine in proptest::collection::btree_set(0i64..120, 0..60),
            theirs in proptest::collection::btree_set(0i64..120, 0..60),
        ) {
            let merged = FinishedMap::new(base, mine.iter().copied())
                .union(&FinishedMap::new(other_base, theirs.iter().copied()));
            let both: std::collections::BTreeSet<i64> = mine
                .iter()
                .chain(theirs.iter().filter(|&&o| o >= other_base))
                .copied()
                .collect();
            prop_assert_eq!(merged, FinishedMap::new(base, both));
        }

        /// Arbitrary bytes never panic and never yield a map wider than MAX_SPAN.
        #[test]
        fn arbitrary_metadata_is_safe(tag in "[rb]", body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let text = format!("fh1:5:{tag}{}", URL_SAFE_NO_PAD.encode(&body));
            if let Ok(m) = FinishedMap::decode(text.as_bytes(), 5) {
                prop_assert!(m.ranges.last().is_none_or(|&(_, e)| (e - 5) as u64 <= MAX_SPAN));
            }
        }
    }
}
