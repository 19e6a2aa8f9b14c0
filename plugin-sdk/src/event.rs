use crate::bindings::feature_host::plugin::types as wit;

/// One Kafka (or local, or batch) header.
///
/// ```
/// use feature_host_plugin_sdk::Header;
/// let h = Header { key: "type".into(), value: b"click".to_vec() };
/// assert_eq!(h.value_str(), Some("click"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Header name.
    pub key: String,
    /// Header value bytes.
    pub value: Vec<u8>,
}

impl Header {
    /// The value as UTF-8, if it is.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Header;
    /// assert_eq!(Header { key: "k".into(), value: vec![0xff] }.value_str(), None);
    /// ```
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

/// One input event and where it came from.
///
/// ```
/// use feature_host_plugin_sdk::Event;
/// let e = Event::for_test(br#"{"user_id":"u1"}"#).with_key("u1").with_header("type", "click");
/// assert_eq!(e.key_str(), Some("u1"));
/// assert_eq!(e.header_str("type"), Some("click"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Kafka topic, or the source URI for local and batch sources.
    pub source: String,
    /// Kafka partition (0 for local and batch sources).
    pub partition: i32,
    /// Offset within the partition (line or row number for local and batch sources).
    pub offset: i64,
    /// Message key, if any.
    pub key: Option<Vec<u8>>,
    /// Event time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Message headers, in order.
    pub headers: Vec<Header>,
    /// Message payload.
    pub payload: Vec<u8>,
}

impl Event {
    /// An event with the given payload and neutral metadata, for tests.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// let e = Event::for_test(b"{}");
    /// assert_eq!(e.source, "test");
    /// ```
    pub fn for_test(payload: &[u8]) -> Self {
        Event {
            source: "test".into(),
            partition: 0,
            offset: 0,
            key: None,
            timestamp_ms: 1_700_000_000_000,
            headers: Vec::new(),
            payload: payload.to_vec(),
        }
    }

    /// This event with a key (builder for tests).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// assert_eq!(Event::for_test(b"").with_key("k").key.as_deref(), Some(&b"k"[..]));
    /// ```
    pub fn with_key(mut self, key: &str) -> Self {
        self.key = Some(key.as_bytes().to_vec());
        self
    }

    /// This event with one more header (builder for tests).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// assert_eq!(Event::for_test(b"").with_header("a", "b").headers.len(), 1);
    /// ```
    pub fn with_header(mut self, key: &str, value: &str) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.as_bytes().to_vec(),
        });
        self
    }

    /// This event with an event time (builder for tests).
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// assert_eq!(Event::for_test(b"").at(5).timestamp_ms, 5);
    /// ```
    pub fn at(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Decode the payload as JSON into `T`; a decode failure is an
    /// [`EventError::invalid`] naming the problem, so `?` dead-letters the event.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// #[derive(serde::Deserialize)]
    /// struct Click { user_id: String }
    /// let c: Click = Event::for_test(br#"{"user_id":"u1"}"#).json().unwrap();
    /// assert_eq!(c.user_id, "u1");
    /// assert!(Event::for_test(b"not json").json::<Click>().is_err());
    /// ```
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, EventError> {
        serde_json::from_slice(&self.payload)
            .map_err(|e| EventError::invalid(format!("payload is not the expected JSON: {e}")))
    }

    /// The key as UTF-8, if present and valid.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// assert_eq!(Event::for_test(b"").key_str(), None);
    /// ```
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The first header named `key`, as UTF-8.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::Event;
    /// assert_eq!(Event::for_test(b"").with_header("t", "view").header_str("t"), Some("view"));
    /// ```
    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key == key)
            .and_then(Header::value_str)
    }
}

impl From<wit::Event> for Event {
    fn from(e: wit::Event) -> Self {
        Event {
            source: e.source,
            partition: e.partition,
            offset: e.offset,
            key: e.key,
            timestamp_ms: e.timestamp_ms,
            headers: e
                .headers
                .into_iter()
                .map(|h| Header {
                    key: h.key,
                    value: h.value,
                })
                .collect(),
            payload: e.payload,
        }
    }
}

/// Why an event could not be turned into writes.
///
/// ```
/// use feature_host_plugin_sdk::EventError;
/// let e = EventError::invalid("price is negative");
/// assert!(matches!(e, EventError::Invalid(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventError {
    /// The event can never succeed: the host dead-letters it at once, with this reason.
    Invalid(String),
    /// A transient problem: the host sends the event to the retry path.
    Retryable(String),
}

impl EventError {
    /// An error that dead-letters the event.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::EventError;
    /// assert_eq!(EventError::invalid("x"), EventError::Invalid("x".into()));
    /// ```
    pub fn invalid(reason: impl Into<String>) -> Self {
        EventError::Invalid(reason.into())
    }

    /// An error that sends the event to the retry path.
    ///
    /// ```
    /// # use feature_host_plugin_sdk::EventError;
    /// assert_eq!(EventError::retryable("x"), EventError::Retryable("x".into()));
    /// ```
    pub fn retryable(reason: impl Into<String>) -> Self {
        EventError::Retryable(reason.into())
    }
}

impl std::fmt::Display for EventError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventError::Invalid(r) => write!(f, "invalid event: {r}"),
            EventError::Retryable(r) => write!(f, "retryable failure: {r}"),
        }
    }
}

impl std::error::Error for EventError {}

impl From<EventError> for wit::EventError {
    fn from(e: EventError) -> Self {
        match e {
            EventError::Invalid(r) => wit::EventError::Invalid(r),
            EventError::Retryable(r) => wit::EventError::Retryable(r),
        }
    }
}
