//! Specs: the YAML documents (`FeatureGroup`, `Ingestion`) that declare what the host does.
//!
//! - [`model`]: the typed documents (also the source of the published JSON Schema);
//! - [`load`]: reading a directory, strict structural checks against the schema, then the
//!   semantic checks across documents — every problem reported, with file and field path;
//! - [`reference`]: the Markdown spec reference, rendered from the schema;
//! - [`scope`]: where batch sources may read (the operator's allow-lists).

pub mod load;
pub mod model;
pub mod reference;
pub mod scope;

pub use load::{
    GroupDef, IngestionDef, SpecError, SpecErrors, SpecSet, json_schema, load_dir, load_dir_in,
    load_dir_tolerant,
};
pub use model::*;
pub use scope::SpecScope;
