//! feature-host: an ingestion host for ML feature platforms.
//!
//! Reading order follows the data:
//! - [`spec`]: FeatureGroup / Ingestion documents, validation, JSON Schema;
//! - [`stream`]: event sources — Kafka (offsets committed in [`stream::consumer`]), local file and
//!   HTTP push — and dead letters;
//! - [`dispatch`]: which groups an event goes to (M:N);
//! - [`plugin`]: the WASM runtime that turns events into feature writes;
//! - [`feature`]: values, operations, and the merge rules (event time, exactly-once);
//! - [`sink`]: DynamoDB / Redis / embedded stores and the cache strategies;
//! - [`pipeline`]: a batch of events through all of the above;
//! - [`batch`]: bulk sources (local, S3; JSON lines, CSV, Parquet), sharded resumable runs on
//!   the local or AWS Batch engine, the cron scheduler and its alerts;
//! - [`admin`], [`metrics`], [`cli`], [`config`], [`app`]: operating it; [`bench`]: measuring it.

pub mod admin;
pub mod admin_client;
pub mod app;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod config;
pub mod dispatch;
pub mod event;
pub mod feature;
pub mod metrics;
pub mod pipeline;
pub mod plugin;
pub mod retry;
pub mod sink;
pub mod spec;
pub mod stream;
pub mod text;
