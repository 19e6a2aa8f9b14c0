//! Stored state of one entity in one feature group, and the merge of mutations into it.
//!
//! Rules (documented in the README's data model):
//! - **Exactly-once effect.** A mutation carrying a source position `(source, partition,
//!   offset)` applies only if the entity's [`Watermark`] for `(source, partition)` does not
//!   already hold `offset`; it is then recorded. A replayed event is a no-op, increments
//!   included. Offsets of one partition may arrive in any order (events of different keys run
//!   in parallel, failed ones come back later through the retry topic), so the watermark is
//!   a floor plus the applied offsets above it, not a single high-water offset.
//! - **Event time wins.** `set` and `delete` older than the feature's event time are skipped
//!   (counted as stale); `overwrite` mutations (backfills) bypass this. A delete leaves a
//!   tombstone so an older set cannot resurrect the feature.
//! - `incr` counts every (non-replayed) event, its sums saturating where the stores stop
//!   (ints at the ends of `i64`, floats at ±[`MAX_FLOAT`](super::value::MAX_FLOAT));
//!   `max`/`min` keep the extreme; `append` inserts
//!   into a last-k list by event time, newest first, capped.
//!
//! Each op of a mutation is judged on its own: a stale `set` does not block an `incr` of the
//! same event.

use super::value::{Op, Value, saturate_float};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One feature's stored value with the event time that decided it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// `None` is a tombstone left by `delete`.
    pub value: Option<Value>,
    pub event_time_ms: i64,
    /// For last-k lists: the event time of each item, parallel to the list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub item_times: Vec<i64>,
}

/// Everything stored for one (group, entity).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EntityState {
    pub features: BTreeMap<String, Cell>,
    /// Applied offsets per `source#partition` that wrote this entity.
    #[serde(default)]
    pub positions: BTreeMap<String, Watermark>,
    /// Unix seconds after which the store may drop the entity (DynamoDB TTL semantics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// A state with the version that guards compare-and-swap writes. Version 0 means "absent".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    pub version: u64,
    pub state: EntityState,
}

impl Versioned {
    /// Decode a versioned state stored as JSON (the embedded store's items), as
    /// [`EntityState::from_stored_json`] does.
    pub fn from_stored_json(bytes: &[u8]) -> Result<Versioned, String> {
        let v: Versioned = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        v.state.check_finite()?;
        Ok(v)
    }

    /// The version of the write that replaces this one. An absent entity (version 0) starts
    /// from the clock, `now_ms` × 1000, not from 1: DynamoDB deletes an expired item, and the
    /// entity written again must not take versions a cache still holds for its previous life
    /// (the cache keeps the higher one and refuses the update). 1000 writes per millisecond of
    /// an entity's life stay below the next life's start; the product stays below 2^53 (Lua's
    /// exact integers) until the year 2255.
    pub fn successor(&self, now_ms: i64) -> u64 {
        match self.version {
            0 => (now_ms.max(1) as u64).saturating_mul(1000),
            v => v + 1,
        }
    }

    /// An expired item reads as empty but keeps its version: stores delete expired items
    /// lazily (DynamoDB within days, redb never), and the next write must swap against the
    /// version that is really there.
    pub fn unless_expired(self, now_unix: i64) -> Versioned {
        if self.state.expires_at.is_some_and(|t| t <= now_unix) {
            Versioned {
                version: self.version,
                state: EntityState::default(),
            }
        } else {
            self
        }
    }
}

/// Where an event came from; the unit of exactly-once effect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub source: String,
    pub partition: i32,
    pub offset: i64,
    /// Every offset of this partition below `floor` is finished (applied, handed to the retry
    /// path, or without writes) and will never be applied again: the consumer's committable
    /// low watermark when the event was processed. Always `<= offset`.
    pub floor: i64,
}

impl Position {
    /// A position whose partition is processed strictly in offset order, so everything
    /// below `offset` is finished.
    pub fn sequential(source: impl Into<String>, partition: i32, offset: i64) -> Position {
        Position {
            source: source.into(),
            partition,
            offset,
            floor: offset,
        }
    }

    pub fn key(&self) -> String {
        format!("{}#{}", self.source, self.partition)
    }

    /// Set the floor to `low_watermark` (at most the offset), the consumer's low watermark
    /// of the partition being read (`source`, `partition`: the source name of its positions)
    /// — only if this position is in that partition's offset space. A replayed dead letter
    /// read from a retry partition carries its dead-letter offset: the retry partition's watermark says nothing about which dead
    /// letters are finished, and as a floor it would mark every lower one as applied.
    pub fn set_floor(&mut self, source: &str, partition: i32, low_watermark: i64) {
        if self.source == source && self.partition == partition {
            self.floor = low_watermark.min(self.offset);
        }
    }
}

/// Sources whose positions end: each batch run is a source of its own (`batch:<run>`), so
/// without an end every run would leave one more entry in every entity it wrote, and a
/// popular entity of a daily ingestion would outgrow the store's item limit. Their entries
/// carry the time of their last write and expire after a retention (see
/// [`EntityState::expire_positions`]). Stream sources never expire: their entries are one per
/// partition and topic incarnation (a topic created again is a new source), and a committed
/// offset or a replayed dead letter may come back at any time.
pub const EXPIRING_SOURCE_PREFIX: &str = "batch:";

/// The offsets of one source partition an entity has absorbed: all below `floor`, and those
/// listed in `applied` (all `>= floor`). The list only holds offsets that raced ahead of
/// slower ones in the in-flight window, so it stays about as long as that window.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredWatermark")]
pub struct Watermark {
    pub floor: i64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub applied: Vec<i64>,
    /// Unix seconds of the last write through this source, for sources that expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub touched: Option<i64>,
}

/// A watermark as stored, before [`Watermark::normalized`] restores the order `holds` relies on.
#[derive(Deserialize)]
struct StoredWatermark {
    floor: i64,
    #[serde(default)]
    applied: Vec<i64>,
    #[serde(default)]
    touched: Option<i64>,
}

impl From<StoredWatermark> for Watermark {
    fn from(w: StoredWatermark) -> Self {
        Watermark {
            floor: w.floor,
            applied: w.applied,
            touched: w.touched,
        }
        .normalized()
    }
}

impl Watermark {
    /// The list sorted, without duplicates and without offsets the floor already covers.
    /// This host writes it that way; a stored item from anywhere else (an old backup, a hand
    /// edit, another writer the table's policy lets in) is read into that shape, because a
    /// binary search over an unsorted list misses listed offsets and applies them again.
    fn normalized(mut self) -> Self {
        self.applied.sort_unstable();
        self.applied.dedup();
        let floor = self.floor;
        self.applied.retain(|&o| o >= floor);
        self
    }

    /// Whether the event at `offset` was already absorbed.
    pub fn holds(&self, offset: i64) -> bool {
        offset < self.floor || self.applied.binary_search(&offset).is_ok()
    }

    /// Record `pos` (not [`held`](Self::holds)) and raise the floor to the position's.
    pub fn record(&mut self, pos: &Position) {
        if let Err(at) = self.applied.binary_search(&pos.offset) {
            self.applied.insert(at, pos.offset);
        }
        self.floor = self.floor.max(pos.floor.min(pos.offset));
        let floor = self.floor;
        self.applied.retain(|&o| o >= floor);
    }

    /// Compact text form for stores with typed attributes: `floor` or `floor:o1,o2,…`
    /// (`touched` is stored beside it).
    pub fn encode(&self) -> String {
        let mut s = self.floor.to_string();
        for (i, o) in self.applied.iter().enumerate() {
            s.push(if i == 0 { ':' } else { ',' });
            s.push_str(&o.to_string());
        }
        s
    }

    pub fn decode(s: &str) -> Option<Watermark> {
        let (floor, rest) = s.split_once(':').unwrap_or((s, ""));
        let applied = rest
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().ok())
            .collect::<Option<Vec<i64>>>()?;
        Some(
            Watermark {
                floor: floor.parse().ok()?,
                applied,
                touched: None,
            }
            .normalized(),
        )
    }
}

/// The operations of one event on one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub position: Option<Position>,
    /// `(feature, op, event time ms)` in the plugin's order.
    pub ops: Vec<(String, Op, i64)>,
    /// Bypass event-time ordering (explicit backfill override).
    pub overwrite: bool,
}

/// What applying one mutation did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The position was already applied: nothing changed.
    pub replayed: bool,
    pub applied_ops: u32,
    /// Ops skipped because a newer value was stored.
    pub stale_skips: u32,
}

impl ApplyOutcome {
    pub fn add(&mut self, other: ApplyOutcome) {
        self.replayed |= other.replayed;
        self.applied_ops += other.applied_ops;
        self.stale_skips += other.stale_skips;
    }
}

impl EntityState {
    /// Decode a state stored as JSON (the Redis cache's `__s`). serde reads an f32 beyond
    /// its range as infinity, which would be written back as `null` and leave the entry
    /// unreadable for good: a state holding a non-finite float is refused, naming the feature.
    pub fn from_stored_json(bytes: &[u8]) -> Result<EntityState, String> {
        let state: EntityState = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        state.check_finite()?;
        Ok(state)
    }

    fn check_finite(&self) -> Result<(), String> {
        match self
            .features
            .iter()
            .find(|(_, c)| c.value.as_ref().is_some_and(|v| !v.is_finite()))
        {
            Some((name, _)) => Err(format!("feature {name:?} holds a float that is not finite")),
            None => Ok(()),
        }
    }

    /// Merge `m` into this state.
    pub fn apply(&mut self, m: &Mutation) -> ApplyOutcome {
        let mut out = ApplyOutcome::default();
        if let Some(pos) = &m.position {
            let wm = self.positions.entry(pos.key()).or_default();
            if wm.holds(pos.offset) {
                out.replayed = true;
                return out;
            }
            wm.record(pos);
        }
        for (feature, op, t) in &m.ops {
            if self.apply_op(feature, op, *t, m.overwrite) {
                out.applied_ops += 1;
            } else {
                out.stale_skips += 1;
            }
        }
        out
    }

    /// Note that `pos` wrote this entity at `now_unix`, for positions of sources that expire.
    pub fn touch(&mut self, pos: &Position, now_unix: i64) {
        if pos.source.starts_with(EXPIRING_SOURCE_PREFIX)
            && let Some(wm) = self.positions.get_mut(&pos.key())
        {
            wm.touched = Some(wm.touched.map_or(now_unix, |t| t.max(now_unix)));
        }
    }

    /// Drop the entries of expiring sources not written for `retention_s` seconds; the number
    /// dropped. An entry written before entries carried a time is stamped `now_unix` instead,
    /// so it expires one retention from now rather than at once. Callers must refuse to replay
    /// a source (re-run or resume a batch run) whose entries may be gone: past the retention
    /// its rows would apply again.
    pub fn expire_positions(&mut self, now_unix: i64, retention_s: i64) -> usize {
        let before = self.positions.len();
        self.positions.retain(|key, wm| {
            if !key.starts_with(EXPIRING_SOURCE_PREFIX) {
                return true;
            }
            let touched = *wm.touched.get_or_insert(now_unix);
            now_unix - touched < retention_s
        });
        before - self.positions.len()
    }

    /// The live (non-tombstone) feature values.
    pub fn values(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.features
            .iter()
            .filter_map(|(k, c)| c.value.as_ref().map(|v| (k.as_str(), v)))
    }

    /// Apply one op; false if it was skipped as stale.
    fn apply_op(&mut self, feature: &str, op: &Op, t: i64, overwrite: bool) -> bool {
        let cell = self.features.get(feature);
        let newer_stored = cell.is_some_and(|c| c.event_time_ms > t) && !overwrite;
        // A tombstone newer than this event hides every older op, accumulating ones too.
        let deleted_later = cell.is_some_and(|c| c.value.is_none()) && newer_stored;
        let new_cell = match op {
            Op::Set(v) => {
                if newer_stored {
                    return false;
                }
                Cell {
                    value: Some(v.clone()),
                    event_time_ms: t,
                    item_times: Vec::new(),
                }
            }
            Op::Delete => {
                if newer_stored {
                    return false;
                }
                Cell {
                    value: None,
                    event_time_ms: t,
                    item_times: Vec::new(),
                }
            }
            Op::Incr(delta) => {
                if deleted_later {
                    return false;
                }
                let value = match cell.and_then(|c| c.value.as_ref()) {
                    Some(Value::Int(a)) => match delta {
                        Value::Int(d) => Value::Int(a.saturating_add(*d)),
                        Value::Float(d) => Value::Float(saturate_float(*a as f64 + d)),
                        other => other.clone(),
                    },
                    Some(Value::Float(a)) => match delta {
                        Value::Int(d) => Value::Float(saturate_float(a + *d as f64)),
                        Value::Float(d) => Value::Float(saturate_float(a + d)),
                        other => other.clone(),
                    },
                    // Absent, tombstoned, or a type the spec no longer declares: restart.
                    _ => delta.clone(),
                };
                Cell {
                    value: Some(value),
                    event_time_ms: max_time(cell, t),
                    item_times: Vec::new(),
                }
            }
            Op::Max(v) | Op::Min(v) => {
                if deleted_later {
                    return false;
                }
                let want_max = matches!(op, Op::Max(_));
                let value = match cell.and_then(|c| c.value.as_ref()) {
                    Some(old) => match compare(old, v) {
                        Some(ord) if (ord.is_lt() == want_max) && ord.is_ne() => v.clone(),
                        Some(_) => old.clone(),
                        None => v.clone(),
                    },
                    None => v.clone(),
                };
                Cell {
                    value: Some(value),
                    event_time_ms: max_time(cell, t),
                    item_times: Vec::new(),
                }
            }
            Op::Append { item, cap } => {
                if deleted_later {
                    return false;
                }
                let (mut list, mut times) = match cell {
                    Some(Cell {
                        value: Some(v),
                        item_times,
                        event_time_ms,
                    }) if same_list_kind(v, item) => {
                        // A list written by `set` has no per-item times: they share its time.
                        let len = list_len(v);
                        let times = if item_times.len() == len {
                            item_times.clone()
                        } else {
                            vec![*event_time_ms; len]
                        };
                        (v.clone(), times)
                    }
                    _ => (empty_list_like(item), Vec::new()),
                };
                // Newest first; equal times keep arrival order (the newer arrival first).
                let at = times.iter().position(|&x| x <= t).unwrap_or(times.len());
                if at >= *cap as usize {
                    return false;
                }
                insert_item(&mut list, at, item);
                times.insert(at, t);
                truncate_list(&mut list, *cap as usize);
                times.truncate(*cap as usize);
                Cell {
                    value: Some(list),
                    event_time_ms: max_time(cell, t),
                    item_times: times,
                }
            }
        };
        self.features.insert(feature.to_owned(), new_cell);
        true
    }
}

fn max_time(cell: Option<&Cell>, t: i64) -> i64 {
    cell.map_or(t, |c| c.event_time_ms.max(t))
}

fn compare(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => Some(x.cmp(y)),
        (Value::Float(x), Value::Float(y)) => x.partial_cmp(y),
        (Value::Int(x), Value::Float(y)) => (*x as f64).partial_cmp(y),
        (Value::Float(x), Value::Int(y)) => x.partial_cmp(&(*y as f64)),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn same_list_kind(list: &Value, item: &Value) -> bool {
    matches!(
        (list, item),
        (Value::IntList(_), Value::Int(_))
            | (Value::FloatList(_), Value::Float(_))
            | (Value::StringList(_), Value::String(_))
    )
}

fn list_len(list: &Value) -> usize {
    match list {
        Value::IntList(l) => l.len(),
        Value::FloatList(l) => l.len(),
        Value::StringList(l) => l.len(),
        _ => 0,
    }
}

fn empty_list_like(item: &Value) -> Value {
    match item {
        Value::Int(_) => Value::IntList(Vec::new()),
        Value::Float(_) => Value::FloatList(Vec::new()),
        _ => Value::StringList(Vec::new()),
    }
}

fn insert_item(list: &mut Value, at: usize, item: &Value) {
    match (list, item) {
        (Value::IntList(l), Value::Int(i)) => l.insert(at, *i),
        (Value::FloatList(l), Value::Float(f)) => l.insert(at, *f),
        (Value::StringList(l), Value::String(s)) => l.insert(at, s.clone()),
        // check_write guarantees matching kinds; anything else is ignored defensively.
        _ => {}
    }
}

fn truncate_list(list: &mut Value, cap: usize) {
    match list {
        Value::IntList(l) => l.truncate(cap),
        Value::FloatList(l) => l.truncate(cap),
        Value::StringList(l) => l.truncate(cap),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_is_raised_only_in_its_own_offset_space() {
        // As read: `sequential` claims everything below is finished, which the parallel
        // consumer replaces with what it knows.
        let mut own = Position::sequential("events", 2, 40);
        own.set_floor("events", 2, 35);
        assert_eq!(own.floor, 35);
        own.set_floor("events", 2, 90);
        assert_eq!(own.floor, 40, "never above the position itself");
        let mut replayed = Position {
            source: "replay:g.dlq".into(),
            partition: 0,
            offset: 7,
            floor: 0,
        };
        replayed.set_floor("g.retry", 0, 5);
        assert_eq!(
            replayed.floor, 0,
            "a retry partition's watermark is not a dead-letter floor"
        );
        let mut other_partition = Position {
            source: "events".into(),
            partition: 1,
            offset: 9,
            floor: 0,
        };
        other_partition.set_floor("events", 2, 5);
        assert_eq!(other_partition.floor, 0);
    }
    use proptest::prelude::*;

    fn m(offset: Option<i64>, ops: Vec<(&str, Op, i64)>) -> Mutation {
        Mutation {
            position: offset.map(|o| Position::sequential("t", 0, o)),
            ops: ops
                .into_iter()
                .map(|(f, o, t)| (f.to_string(), o, t))
                .collect(),
            overwrite: false,
        }
    }

    fn get<'a>(s: &'a EntityState, f: &str) -> Option<&'a Value> {
        s.features.get(f).and_then(|c| c.value.as_ref())
    }

    #[test]
    fn replay_is_a_noop_even_for_increments() {
        let mut s = EntityState::default();
        let ev = m(Some(10), vec![("n", Op::Incr(Value::Int(1)), 5)]);
        assert_eq!(s.apply(&ev).applied_ops, 1);
        let again = s.apply(&ev);
        assert!(again.replayed);
        assert!(
            s.apply(&m(Some(3), vec![("n", Op::Incr(Value::Int(1)), 5)]))
                .replayed
        );
        assert_eq!(get(&s, "n"), Some(&Value::Int(1)));
        // Another partition has its own high-water mark.
        let mut other = m(Some(3), vec![("n", Op::Incr(Value::Int(1)), 5)]);
        other.position.as_mut().unwrap().partition = 1;
        assert!(!s.apply(&other).replayed);
        assert_eq!(get(&s, "n"), Some(&Value::Int(2)));
    }

    #[test]
    fn stale_set_does_not_block_incr_of_same_event() {
        let mut s = EntityState::default();
        s.apply(&m(None, vec![("price", Op::Set(Value::Int(20)), 100)]));
        let out = s.apply(&m(
            None,
            vec![
                ("price", Op::Set(Value::Int(10)), 50),
                ("n", Op::Incr(Value::Int(1)), 50),
            ],
        ));
        assert_eq!(
            out,
            ApplyOutcome {
                replayed: false,
                applied_ops: 1,
                stale_skips: 1
            }
        );
        assert_eq!(get(&s, "price"), Some(&Value::Int(20)));
        assert_eq!(get(&s, "n"), Some(&Value::Int(1)));
    }

    #[test]
    fn overwrite_bypasses_event_time() {
        let mut s = EntityState::default();
        s.apply(&m(None, vec![("price", Op::Set(Value::Int(20)), 100)]));
        let mut back = m(None, vec![("price", Op::Set(Value::Int(10)), 50)]);
        back.overwrite = true;
        assert_eq!(s.apply(&back).applied_ops, 1);
        assert_eq!(get(&s, "price"), Some(&Value::Int(10)));
    }

    #[test]
    fn delete_tombstone_blocks_older_writes() {
        let mut s = EntityState::default();
        s.apply(&m(
            None,
            vec![("status", Op::Set(Value::String("live".into())), 10)],
        ));
        s.apply(&m(None, vec![("status", Op::Delete, 20)]));
        assert_eq!(
            s.apply(&m(
                None,
                vec![("status", Op::Set(Value::String("old".into())), 15)]
            ))
            .stale_skips,
            1
        );
        assert_eq!(
            s.apply(&m(
                None,
                vec![("status", Op::Max(Value::String("zzz".into())), 15)]
            ))
            .stale_skips,
            1
        );
        assert_eq!(get(&s, "status"), None);
        assert_eq!(s.values().count(), 0);
        s.apply(&m(
            None,
            vec![("status", Op::Set(Value::String("new".into())), 25)],
        ));
        assert_eq!(get(&s, "status"), Some(&Value::String("new".into())));
    }

    #[test]
    fn max_min_keep_extremes() {
        let mut s = EntityState::default();
        for (v, t) in [(5, 1), (9, 2), (7, 3)] {
            s.apply(&m(
                None,
                vec![
                    ("hi", Op::Max(Value::Int(v)), t),
                    ("lo", Op::Min(Value::Int(v)), t),
                ],
            ));
        }
        assert_eq!(get(&s, "hi"), Some(&Value::Int(9)));
        assert_eq!(get(&s, "lo"), Some(&Value::Int(5)));
        assert_eq!(s.features["hi"].event_time_ms, 3);
    }

    #[test]
    fn append_orders_by_event_time_and_caps() {
        let mut s = EntityState::default();
        let app = |item: &str, t| {
            m(
                None,
                vec![(
                    "last",
                    Op::Append {
                        item: Value::String(item.into()),
                        cap: 3,
                    },
                    t,
                )],
            )
        };
        for (i, t) in [("a", 1), ("b", 2), ("d", 4), ("c", 3)] {
            s.apply(&app(i, t));
        }
        let want = |v: &[&str]| Value::StringList(v.iter().map(|s| s.to_string()).collect());
        assert_eq!(get(&s, "last"), Some(&want(&["d", "c", "b"])));
        // Older than everything in a full list: skipped as stale.
        assert_eq!(s.apply(&app("z", 0)).stale_skips, 1);
        s.apply(&app("e", 5));
        assert_eq!(get(&s, "last"), Some(&want(&["e", "d", "c"])));
        assert_eq!(s.features["last"].item_times, vec![5, 4, 3]);
    }

    #[test]
    fn append_after_set_keeps_items_and_times_aligned() {
        let mut s = EntityState::default();
        let list = Value::StringList(vec!["x".into(), "y".into()]);
        s.apply(&m(None, vec![("last", Op::Set(list), 10)]));
        s.apply(&m(
            None,
            vec![(
                "last",
                Op::Append {
                    item: Value::String("z".into()),
                    cap: 3,
                },
                5,
            )],
        ));
        let want = Value::StringList(vec!["x".into(), "y".into(), "z".into()]);
        assert_eq!(get(&s, "last"), Some(&want));
        assert_eq!(s.features["last"].item_times, vec![10, 10, 5]);
    }

    #[test]
    fn expired_state_reads_empty_but_keeps_its_version() {
        let mut state = EntityState::default();
        state.apply(&m(None, vec![("n", Op::Incr(Value::Int(1)), 1)]));
        state.expires_at = Some(100);
        let v = Versioned { version: 4, state };
        assert_eq!(v.clone().unless_expired(99), v);
        let expired = v.unless_expired(100);
        assert_eq!((expired.version, expired.state.features.len()), (4, 0));
    }

    #[test]
    fn incr_widens_and_saturates() {
        let mut s = EntityState::default();
        s.apply(&m(None, vec![("n", Op::Incr(Value::Int(i64::MAX)), 1)]));
        s.apply(&m(None, vec![("n", Op::Incr(Value::Int(1)), 1)]));
        assert_eq!(get(&s, "n"), Some(&Value::Int(i64::MAX)));
        s.apply(&m(None, vec![("f", Op::Incr(Value::Float(0.5)), 1)]));
        s.apply(&m(None, vec![("f", Op::Incr(Value::Int(1)), 1)]));
        assert_eq!(get(&s, "f"), Some(&Value::Float(1.5)));
    }

    /// A float sum stays a number every store holds (DynamoDB: 1e-130 to 9.99e125 in
    /// magnitude; JSON: finite): beyond, the entity's every later write would fail, or it
    /// would be stored as `null` and never read again.
    #[test]
    fn float_increments_stay_storable() {
        let sum = |deltas: &[f64]| {
            let mut s = EntityState::default();
            for (o, d) in deltas.iter().enumerate() {
                s.apply(&m(
                    Some(o as i64),
                    vec![("f", Op::Incr(Value::Float(*d)), 1)],
                ));
            }
            match get(&s, "f") {
                Some(Value::Float(f)) => *f,
                other => panic!("{other:?}"),
            }
        };
        for deltas in [
            &[9e125, 9e125][..],
            &[-9e125, -9e125],
            &[f64::MAX, f64::MAX],
        ] {
            let f = sum(deltas);
            assert!(f.is_finite() && f.abs() < 1e126, "{deltas:?} gave {f}");
        }
        let f = sum(&[2e-130, -1.5e-130]);
        assert!(f == 0.0 || f.abs() >= 1e-130, "{f}");
        assert_eq!(sum(&[1.5, 2.25]), 3.75);
    }

    /// serde reads an f32 beyond its range as infinity; a stored state holding one must be
    /// refused as unreadable, not merged and written back as `null`.
    #[test]
    fn a_stored_vector_beyond_f32_is_unreadable() {
        let json = br#"{"features":{"x":{"value":{"t":"vector","v":[1e39]},"event_time_ms":1}}}"#;
        assert!(EntityState::from_stored_json(json).is_err());
        let fine = br#"{"features":{"x":{"value":{"t":"vector","v":[1e38]},"event_time_ms":1}}}"#;
        assert!(EntityState::from_stored_json(fine).is_ok());
    }

    #[test]
    fn out_of_order_offsets_apply_once_each() {
        let mut s = EntityState::default();
        let at = |o: i64, floor: i64| Mutation {
            position: Some(Position {
                floor,
                ..Position::sequential("t", 0, o)
            }),
            ..m(None, vec![("n", Op::Incr(Value::Int(1)), 5)])
        };
        // 12 overtakes 10 and 11, which are still in flight (floor 10).
        assert!(!s.apply(&at(12, 10)).replayed);
        assert!(!s.apply(&at(10, 10)).replayed);
        assert!(
            s.apply(&at(12, 10)).replayed,
            "12 is listed above the floor"
        );
        assert!(!s.apply(&at(11, 11)).replayed);
        assert!(
            s.apply(&at(10, 10)).replayed,
            "10 is below the raised floor"
        );
        assert_eq!(get(&s, "n"), Some(&Value::Int(3)));
        let wm = &s.positions["t#0"];
        assert_eq!((wm.floor, wm.applied.clone()), (11, vec![11, 12]));
        assert_eq!(Watermark::decode(&wm.encode()).as_ref(), Some(wm));
        assert_eq!(
            Watermark::decode("7"),
            Some(Watermark {
                floor: 7,
                ..Default::default()
            })
        );
        assert_eq!(Watermark::decode("7:x"), None);
    }

    #[test]
    fn a_stored_watermark_out_of_order_still_holds_what_it_lists() {
        // Stores are written by this host, but an item restored from an older backup or
        // edited by hand must not make `holds` (a binary search) miss a listed offset and
        // apply that event a second time.
        let stored = Watermark::decode("5:40,9,9,3,20").expect("decodes");
        assert_eq!(
            stored.applied,
            vec![9, 20, 40],
            "sorted, no duplicate, none below 5"
        );
        assert!(stored.holds(40) && stored.holds(9) && stored.holds(4));
        assert!(!stored.holds(10));
        let json: Watermark =
            serde_json::from_str(r#"{"floor":5,"applied":[40,9,9,3,20]}"#).expect("parses");
        assert_eq!(json.applied, vec![9, 20, 40]);
        assert!(json.holds(40));
    }

    #[test]
    fn a_new_life_starts_above_every_version_of_the_previous_one() {
        let absent = Versioned::default();
        let first = absent.successor(1_764_000_000_000);
        assert_eq!(first, 1_764_000_000_000_000);
        assert!(first < 1 << 53, "exact in Redis' Lua numbers");
        let later = Versioned {
            version: first + 999_999,
            ..Default::default()
        };
        assert_eq!(later.successor(0), first + 1_000_000);
        // Deleted one second after its last write (DynamoDB deletes expired items later
        // than that), it starts over higher than a million writes took it.
        assert!(absent.successor(1_764_000_001_000) > later.version);
    }

    fn batch_row(run: &str, offset: i64) -> Mutation {
        Mutation {
            position: Some(Position::sequential(format!("batch:{run}"), 0, offset)),
            ops: vec![("n".into(), Op::Incr(Value::Int(1)), 1)],
            overwrite: false,
        }
    }

    #[test]
    fn batch_positions_expire_after_their_last_write_and_stream_ones_never() {
        let mut s = EntityState::default();
        let stream = Mutation {
            position: Some(Position::sequential("events", 0, 4)),
            ..batch_row("r1", 0)
        };
        s.apply(&stream);
        s.touch(stream.position.as_ref().unwrap(), 1_000);
        assert_eq!(
            s.positions["events#0"].touched, None,
            "stream sources never expire"
        );
        for (run, at) in [("r1", 1_000), ("r2", 1_050)] {
            let m = batch_row(run, 0);
            s.apply(&m);
            s.touch(m.position.as_ref().unwrap(), at);
        }
        // r1 writes again later: its entry lives on from that write.
        let m = batch_row("r1", 1);
        s.apply(&m);
        s.touch(m.position.as_ref().unwrap(), 1_080);
        assert_eq!(s.expire_positions(1_100, 50), 1, "r2 last wrote 50 s ago");
        assert_eq!(
            s.positions.keys().collect::<Vec<_>>(),
            ["batch:r1#0", "events#0"]
        );
        assert_eq!(s.expire_positions(1_200, 50), 1);
        assert_eq!(s.positions.keys().collect::<Vec<_>>(), ["events#0"]);
        assert_eq!(get(&s, "n"), Some(&Value::Int(4)));
    }

    #[test]
    fn a_batch_entry_written_before_entries_had_a_time_expires_a_retention_later() {
        let mut s = EntityState::default();
        s.apply(&batch_row("old", 0));
        assert_eq!(s.expire_positions(5_000, 100), 0, "stamped, not dropped");
        assert_eq!(s.positions["batch:old#0"].touched, Some(5_000));
        assert_eq!(s.expire_positions(5_100, 100), 1);
    }

    proptest! {
        /// Offsets finishing in any order, each carrying the low watermark of its moment as
        /// floor, with replays of finished offsets at any later time: every offset counts
        /// exactly once, and the applied list never outgrows the out-of-order window.
        #[test]
        fn any_completion_order_counts_each_offset_once(
            gaps in proptest::collection::vec(1i64..4, 1..80),
            seed in any::<u64>(),
            replays in proptest::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut offsets = Vec::new();
            let mut o = 0;
            for g in &gaps {
                o += g;
                offsets.push(o);
            }
            let mut order = offsets.clone();
            let mut x = seed;
            for i in (1..order.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                order.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut unfinished: std::collections::BTreeSet<i64> = offsets.iter().copied().collect();
            let mut finished = Vec::new();
            let mut s = EntityState::default();
            let incr = |o: i64, floor: i64| Mutation {
                position: Some(Position { floor, ..Position::sequential("t", 0, o) }),
                ..m(None, vec![("n", Op::Incr(Value::Int(1)), 1)])
            };
            for (step, o) in order.iter().enumerate() {
                let floor = *unfinished.first().unwrap();
                prop_assert!(!s.apply(&incr(*o, floor)).replayed);
                unfinished.remove(o);
                finished.push(*o);
                if let Some(r) = replays.get(step) {
                    let r = *r.get(&finished);
                    let floor = unfinished.first().copied().unwrap_or(i64::MAX).min(r);
                    prop_assert!(s.apply(&incr(r, floor)).replayed, "replay of {} applied", r);
                }
                let wm = &s.positions["t#0"];
                prop_assert!(wm.applied.len() <= step + 1);
                prop_assert!(wm.applied.iter().all(|&a| a >= wm.floor));
            }
            prop_assert_eq!(get(&s, "n"), Some(&Value::Int(offsets.len() as i64)));
        }
    }

    proptest! {
        /// Whatever the arrival order and however often events are replayed, the final state
        /// has the newest set, the exact count and the newest-k list.
        #[test]
        fn order_and_replay_independent(
            times in proptest::collection::btree_set(0i64..10_000, 1..40),
            seed in any::<u64>(),
            replays in proptest::collection::vec(0usize..40, 0..20),
        ) {
            let events: Vec<(i64, i64)> = times.iter().enumerate().map(|(i, t)| (i as i64, *t)).collect();
            let mk = |(off, t): (i64, i64)| m(Some(off), vec![
                ("v", Op::Set(Value::Int(t)), t),
                ("n", Op::Incr(Value::Int(1)), t),
                ("last", Op::Append { item: Value::Int(t), cap: 5 }, t),
            ]);
            // Offsets must rise per partition for the high-water check (the stream layer
            // guarantees per-entity offset order); shuffle only event *times* vs offsets.
            let mut shuffled: Vec<i64> = events.iter().map(|e| e.1).collect();
            let mut x = seed;
            for i in (1..shuffled.len()).rev() {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut s = EntityState::default();
            for (off, t) in shuffled.iter().enumerate() {
                s.apply(&mk((off as i64, *t)));
                for r in replays.iter().filter(|&&r| r <= off) {
                    s.apply(&mk((*r as i64, shuffled[*r])));
                }
            }
            let newest = *times.iter().max().unwrap();
            prop_assert_eq!(get(&s, "v"), Some(&Value::Int(newest)));
            prop_assert_eq!(get(&s, "n"), Some(&Value::Int(times.len() as i64)));
            let top: Vec<i64> = times.iter().rev().take(5).copied().collect();
            prop_assert_eq!(get(&s, "last"), Some(&Value::IntList(top)));
        }
    }
}
