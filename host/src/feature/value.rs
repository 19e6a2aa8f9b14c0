//! Host-side mirror of the plugin interface's value and operation types.

use serde::{Deserialize, Serialize};

/// A typed feature value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "v", rename_all = "kebab-case")]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
    IntList(Vec<i64>),
    FloatList(Vec<f64>),
    StringList(Vec<String>),
    Vector(Vec<f32>),
}

impl Value {
    /// Bytes of payload the value holds (a string list counts each item's length plus 8 for
    /// its place in the list).
    pub fn size_bytes(&self) -> usize {
        match self {
            Value::Bool(_) => 1,
            Value::Int(_) | Value::Float(_) => 8,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::IntList(l) => 8 * l.len(),
            Value::FloatList(l) => 8 * l.len(),
            Value::StringList(l) => l.iter().map(|s| s.len() + 8).sum(),
            Value::Vector(v) => 4 * v.len(),
        }
    }

    /// Plain JSON for humans and serving clients (bytes as hex).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Bool(b) => json!(b),
            Value::Int(i) => json!(i),
            Value::Float(f) => json!(f),
            Value::String(s) => json!(s),
            Value::Bytes(b) => json!(hex::encode(b)),
            Value::IntList(l) => json!(l),
            Value::FloatList(l) => json!(l),
            Value::StringList(l) => json!(l),
            Value::Vector(v) => json!(v),
        }
    }

    /// Short type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::String(_) => "string",
            Value::Bytes(_) => "bytes",
            Value::IntList(_) => "int-list",
            Value::FloatList(_) => "float-list",
            Value::StringList(_) => "string-list",
            Value::Vector(_) => "vector",
        }
    }
}

/// An operation on one feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    Set(Value),
    Incr(Value),
    Max(Value),
    Min(Value),
    /// Insert into a last-k list (newest first, at most `cap` items).
    Append {
        item: Value,
        cap: u32,
    },
    Delete,
}

impl Op {
    pub fn name(&self) -> &'static str {
        match self {
            Op::Set(_) => "set",
            Op::Incr(_) => "incr",
            Op::Max(_) => "max",
            Op::Min(_) => "min",
            Op::Append { .. } => "append",
            Op::Delete => "delete",
        }
    }
}

/// One feature write produced by a plugin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Write {
    pub entity: String,
    pub feature: String,
    pub op: Op,
    pub event_time_ms: i64,
}
