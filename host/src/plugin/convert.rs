//! Conversions between the host's event and write types and the WIT interface's.

use super::EventFailure;
use super::EventResult;
use super::bindings::feature_host::plugin::types as wit;
use crate::event::Event;
use crate::feature::{Op, Value, Write};

pub(super) fn to_wit_event(e: &Event) -> wit::Event {
    wit::Event {
        source: e.topic.clone(),
        partition: e.partition,
        offset: e.offset,
        key: e.key.clone(),
        timestamp_ms: e.timestamp_ms,
        headers: e
            .headers
            .iter()
            .map(|(k, v)| wit::Header {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        payload: e.payload.clone(),
    }
}

pub(super) fn from_wit_result(r: Result<Vec<wit::Write>, wit::EventError>) -> EventResult {
    match r {
        Ok(writes) => Ok(writes.into_iter().map(from_wit_write).collect()),
        Err(wit::EventError::Invalid(m)) => Err(EventFailure::Invalid(m)),
        Err(wit::EventError::Retryable(m)) => Err(EventFailure::Retryable(m)),
    }
}

fn from_wit_value(v: wit::Value) -> Value {
    match v {
        wit::Value::Boolean(b) => Value::Bool(b),
        wit::Value::Int(i) => Value::Int(i),
        wit::Value::Float(f) => Value::Float(f),
        wit::Value::Text(s) => Value::String(s),
        wit::Value::Bytes(b) => Value::Bytes(b),
        wit::Value::IntList(l) => Value::IntList(l),
        wit::Value::FloatList(l) => Value::FloatList(l),
        wit::Value::TextList(l) => Value::StringList(l),
        wit::Value::Vector(v) => Value::Vector(v),
    }
}

fn from_wit_write(w: wit::Write) -> Write {
    let op = match w.op {
        wit::Op::Set(v) => Op::Set(from_wit_value(v)),
        wit::Op::Incr(v) => Op::Incr(from_wit_value(v)),
        wit::Op::Max(v) => Op::Max(from_wit_value(v)),
        wit::Op::Min(v) => Op::Min(from_wit_value(v)),
        wit::Op::Append(a) => Op::Append {
            item: from_wit_value(a.item),
            cap: a.cap,
        },
        wit::Op::Delete => Op::Delete,
    };
    Write {
        entity: w.entity,
        feature: w.feature,
        op,
        event_time_ms: w.event_time_ms,
    }
}
