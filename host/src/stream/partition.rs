//! The bookkeeping of one assigned partition: delivered offsets and the low watermark
//! ([`OffsetTracker`]), which units may run ([`Lanes`]), how many events and bytes are in
//! flight (backpressure), what the previous owner finished above its commit
//! ([`FinishedMap`]: skipped), and whether the partition was revoked (fencing).
//!
//! Pure state with no I/O, so every rule is unit-tested; the consumer holds it under a mutex.

use super::lanes::{LaneKey, Lanes};
use super::offset_map::FinishedMap;
use super::offsets::{OffsetError, OffsetTracker};
use crate::dispatch::GroupId;
use crate::event::Event;
use std::collections::HashMap;
use std::sync::Arc;

/// Bounds of one partition's in-flight work.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Events delivered and not finished.
    pub max_in_flight: usize,
    /// Payload bytes of those events.
    pub max_buffered_bytes: usize,
    /// Offsets from the lowest unfinished to the highest delivered: bounds what one stuck
    /// event lets the window (and every entity's applied-offset list) grow to.
    pub max_offset_span: u64,
}

/// A retried event's history, carried in the retry topic's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryMeta {
    /// Failed attempts so far.
    pub attempts: u32,
    pub first_failure_ms: i64,
    /// Not to be processed before this time (ms since the epoch).
    pub due_ms: i64,
}

/// One event for one group.
#[derive(Debug, Clone)]
pub struct Unit {
    /// Offset of the consumed message in this partition (for a retried event, its place in
    /// the retry topic; `event` then carries the original coordinates).
    pub offset: i64,
    pub event: Arc<Event>,
    pub group: GroupId,
    pub origin: Origin,
}

impl Unit {
    /// The lane the unit runs in: source units only, by their group's ordering; retried
    /// units run on their own once due.
    pub fn lane(&self) -> Option<LaneKey> {
        match self.origin {
            Origin::Source { lane } => lane,
            Origin::Retry(_) | Origin::Poison(_) => None,
        }
    }
}

/// Where a unit's message came from: the cases are exclusive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A source topic: processed as soon as its lane (none: `unordered`) lets it.
    Source { lane: Option<LaneKey> },
    /// A retry topic: its history, from the record's headers; waits until due.
    Retry(RetryMeta),
    /// A message that cannot be processed at all (an unreadable retry record): goes to the
    /// dead-letter topic with this reason.
    Poison(String),
}

/// What became of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Its units wait in their lanes.
    Queued,
    /// Routed to no group: finished at once.
    Unrouted,
    /// The previous owner finished it (its commit's map says so): finished at once.
    Skipped,
}

/// An offset commit to send: the low watermark and the finished offsets above it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    pub offset: i64,
    /// [`FinishedMap::encode`] of the offsets finished above `offset`.
    pub metadata: String,
}

#[derive(Debug)]
struct Pending {
    groups_left: usize,
    bytes: usize,
}

#[derive(Debug)]
pub struct PartitionState {
    tracker: OffsetTracker,
    lanes: Lanes<Unit>,
    pending: HashMap<i64, Pending>,
    buffered_bytes: usize,
    /// At the bound: the partition's queue is not read (backpressure).
    pub paused: bool,
    /// Revoked or lost: results that arrive now are dropped, nothing is committed.
    pub fenced: bool,
    /// Last commit sent (or known committed) for this partition.
    pub committed: Option<Commit>,
    /// Offsets the previous owner finished above its commit.
    skip: FinishedMap,
    /// Units (offset, group) handed off in the open transaction.
    txn_hand_offs: Vec<(i64, GroupId)>,
    /// Units of unfinished offsets whose hand-off was committed: after a rewind they are
    /// not handed off again (the finished map holds whole offsets only).
    committed_hand_offs: HashMap<i64, Vec<GroupId>>,
    /// Carried over by a rewind: units not to run again.
    skip_units: HashMap<i64, Vec<GroupId>>,
}

impl Default for PartitionState {
    fn default() -> Self {
        PartitionState {
            tracker: OffsetTracker::new(),
            lanes: Lanes::default(),
            pending: HashMap::new(),
            buffered_bytes: 0,
            paused: false,
            fenced: false,
            committed: None,
            skip: FinishedMap::default(),
            txn_hand_offs: Vec::new(),
            committed_hand_offs: HashMap::new(),
            skip_units: HashMap::new(),
        }
    }
}

impl PartitionState {
    /// Resume where the previous owner committed: `map` holds what it finished above its
    /// committed offset, and the units of unfinished offsets it handed off (by group name;
    /// `groups` names this host's groups, by [`GroupId`]).
    pub fn resume(&mut self, map: FinishedMap, groups: &[String]) {
        for (offset, name) in map.hand_offs() {
            if let Some(g) = groups.iter().position(|n| n == name) {
                self.skip_unit(offset, GroupId::new(g));
            }
        }
        self.skip = map;
    }

    /// A unit of `offset` for `group` was handed off in the open transaction.
    pub fn handed_off(&mut self, offset: i64, group: GroupId) {
        self.txn_hand_offs.push((offset, group));
    }

    /// The open transaction committed: its hand-offs of offsets still unfinished must not
    /// be made again if this partition is rewound.
    pub fn transaction_committed(&mut self) {
        for (offset, group) in std::mem::take(&mut self.txn_hand_offs) {
            self.committed_hand_offs
                .entry(offset)
                .or_default()
                .push(group);
        }
        let pending = &self.pending;
        self.committed_hand_offs
            .retain(|o, _| pending.contains_key(o));
    }

    /// For the state that replaces this one after a rewind: the committed hand-offs of
    /// offsets still unfinished, and those the previous owner's map named that were not
    /// delivered yet.
    pub fn committed_hand_offs(&self) -> HashMap<i64, Vec<GroupId>> {
        let mut all: HashMap<i64, Vec<GroupId>> = HashMap::new();
        for (offset, group) in self.kept_hand_offs() {
            all.entry(offset).or_default().push(group);
        }
        all
    }

    /// Units `(offset, group)` of unfinished offsets whose hand-off is committed: by this
    /// owner, or by one before it (inherited, not delivered yet). Disjoint: an offset
    /// leaves `skip_units` when it is delivered.
    fn kept_hand_offs(&self) -> impl Iterator<Item = (i64, GroupId)> + '_ {
        self.committed_hand_offs
            .iter()
            .chain(&self.skip_units)
            .flat_map(|(&o, gs)| gs.iter().map(move |&g| (o, g)))
    }

    /// Resume after a rewind: `units` are not to run again.
    pub fn skip_units(&mut self, units: HashMap<i64, Vec<GroupId>>) {
        for (offset, groups) in units {
            for g in groups {
                self.skip_unit(offset, g);
            }
        }
    }

    fn skip_unit(&mut self, offset: i64, group: GroupId) {
        let groups = self.skip_units.entry(offset).or_default();
        if !groups.contains(&group) {
            groups.push(group);
        }
    }

    /// Register a delivered message (`bytes` of payload) and its units. A message with no
    /// units (routed nowhere), or one the previous owner finished, finishes at once.
    pub fn deliver(
        &mut self,
        offset: i64,
        bytes: usize,
        units: Vec<Unit>,
    ) -> Result<Delivered, OffsetError> {
        self.tracker.deliver(offset)?;
        if self.skip.contains(offset) {
            self.skip_units.remove(&offset);
            self.tracker.finish(offset)?;
            return Ok(Delivered::Skipped);
        }
        let units = match self.skip_units.remove(&offset) {
            Some(done) => {
                let left: Vec<Unit> = units
                    .into_iter()
                    .filter(|u| !done.contains(&u.group))
                    .collect();
                if left.is_empty() {
                    self.tracker.finish(offset)?;
                    return Ok(Delivered::Skipped);
                }
                // Still handed off while the rest runs: every commit until it finishes
                // says so.
                self.committed_hand_offs.insert(offset, done);
                left
            }
            None => units,
        };
        if units.is_empty() {
            self.tracker.finish(offset)?;
            return Ok(Delivered::Unrouted);
        }
        self.buffered_bytes += bytes;
        self.pending.insert(
            offset,
            Pending {
                groups_left: units.len(),
                bytes,
            },
        );
        for u in units {
            self.lanes.submit(u.lane(), u);
        }
        Ok(Delivered::Queued)
    }

    /// Units that may run now.
    pub fn take_ready(&mut self) -> Vec<Unit> {
        self.lanes
            .take_ready()
            .into_iter()
            .map(|(_, u)| u)
            .collect()
    }

    /// A dispatch finished (each unit succeeded or was handed off): release its lanes and
    /// finish the events whose every group is done. Returns the offsets finished.
    pub fn complete(&mut self, units: &[Unit]) -> Vec<i64> {
        let mut released = Vec::new();
        let mut finished = Vec::new();
        for u in units {
            if let Some(lane) = u.lane()
                && !released.contains(&lane)
            {
                released.push(lane);
                self.lanes.release(lane);
            }
            let offset = u.offset;
            let Some(p) = self.pending.get_mut(&offset) else {
                tracing::error!(offset, "completed a unit of an unknown offset");
                continue;
            };
            p.groups_left -= 1;
            if p.groups_left == 0 {
                self.buffered_bytes -= p.bytes;
                self.pending.remove(&offset);
                if let Err(e) = self.tracker.finish(offset) {
                    tracing::error!(offset, error = %e, "offset tracking");
                }
                finished.push(offset);
            }
        }
        finished
    }

    /// Every offset below this is finished: what to commit.
    pub fn low_watermark(&self) -> Option<i64> {
        self.tracker.committable()
    }

    /// The floor of the positions a batch starting now writes ([`Position::floor`]): the
    /// low watermark, but never above an offset handed off in the open transaction. A floor
    /// claims that every lower offset will never be applied again; a hand-off that is not
    /// committed yet may still abort (or die with the host), and then its event is redone
    /// from the commit and must apply.
    ///
    /// [`Position::floor`]: crate::feature::Position::floor
    pub fn floor(&self) -> Option<i64> {
        let open = self.txn_hand_offs.iter().map(|&(o, _)| o).min();
        match (self.low_watermark(), open) {
            (Some(w), Some(o)) => Some(w.min(o)),
            (w, _) => w,
        }
    }

    /// The commit to send if the low watermark or the finished offsets above it changed
    /// since the last one. The map is what lets a revoke hand over the work finished behind
    /// a waiting event, so it is committed even when the watermark stands still.
    /// `groups` names the groups by [`GroupId`]: the map names the handed-off units of unfinished
    /// offsets by group, so that the next owner does not hand them off again.
    pub fn to_commit(&self, groups: &[String]) -> Option<Commit> {
        let offset = self.low_watermark()?;
        let hand_offs = self
            .txn_hand_offs
            .iter()
            .copied()
            .chain(self.kept_hand_offs())
            .filter_map(|(o, g)| groups.get(g.index()).map(|name| (o, name.as_str())));
        // What the previous owner finished and this one has not read yet stays finished:
        // a commit without it would make the next owner redo it, hand-offs included.
        let metadata = FinishedMap::new(offset, self.tracker.finished_above())
            .union(&self.skip)
            .with_hand_offs(hand_offs)
            .encode();
        let next = Commit { offset, metadata };
        match &self.committed {
            Some(done) if done.offset > offset || *done == next => None,
            _ => Some(next),
        }
    }

    pub fn in_flight(&self) -> usize {
        self.tracker.in_flight()
    }

    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Whether the partition is at its bound (stop reading it).
    pub fn over(&self, limits: &Limits) -> bool {
        self.in_flight() >= limits.max_in_flight.max(1)
            || self.buffered_bytes >= limits.max_buffered_bytes.max(1)
            || self.tracker.span() >= limits.max_offset_span.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(offset: i64, key: &str, bytes: usize) -> Arc<Event> {
        Arc::new(Event {
            topic: "t".into(),
            partition: 0,
            offset,
            key: Some(key.as_bytes().to_vec()),
            timestamp_ms: 0,
            headers: vec![],
            payload: vec![b'x'; bytes],
            position: None,
        })
    }

    fn unit(e: &Arc<Event>, group: usize) -> Unit {
        let group = GroupId::new(group);
        Unit {
            offset: e.offset,
            event: e.clone(),
            group,
            origin: Origin::Source {
                lane: Some(LaneKey::for_key(group, e.key.as_deref())),
            },
        }
    }

    #[test]
    fn event_finishes_when_every_group_is_done() {
        let mut p = PartitionState::default();
        let e0 = event(0, "a", 10);
        let e1 = event(1, "b", 10);
        p.deliver(
            e0.offset,
            e0.payload.len(),
            vec![unit(&e0, 0), unit(&e0, 1)],
        )
        .unwrap();
        p.deliver(e1.offset, e1.payload.len(), vec![unit(&e1, 0)])
            .unwrap();
        let ready = p.take_ready();
        assert_eq!(ready.len(), 3);
        assert_eq!(p.buffered_bytes(), 20);
        // e1 and half of e0 finish; e0 still has group 1 in flight.
        let (g0, g1): (Vec<Unit>, Vec<Unit>) =
            ready.into_iter().partition(|u| u.group == GroupId::new(0));
        assert_eq!(p.complete(&g0), vec![1]);
        assert_eq!(p.low_watermark(), Some(0), "offset 0 still in flight");
        assert_eq!(p.complete(&g1), vec![0]);
        assert_eq!(p.low_watermark(), Some(2));
        assert_eq!((p.in_flight(), p.buffered_bytes()), (0, 0));
    }

    #[test]
    fn unrouted_events_finish_at_once_and_gaps_do_not_block() {
        let mut p = PartitionState::default();
        let e5 = event(5, "a", 1);
        p.deliver(e5.offset, e5.payload.len(), vec![]).unwrap();
        let at = |offset: i64| Commit {
            offset,
            metadata: String::new(),
        };
        assert_eq!(p.to_commit(&[]), Some(at(6)));
        p.committed = Some(at(6));
        assert_eq!(p.to_commit(&[]), None, "nothing new to commit");
        let e9 = event(9, "a", 1);
        p.deliver(e9.offset, e9.payload.len(), vec![unit(&e9, 0)])
            .unwrap();
        let r = p.take_ready();
        p.complete(&r);
        assert_eq!(p.to_commit(&[]), Some(at(10)));
    }

    /// Deliver `offsets` (one unit of group 0 each, distinct keys) and finish `done`.
    fn run(p: &mut PartitionState, offsets: std::ops::Range<i64>, done: &[i64]) {
        for o in offsets {
            let e = event(o, &format!("k{o}"), 1);
            p.deliver(o, 1, vec![unit(&e, 0)]).unwrap();
        }
        let ready = p.take_ready();
        let finished: Vec<Unit> = ready
            .into_iter()
            .filter(|u| done.contains(&u.offset))
            .collect();
        p.complete(&finished);
    }

    #[test]
    fn work_finished_behind_a_waiting_event_is_committed_in_the_map() {
        let mut p = PartitionState::default();
        run(&mut p, 0..6, &[1, 2, 4]);
        let c = p.to_commit(&[]).unwrap();
        assert_eq!(c.offset, 0, "offset 0 waits");
        assert_eq!(c.metadata, FinishedMap::new(0, [1, 2, 4]).encode());
        p.committed = Some(c);
        assert_eq!(p.to_commit(&[]), None);
        // More finished behind the waiting one: a new commit though the watermark stands.
        let e5 = event(5, "k5", 1);
        p.complete(&[unit(&e5, 0)]);
        let c = p.to_commit(&[]).expect("the map changed");
        assert_eq!(
            (c.offset, c.metadata),
            (0, FinishedMap::new(0, [1, 2, 4, 5]).encode())
        );
    }

    #[test]
    fn a_rewind_does_not_redo_committed_hand_offs_of_unfinished_offsets() {
        let mut p = PartitionState::default();
        let e = event(0, "k", 1);
        p.deliver(0, 1, vec![unit(&e, 0), unit(&e, 1)]).unwrap();
        let ready = p.take_ready();
        // Group 0 failed and was handed off; group 1 is still running.
        p.handed_off(0, GroupId::new(0));
        let g0: Vec<Unit> = ready
            .iter()
            .filter(|u| u.group == GroupId::new(0))
            .cloned()
            .collect();
        p.complete(&g0);
        p.transaction_committed();
        // A later transaction aborts: the partition starts over from its commit.
        p.handed_off(0, GroupId::new(1));
        let mut next = PartitionState::default();
        next.skip_units(p.committed_hand_offs());
        next.deliver(0, 1, vec![unit(&e, 0), unit(&e, 1)]).unwrap();
        let again: Vec<usize> = next.take_ready().iter().map(|u| u.group.index()).collect();
        assert_eq!(
            again,
            vec![1],
            "group 0's hand-off is committed; only group 1 runs"
        );
    }

    #[test]
    fn a_new_owner_does_not_repeat_the_hand_offs_the_map_names() {
        let groups = ["clicks".to_owned(), "views".to_owned()];
        let mut previous = PartitionState::default();
        let e = event(0, "k", 1);
        previous
            .deliver(0, 1, vec![unit(&e, 0), unit(&e, 1)])
            .unwrap();
        let ready = previous.take_ready();
        previous.handed_off(0, GroupId::new(0));
        let g0: Vec<Unit> = ready
            .iter()
            .filter(|u| u.group == GroupId::new(0))
            .cloned()
            .collect();
        previous.complete(&g0);
        // Committed with the hand-off (same transaction); then the host dies.
        let commit = previous.to_commit(&groups).unwrap();
        assert_eq!(
            commit.offset, 0,
            "offset 0 is not finished: views still runs"
        );

        // The next owner serves the groups in another order: names, not indices, count.
        let reordered = ["views".to_owned(), "clicks".to_owned()];
        let mut next = PartitionState::default();
        let map = FinishedMap::decode(commit.metadata.as_bytes(), commit.offset).unwrap();
        next.resume(map, &reordered);
        next.deliver(0, 1, vec![unit(&e, 0), unit(&e, 1)]).unwrap();
        let again: Vec<usize> = next.take_ready().iter().map(|u| u.group.index()).collect();
        assert_eq!(again, vec![0], "only views (index 0 here) runs again");
        // Until offset 0 finishes, every commit still names the hand-off.
        let c = next.to_commit(&reordered).unwrap();
        let map = FinishedMap::decode(c.metadata.as_bytes(), c.offset).unwrap();
        assert_eq!(map.hand_offs().collect::<Vec<_>>(), vec![(0, "clicks")]);
    }

    /// A new owner's state, resumed from `commit`.
    fn resumed_from(commit: &Commit) -> PartitionState {
        let mut next = PartitionState::default();
        next.resume(
            FinishedMap::decode(commit.metadata.as_bytes(), commit.offset).unwrap(),
            &[],
        );
        next
    }

    #[test]
    fn a_new_owner_commits_the_finished_offsets_it_has_not_read_yet() {
        let mut previous = PartitionState::default();
        run(&mut previous, 0..6, &[2, 3, 5]);
        let commit = previous.to_commit(&[]).unwrap();
        // The next owner reads offset 0 and commits before it reaches 2: the commit must
        // still say that 2, 3 and 5 are finished, or a second move redoes them.
        let mut next = resumed_from(&commit);
        let e = event(0, "k0", 1);
        next.deliver(0, 1, vec![unit(&e, 0)]).unwrap();
        let again = next.to_commit(&[]).unwrap();
        assert_eq!(again, commit);
    }

    #[test]
    fn the_floor_stays_below_hand_offs_not_yet_committed() {
        let mut p = PartitionState::default();
        run(&mut p, 0..3, &[0, 1, 2]);
        let e = event(3, "k", 1);
        p.deliver(3, 1, vec![unit(&e, 0)]).unwrap();
        let u = p.take_ready();
        p.handed_off(3, GroupId::new(0));
        p.complete(&u);
        assert_eq!(p.low_watermark(), Some(4));
        assert_eq!(p.floor(), Some(3), "the hand-off may still abort");
        p.transaction_committed();
        assert_eq!(p.floor(), Some(4));
    }

    #[test]
    fn a_new_owner_skips_what_the_map_says_was_finished() {
        let mut previous = PartitionState::default();
        run(&mut previous, 0..6, &[1, 2, 4]);
        let commit = previous.to_commit(&[]).unwrap();

        let mut next = resumed_from(&commit);
        let mut skipped = Vec::new();
        for o in commit.offset..6 {
            let e = event(o, &format!("k{o}"), 1);
            if next.deliver(o, 1, vec![unit(&e, 0)]).unwrap() == Delivered::Skipped {
                skipped.push(o);
            }
        }
        assert_eq!(skipped, vec![1, 2, 4]);
        let ready: Vec<i64> = next.take_ready().iter().map(|u| u.offset).collect();
        assert_eq!(ready, vec![0, 3, 5], "only the unfinished run again");
        assert_eq!(next.in_flight(), 3);
    }

    #[test]
    fn backpressure_bounds_events_and_bytes() {
        let limits = Limits {
            max_in_flight: 2,
            max_buffered_bytes: 100,
            max_offset_span: 1_000,
        };
        let mut p = PartitionState::default();
        let e0 = event(0, "a", 10);
        p.deliver(e0.offset, e0.payload.len(), vec![unit(&e0, 0)])
            .unwrap();
        assert!(!p.over(&limits));
        let e1 = event(1, "a", 10);
        p.deliver(e1.offset, e1.payload.len(), vec![unit(&e1, 0)])
            .unwrap();
        assert!(p.over(&limits), "two events in flight");
        let big = event(2, "b", 200);
        let mut q = PartitionState::default();
        q.deliver(big.offset, big.payload.len(), vec![unit(&big, 0)])
            .unwrap();
        assert!(q.over(&limits), "bytes bound");
    }

    #[test]
    fn one_stuck_event_stops_reading_at_the_offset_span() {
        let limits = Limits {
            max_in_flight: 256,
            max_buffered_bytes: 1 << 20,
            max_offset_span: 50,
        };
        let mut p = PartitionState::default();
        let stuck = event(0, "stuck", 1);
        p.deliver(0, 1, vec![unit(&stuck, 0)]).unwrap();
        let _running = p.take_ready();
        for o in 1..50 {
            let e = event(o, &format!("k{o}"), 1);
            p.deliver(o, 1, vec![unit(&e, 0)]).unwrap();
            let ready = p.take_ready();
            p.complete(&ready);
        }
        assert_eq!(p.in_flight(), 1, "only the stuck one is unfinished");
        assert!(
            p.over(&limits),
            "yet reading stops: 50 offsets span the window"
        );
    }

    #[test]
    fn same_key_units_queue_behind_the_running_one() {
        let mut p = PartitionState::default();
        let e0 = event(0, "a", 1);
        p.deliver(e0.offset, e0.payload.len(), vec![unit(&e0, 0)])
            .unwrap();
        let first = p.take_ready();
        let e1 = event(1, "a", 1);
        p.deliver(e1.offset, e1.payload.len(), vec![unit(&e1, 0)])
            .unwrap();
        assert!(p.take_ready().is_empty(), "key a is busy");
        p.complete(&first);
        let next = p.take_ready();
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].event.offset, 1);
    }
}
