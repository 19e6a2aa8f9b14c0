//! Per-partition offset tracking for out-of-order completion.
//!
//! Messages of a partition are delivered in offset order (with gaps: compaction, transaction
//! markers) and may finish in any order. The committable offset is the **low watermark**: one
//! past the highest offset below which every delivered message is finished — never the
//! largest finished offset, which would skip in-flight messages after a crash.

use std::collections::VecDeque;

/// Why an offset could not be tracked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OffsetError {
    #[error("offset {offset} delivered after {last}: deliveries must increase")]
    OutOfOrder { offset: i64, last: i64 },
    #[error("offset {0} was not delivered or is already finished")]
    Unknown(i64),
}

/// Tracks delivered and finished offsets of one partition.
///
/// `deliver` is O(1), `finish` O(log n) (binary search over the in-flight window) plus an
/// amortized O(1) advance of the watermark.
#[derive(Debug, Clone, Default)]
pub struct OffsetTracker {
    /// Delivered offsets not yet below the watermark, increasing, with their done flag.
    window: VecDeque<(i64, bool)>,
    /// Highest delivered offset.
    last: Option<i64>,
    /// Finished-but-not-yet-contiguous count, for metrics.
    done_in_window: usize,
}

impl OffsetTracker {
    pub fn new() -> OffsetTracker {
        OffsetTracker::default()
    }

    /// Register a delivered message.
    pub fn deliver(&mut self, offset: i64) -> Result<(), OffsetError> {
        if let Some(last) = self.last
            && offset <= last
        {
            return Err(OffsetError::OutOfOrder { offset, last });
        }
        self.last = Some(offset);
        self.window.push_back((offset, false));
        Ok(())
    }

    /// Mark a delivered message finished (succeeded, or handed off to retry / dead letter).
    pub fn finish(&mut self, offset: i64) -> Result<(), OffsetError> {
        let i = self
            .window
            .binary_search_by_key(&offset, |(o, _)| *o)
            .map_err(|_| OffsetError::Unknown(offset))?;
        if self.window[i].1 {
            return Err(OffsetError::Unknown(offset));
        }
        self.window[i].1 = true;
        self.done_in_window += 1;
        while let Some(&(_, true)) = self.window.front() {
            self.window.pop_front();
            self.done_in_window -= 1;
        }
        Ok(())
    }

    /// The offset to commit: every delivered message below it is finished. `None` before the
    /// first delivery.
    pub fn committable(&self) -> Option<i64> {
        match self.window.front() {
            Some(&(first_unfinished, _)) => Some(first_unfinished),
            None => self.last.map(|l| l + 1),
        }
    }

    /// Finished offsets above the low watermark, increasing: what a new owner may skip
    /// ([`super::offset_map`]).
    pub fn finished_above(&self) -> impl Iterator<Item = i64> + '_ {
        self.window
            .iter()
            .filter(|(_, done)| *done)
            .map(|(o, _)| *o)
    }

    /// Messages delivered and not finished.
    pub fn in_flight(&self) -> usize {
        self.window.len() - self.done_in_window
    }

    /// Offsets from the lowest unfinished one to the highest delivered, inclusive (0 when
    /// nothing is unfinished). Finished offsets inside it are still tracked here and stay
    /// in every written entity's applied-offset list until the lowest one finishes, so this
    /// — not [`in_flight`](Self::in_flight) — is what a single stuck message grows.
    pub fn span(&self) -> u64 {
        match (self.window.front(), self.last) {
            (Some(&(first, _)), Some(last)) => (last - first + 1) as u64,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_span_counts_from_the_lowest_unfinished_offset() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.span(), 0);
        for o in 0..100 {
            t.deliver(o).unwrap();
        }
        for o in 1..100 {
            t.finish(o).unwrap();
        }
        assert_eq!(
            (t.in_flight(), t.span()),
            (1, 100),
            "one stuck message, a long span"
        );
        t.finish(0).unwrap();
        assert_eq!(t.span(), 0);
    }

    #[test]
    fn watermark_waits_for_the_lowest_unfinished() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.committable(), None);
        for o in [10, 11, 15, 16] {
            t.deliver(o).unwrap();
        }
        assert_eq!(t.committable(), Some(10));
        t.finish(15).unwrap();
        t.finish(11).unwrap();
        assert_eq!(t.committable(), Some(10), "10 still in flight");
        assert_eq!(t.finished_above().collect::<Vec<_>>(), vec![11, 15]);
        t.finish(10).unwrap();
        assert_eq!(t.committable(), Some(16), "gap 12..14 does not block");
        t.finish(16).unwrap();
        assert_eq!(t.committable(), Some(17));
        assert_eq!(t.finished_above().count(), 0);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn rejects_misuse() {
        let mut t = OffsetTracker::new();
        t.deliver(5).unwrap();
        assert_eq!(
            t.deliver(5),
            Err(OffsetError::OutOfOrder { offset: 5, last: 5 })
        );
        assert_eq!(t.finish(4), Err(OffsetError::Unknown(4)));
        t.deliver(6).unwrap();
        t.finish(6).unwrap();
        assert_eq!(t.finish(6), Err(OffsetError::Unknown(6)));
    }

    proptest! {
        /// For random delivery sets with gaps and random completion orders, the committed
        /// offset never passes an unfinished offset, never goes backwards, and reaches one
        /// past the last delivery when all are finished.
        #[test]
        fn never_passes_an_unfinished_offset(
            gaps in proptest::collection::vec(1i64..5, 1..200),
            order in any::<u64>(),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in gaps {
                o += g;
                offsets.push(o);
            }
            let mut t = OffsetTracker::new();
            for &o in &offsets {
                t.deliver(o).unwrap();
            }
            let mut finish_order = offsets.clone();
            let mut x = order;
            for i in (1..finish_order.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                finish_order.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut unfinished: std::collections::BTreeSet<i64> = offsets.iter().copied().collect();
            let mut previous = t.committable().unwrap();
            for o in finish_order {
                t.finish(o).unwrap();
                unfinished.remove(&o);
                let c = t.committable().unwrap();
                if let Some(&lowest) = unfinished.first() {
                    prop_assert!(c <= lowest, "committed {} past unfinished {}", c, lowest);
                }
                prop_assert!(c >= previous, "watermark went back from {} to {}", previous, c);
                previous = c;
            }
            prop_assert_eq!(t.committable(), Some(offsets.last().unwrap() + 1));
        }
    }
}
