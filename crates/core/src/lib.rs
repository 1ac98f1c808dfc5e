//! Starcite's domain: validated requests, events, and the deterministic per-group state
//! machine. Everything here is pure (no I/O, no clock, no randomness except where a caller
//! explicitly asks for a generated id) so it can be unit- and property-tested in isolation and
//! replayed identically on every replica.

pub mod command;
pub mod event;
pub mod hash;
pub mod ids;
pub mod state;
pub mod time;
pub mod validate;

pub use command::{AppendCommand, ArchiveAckCommand, ArchiveMark, Command, CreateCommand};
pub use event::{
    first_missing_seq, frame_seq, frame_with_seq, render_event, render_event_body, EventFields,
};
pub use hash::group_of;
pub use ids::SessionId;
pub use state::{
    event_cost, Applied, GroupState, Session, SessionView, SpillChunk, SpillExtent, SpillRun,
};
pub use time::Timestamp;
pub use validate::{AppendRequest, CreateRequest, ValidationError};
