//! The host's event: what every source (Kafka, file, HTTP push, batch) produces.

use crate::feature::Position;

/// An event's place in the batch being processed. Failures and routes name their event by
/// it, so it is only meaningful beside the batch it indexes; across batches an event is its
/// [`Position`].
///
/// ```
/// use feature_host::event::EventIdx;
///
/// let events = ["a", "b"];
/// assert_eq!(events[EventIdx::new(1).index()], "b");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventIdx(usize);

impl EventIdx {
    pub const fn new(index: usize) -> EventIdx {
        EventIdx(index)
    }

    pub const fn index(self) -> usize {
        self.0
    }
}

impl std::fmt::Display for EventIdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Kafka topic, or the local source's topic name.
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// Event time, ms since the Unix epoch.
    pub timestamp_ms: i64,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload: Vec<u8>,
    /// The position its writes carry for exactly-once effect, if it has a durable one. Usually
    /// `(topic, partition, offset)`; a file line's is `(file:<path>@<digest>, 0, line)`, a
    /// retried event's is its place in the retry topic. HTTP pushes have none.
    pub position: Option<Position>,
}

impl Event {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}
