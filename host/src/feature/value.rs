//! Host-side mirror of the plugin interface's value and operation types.

use serde::{Deserialize, Serialize};

/// The largest float magnitude every store holds: DynamoDB's numbers stop below 1e126, and
/// a feature beyond it would fail its entity's every later write. (The f64 nearest 1e126 is
/// just below it, but is written `1e126`, which DynamoDB refuses: this is the one before.)
pub const MAX_FLOAT: f64 = 9.999_999_999_999_998e125;
/// The smallest nonzero float magnitude DynamoDB holds; a smaller one is stored as 0.
pub const MIN_FLOAT: f64 = 1e-130;

/// `f` as every store holds it: a magnitude below [`MIN_FLOAT`] becomes 0; `None` when it
/// is NaN, infinite or beyond [`MAX_FLOAT`].
pub fn storable_float(f: f64) -> Option<f64> {
    if f.abs() < MIN_FLOAT {
        Some(0.0)
    } else if f.abs() <= MAX_FLOAT {
        Some(f)
    } else {
        None
    }
}

/// `f` brought into what every store holds, saturating at ±[`MAX_FLOAT`] as integer sums
/// saturate at the ends of `i64` (NaN, which no stored sum can produce, becomes 0).
pub fn saturate_float(f: f64) -> f64 {
    if f.is_nan() {
        0.0
    } else {
        storable_float(f).unwrap_or(MAX_FLOAT.copysign(f))
    }
}

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

    /// Bring the value's floats into what every store holds ([`storable_float`]); on
    /// failure, the first float that no store can hold.
    pub fn make_storable(&mut self) -> Result<(), f64> {
        let fit = |f: &mut f64| storable_float(*f).map(|s| *f = s).ok_or(*f);
        match self {
            Value::Float(f) => fit(f),
            Value::FloatList(l) => l.iter_mut().try_for_each(fit),
            // Stored as raw bytes (DynamoDB) or JSON: any finite f32 fits.
            Value::Vector(v) => match v.iter().find(|f| !f.is_finite()) {
                Some(f) => Err(f64::from(*f)),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Whether every float in the value is finite: what JSON can hold, so what a state
    /// decoded from JSON must hold to be written back unchanged.
    pub fn is_finite(&self) -> bool {
        match self {
            Value::Float(f) => f.is_finite(),
            Value::FloatList(l) => l.iter().all(|f| f.is_finite()),
            Value::Vector(v) => v.iter().all(|f| f.is_finite()),
            _ => true,
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
