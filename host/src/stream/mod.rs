//! Stream sources: Kafka ([`kafka`]) in production; a JSON-lines file or HTTP push
//! ([`local`]) for the no-services default. Both feed [`crate::pipeline::Pipeline`].

pub mod dead_letter;
pub mod kafka;
pub mod local;
pub mod offsets;
