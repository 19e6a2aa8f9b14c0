//! DynamoDB, the durable online store.
//!
//! Item layout (one item per (group, entity); see README "Data model"):
//!
//! | attribute        | meaning                                                    |
//! |------------------|------------------------------------------------------------|
//! | `pk` (S)         | `<group>#<entity>` — the partition key                      |
//! | `v` (N)          | item version; every write is `PutItem` conditioned on it    |
//! | `f:<feature>`    | the value (N, S, B, BOOL, L; vectors as packed f32 LE in B) |
//! | `t:<feature>` (N)| event time (ms) that decided the value; alone = tombstone   |
//! | `i:<feature>` (L)| event time of each item of a last-k list                   |
//! | `p:<src>#<part>` | applied offsets from that source partition: `floor[:o1,o2…]` |
//! | `ttl` (N)        | expiry, Unix seconds (DynamoDB TTL attribute)              |

use super::{Loaded, SinkError, Store, Target, unix_now};
use crate::feature::value::saturate_float;
use crate::feature::{EntityState, Value, Versioned, Watermark};
use crate::spec::FeatureType;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, KeysAndAttributes,
    ScalarAttributeType, TableStatus, TimeToLiveSpecification,
};
use futures::stream::{self, StreamExt};
use std::collections::HashMap;
use std::time::Duration;

const BACKEND: &str = "DynamoDB";
/// `BatchGetItem` takes at most 100 keys.
const BATCH_GET_KEYS: usize = 100;
/// `BatchGetItem` requests of one load in flight at once.
const LOAD_CONCURRENCY: usize = 8;
type Item = HashMap<String, AttributeValue>;

pub struct DynamoStore {
    client: Client,
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    what: &str,
    e: SdkError<E>,
) -> SinkError {
    let message = match &e {
        SdkError::ServiceError(s) => {
            let code = s.err().code().unwrap_or("unknown");
            let msg = format!("{what}: {code}: {}", s.err().message().unwrap_or(""));
            if code.contains("Validation") || code == "ResourceNotFoundException" {
                return SinkError::Rejected {
                    backend: BACKEND,
                    message: msg,
                };
            }
            msg
        }
        other => format!(
            "{what}: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(other)
        ),
    };
    SinkError::Unavailable {
        backend: BACKEND,
        message,
    }
}

/// Create a pay-per-request table keyed by string attributes `keys` (hash first) unless it
/// exists, and wait until it is ACTIVE. Shared by the feature tables and the job-state table.
pub async fn create_table(
    client: &Client,
    table: &str,
    keys: &[(&str, KeyType)],
) -> Result<(), String> {
    let mut request = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest);
    for (name, kind) in keys {
        request = request
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name(*name)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .expect("complete builder"),
            )
            .key_schema(
                KeySchemaElement::builder()
                    .attribute_name(*name)
                    .key_type(kind.clone())
                    .build()
                    .expect("complete builder"),
            );
    }
    match request.send().await {
        Ok(_) => {}
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception()) => {}
        Err(e) => {
            return Err(format!(
                "cannot create table {table}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(e)
            ));
        }
    }
    match wait_active(client, table).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "table {table} did not become ACTIVE within a minute"
        )),
        Err(e) => Err(format!(
            "describe table {table}: {}",
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        )),
    }
}

/// Wait (up to a minute) until a new table is ACTIVE: DynamoDB takes a while, DynamoDB Local
/// does not.
pub async fn wait_active(
    client: &Client,
    table: &str,
) -> Result<
    bool,
    aws_sdk_dynamodb::error::SdkError<
        aws_sdk_dynamodb::operation::describe_table::DescribeTableError,
    >,
> {
    for _ in 0..240 {
        let d = client.describe_table().table_name(table).send().await?;
        if d.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(false)
}

/// Send a put that succeeds only if the item's version attribute `v` is `expected` (0: the
/// item is absent). `Ok(false)` when the condition failed: another writer got there first.
pub async fn conditional_put(
    request: aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder,
    expected: u64,
) -> Result<bool, SdkError<aws_sdk_dynamodb::operation::put_item::PutItemError>> {
    let request = if expected == 0 {
        request.condition_expression("attribute_not_exists(pk)")
    } else {
        request
            .condition_expression("#v = :v")
            .expression_attribute_names("#v", "v")
            .expression_attribute_values(":v", AttributeValue::N(expected.to_string()))
    };
    match request.send().await {
        Ok(_) => Ok(true),
        Err(e)
            if e.as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
        {
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

impl DynamoStore {
    /// A client from the AWS default chain (env, profile, IRSA web identity, instance role);
    /// `endpoint` overrides the service URL (DynamoDB Local).
    pub async fn connect(endpoint: Option<&str>) -> DynamoStore {
        let shared = crate::app::aws_config().await;
        // Bounded waits: a store that stops answering (a paused process, a black-holed
        // connection) fails the attempt, and the write goes the retry way, instead of holding
        // the batch forever.
        let mut config = aws_sdk_dynamodb::config::Builder::from(&shared).timeout_config(
            aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(2))
                .operation_attempt_timeout(Duration::from_secs(5))
                .operation_timeout(Duration::from_secs(15))
                .build(),
        );
        if let Some(url) = endpoint {
            config = config.endpoint_url(url);
        }
        DynamoStore {
            client: Client::from_conf(config.build()),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// One `BatchGetItem` of up to 100 keys, repeated for unprocessed keys (throttling)
    /// with a growing backoff.
    async fn batch_get(&self, table: &str, keys: &[String]) -> Result<Vec<Item>, SinkError> {
        let mut request = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(
                    keys.iter()
                        .map(|k| HashMap::from([("pk".to_string(), AttributeValue::S(k.clone()))]))
                        .collect(),
                ))
                .consistent_read(true)
                .build()
                .map_err(|e| SinkError::Rejected {
                    backend: BACKEND,
                    message: e.to_string(),
                })?,
        );
        let mut items = Vec::with_capacity(keys.len());
        let mut backoff = Duration::from_millis(10);
        while let Some(req) = request.take() {
            let out = self
                .client
                .batch_get_item()
                .request_items(table, req)
                .send()
                .await
                .map_err(|e| classify(&format!("batch get from {table}"), e))?;
            items.extend(
                out.responses
                    .unwrap_or_default()
                    .remove(table)
                    .unwrap_or_default(),
            );
            request = out
                .unprocessed_keys
                .unwrap_or_default()
                .remove(table)
                .filter(|k| !k.keys().is_empty());
            if request.is_some() {
                tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.0))).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        Ok(items)
    }
}

#[async_trait]
impl Store for DynamoStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn ensure_table(&self, table: &str) -> Result<(), SinkError> {
        create_table(&self.client, table, &[("pk", KeyType::Hash)])
            .await
            .map_err(|message| SinkError::Unavailable {
                backend: BACKEND,
                message,
            })?;
        let ttl = self
            .client
            .update_time_to_live()
            .table_name(table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name("ttl")
                    .build()
                    .expect("complete builder"),
            )
            .send()
            .await;
        match ttl {
            Ok(_) => Ok(()),
            // Already enabled: fine.
            Err(e)
                if e.as_service_error()
                    .and_then(|s| s.message())
                    .is_some_and(|m| m.contains("already enabled")) =>
            {
                Ok(())
            }
            Err(e) => Err(classify(&format!("enable TTL on {table}"), e)),
        }
    }

    async fn load(&self, target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        // Futures collected first: a closure in the stream would not be `Send` for every
        // lifetime, which `async_trait` needs.
        let requests: Vec<_> = keys
            .chunks(BATCH_GET_KEYS)
            .map(|chunk| self.batch_get(&target.table, chunk))
            .collect();
        let chunks: Vec<Result<Vec<Item>, SinkError>> = stream::iter(requests)
            .buffer_unordered(LOAD_CONCURRENCY)
            .collect()
            .await;
        let mut found: HashMap<String, Item> = HashMap::with_capacity(keys.len());
        for chunk in chunks {
            for item in chunk? {
                if let Some(AttributeValue::S(pk)) = item.get("pk") {
                    found.insert(pk.clone(), item);
                }
            }
        }
        let now = unix_now();
        Ok(keys
            .iter()
            .map(|k| match found.remove(k) {
                Some(item) => decode_item(&item, &target.types)
                    .map(|v| Some(v.unless_expired(now)))
                    .map_err(|why| SinkError::unreadable(BACKEND, k, why)),
                None => Ok(None),
            })
            .collect())
    }

    async fn compare_and_swap(
        &self,
        target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        let request = self
            .client
            .put_item()
            .table_name(&target.table)
            .set_item(Some(encode_item(key, next)));
        match conditional_put(request, expected).await {
            Ok(swapped) => Ok(swapped),
            Err(e) => Err(classify(&format!("conditional put to {}", target.table), e)),
        }
    }
}

/// Encode a state as a DynamoDB item.
pub fn encode_item(key: &str, v: &Versioned) -> Item {
    let mut item = Item::new();
    item.insert("pk".into(), AttributeValue::S(key.into()));
    item.insert("v".into(), AttributeValue::N(v.version.to_string()));
    if let Some(t) = v.state.expires_at {
        item.insert("ttl".into(), AttributeValue::N(t.to_string()));
    }
    for (name, cell) in &v.state.features {
        if let Some(value) = &cell.value {
            item.insert(format!("f:{name}"), encode_value(value));
        }
        item.insert(
            format!("t:{name}"),
            AttributeValue::N(cell.event_time_ms.to_string()),
        );
        if !cell.item_times.is_empty() {
            item.insert(
                format!("i:{name}"),
                AttributeValue::L(
                    cell.item_times
                        .iter()
                        .map(|t| AttributeValue::N(t.to_string()))
                        .collect(),
                ),
            );
        }
    }
    for (pos, wm) in &v.state.positions {
        item.insert(format!("p:{pos}"), AttributeValue::S(wm.encode()));
        // Its own attribute, so hosts that predate it (a rolling deploy, a rollback) read
        // the item; they drop it on their next write, which only lengthens the entry's life.
        if let Some(t) = wm.touched {
            item.insert(format!("pt:{pos}"), AttributeValue::N(t.to_string()));
        }
    }
    item
}

fn encode_value(v: &Value) -> AttributeValue {
    let n = |x: String| AttributeValue::N(x);
    match v {
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Int(i) => n(i.to_string()),
        Value::Float(f) => n(format_float(*f)),
        Value::String(s) => AttributeValue::S(s.clone()),
        Value::Bytes(b) => AttributeValue::B(b.clone().into()),
        Value::IntList(l) => AttributeValue::L(l.iter().map(|i| n(i.to_string())).collect()),
        Value::FloatList(l) => AttributeValue::L(l.iter().map(|f| n(format_float(*f))).collect()),
        Value::StringList(l) => {
            AttributeValue::L(l.iter().map(|s| AttributeValue::S(s.clone())).collect())
        }
        Value::Vector(v) => AttributeValue::B(
            v.iter()
                .flat_map(|f| f.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
    }
}

fn format_float(f: f64) -> String {
    // check_write rejects non-finite floats; DynamoDB numbers cannot hold them.
    if f.is_finite() {
        format!("{f:?}")
    } else {
        "0".into()
    }
}

fn num<T: std::str::FromStr>(a: &AttributeValue, what: &str) -> Result<T, String> {
    a.as_n()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what} is not a number"))
}

/// Decode an item; `types` are the group's declared feature types. The error says what in
/// the item is unreadable; [`SinkError::unreadable`] names the item.
pub fn decode_item(
    item: &Item,
    types: &std::collections::BTreeMap<String, FeatureType>,
) -> Result<Versioned, String> {
    let mut state = EntityState::default();
    let mut version = 0;
    let mut touched = Vec::new();
    for (name, attr) in item {
        if name == "v" {
            version = num(attr, "v")?;
        } else if name == "ttl" {
            state.expires_at = Some(num(attr, "ttl")?);
        } else if let Some(f) = name.strip_prefix("t:") {
            let t = num(attr, name)?;
            state
                .features
                .entry(f.to_owned())
                .or_default()
                .event_time_ms = t;
        } else if let Some(f) = name.strip_prefix("f:") {
            let value = decode_value(attr, types.get(f).copied())
                .ok_or_else(|| format!("feature {f:?} is not a value (floats must be finite)"))?;
            state.features.entry(f.to_owned()).or_default().value = Some(value);
        } else if let Some(f) = name.strip_prefix("i:") {
            let times = attr
                .as_l()
                .map_err(|_| format!("{name} is not a list"))?
                .iter()
                .map(|a| num(a, name))
                .collect::<Result<_, _>>()?;
            state.features.entry(f.to_owned()).or_default().item_times = times;
        } else if let Some(p) = name.strip_prefix("p:") {
            let wm = attr
                .as_s()
                .ok()
                .and_then(|s| Watermark::decode(s))
                .ok_or_else(|| format!("{name} is not a list of applied offsets"))?;
            state.positions.insert(p.to_owned(), wm);
        } else if let Some(p) = name.strip_prefix("pt:") {
            touched.push((p, num(attr, name)?));
        }
    }
    for (p, t) in touched {
        if let Some(wm) = state.positions.get_mut(p) {
            wm.touched = Some(t);
        }
    }
    // This host writes versions from 1 up; an item without one is another writer's, and
    // swapping it as absent would lose every race.
    if version == 0 {
        return Err("the item has no version (`v`)".into());
    }
    Ok(Versioned { version, state })
}

/// A stored value as its declared type, else as what it is: a spec may retype a feature
/// (bytes to vector, one kind of list to another), and the values stored before stay
/// readable until the next write replaces them ([`EntityState::apply`] restarts a value of
/// a type the spec no longer declares). `None` only for what no type reads: a float that is
/// not finite (this host stores none, `check_write`; passing it on would let `max` and `min`
/// misbehave), a set or map, a list of mixed kinds.
fn decode_value(a: &AttributeValue, ty: Option<FeatureType>) -> Option<Value> {
    ty.and_then(|ty| typed_value(a, ty))
        .or_else(|| untyped_value(a))
}

fn int(a: &AttributeValue) -> Option<i64> {
    a.as_n().ok()?.parse::<i64>().ok()
}

/// A stored number as a float. One of DynamoDB's 38 digits may lie beyond what this host
/// writes (`MAX_FLOAT`): it reads as the nearest this host can write back.
fn float(a: &AttributeValue) -> Option<f64> {
    let f = a.as_n().ok()?.parse::<f64>().ok()?;
    f.is_finite().then(|| saturate_float(f))
}

fn strings(l: &[AttributeValue]) -> Option<Vec<String>> {
    l.iter().map(|x| x.as_s().ok().cloned()).collect()
}

fn typed_value(a: &AttributeValue, ty: FeatureType) -> Option<Value> {
    Some(match (a, ty) {
        (AttributeValue::N(_), FeatureType::Float) => Value::Float(float(a)?),
        (AttributeValue::B(b), FeatureType::Vector) => {
            let bytes = b.as_ref();
            // Not a whole number of finite f32s: bytes written before the feature was a
            // vector, read as bytes rather than cut or passed on as NaN.
            if bytes.len() % 4 != 0 {
                return None;
            }
            let v: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if !v.iter().all(|f| f.is_finite()) {
                return None;
            }
            Value::Vector(v)
        }
        (AttributeValue::L(l), FeatureType::StringList) => Value::StringList(strings(l)?),
        (AttributeValue::L(l), FeatureType::FloatList) => {
            Value::FloatList(l.iter().map(float).collect::<Option<_>>()?)
        }
        _ => return None,
    })
}

fn untyped_value(a: &AttributeValue) -> Option<Value> {
    Some(match a {
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::S(s) => Value::String(s.clone()),
        AttributeValue::N(_) => int(a)
            .map(Value::Int)
            .or_else(|| float(a).map(Value::Float))?,
        AttributeValue::B(b) => Value::Bytes(b.clone().into_inner()),
        AttributeValue::L(l) => {
            if let Some(ints) = l.iter().map(int).collect::<Option<Vec<_>>>() {
                Value::IntList(ints)
            } else if let Some(fs) = l.iter().map(float).collect::<Option<Vec<_>>>() {
                Value::FloatList(fs)
            } else {
                Value::StringList(strings(l)?)
            }
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feature::Cell;
    use std::collections::BTreeMap;

    #[test]
    fn a_stored_float_that_is_not_finite_is_an_unreadable_item() {
        // This host never stores NaN or an infinity (check_write refuses them), so reading one
        // means another writer: passing it on would let `max` and `min` misbehave, and
        // writing it back would turn an infinity into "0" without a word.
        let types = BTreeMap::from([
            ("f".to_string(), FeatureType::Float),
            ("l".to_string(), FeatureType::FloatList),
            ("emb".to_string(), FeatureType::Vector),
        ]);
        let nan: Vec<u8> = [0.5f32, f32::NAN]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        for (name, attr) in [
            ("f:f", AttributeValue::N("inf".into())),
            ("f:f", AttributeValue::N("1e400".into())),
            ("f:untyped", AttributeValue::N("NaN".into())),
            (
                "f:l",
                AttributeValue::L(vec![AttributeValue::N("-inf".into())]),
            ),
        ] {
            let item = Item::from([
                ("v".to_string(), AttributeValue::N("1".into())),
                (name.to_string(), attr.clone()),
            ]);
            let got = decode_item(&item, &types);
            assert!(got.is_err(), "{name} = {attr:?} decoded as {got:?}");
        }
        // A vector blob holding NaN, or not a whole number of f32s (its last bytes would
        // be cut), is not a vector: it reads as the bytes it is, never as a vector.
        for blob in [nan, vec![0, 0, 128, 63, 1]] {
            let item = Item::from([
                ("v".to_string(), AttributeValue::N("1".into())),
                ("f:emb".to_string(), AttributeValue::B(blob.clone().into())),
            ]);
            let state = decode_item(&item, &types).unwrap().state;
            assert_eq!(state.features["emb"].value, Some(Value::Bytes(blob)));
        }
    }

    /// A spec may retype a feature (bytes to vector, a list to another kind of list): the
    /// values stored before stay readable as what they are, and the next write replaces them.
    /// Refusing them would fail every later event of the entity.
    #[test]
    fn a_value_stored_before_its_feature_was_retyped_still_reads() {
        let types = BTreeMap::from([
            ("emb".to_string(), FeatureType::Vector),
            ("names".to_string(), FeatureType::StringList),
            ("score".to_string(), FeatureType::Float),
        ]);
        let item = Item::from([
            ("v".to_string(), AttributeValue::N("1".into())),
            ("f:emb".to_string(), AttributeValue::B(vec![1, 2, 3].into())),
            (
                "f:names".to_string(),
                AttributeValue::L(vec![AttributeValue::N("4".into())]),
            ),
            ("f:score".to_string(), AttributeValue::S("high".into())),
        ]);
        let state = decode_item(&item, &types)
            .expect("a retyped feature reads")
            .state;
        let value = |f: &str| state.features[f].value.clone();
        assert_eq!(value("emb"), Some(Value::Bytes(vec![1, 2, 3])));
        assert_eq!(value("names"), Some(Value::IntList(vec![4])));
        assert_eq!(value("score"), Some(Value::String("high".into())));
    }

    /// Another writer's item without a version would be swapped as absent and lose every
    /// race (contended, retried for ever): it is unreadable. A number beyond what this host
    /// writes reads as the largest it does, or every later write of the item is refused.
    #[test]
    fn another_writers_versions_and_numbers() {
        let types = BTreeMap::from([("f".to_string(), FeatureType::Float)]);
        for v in [None, Some("0")] {
            let mut item = Item::from([("f:f".to_string(), AttributeValue::N("1".into()))]);
            if let Some(v) = v {
                item.insert("v".into(), AttributeValue::N(v.into()));
            }
            assert!(decode_item(&item, &types).is_err(), "version {v:?}");
        }
        let item = Item::from([
            ("v".to_string(), AttributeValue::N("3".into())),
            (
                "f:f".to_string(),
                AttributeValue::N("9.99999999999999999e125".into()),
            ),
        ]);
        let v = decode_item(&item, &types).unwrap();
        let stored = &encode_item("k", &v)["f:f"];
        let written: f64 = stored.as_n().unwrap().parse().unwrap();
        assert!(written < 1e126, "written back as {stored:?}");
    }

    #[test]
    fn item_round_trip() {
        let mut state = EntityState::default();
        let cell = |v: Option<Value>, t| Cell {
            value: v,
            event_time_ms: t,
            item_times: vec![],
        };
        state
            .features
            .insert("n".into(), cell(Some(Value::Int(3)), 10));
        state
            .features
            .insert("f".into(), cell(Some(Value::Float(2.0)), 11));
        state.features.insert("gone".into(), cell(None, 12));
        state
            .features
            .insert("emb".into(), cell(Some(Value::Vector(vec![0.5, -1.0])), 13));
        state.features.insert(
            "last".into(),
            Cell {
                value: Some(Value::StringList(vec!["a".into(), "b".into()])),
                event_time_ms: 14,
                item_times: vec![14, 9],
            },
        );
        state.positions.insert(
            "topic#3".into(),
            Watermark {
                floor: 99,
                applied: vec![100, 104],
                touched: Some(1_800_000_000),
            },
        );
        state.expires_at = Some(1_900_000_000);
        let v = Versioned { version: 7, state };
        let types = BTreeMap::from([
            ("f".to_string(), FeatureType::Float),
            ("emb".to_string(), FeatureType::Vector),
            ("last".to_string(), FeatureType::StringList),
        ]);
        let item = encode_item("g#u1", &v);
        assert_eq!(item["pk"], AttributeValue::S("g#u1".into()));
        assert!(!item.contains_key("f:gone") && item.contains_key("t:gone"));
        assert_eq!(item["p:topic#3"], AttributeValue::S("99:100,104".into()));
        assert_eq!(item["pt:topic#3"], AttributeValue::N("1800000000".into()));
        assert_eq!(decode_item(&item, &types).unwrap(), v);
    }
}
