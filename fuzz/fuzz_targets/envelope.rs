//! The hand-off envelope on any headers: a retry topic's records may be written by anyone its
//! ACL lets through. Unwrapping must fail with a reason or give an envelope that wraps and
//! unwraps to itself (its error cut to the bound); source events lose every `fh-*` header.
#![no_main]

use arbitrary::Arbitrary;
use feature_host::event::Event;
use feature_host::stream::envelope;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    headers: Vec<(String, Vec<u8>)>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    offset: i64,
    timestamp_ms: i64,
}

fuzz_target!(|input: Input| {
    let message = Event {
        topic: "g.retry".into(),
        partition: 0,
        offset: input.offset,
        key: input.key,
        timestamp_ms: input.timestamp_ms,
        headers: input.headers,
        payload: input.payload,
        position: None,
    };
    if let Ok((event, env)) = envelope::unwrap(&message) {
        let again = Event {
            headers: envelope::wrap(&event, &env),
            ..message.clone()
        };
        let (event2, env2) = envelope::unwrap(&again).expect("a wrapped envelope unwraps");
        // A wrapped error is cut to its bound (a record's headers stay small); the rest is kept.
        let expected = envelope::Envelope {
            error: envelope::truncate(&env.error, envelope::MAX_ERROR_BYTES),
            ..env.clone()
        };
        assert_eq!(env2, expected);
        assert_eq!(
            (
                &event2.topic,
                event2.partition,
                event2.offset,
                &event2.payload
            ),
            (&event.topic, event.partition, event.offset, &event.payload)
        );
    }
    let mut headers = message.headers.clone();
    envelope::strip_host_headers(&mut headers);
    assert!(headers.iter().all(|(k, _)| !k.starts_with("fh-")));
});
