//! Checking a plugin's write against the FeatureGroup's declared features, before anything
//! reaches a store. A failed check dead-letters the event: it is a plugin or spec bug that a
//! retry cannot fix.

use super::value::{MAX_FLOAT, Op, Value, Write};
use crate::spec::{FeatureGroupSpec, FeatureType};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteCheckError {
    #[error("write to undeclared feature {feature:?} (declare it in the FeatureGroup spec)")]
    UnknownFeature { feature: String },
    #[error("feature {feature:?} is {declared:?}: `{op}` with a {given} value does not fit")]
    TypeMismatch {
        feature: String,
        declared: FeatureType,
        op: &'static str,
        given: &'static str,
    },
    #[error("feature {feature:?} is a vector of dimension {expected}, got {got}")]
    WrongDimension {
        feature: String,
        expected: u32,
        got: usize,
    },
    #[error("empty entity id in write to {feature:?}")]
    EmptyEntity { feature: String },
    #[error("append to {feature:?} with cap 0")]
    ZeroCap { feature: String },
    #[error(
        "feature {feature:?}: the float {value} cannot be stored (floats must be finite and at \
         most {MAX_FLOAT:e} in magnitude, DynamoDB's number range)"
    )]
    UnstorableFloat { feature: String, value: f64 },
    #[error("entity id of {len} bytes in write to {feature:?}; at most {MAX_ENTITY_BYTES}")]
    EntityTooLong { feature: String, len: usize },
    #[error("feature {feature:?}: a value of {bytes} bytes; at most {MAX_VALUE_BYTES}")]
    ValueTooLarge { feature: String, bytes: usize },
    #[error("append to {feature:?} with cap {cap}; at most {MAX_APPEND_CAP}")]
    CapTooLarge { feature: String, cap: u32 },
}

/// The longest entity id: it is the store's key (DynamoDB allows 2,048 bytes of partition
/// key, and the cache key adds the group).
pub const MAX_ENTITY_BYTES: usize = 1024;
/// The largest value one write may carry: a DynamoDB item holds at most 400 KB, so a larger
/// value could never be stored and would fail the entity's every later write.
pub const MAX_VALUE_BYTES: usize = 256 << 10;
/// The largest last-k list: each item is kept with its event time in the entity's item.
pub const MAX_APPEND_CAP: u32 = 10_000;

/// Validate `write` against `spec`, normalizing numbers (an int written to a float feature
/// becomes a float).
pub fn check_write(spec: &FeatureGroupSpec, mut write: Write) -> Result<Write, WriteCheckError> {
    let Some(decl) = spec.feature(&write.feature) else {
        return Err(WriteCheckError::UnknownFeature {
            feature: write.feature,
        });
    };
    if write.entity.is_empty() {
        return Err(WriteCheckError::EmptyEntity {
            feature: write.feature,
        });
    }
    if write.entity.len() > MAX_ENTITY_BYTES {
        return Err(WriteCheckError::EntityTooLong {
            len: write.entity.len(),
            feature: write.feature,
        });
    }
    let bytes = match &write.op {
        Op::Set(v) | Op::Incr(v) | Op::Max(v) | Op::Min(v) | Op::Append { item: v, .. } => {
            v.size_bytes()
        }
        Op::Delete => 0,
    };
    if bytes > MAX_VALUE_BYTES {
        return Err(WriteCheckError::ValueTooLarge {
            feature: write.feature,
            bytes,
        });
    }
    let ty = decl.ty;
    if let Op::Set(v) | Op::Incr(v) | Op::Max(v) | Op::Min(v) | Op::Append { item: v, .. } =
        &mut write.op
        && let Err(value) = v.make_storable()
    {
        return Err(WriteCheckError::UnstorableFloat {
            feature: write.feature,
            value,
        });
    }
    let mismatch = |op: &Op, v: &Value| WriteCheckError::TypeMismatch {
        feature: decl.name.clone(),
        declared: ty,
        op: op.name(),
        given: v.type_name(),
    };
    let op_name = write.op.clone();
    let extreme = matches!(write.op, Op::Max(_) | Op::Min(_));
    match &mut write.op {
        Op::Set(v) => {
            coerce(ty, v).map_err(|v| mismatch(&op_name, &v))?;
            if let (Value::Vector(vec), Some(dim)) = (&*v, decl.dim)
                && vec.len() != dim as usize
            {
                return Err(WriteCheckError::WrongDimension {
                    feature: decl.name.clone(),
                    expected: dim,
                    got: vec.len(),
                });
            }
        }
        Op::Incr(v) | Op::Max(v) | Op::Min(v) => {
            let numeric = matches!(ty, FeatureType::Int | FeatureType::Float);
            if !(numeric || extreme && ty == FeatureType::String) {
                return Err(mismatch(&op_name, v));
            }
            coerce(ty, v).map_err(|v| mismatch(&op_name, &v))?;
        }
        Op::Append { item, cap } => {
            if *cap == 0 {
                return Err(WriteCheckError::ZeroCap {
                    feature: decl.name.clone(),
                });
            }
            if *cap > MAX_APPEND_CAP {
                return Err(WriteCheckError::CapTooLarge {
                    feature: decl.name.clone(),
                    cap: *cap,
                });
            }
            let element = match ty {
                FeatureType::IntList => FeatureType::Int,
                FeatureType::FloatList => FeatureType::Float,
                FeatureType::StringList => FeatureType::String,
                _ => return Err(mismatch(&op_name, item)),
            };
            coerce(element, item).map_err(|v| mismatch(&op_name, &v))?;
        }
        Op::Delete => {}
    }
    Ok(write)
}

/// Make `v` fit `ty` (int → float widening only); on failure return the offending value.
fn coerce(ty: FeatureType, v: &mut Value) -> Result<(), Value> {
    let ok = match (ty, &*v) {
        (FeatureType::Float, Value::Int(i)) => {
            *v = Value::Float(*i as f64);
            true
        }
        (FeatureType::FloatList, Value::IntList(l)) => {
            *v = Value::FloatList(l.iter().map(|i| *i as f64).collect());
            true
        }
        (FeatureType::Bool, Value::Bool(_))
        | (FeatureType::Int, Value::Int(_))
        | (FeatureType::Float, Value::Float(_))
        | (FeatureType::String, Value::String(_))
        | (FeatureType::Bytes, Value::Bytes(_))
        | (FeatureType::IntList, Value::IntList(_))
        | (FeatureType::FloatList, Value::FloatList(_))
        | (FeatureType::StringList, Value::StringList(_))
        | (FeatureType::Vector, Value::Vector(_)) => true,
        _ => false,
    };
    if ok { Ok(()) } else { Err(v.clone()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{FeatureSpec, PluginSpec};

    fn spec() -> FeatureGroupSpec {
        let f = |name: &str, ty, dim| FeatureSpec {
            name: name.into(),
            ty,
            dim,
            description: None,
        };
        FeatureGroupSpec {
            entity: "user".into(),
            description: None,
            features: vec![
                f("clicks", FeatureType::Int, None),
                f("spend", FeatureType::Float, None),
                f("last", FeatureType::StringList, None),
                f("emb", FeatureType::Vector, Some(3)),
                f("country", FeatureType::String, None),
            ],
            plugin: PluginSpec {
                wasm: "x.wasm".into(),
                config: None,
                limits: Default::default(),
                golden: None,
                sha256: None,
            },
            sources: vec![],
            store: Default::default(),
            cache: Default::default(),
            ordering: Default::default(),
            retry: Default::default(),
        }
    }

    fn w(feature: &str, op: Op) -> Write {
        Write {
            entity: "u1".into(),
            feature: feature.into(),
            op,
            event_time_ms: 1,
        }
    }

    #[test]
    fn accepts_and_widens() {
        let out = check_write(&spec(), w("spend", Op::Incr(Value::Int(2)))).unwrap();
        assert_eq!(out.op, Op::Incr(Value::Float(2.0)));
        check_write(
            &spec(),
            w(
                "last",
                Op::Append {
                    item: Value::String("i".into()),
                    cap: 3,
                },
            ),
        )
        .unwrap();
        check_write(&spec(), w("country", Op::Max(Value::String("DE".into())))).unwrap();
        check_write(&spec(), w("clicks", Op::Delete)).unwrap();
    }

    #[test]
    fn rejects_with_reasons() {
        let e = check_write(&spec(), w("nope", Op::Delete)).unwrap_err();
        assert!(e.to_string().contains("undeclared feature \"nope\""));
        let e = check_write(&spec(), w("clicks", Op::Set(Value::String("x".into())))).unwrap_err();
        assert!(matches!(e, WriteCheckError::TypeMismatch { .. }), "{e}");
        let e = check_write(&spec(), w("country", Op::Incr(Value::Int(1)))).unwrap_err();
        assert!(matches!(e, WriteCheckError::TypeMismatch { .. }));
        let e = check_write(&spec(), w("emb", Op::Set(Value::Vector(vec![1.0])))).unwrap_err();
        assert_eq!(
            e,
            WriteCheckError::WrongDimension {
                feature: "emb".into(),
                expected: 3,
                got: 1
            }
        );
        let e = check_write(
            &spec(),
            w(
                "last",
                Op::Append {
                    item: Value::Int(1),
                    cap: 3,
                },
            ),
        )
        .unwrap_err();
        assert!(matches!(e, WriteCheckError::TypeMismatch { .. }));
        let e = check_write(
            &spec(),
            w(
                "last",
                Op::Append {
                    item: Value::String("a".into()),
                    cap: 0,
                },
            ),
        )
        .unwrap_err();
        assert!(matches!(e, WriteCheckError::ZeroCap { .. }));
        let e = check_write(&spec(), w("spend", Op::Set(Value::Float(f64::NAN)))).unwrap_err();
        assert!(matches!(e, WriteCheckError::UnstorableFloat { .. }));
        let mut empty = w("clicks", Op::Delete);
        empty.entity.clear();
        assert!(matches!(
            check_write(&spec(), empty),
            Err(WriteCheckError::EmptyEntity { .. })
        ));
    }

    /// DynamoDB's numbers span 1e-130 to 9.99e125 in magnitude: a larger float would fail
    /// the entity's every later write, so it is refused; a smaller one is stored as 0, as
    /// it would underflow in any arithmetic.
    #[test]
    fn floats_fit_every_store() {
        for big in [1e126, -1e200, f64::MAX] {
            let e = check_write(&spec(), w("spend", Op::Set(Value::Float(big))));
            assert!(
                e.as_ref().is_err_and(|e| e.to_string().contains("range")),
                "{big}: {e:?}"
            );
        }
        let out = check_write(&spec(), w("spend", Op::Incr(Value::Float(-1e-140)))).unwrap();
        assert_eq!(out.op, Op::Incr(Value::Float(0.0)));
        let out = check_write(&spec(), w("spend", Op::Max(Value::Float(9.9e125)))).unwrap();
        assert_eq!(out.op, Op::Max(Value::Float(9.9e125)));
    }

    /// A hostile plugin cannot make one write larger than any store can hold.
    #[test]
    fn oversized_writes_are_refused() {
        let mut long = w("clicks", Op::Delete);
        long.entity = "u".repeat(MAX_ENTITY_BYTES + 1);
        assert!(matches!(
            check_write(&spec(), long),
            Err(WriteCheckError::EntityTooLong { len: 1025, .. })
        ));
        long = w("clicks", Op::Delete);
        long.entity = "u".repeat(MAX_ENTITY_BYTES);
        assert!(check_write(&spec(), long).is_ok());
        let big = Value::String("x".repeat(MAX_VALUE_BYTES + 1));
        let e = check_write(&spec(), w("country", Op::Set(big))).unwrap_err();
        assert!(matches!(e, WriteCheckError::ValueTooLarge { .. }), "{e}");
        let fits = Value::String("x".repeat(MAX_VALUE_BYTES));
        assert!(check_write(&spec(), w("country", Op::Set(fits))).is_ok());
        let many = Value::StringList(vec!["ab".into(); MAX_VALUE_BYTES / 2]);
        let e = check_write(&spec(), w("last", Op::Set(many))).unwrap_err();
        assert!(matches!(e, WriteCheckError::ValueTooLarge { .. }), "{e}");
        let append = |cap| {
            w(
                "last",
                Op::Append {
                    item: Value::String("a".into()),
                    cap,
                },
            )
        };
        assert!(check_write(&spec(), append(MAX_APPEND_CAP)).is_ok());
        assert_eq!(
            check_write(&spec(), append(u32::MAX)),
            Err(WriteCheckError::CapTooLarge {
                feature: "last".into(),
                cap: u32::MAX
            })
        );
    }
}
