//! Where batch job state lives: a small versioned key-value table (DynamoDB, or the embedded
//! redb file without services). Every record is JSON under a `(pk, sk)` key and carries a
//! version; writes are compare-and-swap on it, so two replicas never both create a run, both
//! hold the scheduler lease, or both raise the same alert.
//!
//! Keys (`pk` / `sk`):
//! - `run` / run id: a [`RunRecord`](super::run::RunRecord);
//! - `shard#<run>` / `00007`: a [`ShardRecord`](super::run::ShardRecord) with its checkpoint;
//! - `lease` / `scheduler`: the scheduler lease;
//! - `schedule` / ingestion: the last scheduled tick;
//! - `alert` / `<run>#<kind>`: an alert that was raised (raised once).

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{AttributeValue, KeyType};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::Arc;

/// A job-state call that could not be made (the store is unreachable or refused).
#[derive(Debug, thiserror::Error)]
#[error("job state ({backend}): {message}")]
pub struct JobStoreError {
    pub backend: &'static str,
    pub message: String,
}

/// A stored record and the version its next write must name.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub version: u64,
    pub value: T,
}

/// The raw table: JSON values under `(pk, sk)`, compare-and-swap on a version.
#[async_trait]
pub trait JobTable: Send + Sync {
    fn backend(&self) -> &'static str;
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<(u64, String)>, JobStoreError>;
    /// Write `value` if the stored version is `expected` (0: absent). `Ok(false)` when it
    /// is not (another writer got there first).
    async fn put(
        &self,
        pk: &str,
        sk: &str,
        value: String,
        expected: u64,
    ) -> Result<bool, JobStoreError>;
    /// Every record under `pk`, ordered by `sk`.
    async fn list(&self, pk: &str) -> Result<Vec<(String, u64, String)>, JobStoreError>;
}

/// Typed access to a [`JobTable`].
#[derive(Clone)]
pub struct Jobs {
    table: Arc<dyn JobTable>,
}

impl Jobs {
    pub fn new(table: Arc<dyn JobTable>) -> Jobs {
        Jobs { table }
    }

    pub fn backend(&self) -> &'static str {
        self.table.backend()
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        pk: &str,
        sk: &str,
    ) -> anyhow::Result<Option<Stored<T>>> {
        match self.table.get(pk, sk).await? {
            None => Ok(None),
            Some((version, json)) => Ok(Some(Stored {
                version,
                value: serde_json::from_str(&json).map_err(|e| {
                    anyhow::anyhow!("job state record {pk}/{sk} is not readable: {e}")
                })?,
            })),
        }
    }

    /// Compare-and-swap; `Ok(Some(new version))` on success, `Ok(None)` on a lost race.
    pub async fn put<T: Serialize>(
        &self,
        pk: &str,
        sk: &str,
        value: &T,
        expected: u64,
    ) -> anyhow::Result<Option<u64>> {
        let json = serde_json::to_string(value)?;
        Ok(self
            .table
            .put(pk, sk, json, expected)
            .await?
            .then_some(expected + 1))
    }

    pub async fn list<T: DeserializeOwned>(&self, pk: &str) -> anyhow::Result<Vec<Stored<T>>> {
        self.table
            .list(pk)
            .await?
            .into_iter()
            .map(|(sk, version, json)| {
                Ok(Stored {
                    version,
                    value: serde_json::from_str(&json).map_err(|e| {
                        anyhow::anyhow!("job state record {pk}/{sk} is not readable: {e}")
                    })?,
                })
            })
            .collect()
    }
}

const REDB_JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// Job state in the embedded store's redb file (a table next to the features).
pub struct EmbeddedJobs {
    db: Arc<Database>,
}

impl EmbeddedJobs {
    pub fn new(db: Arc<Database>) -> anyhow::Result<EmbeddedJobs> {
        let tx = db.begin_write()?;
        tx.open_table(REDB_JOBS)?;
        tx.commit()?;
        Ok(EmbeddedJobs { db })
    }
}

fn redb_err(e: impl std::fmt::Display) -> JobStoreError {
    JobStoreError {
        backend: "embedded",
        message: e.to_string(),
    }
}

/// `pk \0 sk`: a prefix scan on `pk \0` lists a partition in `sk` order.
fn redb_key(pk: &str, sk: &str) -> String {
    format!("{pk}\u{0}{sk}")
}

fn redb_value(version: u64, json: &str) -> Vec<u8> {
    let mut v = version.to_be_bytes().to_vec();
    v.extend_from_slice(json.as_bytes());
    v
}

fn redb_decode(bytes: &[u8]) -> Result<(u64, String), JobStoreError> {
    if bytes.len() < 8 {
        return Err(redb_err("corrupt job record"));
    }
    let version = u64::from_be_bytes(bytes[..8].try_into().expect("8 bytes"));
    Ok((version, String::from_utf8_lossy(&bytes[8..]).into_owned()))
}

#[async_trait]
impl JobTable for EmbeddedJobs {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<(u64, String)>, JobStoreError> {
        let (db, key) = (self.db.clone(), redb_key(pk, sk));
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(redb_err)?;
            let t = tx.open_table(REDB_JOBS).map_err(redb_err)?;
            t.get(key.as_str())
                .map_err(redb_err)?
                .map(|v| redb_decode(v.value()))
                .transpose()
        })
        .await
        .map_err(redb_err)?
    }

    async fn put(
        &self,
        pk: &str,
        sk: &str,
        value: String,
        expected: u64,
    ) -> Result<bool, JobStoreError> {
        let (db, key) = (self.db.clone(), redb_key(pk, sk));
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_write().map_err(redb_err)?;
            {
                let mut t = tx.open_table(REDB_JOBS).map_err(redb_err)?;
                let current = match t.get(key.as_str()).map_err(redb_err)? {
                    Some(v) => redb_decode(v.value())?.0,
                    None => 0,
                };
                if current != expected {
                    return Ok(false);
                }
                t.insert(key.as_str(), redb_value(expected + 1, &value).as_slice())
                    .map_err(redb_err)?;
            }
            tx.commit().map_err(redb_err)?;
            Ok(true)
        })
        .await
        .map_err(redb_err)?
    }

    async fn list(&self, pk: &str) -> Result<Vec<(String, u64, String)>, JobStoreError> {
        let (db, prefix) = (self.db.clone(), redb_key(pk, ""));
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(redb_err)?;
            let t = tx.open_table(REDB_JOBS).map_err(redb_err)?;
            let mut out = Vec::new();
            for entry in t.range(prefix.as_str()..).map_err(redb_err)? {
                let (k, v) = entry.map_err(redb_err)?;
                let Some(sk) = k.value().strip_prefix(prefix.as_str()) else {
                    break;
                };
                let (version, json) = redb_decode(v.value())?;
                out.push((sk.to_owned(), version, json));
            }
            Ok(out)
        })
        .await
        .map_err(redb_err)?
    }
}

/// Job state in a DynamoDB table (`pk` hash key, `sk` range key, `v` version, `body` JSON).
pub struct DynamoJobs {
    client: Client,
    table: String,
}

fn ddb_err(e: impl std::fmt::Display) -> JobStoreError {
    JobStoreError {
        backend: "dynamodb",
        message: e.to_string(),
    }
}

impl DynamoJobs {
    pub fn new(client: Client, table: impl Into<String>) -> DynamoJobs {
        DynamoJobs {
            client,
            table: table.into(),
        }
    }

    /// Create the table if it is missing (idempotent).
    pub async fn ensure_table(&self) -> anyhow::Result<()> {
        crate::sink::dynamo::create_table(
            &self.client,
            &self.table,
            &[("pk", KeyType::Hash), ("sk", KeyType::Range)],
        )
        .await
        .map_err(|e| anyhow::anyhow!("job state: {e}"))
    }

    fn decode(
        item: &HashMap<String, AttributeValue>,
    ) -> Result<(String, u64, String), JobStoreError> {
        let s = |k: &str| item.get(k).and_then(|v| v.as_s().ok()).cloned();
        let version = item
            .get("v")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ddb_err("job record without a version"))?;
        Ok((
            s("sk").unwrap_or_default(),
            version,
            s("body").ok_or_else(|| ddb_err("job record without a body"))?,
        ))
    }
}

#[async_trait]
impl JobTable for DynamoJobs {
    fn backend(&self) -> &'static str {
        "dynamodb"
    }

    async fn get(&self, pk: &str, sk: &str) -> Result<Option<(u64, String)>, JobStoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", AttributeValue::S(pk.into()))
            .key("sk", AttributeValue::S(sk.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| ddb_err(aws_sdk_dynamodb::error::DisplayErrorContext(e)))?;
        out.item
            .map(|i| Self::decode(&i).map(|(_, v, b)| (v, b)))
            .transpose()
    }

    async fn put(
        &self,
        pk: &str,
        sk: &str,
        value: String,
        expected: u64,
    ) -> Result<bool, JobStoreError> {
        let req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", AttributeValue::S(pk.into()))
            .item("sk", AttributeValue::S(sk.into()))
            .item("v", AttributeValue::N((expected + 1).to_string()))
            .item("body", AttributeValue::S(value));
        crate::sink::dynamo::conditional_put(req, expected)
            .await
            .map_err(|e| ddb_err(aws_sdk_dynamodb::error::DisplayErrorContext(e)))
    }

    async fn list(&self, pk: &str) -> Result<Vec<(String, u64, String)>, JobStoreError> {
        let mut out = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(pk.into()))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| ddb_err(aws_sdk_dynamodb::error::DisplayErrorContext(e)))?;
            for item in page.items() {
                out.push(Self::decode(item)?);
            }
            start = page.last_evaluated_key;
            if start.is_none() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn embedded() -> (Jobs, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let db = Database::create(dir.path.join("jobs.redb")).unwrap();
        (
            Jobs::new(Arc::new(EmbeddedJobs::new(Arc::new(db)).unwrap())),
            dir,
        )
    }

    /// A throwaway directory (no tempfile crate needed for one use).
    mod tempdir {
        pub struct Dir {
            pub path: std::path::PathBuf,
        }
        impl Dir {
            pub fn new() -> Dir {
                let path = std::env::temp_dir().join(format!(
                    "fh-jobs-{}-{}",
                    std::process::id(),
                    rand::random::<u64>()
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir { path }
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.path);
            }
        }
    }

    #[tokio::test]
    async fn embedded_compare_and_swap_and_list() {
        let (jobs, _dir) = embedded();
        assert_eq!(jobs.put("run", "a", &1u32, 0).await.unwrap(), Some(1));
        assert_eq!(
            jobs.put("run", "a", &2u32, 0).await.unwrap(),
            None,
            "exists"
        );
        assert_eq!(jobs.put("run", "a", &3u32, 1).await.unwrap(), Some(2));
        assert_eq!(jobs.put("run", "a", &4u32, 1).await.unwrap(), None, "stale");
        jobs.put("run", "b", &5u32, 0).await.unwrap();
        jobs.put("runx", "c", &6u32, 0).await.unwrap();
        let got: Stored<u32> = jobs.get("run", "a").await.unwrap().unwrap();
        assert_eq!((got.version, got.value), (2, 3));
        let all: Vec<u32> = jobs
            .list::<u32>("run")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.value)
            .collect();
        assert_eq!(
            all,
            vec![3, 5],
            "another pk with the same prefix is not listed"
        );
    }
}
