use crate::{Event, Value, bindings::feature_host::plugin::types as wit};

/// An operation the host applies atomically to one feature in the store.
///
/// A float must be finite and at most 9.99e125 in magnitude (DynamoDB's number range): the
/// host dead-letters an event with any other, and stores one below 1e-130 as 0.
///
/// ```
/// use feature_host_plugin_sdk::{Op, Value};
/// let op = Op::Append { item: Value::from("item-9"), cap: 20 };
/// assert!(matches!(op, Op::Append { cap: 20, .. }));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// Replace the value, unless the stored value is newer by event time.
    Set(Value),
    /// Add to a numeric feature; every event counts exactly once. Sums saturate where the
    /// stores stop: integers at the ends of `i64`, floats at ±9.99e125.
    Incr(Value),
    /// Keep the larger of the stored and the given value.
    Max(Value),
    /// Keep the smaller of the stored and the given value.
    Min(Value),
    /// Last-k list: insert `item` by event time, newest first, keep at most `cap` items.
    Append {
        /// The element to insert.
        item: Value,
        /// The list's maximum length.
        cap: u32,
    },
    /// Remove the feature; older writes cannot resurrect it.
    Delete,
}

/// One feature write.
///
/// ```
/// use feature_host_plugin_sdk::{Op, Value, Write};
/// let w = Write { entity: "u1".into(), feature: "clicks".into(), op: Op::Incr(1.into()), event_time_ms: 0 };
/// assert_eq!(w.feature, "clicks");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Write {
    /// Entity id, e.g. a user id.
    pub entity: String,
    /// Feature name as declared in the FeatureGroup spec.
    pub feature: String,
    /// What to do.
    pub op: Op,
    /// Event time in milliseconds since the Unix epoch; decides which write wins.
    pub event_time_ms: i64,
}

impl From<Write> for wit::Write {
    fn from(w: Write) -> Self {
        let op = match w.op {
            Op::Set(v) => wit::Op::Set(v.into()),
            Op::Incr(v) => wit::Op::Incr(v.into()),
            Op::Max(v) => wit::Op::Max(v.into()),
            Op::Min(v) => wit::Op::Min(v.into()),
            Op::Append { item, cap } => wit::Op::Append(wit::AppendCapped {
                item: item.into(),
                cap,
            }),
            Op::Delete => wit::Op::Delete,
        };
        wit::Write {
            entity: w.entity,
            feature: w.feature,
            op,
            event_time_ms: w.event_time_ms,
        }
    }
}

/// The writes produced for one event. Event time defaults to the event's timestamp.
///
/// ```
/// use feature_host_plugin_sdk::{Event, Writes};
/// let event = Event::for_test(b"").at(42);
/// let mut out = Writes::for_event(&event);
/// out.entity("u1").incr("clicks", 1).append("last_viewed", "item-3", 20);
/// let writes = out.into_vec();
/// assert_eq!(writes.len(), 2);
/// assert_eq!(writes[0].event_time_ms, 42);
/// ```
#[derive(Debug, Default)]
pub struct Writes {
    event_time_ms: i64,
    writes: Vec<Write>,
}

impl Writes {
    /// An empty set of writes whose event time is `event`'s timestamp.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// assert!(Writes::for_event(&Event::for_test(b"")).is_empty());
    /// ```
    pub fn for_event(event: &Event) -> Self {
        Writes {
            event_time_ms: event.timestamp_ms,
            writes: Vec::new(),
        }
    }

    /// Override the event time of writes added from now on (e.g. a time field in the payload).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// let mut out = Writes::for_event(&Event::for_test(b""));
    /// out.at(7).entity("e").set("f", 1_i64);
    /// assert_eq!(out.into_vec()[0].event_time_ms, 7);
    /// ```
    pub fn at(&mut self, event_time_ms: i64) -> &mut Self {
        self.event_time_ms = event_time_ms;
        self
    }

    /// Start writing features of one entity.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// let mut out = Writes::for_event(&Event::for_test(b""));
    /// out.entity("u1").set("country", "DE").max("max_price", 12.5);
    /// assert_eq!(out.len(), 2);
    /// ```
    pub fn entity<'a>(&'a mut self, entity: &str) -> EntityWrites<'a> {
        EntityWrites {
            entity: entity.to_owned(),
            out: self,
        }
    }

    /// Add one raw write.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Op, Write, Writes};
    /// let mut out = Writes::for_event(&Event::for_test(b""));
    /// out.push(Write { entity: "e".into(), feature: "f".into(), op: Op::Delete, event_time_ms: 1 });
    /// assert_eq!(out.len(), 1);
    /// ```
    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// Number of writes so far.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// assert_eq!(Writes::for_event(&Event::for_test(b"")).len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// True if no write was added.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// assert!(Writes::for_event(&Event::for_test(b"")).is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The writes, in the order they were added.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// let v = Writes::for_event(&Event::for_test(b"")).into_vec();
    /// assert!(v.is_empty());
    /// ```
    pub fn into_vec(self) -> Vec<Write> {
        self.writes
    }
}

/// Builder for the writes of one entity; see [`Writes::entity`].
///
/// ```
/// # use feature_host_plugin_sdk::{Event, Writes};
/// let mut out = Writes::for_event(&Event::for_test(b""));
/// out.entity("item-1").set("status", "active").delete("discount");
/// assert_eq!(out.len(), 2);
/// ```
pub struct EntityWrites<'a> {
    entity: String,
    out: &'a mut Writes,
}

impl EntityWrites<'_> {
    fn op(self, feature: &str, op: Op) -> Self {
        let write = Write {
            entity: self.entity.clone(),
            feature: feature.to_owned(),
            op,
            event_time_ms: self.out.event_time_ms,
        };
        self.out.writes.push(write);
        self
    }

    /// Set `feature` to `value` (newest event time wins).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("u").set("tier", "gold");
    /// ```
    pub fn set(self, feature: &str, value: impl Into<Value>) -> Self {
        self.op(feature, Op::Set(value.into()))
    }

    /// Add `delta` to a numeric feature.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("u").incr("clicks", 1).incr("spend", 9.99);
    /// ```
    pub fn incr(self, feature: &str, delta: impl Into<Value>) -> Self {
        self.op(feature, Op::Incr(delta.into()))
    }

    /// Keep the maximum of the stored value and `value`.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("u").max("max_price", 120_i64);
    /// ```
    pub fn max(self, feature: &str, value: impl Into<Value>) -> Self {
        self.op(feature, Op::Max(value.into()))
    }

    /// Keep the minimum of the stored value and `value`.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("u").min("first_seen", 1_700_000_000_i64);
    /// ```
    pub fn min(self, feature: &str, value: impl Into<Value>) -> Self {
        self.op(feature, Op::Min(value.into()))
    }

    /// Insert `item` into the last-k list `feature` (newest first, at most `cap` long).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("u").append("last_viewed", "item-9", 20);
    /// ```
    pub fn append(self, feature: &str, item: impl Into<Value>, cap: u32) -> Self {
        self.op(
            feature,
            Op::Append {
                item: item.into(),
                cap,
            },
        )
    }

    /// Delete `feature` (a tombstone at this event time).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::{Event, Writes};
    /// Writes::for_event(&Event::for_test(b"")).entity("item-1").delete("price");
    /// ```
    pub fn delete(self, feature: &str) -> Self {
        self.op(feature, Op::Delete)
    }
}
