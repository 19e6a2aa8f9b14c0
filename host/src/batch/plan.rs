//! Sharding a source: the files (and Parquet row groups) of a run become units, and units are
//! dealt into shards of about equal size.
//!
//! `parallelism: auto` picks the shard count from the source's size: one shard per
//! [`ShardTarget::rows`] rows (when the row count is known, as with Parquet) or per
//! [`ShardTarget::bytes`] bytes, whichever gives more, at least 1 and at most one per unit (a
//! unit — a JSON-lines or CSV file, a Parquet row group — is never split). An explicit number
//! is honoured up to the unit count.

use crate::spec::Parallelism;
use serde::{Deserialize, Serialize};

/// The smallest piece of a source a shard reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// `s3://bucket/key` or a local path.
    pub uri: String,
    /// Parquet: the row group; other formats read the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_group: Option<u32>,
    /// Rows, when known before reading (Parquet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// Bytes (compressed size for a row group).
    pub bytes: u64,
}

/// The size one shard should have under `parallelism: auto`.
#[derive(Debug, Clone, Copy)]
pub struct ShardTarget {
    pub rows: u64,
    pub bytes: u64,
    /// Upper bound on shards (AWS Batch array jobs take at most 10,000 children).
    pub max_shards: u32,
}

impl Default for ShardTarget {
    fn default() -> Self {
        ShardTarget {
            rows: 1_000_000,
            bytes: 256 << 20,
            max_shards: 10_000,
        }
    }
}

/// How many shards `units` get.
pub fn shard_count(units: &[Unit], parallelism: Parallelism, target: ShardTarget) -> u32 {
    let cap = (units.len() as u64).min(target.max_shards as u64).max(1) as u32;
    match parallelism {
        Parallelism::Shards(n) => n.clamp(1, cap),
        Parallelism::Auto => {
            let bytes: u64 = units.iter().map(|u| u.bytes).sum();
            let by_bytes = bytes.div_ceil(target.bytes.max(1));
            let by_rows = if units.iter().all(|u| u.rows.is_some()) {
                let rows: u64 = units.iter().filter_map(|u| u.rows).sum();
                rows.div_ceil(target.rows.max(1))
            } else {
                0
            };
            (by_bytes.max(by_rows).max(1).min(cap as u64)) as u32
        }
    }
}

/// Deal `units` (in source order) into `n` contiguous shards of about equal weight (rows when
/// every unit's row count is known, else bytes). Every shard gets at least one unit.
pub fn assign(units: Vec<Unit>, n: u32) -> Vec<Vec<Unit>> {
    let n = (n as usize).clamp(1, units.len().max(1));
    let by_rows = units.iter().all(|u| u.rows.is_some());
    let weight = |u: &Unit| {
        if by_rows {
            u.rows.unwrap_or(0).max(1)
        } else {
            u.bytes.max(1)
        }
    };
    let total: u64 = units.iter().map(weight).sum();
    let mut shards: Vec<Vec<Unit>> = vec![Vec::new(); n];
    let (mut shard, mut acc) = (0usize, 0u64);
    let count = units.len();
    for (i, u) in units.into_iter().enumerate() {
        // Move on once this shard has its share, but leave one unit for each later shard.
        let remaining_units = count - i;
        let remaining_shards = n - shard;
        if !shards[shard].is_empty()
            && shard + 1 < n
            && (acc * n as u64 >= total * (shard as u64 + 1) || remaining_units < remaining_shards)
        {
            shard += 1;
        }
        acc += weight(&u);
        shards[shard].push(u);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: u64) -> Unit {
        Unit {
            uri: format!("f{bytes}"),
            row_group: None,
            rows: None,
            bytes,
        }
    }

    fn group(rows: u64) -> Unit {
        Unit {
            rows: Some(rows),
            row_group: Some(0),
            ..file(rows * 10)
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn auto_follows_bytes_for_text_formats() {
        let t = ShardTarget::default();
        let units: Vec<Unit> = (0..10).map(|_| file(100 * MIB)).collect();
        // 1000 MiB / 256 MiB → 4 shards.
        assert_eq!(shard_count(&units, Parallelism::Auto, t), 4);
        assert_eq!(shard_count(&units[..1], Parallelism::Auto, t), 1);
        assert_eq!(shard_count(&[], Parallelism::Auto, t), 1);
    }

    #[test]
    fn auto_follows_rows_when_known() {
        let t = ShardTarget {
            rows: 1000,
            ..Default::default()
        };
        let units: Vec<Unit> = (0..8).map(|_| group(500)).collect();
        assert_eq!(shard_count(&units, Parallelism::Auto, t), 4);
    }

    #[test]
    fn never_more_shards_than_units_or_the_cap() {
        let t = ShardTarget {
            rows: 1,
            bytes: 1,
            max_shards: 3,
        };
        let units: Vec<Unit> = (0..5).map(|_| group(100)).collect();
        assert_eq!(shard_count(&units, Parallelism::Auto, t), 3);
        assert_eq!(shard_count(&units, Parallelism::Shards(50), t), 3);
        assert_eq!(
            shard_count(&units[..2], Parallelism::Shards(50), ShardTarget::default()),
            2
        );
        assert_eq!(
            shard_count(&units, Parallelism::Shards(2), ShardTarget::default()),
            2
        );
    }

    #[test]
    fn assignment_is_balanced_contiguous_and_complete() {
        let units: Vec<Unit> = [5, 5, 5, 5, 40, 5, 5, 5, 5, 20]
            .into_iter()
            .enumerate()
            .map(|(i, r)| Unit {
                uri: format!("u{i}"),
                ..group(r)
            })
            .collect();
        for n in 1..=10 {
            let shards = assign(units.clone(), n);
            assert_eq!(shards.len(), n as usize);
            assert!(shards.iter().all(|s| !s.is_empty()), "n={n}: {shards:?}");
            let flat: Vec<Unit> = shards.into_iter().flatten().collect();
            assert_eq!(flat, units, "n={n}: order and completeness");
        }
        let sizes: Vec<u64> = assign(units, 2)
            .iter()
            .map(|s| s.iter().filter_map(|u| u.rows).sum())
            .collect();
        assert_eq!(sizes, vec![60, 40]);
    }
}
