//! The host's event: what every source (Kafka, file, HTTP push, batch) produces.

use crate::feature::Position;

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
    /// Whether `(topic, partition, offset)` identifies this event durably, so replays can be
    /// recognized (Kafka, files). HTTP pushes without an explicit offset are not.
    pub replayable: bool,
    /// Namespace of `(partition, offset)` when it is not the topic's own (e.g. a line number
    /// in a file): `file:<path>`.
    pub origin: Option<String>,
}

impl Event {
    /// The position writes carry for exactly-once effect, if the event has a durable one.
    pub fn position(&self) -> Option<Position> {
        self.replayable.then(|| Position {
            source: self.origin.clone().unwrap_or_else(|| self.topic.clone()),
            partition: self.partition,
            offset: self.offset,
        })
    }

    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}
