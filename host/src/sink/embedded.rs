//! The embedded store: a redb file, for running with no services. Same semantics as DynamoDB
//! (compare-and-swap on the item version, TTL honoured on read).

use super::{Loaded, SinkError, Store, Target, unix_now};
use crate::feature::Versioned;
use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::Path;
use std::sync::Arc;

const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
const BACKEND: &str = "embedded store";

pub struct EmbeddedStore {
    db: Arc<Database>,
}

fn err(e: impl std::fmt::Display) -> SinkError {
    SinkError::Unavailable {
        backend: BACKEND,
        message: e.to_string(),
    }
}

impl EmbeddedStore {
    /// Open (or create) the store file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<EmbeddedStore> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = Database::create(path).map_err(|e| {
            anyhow::anyhow!(
                "cannot open embedded store {}: {e} (is another feature-host process using it? \
                 query the running host's admin API instead, or set FH_DATA_DIR)",
                path.display()
            )
        })?;
        let tx = db.begin_write()?;
        tx.open_table(ITEMS)?;
        tx.commit()?;
        Ok(EmbeddedStore { db: Arc::new(db) })
    }

    /// The redb database, for other tables in the same file (batch job state).
    pub fn database(&self) -> Arc<Database> {
        self.db.clone()
    }

    fn item_key(table: &str, key: &str) -> String {
        format!("{table}\u{0}{key}")
    }
}

fn decode(key: &str, bytes: &[u8]) -> Result<Versioned, SinkError> {
    Versioned::from_stored_json(bytes).map_err(|why| SinkError::unreadable(BACKEND, key, why))
}

#[async_trait]
impl Store for EmbeddedStore {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    async fn load(&self, target: &Target, keys: &[String]) -> Result<Vec<Loaded>, SinkError> {
        let db = self.db.clone();
        let keys: Vec<(String, String)> = keys
            .iter()
            .map(|k| (Self::item_key(&target.table, k), k.clone()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(err)?;
            let table = tx.open_table(ITEMS).map_err(err)?;
            let now = unix_now();
            keys.iter()
                .map(|(item, k)| {
                    Ok(match table.get(item.as_str()).map_err(err)? {
                        Some(v) => decode(k, v.value()).map(|v| Some(v.unless_expired(now))),
                        None => Ok(None),
                    })
                })
                .collect()
        })
        .await
        .map_err(err)?
    }

    async fn compare_and_swap(
        &self,
        target: &Target,
        key: &str,
        expected: u64,
        next: &Versioned,
    ) -> Result<bool, SinkError> {
        let db = self.db.clone();
        let (item, key) = (Self::item_key(&target.table, key), key.to_owned());
        let bytes = serde_json::to_vec(next).map_err(err)?;
        tokio::task::spawn_blocking(move || {
            // redb has one writer at a time: the version check and the write are atomic.
            let tx = db.begin_write().map_err(err)?;
            let swapped = {
                let mut table = tx.open_table(ITEMS).map_err(err)?;
                let current = match table.get(item.as_str()).map_err(err)? {
                    Some(v) => decode(&key, v.value())?.version,
                    None => 0,
                };
                if current == expected {
                    table.insert(item.as_str(), bytes.as_slice()).map_err(err)?;
                    true
                } else {
                    false
                }
            };
            tx.commit().map_err(err)?;
            Ok(swapped)
        })
        .await
        .map_err(err)?
    }
}
