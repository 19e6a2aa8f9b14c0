/// A typed feature value.
///
/// Build one with `.into()` from the matching Rust type:
///
/// ```
/// use feature_host_plugin_sdk::Value;
/// assert_eq!(Value::from(true), Value::Bool(true));
/// assert_eq!(Value::from(7_i64), Value::Int(7));
/// assert_eq!(Value::from(0.5), Value::Float(0.5));
/// assert_eq!(Value::from("red"), Value::Text("red".into()));
/// assert_eq!(Value::from(vec![0.1_f32, 0.2]), Value::Vector(vec![0.1, 0.2]));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// A 64-bit signed integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A UTF-8 string.
    Text(String),
    /// Raw bytes.
    Bytes(Vec<u8>),
    /// A list of integers.
    IntList(Vec<i64>),
    /// A list of floats.
    FloatList(Vec<f64>),
    /// A list of strings.
    TextList(Vec<String>),
    /// A dense float vector, e.g. an embedding.
    Vector(Vec<f32>),
}

macro_rules! from_impls {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {
        $(impl From<$t> for Value {
            fn from($v: $t) -> Self { $e }
        })*
    };
}

from_impls! {
    bool => |v| Value::Bool(v),
    i64 => |v| Value::Int(v),
    i32 => |v| Value::Int(v.into()),
    u32 => |v| Value::Int(v.into()),
    f64 => |v| Value::Float(v),
    f32 => |v| Value::Float(v.into()),
    String => |v| Value::Text(v),
    &str => |v| Value::Text(v.to_owned()),
    Vec<u8> => |v| Value::Bytes(v),
    Vec<i64> => |v| Value::IntList(v),
    Vec<f64> => |v| Value::FloatList(v),
    Vec<String> => |v| Value::TextList(v),
    Vec<f32> => |v| Value::Vector(v),
}

use crate::bindings::feature_host::plugin::types as wit;

impl From<Value> for wit::Value {
    fn from(v: Value) -> Self {
        match v {
            Value::Bool(b) => wit::Value::Boolean(b),
            Value::Int(i) => wit::Value::Int(i),
            Value::Float(f) => wit::Value::Float(f),
            Value::Text(s) => wit::Value::Text(s),
            Value::Bytes(b) => wit::Value::Bytes(b),
            Value::IntList(l) => wit::Value::IntList(l),
            Value::FloatList(l) => wit::Value::FloatList(l),
            Value::TextList(l) => wit::Value::TextList(l),
            Value::Vector(v) => wit::Value::Vector(v),
        }
    }
}
