//! Ordering inside one partition: which units of work may run now.
//!
//! A unit is one event for one feature group. Its group's ordering mode puts it in a lane:
//! - `key`: one lane per (group, message key) — same key in order, different keys in parallel;
//! - `partition`: one lane per group — strictly in offset order;
//! - `unordered`: no lane — runs at once.
//!
//! A lane has at most one dispatch in flight. Units that arrive for a lane while the lane
//! is busy queue behind it and are released together when it finishes, so a hot key is
//! processed in batches rather than one event at a time. All units of a lane that are ready
//! together go into the same dispatch (in offset order); the writer applies one entity's
//! mutations of a batch in that order.

use crate::dispatch::GroupId;
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

/// A lane of one group within one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LaneKey {
    /// `key` ordering: the hash of the message key (a collision only serializes two keys).
    Key { group: GroupId, hash: u64 },
    /// `partition` ordering.
    Partition { group: GroupId },
}

impl LaneKey {
    pub fn for_key(group: GroupId, key: Option<&[u8]>) -> LaneKey {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        LaneKey::Key {
            group,
            hash: h.finish(),
        }
    }
}

/// Units waiting for their lane, and the units ready to dispatch.
#[derive(Debug)]
pub struct Lanes<U> {
    /// Lanes with a dispatch in flight, and the units queued behind it.
    busy: HashMap<LaneKey, VecDeque<U>>,
    ready: Vec<(Option<LaneKey>, U)>,
    /// Lanes whose units are in `ready` (not yet taken): more units may join them.
    ready_lanes: HashSet<LaneKey>,
    queued: usize,
}

impl<U> Default for Lanes<U> {
    fn default() -> Self {
        Lanes {
            busy: HashMap::new(),
            ready: Vec::new(),
            ready_lanes: HashSet::new(),
            queued: 0,
        }
    }
}

impl<U> Lanes<U> {
    /// Add a unit (units of one lane must be submitted in offset order).
    pub fn submit(&mut self, lane: Option<LaneKey>, unit: U) {
        let Some(lane) = lane else {
            self.ready.push((None, unit));
            return;
        };
        if self.ready_lanes.contains(&lane) || !self.busy.contains_key(&lane) {
            self.busy.entry(lane).or_default();
            self.ready_lanes.insert(lane);
            self.ready.push((Some(lane), unit));
        } else {
            self.busy.get_mut(&lane).expect("checked").push_back(unit);
            self.queued += 1;
        }
    }

    /// Everything that may run now; their lanes stay busy until [`release`](Self::release).
    pub fn take_ready(&mut self) -> Vec<(Option<LaneKey>, U)> {
        self.ready_lanes.clear();
        std::mem::take(&mut self.ready)
    }

    /// A dispatch of `lane` finished: its queued units become ready, or the lane goes idle.
    pub fn release(&mut self, lane: LaneKey) {
        let Some(queue) = self.busy.get_mut(&lane) else {
            return;
        };
        if queue.is_empty() {
            self.busy.remove(&lane);
            return;
        }
        self.queued -= queue.len();
        self.ready_lanes.insert(lane);
        self.ready
            .extend(queue.drain(..).map(|unit| (Some(lane), unit)));
    }

    /// Units waiting behind a busy lane.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Lanes with a dispatch in flight.
    pub fn busy_lanes(&self) -> usize {
        self.busy.len() - self.ready_lanes.len()
    }
}

/// Split one group's ready units into batches of about `cap` units that can run
/// concurrently: all units of one lane stay in one batch (in order), so lanes keep their
/// order; a lane longer than `cap` makes its batch longer.
pub fn split_batches<U>(units: Vec<(Option<LaneKey>, U)>, cap: usize) -> Vec<Vec<U>> {
    let cap = cap.max(1);
    let mut batches: Vec<Vec<U>> = Vec::new();
    let mut lane_batch: HashMap<LaneKey, usize> = HashMap::new();
    for (lane, unit) in units {
        let at = match lane.and_then(|l| lane_batch.get(&l).copied()) {
            Some(i) => i,
            None => {
                if batches.last().is_none_or(|b| b.len() >= cap) {
                    batches.push(Vec::new());
                }
                let i = batches.len() - 1;
                if let Some(l) = lane {
                    lane_batch.insert(l, i);
                }
                i
            }
        };
        batches[at].push(unit);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    const G0: GroupId = GroupId::new(0);
    use proptest::prelude::*;

    fn units(ready: Vec<(Option<LaneKey>, i64)>) -> Vec<i64> {
        ready.into_iter().map(|(_, u)| u).collect()
    }

    #[test]
    fn same_key_waits_different_keys_run() {
        let a = LaneKey::for_key(G0, Some(b"a"));
        let b = LaneKey::for_key(G0, Some(b"b"));
        let mut l = Lanes::default();
        l.submit(Some(a), 1);
        l.submit(Some(b), 2);
        l.submit(Some(a), 3); // joins 1: same dispatch, in order
        assert_eq!(units(l.take_ready()), vec![1, 2, 3]);
        l.submit(Some(a), 4);
        l.submit(Some(a), 5);
        l.submit(None, 6);
        assert_eq!(units(l.take_ready()), vec![6], "lane a is busy");
        assert_eq!(l.queued(), 2);
        l.release(b);
        assert!(l.take_ready().is_empty());
        l.release(a);
        assert_eq!(units(l.take_ready()), vec![4, 5]);
        l.release(a);
        assert_eq!(l.busy_lanes(), 0);
        assert_eq!(l.queued(), 0);
    }

    #[test]
    fn groups_have_separate_lanes() {
        let mut l = Lanes::default();
        l.submit(Some(LaneKey::Partition { group: G0 }), 1);
        assert_eq!(l.take_ready().len(), 1);
        l.submit(Some(LaneKey::Partition { group: G0 }), 2);
        l.submit(
            Some(LaneKey::Partition {
                group: GroupId::new(1),
            }),
            3,
        );
        assert_eq!(units(l.take_ready()), vec![3]);
    }

    #[test]
    fn batches_keep_each_lane_whole_and_in_order() {
        let a = Some(LaneKey::for_key(G0, Some(b"a")));
        let b = Some(LaneKey::for_key(G0, Some(b"b")));
        let units = vec![(a, 1), (b, 2), (None, 3), (a, 4), (None, 5), (a, 6)];
        let batches = split_batches(units, 2);
        assert_eq!(batches, vec![vec![1, 2, 4, 6], vec![3, 5]]);
        assert_eq!(split_batches::<u8>(vec![], 4), Vec::<Vec<u8>>::new());
    }

    proptest! {
        /// Whatever the interleaving of arrivals and completions: a lane never has two
        /// dispatches in flight, each lane's units run in submission order, and every unit
        /// runs exactly once.
        #[test]
        fn lanes_serialize_and_lose_nothing(
            script in proptest::collection::vec((0u8..4, any::<bool>()), 1..200),
        ) {
            let mut l = Lanes::default();
            let mut in_flight: HashSet<LaneKey> = HashSet::new();
            let mut dispatched: Vec<Vec<(Option<LaneKey>, usize)>> = Vec::new();
            let mut ran: Vec<(u8, usize)> = Vec::new();
            let lane = |k: u8| (k < 3).then(|| LaneKey::for_key(G0, Some(&[k][..])));
            for (n, (k, complete)) in script.iter().enumerate() {
                l.submit(lane(*k), n);
                if *complete && !dispatched.is_empty() {
                    let done = dispatched.remove(0);
                    let mut seen = HashSet::new();
                    for (lk, _) in done {
                        if let Some(lk) = lk && seen.insert(lk) {
                            in_flight.remove(&lk);
                            l.release(lk);
                        }
                    }
                }
                let batch = l.take_ready();
                let mut lanes_here = HashSet::new();
                for (lk, u) in &batch {
                    if let Some(lk) = lk
                        && lanes_here.insert(*lk)
                    {
                        prop_assert!(in_flight.insert(*lk), "lane dispatched twice");
                    }
                    ran.push((script[*u].0, *u));
                }
                if !batch.is_empty() {
                    dispatched.push(batch);
                }
            }
            // Drain.
            while !dispatched.is_empty() {
                let done = dispatched.remove(0);
                let mut seen = HashSet::new();
                for (lk, _) in done {
                    if let Some(lk) = lk && seen.insert(lk) {
                        l.release(lk);
                    }
                }
                let batch = l.take_ready();
                for (_, u) in &batch {
                    ran.push((script[*u].0, *u));
                }
                if !batch.is_empty() {
                    dispatched.push(batch);
                }
            }
            prop_assert_eq!(ran.len(), script.len());
            for k in 0..3u8 {
                let order: Vec<usize> = ran.iter().filter(|(kk, _)| *kk == k).map(|x| x.1).collect();
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "lane {} out of order: {:?}", k, order);
            }
        }
    }
}
