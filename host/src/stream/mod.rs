//! Stream sources: Kafka ([`consumer`]) in production; a JSON-lines file or HTTP push
//! ([`local`]) for the no-services default. Both feed [`crate::pipeline::Pipeline`].
//!
//! Offsets are committed in [`consumer`] (the low watermark from [`offsets`]); ordering
//! inside a partition is [`lanes`]; failed events travel in an [`envelope`] to the retry
//! and dead-letter topics, and [`replay`] brings dead letters back after a fix. Positions
//! name the topic's incarnation ([`topic_ids`]).

pub mod consumer;
pub mod dead_letter;
#[cfg(test)]
mod delivery_model;
pub mod envelope;
pub mod handoff;
pub mod kafka;
pub mod lanes;
pub mod local;
pub mod msk_iam;
pub mod oauth;
pub mod offset_map;
pub mod offsets;
pub mod partition;
pub mod replay;
pub mod topic_ids;
pub mod topics;
pub mod transaction;
