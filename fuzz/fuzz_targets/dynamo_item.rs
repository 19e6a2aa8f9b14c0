//! A stored DynamoDB item on any shape: items are written by every host (and any other
//! writer the table's policy allows). Decoding fails with a reason or gives a state that
//! encodes and decodes to itself.
#![no_main]

use arbitrary::Arbitrary;
use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use feature_host::sink::dynamo::{decode_item, encode_item};
use feature_host::spec::FeatureType;
use libfuzzer_sys::fuzz_target;
use std::collections::{BTreeMap, HashMap};

#[derive(Arbitrary, Debug)]
enum Attr {
    S(String),
    N(String),
    Num(i64),
    B(Vec<u8>),
    Bool(bool),
    Null,
    L(Vec<Attr>),
    M(Vec<(String, Attr)>),
    Ss(Vec<String>),
    Ns(Vec<String>),
}

impl Attr {
    fn value(self, depth: u8) -> AttributeValue {
        if depth > 4 {
            return AttributeValue::Null(true);
        }
        match self {
            Attr::S(s) => AttributeValue::S(s),
            Attr::N(n) => AttributeValue::N(n),
            Attr::Num(n) => AttributeValue::N(n.to_string()),
            Attr::B(b) => AttributeValue::B(Blob::new(b)),
            Attr::Bool(b) => AttributeValue::Bool(b),
            Attr::Null => AttributeValue::Null(true),
            Attr::L(l) => AttributeValue::L(l.into_iter().map(|a| a.value(depth + 1)).collect()),
            Attr::M(m) => AttributeValue::M(
                m.into_iter()
                    .map(|(k, a)| (k, a.value(depth + 1)))
                    .collect(),
            ),
            Attr::Ss(s) => AttributeValue::Ss(s),
            Attr::Ns(n) => AttributeValue::Ns(n),
        }
    }
}

const TYPES: [FeatureType; 9] = [
    FeatureType::Bool,
    FeatureType::Int,
    FeatureType::Float,
    FeatureType::String,
    FeatureType::Bytes,
    FeatureType::IntList,
    FeatureType::FloatList,
    FeatureType::StringList,
    FeatureType::Vector,
];

#[derive(Arbitrary, Debug)]
struct Input {
    attributes: Vec<(String, Attr)>,
    types: Vec<(String, u8)>,
}

fuzz_target!(|input: Input| {
    let item: HashMap<String, AttributeValue> = input
        .attributes
        .into_iter()
        .map(|(k, a)| (k, a.value(0)))
        .collect();
    let types: BTreeMap<String, FeatureType> = input
        .types
        .into_iter()
        .map(|(k, t)| (k, TYPES[usize::from(t) % TYPES.len()]))
        .collect();
    if let Ok(v) = decode_item(&item, &types) {
        let again = decode_item(&encode_item("k", &v), &types).expect("an encoded item decodes");
        assert_eq!(again, v);
    }
});
