//! Feature values, write operations, and the rules that merge them into stored state.
//!
//! The merge ([`state::EntityState::apply`]) is pure and shared by every store backend: a
//! backend only loads a versioned state and compare-and-swaps the merged one, so event-time
//! ordering and exactly-once effect are decided in one place.

pub mod check;
pub mod state;
pub mod value;

pub use check::{WriteCheckError, check_write};
pub use state::{
    ApplyOutcome, Cell, EXPIRING_SOURCE_PREFIX, EntityState, Mutation, Position, Versioned,
    Watermark,
};
pub use value::{Op, Value, Write};
