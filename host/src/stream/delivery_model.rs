//! The whole delivery path as a state machine, checked by a property test.
//!
//! The parts that decide correctness are the real ones: [`PartitionState`] (offset tracking,
//! lanes, hand-off bookkeeping, the commit and its finished map), [`FinishedMap`]'s encoding
//! as a new owner decodes it, position floors and [`EntityState::apply`]'s deduplication,
//! and the retry decision. Around them this file plays Kafka and the consumer's wiring the
//! way `consumer/` does it: a source log and a retry log read `read_committed`, one open
//! transaction that holds the hand-offs and commits them atomically with the offsets, an
//! abort that rewinds the partitions that handed off in it, a crash (the next owner resumes
//! from the commit; the old one may live on as a zombie that still writes to the store but
//! can no longer commit), a graceful revoke, and dead-letter replays.
//!
//! Checked after every step, for every random schedule of reads, completions, faults,
//! commits, aborts, crashes and revokes:
//! - each source event is applied at most once per group — except the two known limits
//!   below, which the model tracks and allows only where they happen;
//! - a committed offset is finished: each of its units was written or its hand-off committed;
//! - a unit's hand-off is committed at most once;
//!
//! and once the schedule ends and the host runs undisturbed: nothing is skipped — every
//! source event is applied once per group it routes to, or sits in the dead-letter topic.
//!
//! The known limits, as the README states them: a unit whose run wrote the store but was not
//! committed, redone after a crash or an abort, whose redo fails before the store (its hand-off
//! then applies under the retry topic's position); and a zombie's store writes (Kafka fences
//! its commits, not its writes) of an event the new owner hands off. Not modelled: a store
//! write whose every in-place attempt landed with its answer lost, or that failed for only some
//! of an event's entities (one entity per event here).

use super::lanes::LaneKey;
use super::offset_map::FinishedMap;
use super::partition::{Commit, Origin, PartitionState, RetryMeta, Unit};
use crate::dispatch::GroupId;
use crate::event::Event;
use crate::feature::{EntityState, Mutation, Op, Position, Value};
use crate::retry::{Cause, FailureKind, NextStep, RetryPolicy};
use proptest::prelude::*;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const SOURCE: usize = 0;
const RETRY: usize = 1;
const LOGS: usize = 2;
/// Source names of the two logs' positions, and of replayed dead letters'.
const NAMES: [&str; LOGS] = ["clicks~id", "features.retry~id"];
const DLQ_NAME: &str = "replay:features.dlq~id";
const GROUPS: usize = 2;
const MAX_ATTEMPTS: u32 = 3;

fn group_names() -> Vec<String> {
    (0..GROUPS).map(|g| format!("group-{g}")).collect()
}

/// What happens to one processing attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The plugin asks to retry.
    Retryable,
    /// The plugin rejects the event.
    Invalid,
    /// The store refuses the write (an outage): retried until it is back.
    StoreDown,
    /// The write lands but its answer is lost; the in-place retry finds it applied.
    LostAnswer,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// Deliver the next committed record of a log (`zombie`: to the zombie).
    Read {
        log: usize,
        zombie: bool,
    },
    /// Start a ready unit: its store write happens now.
    Start {
        pick: usize,
        zombie: bool,
    },
    /// Finish a started unit: written, or handed off in the open transaction.
    Finish {
        pick: usize,
        zombie: bool,
    },
    Commit,
    /// The open transaction aborts (a hand-off failed).
    Abort,
    /// The host dies; with `zombie`, it lives on cut off from the group.
    Crash {
        zombie: bool,
    },
    /// The partitions move to another host: drain, commit, hand over.
    Revoke,
    /// An operator replays a dead letter into the retry topic.
    Replay {
        pick: usize,
    },
}

/// A committed record of a log.
#[derive(Debug, Clone)]
struct Record {
    /// The source offset of the event it carries.
    root: i64,
    key: u8,
    kind: RecordKind,
}

#[derive(Debug, Clone)]
enum RecordKind {
    Source { groups: Vec<GroupId> },
    Retry(Retry),
}

#[derive(Debug, Clone)]
struct Retry {
    group: GroupId,
    attempts: u32,
    /// A replayed dead letter: its offset in the dead-letter topic.
    replay_of: Option<i64>,
}

#[derive(Debug, Clone)]
struct DeadLetter {
    root: i64,
    key: u8,
    group: GroupId,
    /// A dead letter of a replayed one keeps the first one's identity (`dlq replay`).
    replay_of: Option<i64>,
}

/// Which unit a hand-off finished: (log, offset, group).
type Parent = (usize, i64, GroupId);

#[derive(Debug, Clone)]
enum HandOff {
    Retry(Record),
    DeadLetter(DeadLetter),
}

#[derive(Debug, Clone)]
struct Started {
    log: usize,
    unit: Unit,
    failed: Option<(FailureKind, Cause)>,
}

/// One consumer's view: its partitions' states and its open transaction.
#[derive(Debug)]
struct Owner {
    states: Vec<PartitionState>,
    cursor: [usize; LOGS],
    in_txn: [bool; LOGS],
    ready: Vec<(usize, Unit)>,
    started: Vec<Started>,
    txn: Vec<(Parent, HandOff)>,
    /// Cut off from the group: its transactions can never commit.
    zombie: bool,
}

#[derive(Debug, Default)]
struct World {
    logs: [Vec<Record>; LOGS],
    dead_letters: Vec<DeadLetter>,
    committed: [Option<Commit>; LOGS],
    /// Committed hand-offs by the unit they finished.
    handed_off: HashMap<Parent, usize>,
    /// Applications per (source offset, group).
    applied: HashMap<(i64, GroupId), usize>,
    /// Units whose run reached the store: (log, offset, group).
    reached_store: HashSet<Parent>,
    /// (source offset, group) handed off by a run that failed before the store after an
    /// earlier run of the same unit had written it (uncommitted): the known limit.
    redone: HashSet<(i64, GroupId)>,
    /// (source offset, group) a zombie applied: its store writes are not fenced, only its
    /// commits; the second known limit.
    by_zombie: HashSet<(i64, GroupId)>,
    store: HashMap<(GroupId, u8), EntityState>,
    faults: std::vec::IntoIter<Fault>,
}

impl Owner {
    /// A new owner of both partitions, resuming from what is committed, as
    /// `Shared::assign` and `Shared::resume` do.
    fn resume(world: &World) -> Owner {
        let mut owner = Owner {
            states: (0..LOGS).map(|_| PartitionState::default()).collect(),
            cursor: [0; LOGS],
            in_txn: [false; LOGS],
            ready: Vec::new(),
            started: Vec::new(),
            txn: Vec::new(),
            zombie: false,
        };
        for log in 0..LOGS {
            owner.cursor[log] = owner.resume_log(world, log);
        }
        owner
    }

    /// Resume `log` from its commit; where reading starts.
    fn resume_log(&mut self, world: &World, log: usize) -> usize {
        match &world.committed[log] {
            Some(c) => {
                if let Ok(map) = FinishedMap::decode(c.metadata.as_bytes(), c.offset) {
                    self.states[log].resume(map, &group_names());
                }
                c.offset as usize
            }
            None => 0,
        }
    }

    /// After an abort, as `Shared::rewind` does: `log` starts over from its commit, keeping
    /// the committed hand-offs of offsets it had not finished.
    fn rewind(&mut self, world: &World, log: usize) {
        let keep = self.states[log].committed_hand_offs();
        self.states[log] = PartitionState::default();
        self.states[log].skip_units(keep);
        self.cursor[log] = self.resume_log(world, log);
        self.ready.retain(|(l, _)| *l != log);
        self.started.retain(|s| s.log != log);
    }

    fn read(&mut self, world: &World, log: usize) {
        let offset = self.cursor[log];
        let Some(record) = world.logs[log].get(offset) else {
            return;
        };
        self.cursor[log] += 1;
        let event = |position: Position| {
            Arc::new(Event {
                topic: "clicks".into(),
                partition: 0,
                offset: record.root,
                key: Some(vec![record.key]),
                timestamp_ms: 0,
                headers: vec![],
                payload: vec![],
                position: Some(position),
            })
        };
        let here = Position::sequential(NAMES[log], 0, offset as i64);
        let units = match &record.kind {
            RecordKind::Source { groups } => {
                let e = event(here);
                groups
                    .iter()
                    .map(|&g| Unit {
                        offset: offset as i64,
                        event: e.clone(),
                        group: g,
                        origin: Origin::Source {
                            lane: Some(LaneKey::for_key(g, Some(&[record.key]))),
                        },
                    })
                    .collect()
            }
            RecordKind::Retry(r) => {
                let position = match r.replay_of {
                    Some(dlq_offset) => Position {
                        source: DLQ_NAME.into(),
                        partition: 0,
                        offset: dlq_offset,
                        floor: 0,
                    },
                    None => here,
                };
                vec![Unit {
                    offset: offset as i64,
                    event: event(position),
                    group: r.group,
                    origin: Origin::Retry(RetryMeta {
                        attempts: r.attempts,
                        first_failure_ms: 0,
                        due_ms: 0,
                    }),
                }]
            }
        };
        self.states[log]
            .deliver(offset as i64, 1, units)
            .expect("offsets are read in order");
        self.take_ready(log);
    }

    fn take_ready(&mut self, log: usize) {
        let ready = self.states[log].take_ready();
        self.ready.extend(ready.into_iter().map(|u| (log, u)));
    }

    /// Run a ready unit's plugin and store write, as `run_batch` does.
    fn start(&mut self, world: &mut World, pick: usize) -> Result<(), String> {
        if self.ready.is_empty() {
            return Ok(());
        }
        let (log, unit) = self.ready.remove(pick % self.ready.len());
        let mut position = unit.event.position.clone().expect("every unit has one");
        if let Some(floor) = self.states[log].floor() {
            position.set_floor(NAMES[log], 0, floor);
        }
        let root = unit.event.offset;
        let key = unit.event.key.as_ref().expect("keyed")[0];
        let unit_id = (log, unit.offset, unit.group);
        let zombie = self.zombie;
        let write = |world: &mut World| -> Result<(), String> {
            world.reached_store.insert(unit_id);
            let outcome = world
                .store
                .entry((unit.group, key))
                .or_default()
                .apply(&Mutation {
                    position: Some(position.clone()),
                    ops: vec![("n".into(), Op::Incr(Value::Int(1)), 0)],
                    overwrite: false,
                });
            if !outcome.replayed {
                let id = (root, unit.group);
                if zombie {
                    world.by_zombie.insert(id);
                }
                let n = world.applied.entry(id).or_default();
                *n += 1;
                if *n > 1 && !world.redone.contains(&id) && !world.by_zombie.contains(&id) {
                    return Err(format!(
                        "source offset {root} applied {n} times for group {} (last through {position:?})",
                        unit.group
                    ));
                }
            }
            Ok(())
        };
        let failed = match world.faults.next().unwrap_or(Fault::None) {
            Fault::None => write(world).map(|()| None)?,
            Fault::LostAnswer => {
                write(world)?;
                write(world).map(|()| None)? // the in-place retry re-reads it
            }
            Fault::Retryable => Some((FailureKind::Retryable, Cause::Plugin)),
            Fault::Invalid => Some((FailureKind::Invalid, Cause::Plugin)),
            Fault::StoreDown => Some((FailureKind::Retryable, Cause::Store)),
        };
        self.started.push(Started { log, unit, failed });
        Ok(())
    }

    /// Finish a started unit: hand its failure off in the open transaction, then complete it.
    fn finish(&mut self, world: &mut World, pick: usize) {
        if self.started.is_empty() {
            return;
        }
        let Started { log, unit, failed } = self.started.remove(pick % self.started.len());
        if let Some((kind, cause)) = failed {
            if world
                .reached_store
                .contains(&(log, unit.offset, unit.group))
            {
                world.redone.insert((unit.event.offset, unit.group));
            }
            let before = match &unit.origin {
                Origin::Retry(r) => r.attempts,
                _ => 0,
            };
            let attempts = before + 1;
            let policy = RetryPolicy {
                max_attempts: MAX_ATTEMPTS,
                backoff: Default::default(),
            };
            let step = policy.next_step(kind, cause, attempts, 0);
            let (root, key) = (unit.event.offset, unit.event.key.as_ref().unwrap()[0]);
            let replay_of = unit
                .event
                .position
                .as_ref()
                .filter(|p| p.source == DLQ_NAME)
                .map(|p| p.offset);
            let group = unit.group;
            let hand_off = match step {
                NextStep::Retry { .. } => HandOff::Retry(Record {
                    root,
                    key,
                    kind: RecordKind::Retry(Retry {
                        group,
                        attempts,
                        replay_of,
                    }),
                }),
                NextStep::DeadLetter => HandOff::DeadLetter(DeadLetter {
                    root,
                    key,
                    group,
                    replay_of,
                }),
            };
            self.txn.push(((log, unit.offset, unit.group), hand_off));
            self.states[log].handed_off(unit.offset, unit.group);
            self.in_txn[log] = true;
        }
        self.states[log].complete(std::slice::from_ref(&unit));
        self.take_ready(log);
    }

    /// Commit the offsets and the transaction's hand-offs together, as `commit_exclusive`
    /// does; then check that everything committed is finished.
    fn commit(&mut self, world: &mut World) -> Result<(), String> {
        for log in 0..LOGS {
            if let Some(next) = self.states[log].to_commit(&group_names()) {
                self.states[log].committed = Some(next.clone());
                world.committed[log] = Some(next);
            }
        }
        for (parent, hand_off) in std::mem::take(&mut self.txn) {
            let n = world.handed_off.entry(parent).or_default();
            *n += 1;
            if *n > 1 {
                return Err(format!("unit {parent:?} handed off {n} times"));
            }
            match hand_off {
                HandOff::Retry(r) => world.logs[RETRY].push(r),
                HandOff::DeadLetter(d) => world.dead_letters.push(d),
            }
        }
        for st in &mut self.states {
            st.transaction_committed();
        }
        self.in_txn = [false; LOGS];
        world.check_committed()
    }

    fn abort(&mut self, world: &World) {
        self.txn.clear();
        for log in 0..LOGS {
            if std::mem::take(&mut self.in_txn[log]) {
                self.rewind(world, log);
            }
        }
    }

    fn idle(&self, world: &World) -> bool {
        self.ready.is_empty()
            && self.started.is_empty()
            && (0..LOGS).all(|l| self.cursor[l] >= world.logs[l].len())
    }
}

impl World {
    fn new(keys: &[(u8, bool, bool)], faults: Vec<Fault>) -> World {
        let mut w = World::default();
        for (i, &(key, g0, g1)) in keys.iter().enumerate() {
            let groups = [(GroupId::new(0), g0), (GroupId::new(1), g1)]
                .into_iter()
                .filter_map(|(g, on)| on.then_some(g))
                .collect();
            w.logs[SOURCE].push(Record {
                root: i as i64,
                key,
                kind: RecordKind::Source { groups },
            });
        }
        w.faults = faults.into_iter();
        w
    }

    /// Every unit of a committed offset (below the committed offset, or in its map) was
    /// written or its hand-off committed.
    fn check_committed(&self) -> Result<(), String> {
        for log in 0..LOGS {
            let Some(c) = &self.committed[log] else {
                continue;
            };
            let map = FinishedMap::decode(c.metadata.as_bytes(), c.offset)
                .map_err(|e| format!("commit of log {log} has an unreadable map: {e}"))?;
            for (offset, record) in self.logs[log].iter().enumerate() {
                let offset = offset as i64;
                if offset >= c.offset && !map.contains(offset) {
                    continue;
                }
                let groups = match &record.kind {
                    RecordKind::Source { groups } => groups.clone(),
                    RecordKind::Retry(r) => vec![r.group],
                };
                for g in groups {
                    let written = self.applied.get(&(record.root, g)).is_some_and(|&n| n > 0);
                    if !written && !self.handed_off.contains_key(&(log, offset, g)) {
                        return Err(format!(
                            "log {log} committed past offset {offset}, whose unit for group {g} was neither written nor handed off"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    fn replay(&mut self, pick: usize) {
        if self.dead_letters.is_empty() {
            return;
        }
        let at = pick % self.dead_letters.len();
        let d = self.dead_letters[at].clone();
        self.logs[RETRY].push(Record {
            root: d.root,
            key: d.key,
            kind: RecordKind::Retry(Retry {
                group: d.group,
                attempts: 0,
                replay_of: Some(d.replay_of.unwrap_or(at as i64)),
            }),
        });
    }
}

/// Run `actions`, then let the host run undisturbed until it is idle; check the invariants
/// throughout and the end state.
fn run(keys: &[(u8, bool, bool)], faults: Vec<Fault>, actions: &[Action]) -> Result<(), String> {
    let mut world = World::new(keys, faults);
    let mut owner = Owner::resume(&world);
    let mut zombie: Option<Owner> = None;
    for action in actions {
        match *action {
            Action::Read { log, zombie: false } => owner.read(&world, log),
            Action::Start {
                pick,
                zombie: false,
            } => owner.start(&mut world, pick)?,
            Action::Finish {
                pick,
                zombie: false,
            } => owner.finish(&mut world, pick),
            Action::Read { log, zombie: true } => {
                if let Some(z) = &mut zombie {
                    z.read(&world, log)
                }
            }
            Action::Start { pick, zombie: true } => {
                if let Some(z) = &mut zombie {
                    z.start(&mut world, pick)?
                }
            }
            Action::Finish { pick, zombie: true } => {
                if let Some(z) = &mut zombie {
                    z.finish(&mut world, pick)
                }
            }
            Action::Commit => owner.commit(&mut world)?,
            Action::Abort => owner.abort(&world),
            Action::Crash { zombie: z } => {
                let mut old = std::mem::replace(&mut owner, Owner::resume(&world));
                old.zombie = true;
                zombie = z.then_some(old);
            }
            Action::Revoke => {
                // Drain: what is running finishes; then the last commit, and hand over.
                while !owner.started.is_empty() {
                    owner.finish(&mut world, 0);
                }
                owner.commit(&mut world)?;
                owner = Owner::resume(&world);
            }
            Action::Replay { pick } => world.replay(pick),
        }
    }
    // The zombie's commit is refused (fenced): it stops. The host then runs undisturbed.
    drop(zombie);
    for _ in 0..1000 {
        if owner.idle(&world) && owner.txn.is_empty() {
            break;
        }
        for log in 0..LOGS {
            while owner.cursor[log] < world.logs[log].len() {
                owner.read(&world, log);
            }
        }
        while !owner.ready.is_empty() || !owner.started.is_empty() {
            while !owner.ready.is_empty() {
                owner.start(&mut world, 0)?;
            }
            while !owner.started.is_empty() {
                owner.finish(&mut world, 0);
            }
        }
        owner.commit(&mut world)?;
    }
    if !owner.idle(&world) {
        return Err("the host did not become idle".into());
    }
    for (root, record) in world.logs[SOURCE].iter().enumerate() {
        let RecordKind::Source { groups } = &record.kind else {
            unreachable!("the source log holds source records")
        };
        for &g in groups {
            let root = root as i64;
            let applied = world.applied.get(&(root, g)).copied().unwrap_or(0);
            let dead = world
                .dead_letters
                .iter()
                .any(|d| d.root == root && d.group == g);
            if applied == 0 && !dead {
                return Err(format!(
                    "source offset {root} was skipped for group {g}: never applied, not dead-lettered"
                ));
            }
        }
    }
    Ok(())
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        6 => Just(Fault::None),
        2 => Just(Fault::Retryable),
        1 => Just(Fault::Invalid),
        2 => Just(Fault::StoreDown),
        1 => Just(Fault::LostAnswer),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        8 => (0..LOGS, prop::bool::weighted(0.1)).prop_map(|(log, zombie)| Action::Read { log, zombie }),
        10 => (any::<usize>(), prop::bool::weighted(0.15)).prop_map(|(pick, zombie)| Action::Start { pick, zombie }),
        10 => (any::<usize>(), prop::bool::weighted(0.15)).prop_map(|(pick, zombie)| Action::Finish { pick, zombie }),
        3 => Just(Action::Commit),
        1 => Just(Action::Abort),
        1 => any::<bool>().prop_map(|zombie| Action::Crash { zombie }),
        1 => Just(Action::Revoke),
        1 => any::<usize>().prop_map(|pick| Action::Replay { pick }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Committed ⇒ written or handed off; applied at most once per group; handed off at
    /// most once; nothing skipped — under any schedule of faults, commits, aborts, crashes
    /// (with zombies), revokes and replays.
    #[test]
    fn delivery_applies_each_event_once_whatever_happens(
        keys in prop::collection::vec((0u8..3, any::<bool>(), any::<bool>()), 1..12),
        faults in prop::collection::vec(fault(), 0..40),
        actions in prop::collection::vec(action(), 0..120),
    ) {
        if let Err(e) = run(&keys, faults, &actions) {
            return Err(TestCaseError::fail(e));
        }
    }
}

/// The owner's steps on the source log, first pick: for the scenarios below.
const READ: Action = Action::Read {
    log: SOURCE,
    zombie: false,
};
const START: Action = Action::Start {
    pick: 0,
    zombie: false,
};
const FINISH: Action = Action::Finish {
    pick: 0,
    zombie: false,
};

#[test]
fn a_failure_finished_in_an_aborted_transaction_is_not_covered_by_a_later_floor() {
    // Offset 0 fails and is handed off in the open transaction; offset 1 (same entity)
    // writes with the floor of a watermark past 0; the transaction aborts and the rewind
    // redoes 0, which now succeeds: it must apply.
    let actions = [READ, READ, START, FINISH, START, FINISH, Action::Abort];
    let keys = [(0, true, false), (0, true, false)];
    run(&keys, vec![Fault::StoreDown], &actions).unwrap();
}

#[test]
fn a_new_owner_does_not_hand_off_again_what_a_partly_finished_event_handed_off() {
    // One event for two groups: the first fails and is handed off (committed) while the
    // second has not run; the host dies. The next owner redoes only the second.
    let actions = [
        READ,
        START,
        FINISH,
        Action::Commit,
        Action::Crash { zombie: false },
    ];
    run(&[(0, true, true)], vec![Fault::Retryable], &actions).unwrap();
}
